"""Silence the model libraries' own progress bars: our commands and workers report progress themselves.

Bars from diffusers, transformers and huggingface_hub (loading components, writing shards, denoising)
go to stderr, which a Celery worker logs as warnings, one per refresh.
"""

from __future__ import annotations

import os


def silence_library_progress_bars() -> None:
    """Turn off the per-file and per-step bars of diffusers, transformers and huggingface_hub."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by transformers at import, too
    from huggingface_hub.utils import disable_progress_bars  # a subpackage: not an attribute until imported

    disable_progress_bars()
    silence_loading_progress_bars()


def silence_loading_progress_bars() -> None:
    """Turn off the bars diffusers and transformers draw while loading a pipeline ("Loading pipeline
    components...", "Loading weights"): loading is a step of our own commands, whose progress (a bar on a
    terminal, plain lines off one, nothing with --quiet) they report themselves. Download bars stay."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
