"""Tiny random-weight models for tests and the offline demo, saved with the libraries' own functions."""

from __future__ import annotations

from pathlib import Path

CLIP_SUBDIR = "clip"
DIFFUSION_SUBDIR = "sd-image-variations"
# The demo's RLCF reward model: another tiny CLIP (joint width 48, 256 px input, so it cannot be mistaken for the
# policy), whose random weights give positive similarities on the demo photos (seed 9), so its rewards are not all 0.
REWARD_CLIP_SUBDIR = "reward-clip"
REWARD_CLIP_SEED, REWARD_CLIP_WIDTH, REWARD_CLIP_SIZE = 9, 48, 256


def make_tiny_reward_clip(directory: Path) -> Path:
    """Write DIR/reward-clip: the demo's RLCF reward model (see REWARD_CLIP_SUBDIR)."""
    from difftpt_ops.models.tiny_clip import make_tiny_clip

    return make_tiny_clip(Path(directory) / REWARD_CLIP_SUBDIR, seed=REWARD_CLIP_SEED, embed_dim=REWARD_CLIP_WIDTH,
                          image_size=REWARD_CLIP_SIZE)


def make_tiny_models(directory: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write DIR/clip (open_clip) and DIR/sd-image-variations (diffusers), each loadable by path."""
    from difftpt_ops.models.tiny_clip import make_tiny_clip
    from difftpt_ops.models.tiny_diffusion import make_tiny_variation_pipeline

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "clip": make_tiny_clip(directory / CLIP_SUBDIR, seed=seed),
        "diffusion": make_tiny_variation_pipeline(directory / DIFFUSION_SUBDIR, seed=seed),
    }
