"""Views inside the model, for the lectures' pictures: attention maps, prompt-to-prompt edits, the
denoising trajectory, forward noise, and the token-embedding and latent explorers (embeddings.py ...).
Each view drives the ordinary model through its public pieces; nothing here copies a model's forward."""
