"""Views inside the model: where words are read (attention maps), prompt-to-prompt editing, and the
other pictures of issue #23. Each view is a module of its own over the shared pipeline run and the
UNet's attention hooks (models/attention.py)."""
