"""Training data: the CLIP BPE vocabulary file (the procedural shapes set is sdlab.shapes.dataset)."""
