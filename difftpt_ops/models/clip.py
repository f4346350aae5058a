"""Load a frozen CLIP through open_clip, from a hub name, a local directory or a local checkpoint file.

This module is the only place that touches disk or the hub for CLIP and CoOp weights. The returned
model is in eval mode with every parameter frozen; the tuning code never trains the model itself.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftpt_ops.core.errors import InvalidSpecError, NotFoundError, ServiceUnavailableError
from difftpt_ops.core.specs import ModelSpec

LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedClip:
    """A frozen open_clip model with its tokenizer and the facts the tuning code needs."""

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    name: str  # the spec's name: an open_clip model name or a local directory
    device: torch.device
    precision: str  # resolved: fp32, fp16 or bf16 (never "auto")
    dtype: torch.dtype  # dtype of the frozen transformer weights
    embed_dim: int
    context_length: int
    image_size: int
    activation: str = "gelu"  # of the transformer MLPs as built: "quickgelu" or "gelu"


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" means fp32 on CPU and fp16 frozen weights on CUDA; explicit values are kept."""
    if precision != "auto":
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


def load_clip(spec: ModelSpec, device: str | torch.device = "cpu", *, cache_dir: str | None = None) -> LoadedClip:
    """Load the CLIP that `spec` names, frozen and in eval mode, on `device`.

    `spec.name` is an open_clip model name (with `spec.pretrained` a tag such as "openai" or a path to a
    checkpoint file, or None for random weights), an "hf-hub:" id, or a local directory holding
    open_clip_config.json and open_clip_model.safetensors (then `spec.pretrained` is ignored).

    Raises:
        NotFoundError: `spec.name` is neither a known model nor an existing directory, the directory has no
            open_clip_config.json, or `spec.pretrained` is neither a known tag nor an existing file.
        InvalidSpecError: the config cannot be read, the checkpoint does not fit the architecture, or a weights
            file is damaged.
        ServiceUnavailableError: the weights of a hub tag cannot be fetched (offline and not cached).
    """
    import open_clip

    device = torch.device(device)
    precision = resolve_precision(spec.precision, device)
    model_name, pretrained = _open_clip_source(spec)
    quick_gelu = wants_quick_gelu(spec, model_name, pretrained)
    # OpenAI's own files are TorchScript archives, which torch.load refuses under weights_only=True; torch.load
    # with weights_only=False hands exactly those to torch.jit.load (no pickle of arbitrary objects), as
    # open_clip's load_openai_model does. Every other checkpoint keeps weights_only=True.
    torchscript = _is_checkpoint_file(model_name, pretrained) and is_openai_checkpoint(Path(str(pretrained)))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive.*")
            warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated.*", category=FutureWarning)
            model = open_clip.create_model(
                model_name, pretrained=pretrained, precision=precision, device=device, cache_dir=cache_dir,
                force_quick_gelu=quick_gelu, weights_only=not torchscript,
            )
    except RuntimeError as exc:
        if unreadable_weights(exc):  # a truncated .pt is a RuntimeError too: bad input, never retried
            raise _damaged(spec, model_name, pretrained, exc) from exc
        text = str(exc).lower()
        # open_clip wraps every download failure (no network, HF_HUB_OFFLINE=1 and not cached) in RuntimeError.
        if "download" in text or "hf hub" in text:
            raise ServiceUnavailableError(
                f"cannot fetch the weights of {spec.name} ({spec.pretrained}): the hub is unreachable and they are "
                f"not cached here; copy open_clip's hub cache here (HF_HOME), pass OpenAI's checkpoint file with "
                f"--pretrained /path/{spec.name}.pt, or pass a local directory with --model DIR; check with "
                f"`difftpt-ops models check --model {spec.name} --pretrained {spec.pretrained}`"
            ) from exc
        if "state_dict" in text:  # a checkpoint of another architecture
            raise InvalidSpecError("--pretrained", pretrained or spec.name,
                                   f"does not fit {spec.name}: {_mismatch_summary(str(exc))}") from exc
        raise
    except ValueError as exc:  # an unreadable open_clip_config.json
        raise InvalidSpecError("--model", spec.name, f"cannot be loaded: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - only damaged weights are translated; the rest is re-raised
        if not unreadable_weights(exc):
            raise
        raise _damaged(spec, model_name, pretrained, exc) from exc
    model.eval()
    model.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        name=spec.name,
        device=device,
        precision=precision,
        dtype=_weight_dtype(model),
        embed_dim=int(model.visual.output_dim),
        context_length=int(getattr(model, "context_length", 77)),
        image_size=_image_size(model),
        activation=activation_of(model),
    )


def _damaged(spec: ModelSpec, model_name: str, pretrained: str | None, exc: BaseException) -> InvalidSpecError:
    """A damaged file is bad input, not a transient failure: say which file, and never retry it."""
    argument, value = ("--model", spec.name) if model_name.startswith(LOCAL_DIR_PREFIX) else \
        ("--pretrained", str(pretrained))
    # torch.load's unpickling error text is advice about weights_only, which does not apply to junk.
    text = str(exc).strip()
    reason = text.splitlines()[0] if text and not isinstance(exc, pickle.UnpicklingError) else type(exc).__name__
    reason = reason.split(". ")[0]  # torch appends sentences of advice to its zip reader's error
    return InvalidSpecError(argument, value, f"its weights cannot be read ({reason}): the file is damaged or "
                                             f"not a checkpoint")


def _mismatch_summary(text: str) -> str:
    """torch's load_state_dict error, one line: counts of missing, unexpected and mis-shaped keys, first of each."""
    lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    missing = next((line for line in lines if line.startswith("Missing key(s)")), "")
    unexpected = next((line for line in lines if line.startswith("Unexpected key(s)")), "")
    shapes = [line for line in lines if line.startswith("size mismatch")]
    parts = []
    for label, line in (("missing", missing), ("unexpected", unexpected)):
        keys = line.split(":", 1)[1].split(", ") if ":" in line else []
        if keys:
            parts.append(f"{len(keys)} {label} keys (first {keys[0].strip().rstrip('.')})")
    if shapes:
        first = shapes[0].removeprefix("size mismatch for ").rstrip(".")
        parts.append(f"{len(shapes)} of another shape (first {first})")
    return "; ".join(parts) if parts else (text.splitlines()[0] if text else "")


def _is_checkpoint_file(model_name: str, pretrained: str | None) -> bool:
    """Whether `pretrained` is a local checkpoint file (not a hub tag) for a plain open_clip model name."""
    import open_clip

    if not pretrained or model_name.startswith((LOCAL_DIR_PREFIX, "hf-hub:")):
        return False
    return not open_clip.get_pretrained_cfg(model_name, pretrained) and Path(pretrained).is_file()


def unreadable_weights(exc: BaseException) -> bool:
    """Whether loading failed because a weights file is damaged (truncated, not a checkpoint at all)."""
    import zipfile

    if isinstance(exc, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)):
        return True
    if type(exc).__name__ == "SafetensorError":  # safetensors' Rust error type, not importable by a stable path
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("PytorchStreamReader" in text or "central directory" in text)


def wants_quick_gelu(spec: ModelSpec, model_name: str, pretrained: str | None) -> bool:
    """Whether to build the model with QuickGELU: the activation its weights were trained with.

    OpenAI's CLIP weights were trained with QuickGELU, but open_clip's plain model names (ViT-B-16, RN50)
    build nn.GELU and only warn when given those weights. Under `activation="auto"` QuickGELU is used for
    every pretrained tag that open_clip marks as QuickGELU (all `openai` tags) and for checkpoint files in
    the TorchScript format OpenAI distributes; "quickgelu" and "gelu" force the choice. A plain state dict
    cannot say how it was trained: name the `-quickgelu` model for OpenAI weights saved that way. A local
    open_clip directory keeps its config's setting unless forced. `-quickgelu` model names are QuickGELU
    whatever this returns.
    """
    import open_clip

    if spec.activation != "auto":
        return spec.activation == "quickgelu"
    if not pretrained or model_name.startswith((LOCAL_DIR_PREFIX, "hf-hub:")):
        return False
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        return bool(tag_cfg.get("quick_gelu", False))
    return is_openai_checkpoint(Path(pretrained))


def is_openai_checkpoint(path: Path) -> bool:
    """A checkpoint file as OpenAI distributes it: a TorchScript archive (ViT-B-16.pt, RN50.pt)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    # torch.jit.save writes code/ and constants.pkl beside the data; torch.save of a state dict does not.
    return any("/code/" in name or name.endswith("/constants.pkl") for name in names)


def activation_of(model: nn.Module) -> str:
    """"quickgelu" when the model's transformer MLPs use QuickGELU, else "gelu"."""
    from open_clip.transformer import QuickGELU

    return "quickgelu" if any(isinstance(module, QuickGELU) for module in model.modules()) else "gelu"


def read_coop_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """Read a CoOp checkpoint (torch.save of {"state_dict": {"ctx": ...}, ...}) from disk, tensors only.

    Raises:
        NotFoundError: no such file.
        InvalidSpecError: the file cannot be read as a torch checkpoint.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise NotFoundError("coop_checkpoint", str(path), "no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise InvalidSpecError("coop_checkpoint", str(path), f"cannot be read as a torch checkpoint: {exc}") from exc
    if not isinstance(state, Mapping):
        raise InvalidSpecError("coop_checkpoint", str(path), "is not a dict checkpoint")
    return state


def check_clip_source(spec: ModelSpec) -> None:
    """Raise NotFoundError when `spec` names no open_clip model, model directory or pretrained tag or file.

    Reads no weights: `submit` calls it before it writes a run, so a mistyped --model leaves nothing behind.
    """
    _open_clip_source(spec)


def _open_clip_source(spec: ModelSpec) -> tuple[str, str | None]:
    """Turn a spec into open_clip's (model_name, pretrained) pair, checking local paths first."""
    import open_clip

    name = spec.name
    if name.startswith(("hf-hub:", LOCAL_DIR_PREFIX)):
        if name.startswith(LOCAL_DIR_PREFIX):
            return _local_dir(name.removeprefix(LOCAL_DIR_PREFIX)), None
        return name, None
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_dir(str(path)), None
    name = name.replace("/", "-")  # OpenAI spells ViT-B/16; open_clip's registry says ViT-B-16
    if name not in open_clip.list_models():
        raise NotFoundError("--model", spec.name, "is neither an open_clip model name nor an existing directory")
    pretrained = spec.pretrained
    if pretrained and not open_clip.get_pretrained_cfg(name, pretrained):
        if not Path(pretrained).expanduser().is_file():
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise NotFoundError("--pretrained", pretrained, f"is neither a known tag ({tags}) nor an existing file")
        pretrained = str(Path(pretrained).expanduser())
    return name, pretrained


def _local_dir(directory: str) -> str:
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise NotFoundError("--model", directory, "no such directory")
    if not (path / CONFIG_FILE).is_file():
        raise NotFoundError("--model", directory, f"has no {CONFIG_FILE}; not an open_clip model directory")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")) and not any(path.glob("*.pth")):
        # open_clip would only warn and return random weights; a directory without weights is a mistake.
        raise NotFoundError("--model", directory, f"has no weights file (expected {WEIGHTS_FILE})")
    return f"{LOCAL_DIR_PREFIX}{path}"


def _weight_dtype(model: nn.Module) -> torch.dtype:
    transformer = getattr(model, "transformer", None)
    if transformer is None:
        transformer = getattr(getattr(model, "text", None), "transformer", None)
    if transformer is not None and hasattr(transformer, "get_cast_dtype"):
        return transformer.get_cast_dtype()
    return next(model.parameters()).dtype


def _image_size(model: nn.Module) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)
