"""Loading CLIP (open_clip) and the diffusion pipeline (diffusers): the only code that touches weights."""
