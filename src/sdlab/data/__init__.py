"""Training data: the procedural `shapes` dataset (shapes.py) and the CLIP BPE vocabulary file."""
