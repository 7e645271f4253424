"""Measuring prompt-following: the command line of the shapes evaluations (sdlab.shapes.evaluation, edit_eval)."""
