"""Measuring prompt-following: the automatic `shapes` checker (shapes_check.py)."""
