"""What `submit` checks and resolves before it writes anything: the execution options, the device a run is
for, the model as a run records it (and, in embedded mode, that it can load), the generator's path.

`runs`, `features` and `estimate` share these, so a dry run refuses what the submit would refuse.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import InputError
from difftpt_ops.core.specs import GenerationSpec, ModelSpec

MAX_SHARD_SIZE = 10_000  # a shard's sample ids go into one IN (...) list
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_execution_args(*, limit: int | None, shard_size: int | None, device: str | None = None,
                         seed: int = 0) -> None:
    """Validate the options that are not part of a spec; InputError names the bad one."""
    if limit is not None and limit < 1:
        raise InputError("--limit", limit, "must be >= 1")
    if shard_size is not None and not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise InputError("--shard-size", shard_size, f"must be between 1 and {MAX_SHARD_SIZE}")
    if device is not None and not _DEVICE.match(device):
        raise InputError("--device", device, "must be auto, cpu, mps, cuda or cuda:N")
    if seed < 0:
        raise InputError("--seed", seed, "must be >= 0")


def stream_block(method: Any) -> int:
    """How many consecutive samples the method spec `method` predicts together (an online method that feeds its
    stream in batches, as OGA's reference does; `OnlineMethod.block_size`); 1 for every other method."""
    from difftpt_ops.tta.methods import ONLINE

    registered = _registered(method)
    return registered.block_size(method) if registered is not None and registered.kind == ONLINE else 1


def check_stream_blocks(method: Any, *, limit: int | None, shard_size: int | None,
                        n_samples: int | None = None) -> None:
    """A batch's predictions wait for its last sample, and a shard's rows are written when the shard ends: for a
    method that predicts in batches, a shard may not split one (`--shard-size` a multiple of the batch), nor may
    a `--limit` run, which a later submit continues as the same run (the limit a multiple of it, or at least the
    `n_samples` of the stream, where known)."""
    block = stream_block(method)
    if block == 1:
        return
    why = f"{method.method} predicts its stream in batches of {block} samples (batch_size), which a shard cannot split"
    if shard_size is not None and shard_size % block:
        raise InputError("--shard-size", shard_size, f"must be a multiple of {block}: {why}")
    if limit is not None and limit % block and (n_samples is None or limit < n_samples):
        raise InputError("--limit", limit, f"must be a multiple of {block}: {why}")


def check_model_path(settings: Settings, method: str, model: ModelSpec) -> None:
    """An embedded run loads its model here, so a model that cannot exist is bad input before any row is
    written (workers check their own)."""
    if settings.embedded and method != "noop":
        from difftpt_ops.models.clip import check_clip_source

        check_clip_source(model)


def check_method_files(settings: Settings, method: Any) -> None:
    """A CoOp checkpoint the method spec names (`--set prompt.coop_checkpoint=FILE`) that is not a file is bad
    input before any row is written in embedded mode, which reads it now (workers check their own, as for the
    model); otherwise the run would be made, then fail at its first shard."""
    checkpoint = getattr(getattr(method, "prompt", None), "coop_checkpoint", None)
    if settings.embedded and checkpoint and not Path(checkpoint).expanduser().is_file():
        raise InputError("--set prompt.coop_checkpoint", checkpoint, "no such file")
    check_reward_model(settings, method)


def check_method_classes(method: Any, class_names: Sequence[str]) -> None:
    """A setting the dataset's class count bounds (RLCF's `sample_k`) is bad input at submit, before any row is
    written; otherwise the run would be made, then fail at its first shard (on a worker, after submit said
    "enqueued"). `method` is the spec as the dataset resolves it."""
    registered = _registered(method)
    if registered is None:
        return
    try:
        registered.check_classes(method, len(class_names))
    except InputError as exc:  # the spec's field, as the user sets it
        raise type(exc)(f"--set {exc.argument}", exc.value, exc.problem) from None


def _registered(method: Any) -> Any:
    """The registered method that runs `method` (a spec), or None (noop, the feature runs' view sets)."""
    from difftpt_ops.tta.methods import find_method

    return find_method(getattr(method, "method", ""))


def check_reward_model(settings: Settings, method: Any) -> None:
    """A method that scores with a reward model (RLCF) must name one (`--set reward_model=DIR`); in embedded mode
    the folder must be an open_clip model folder with its weights (read at the first shard, as the CoOp
    checkpoint; workers check their own)."""
    registered = _registered(method)
    if registered is None or not registered.needs_reward_model:
        return
    path = registered.reward_model_path(method)
    if not path:
        raise InputError("--set reward_model", path, f"is required: {registered.name} scores with a second, frozen "
                                                     "CLIP; give its local open_clip model folder (the reference "
                                                     "uses ViT-L/14)")
    if settings.embedded:
        from difftpt_ops.models.clip import check_clip_source

        if not Path(path).expanduser().is_dir():  # a model name too: the reward model is a local folder
            raise InputError("--set reward_model", path, "no such directory (give a local open_clip model folder)")
        try:
            check_clip_source(ModelSpec(name=path, pretrained=None))
        except InputError as exc:
            raise InputError("--set reward_model", path, exc.problem) from None


def resolve_method_paths(method: Any) -> Any:
    """The spec with the reward model folder it names as an absolute path (a relative one would name another
    folder from another directory or machine), as `--model DIR` is stored."""
    path = getattr(method, "reward_model", None)
    if _registered(method) is None or not path or not Path(path).expanduser().is_dir():
        return method
    return dataclasses.replace(method, reward_model=str(Path(path).expanduser().resolve()))


def resolve_run_device(settings: Settings, device: str | None) -> str:
    """The kind of device a run is for, resolved once at submit and stored in its spec.

    The explicit --device, else DIFFTPT_OPS_DEVICE, else auto: CUDA when this machine has it, else the CPU.
    With a broker, submit from a machine with the same kind of device as the workers, or pass --device.

    Raises:
        InputError: --device cuda in embedded mode on a machine without CUDA.
    """
    chosen = device or settings.device
    kind = chosen.split(":", 1)[0]
    if chosen != "auto" and not (kind == "cuda" and settings.embedded):
        return kind
    import torch

    has_cuda = torch.cuda.is_available()
    if chosen == "auto":
        return "cuda" if has_cuda else "cpu"
    if not has_cuda:
        raise InputError("--device", chosen, "CUDA is not available on this machine (no GPU or no driver); "
                                             "use --device cpu")
    return kind


def run_model_spec(model: str, pretrained: str | None, run_device: str) -> ModelSpec:
    """The model a run is for, with the precision its device implies (fp16 frozen weights on CUDA): "auto"
    would otherwise mean different numbers under one fingerprint.

    A local model directory is stored as its absolute path and without a pretrained tag: its own weights and
    config are what load (the tag is ignored), so recording the default "openai" would misstate what ran, and a
    relative path would name another folder from another directory or machine. A local checkpoint file given
    as the tag is stored as its absolute path too.
    """
    if Path(model).expanduser().is_dir():
        model, pretrained = str(Path(model).expanduser().resolve()), None
    elif pretrained and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser().resolve())
    return ModelSpec(name=model, pretrained=pretrained, precision="fp16" if run_device == "cuda" else "fp32")


def generator_path_checked(settings: Settings, spec: GenerationSpec) -> GenerationSpec:
    """A local pipeline directory as its absolute path (a relative one names another folder elsewhere); in
    embedded mode, a local path that is no pipeline is bad input before any row is written (workers check
    their own, as for `submit tune`)."""
    from difftpt_ops.models.diffusion import check_pipeline_source

    if settings.embedded:
        check_pipeline_source(spec.model)
    path = Path(spec.model).expanduser()
    if not path.is_dir():
        return spec
    if spec.revision is not None:  # the loader ignores it, but it would make another generation config
        raise InputError("--revision", spec.revision, f"{path} is a local directory, the revision downloaded into "
                         "it; leave --revision out (or give none)")
    return dataclasses.replace(spec, model=str(path.resolve()))
