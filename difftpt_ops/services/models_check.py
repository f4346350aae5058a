"""`models check`: load the weights a run would use, offline, and say what was found.

Loading goes through the same loaders the runs use (`models.clip.load_clip`, `models.diffusion.
load_variation_pipeline`) with the hub switched off, so a check that passes here means a run on this
machine will find its weights without network access.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from difftpt_ops.core.errors import InputError, NotFoundError, ServiceUnavailableError
from difftpt_ops.core.specs import ModelSpec
from difftpt_ops.data.images import hash_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HOW_TO_GET_CLIP = ("on a machine with hub access run `python -c \"import open_clip; open_clip.create_model("
                   "'{model}', pretrained='{tag}')\"` and copy ~/.cache/huggingface/hub here (or set HF_HOME), "
                   "or pass OpenAI's checkpoint file: --pretrained /path/{model}.pt")
HOW_TO_GET_GENERATOR = ("download it where the hub is reachable with `hf download "
                        "lambdalabs/sd-image-variations-diffusers --revision v2.0 --local-dir DIR` and pass "
                        "--generator DIR")


@contextmanager
def _offline() -> Iterator[None]:
    """The hub is off for the duration: a check must prove the weights are here, not fetch them."""
    saved = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    # huggingface_hub reads the variable once, at import: an already imported hub is switched off directly.
    constants = sys.modules.get("huggingface_hub.constants")
    hub_offline = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = hub_offline
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _files(paths: list[Path]) -> list[dict[str, Any]]:
    return [{"path": str(p), "bytes": p.stat().st_size, "sha256": hash_file(p)} for p in sorted(set(paths))]


def check_clip(model: str, pretrained: str | None, *, device: str = "cpu") -> dict[str, Any]:
    """Load a CLIP offline and describe it: architecture, activation, precision, parameters, weight files.

    Raises:
        NotFoundError: the weights are not on this machine (the message says how to get them).
        InvalidSpecError: the weights do not fit the architecture.
    """
    from difftpt_ops.models.clip import load_clip

    local_dir = Path(model.removeprefix("local-dir:")).expanduser().is_dir()
    pretrained = None if local_dir else pretrained  # a directory holds its own weights
    missing = NotFoundError("--pretrained", pretrained, "weights are not on this machine and the check does not "
                            "download; " + HOW_TO_GET_CLIP.format(model=model, tag=pretrained))
    with _offline():
        if pretrained and not Path(pretrained).expanduser().is_file() and _hub_tag_missing(model, pretrained):
            raise missing
        try:
            loaded = load_clip(ModelSpec(name=model, pretrained=pretrained), device=device)
        except ServiceUnavailableError as exc:
            raise missing from exc
    clip = loaded.model
    return {
        "kind": "clip",
        "model": model,
        "pretrained": pretrained,
        "architecture": _clip_architecture(clip),
        "activation": getattr(loaded, "activation", None) or _activation(clip),
        "precision": loaded.precision,
        "parameters": sum(p.numel() for p in clip.parameters()),
        "embed_dim": loaded.embed_dim,
        "image_size": loaded.image_size,
        "context_length": loaded.context_length,
        "files": _files(_clip_files(model, pretrained)),
        "source": "local directory" if local_dir else "checkpoint file" if pretrained and Path(
            pretrained).expanduser().is_file() else f"hub cache ({pretrained})" if pretrained else "random weights",
        "random_weights": pretrained is None and not local_dir,
    }


def _clip_architecture(model: Any) -> str:
    visual = type(model.visual).__name__
    layers = getattr(getattr(model.visual, "transformer", None), "layers", None)
    width = getattr(getattr(model.visual, "transformer", None), "width", None)
    return f"{visual} (layers {layers}, width {width})" if layers else visual


def _activation(model: Any) -> str:
    from open_clip.transformer import QuickGELU

    return "quickgelu" if any(isinstance(m, QuickGELU) for m in model.modules()) else "gelu"


def _clip_files(model: str, pretrained: str | None) -> list[Path]:
    """The weight files the load read: a local directory's, a checkpoint file, or the hub cache's copy."""
    directory = Path(model.removeprefix("local-dir:")).expanduser()
    if directory.is_dir():
        return [p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if pretrained and Path(pretrained).expanduser().is_file():
        return [Path(pretrained).expanduser()]
    return _cached_tag_files(model, pretrained) if pretrained else []


def _hub_tag_missing(model: str, tag: str) -> bool:
    """A known hub tag whose weights are not in the local cache (open_clip would log and fail on it)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model.replace("/", "-"), tag) or {}
    return bool(cfg.get("hf_hub")) and not _cached_tag_files(model, tag)


def _cached_tag_files(model: str, tag: str) -> list[Path]:
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model.replace("/", "-"), tag) or {}
    repo = cfg.get("hf_hub", "").rstrip("/")
    if not repo:
        return []
    paths = []
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            paths.append(Path(found))
    return paths


def check_generator(directory: str, *, device: str = "cpu") -> dict[str, Any]:
    """Load the image-variation pipeline from a local folder, offline, and describe it.

    Raises:
        NotFoundError: no such folder, or the pipeline cannot be loaded from it (the message says how to get it).
        InputError: the folder holds no diffusers pipeline.
    """
    from difftpt_ops.models.diffusion import load_variation_pipeline

    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise NotFoundError("--generator", directory, f"no such directory; {HOW_TO_GET_GENERATOR}")
    with _offline():
        try:
            pipe = load_variation_pipeline(str(folder), revision=None, dtype="fp32", device=device)
        except ServiceUnavailableError as exc:
            raise NotFoundError("--generator", directory, f"cannot be loaded offline; {HOW_TO_GET_GENERATOR}"
                                ) from exc
        except InputError as exc:  # the loader names `submit generate`'s --model; here the folder is --generator
            if exc.argument != "--model":
                raise
            raise type(exc)("--generator", directory, exc.problem) from exc
    components = {name: type(module).__name__ for name, module in pipe.components.items() if module is not None}
    modules = [m for m in pipe.components.values() if hasattr(m, "parameters")]
    return {
        "kind": "generator",
        "directory": str(folder),
        "pipeline": type(pipe).__name__,
        "components": components,
        "scheduler": type(pipe.scheduler).__name__,
        "precision": str(pipe.unet.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for m in modules for p in m.parameters()),
        "image_size": int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor),
        "files": _files([p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()]),
    }
