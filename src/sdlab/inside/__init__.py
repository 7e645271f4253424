"""Views inside the model, for the lectures' pictures: attention maps, prompt-to-prompt edits, the
denoising trajectory, forward noise, the noise schedule, and the token-embedding and latent explorers,
each made from a real model's own networks and schedule; nothing here copies a model's forward."""
