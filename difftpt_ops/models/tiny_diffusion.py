"""A tiny random-weight image-variation pipeline for tests and the offline demo.

Same components and file layout as `lambdalabs/sd-image-variations-diffusers` (UNet2DConditionModel,
AutoencoderKL, CLIPVisionModelWithProjection, CLIPImageProcessor, an SD-v1 PNDM scheduler), only
very small: the VAE keeps SD's 8x downsampling, so a 64 px image is an 8x8 latent and a call on CPU
takes a fraction of a second. It is written with `save_pretrained`, so loading it goes through the
same `from_pretrained` path as the real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

TINY_SIZE = 64  # output pixels: UNet sample_size 8 x VAE factor 8
_EMBED_DIM = 16  # CLIP projection dim == UNet cross-attention dim, as 768 is for the real model


def make_tiny_variation_pipeline(directory: Path, *, seed: int = 0) -> Path:
    """Build the tiny pipeline with weights drawn from `seed` and save it to `directory`.

    The global torch RNG is left as it was.

    Returns:
        `directory`, loadable with `StableDiffusionImageVariationPipeline.from_pretrained`.
    """
    import torch
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor

    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = StableDiffusionImageVariationPipeline(
            vae=_tiny_vae(),
            image_encoder=_tiny_image_encoder(),
            unet=_tiny_unet(),
            scheduler=_sd_v1_scheduler(),
            safety_checker=None,
            # 224 px in, as the real model's feature extractor; only used for PIL inputs.
            feature_extractor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
            requires_safety_checker=False,
        )
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def _tiny_unet() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_SIZE // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_EMBED_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def _tiny_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    # Four levels like SD's VAE (downsampling by 8), with 8 channels instead of 128..512.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_SIZE,
    )


def _tiny_image_encoder() -> CLIPVisionModelWithProjection:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # image_size 224 like ViT-L/14, so the pipeline takes the reference's 224 px conditioning tensor.
    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        projection_dim=_EMBED_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=224,
        patch_size=32,
    )
    return CLIPVisionModelWithProjection(config)


def _sd_v1_scheduler() -> PNDMScheduler:
    from diffusers import PNDMScheduler

    # Stable Diffusion v1's scheduler configuration, as the real model ships it.
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
