"""Views inside the model: attention maps, prompt-to-prompt, the denoising trajectory, forward noise,
the noise schedule and the latent space, each made from a real model's own networks and schedule."""
