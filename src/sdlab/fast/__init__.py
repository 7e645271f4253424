"""Opt-in fast modes that trade the exact image for speed: modes.py (what `--fast` names, no torch),
deepcache.py (reusing deep UNet features across steps), tome.py (token merging before self-attention).
CFG truncation lives in guidance.CFGDenoiser. Never on by default."""
