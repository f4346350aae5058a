"""Frozen experiment specs and their fingerprints: the shared parts.

A spec holds every setting that can change a result. Its fingerprint (sha256 of the canonical JSON)
identifies a run or a generation config: submitting the same spec again attaches to the stored one.
Defaults follow the reference code (azshue/TPT, chunmeifeng/DiffTPT); execution-only settings
(batch size, shard size, which GPU) are not part of a spec because they do not change results; the kind of
device is, because half precision and GPU kernels do.

Here: fingerprints, the model, prompt and generator specs. The method specs (one class per method, the
`--set` parser) are in `method_specs`, the run specs that combine them in `run_specs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from difftpt_ops.core.errors import InvalidSpecError

# 2: the model's activation and the resolved device and precision are part of a run's spec, and a DiffTPT
# run always reads exactly n_generated images per sample.
SPEC_SCHEMA_VERSION = 2

# Prompt template and context initialisation of TPT/DiffTPT (one template for every dataset).
DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_CTX_INIT = "a photo of a"


def canonical_json(payload: Any) -> str:
    """JSON with sorted keys and no spaces: equal payloads give equal text."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint_of(payload: Any) -> str:
    """sha256 hex digest of the canonical JSON of `payload`."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def require(condition: bool, argument: str, value: object, problem: str) -> None:
    """Raise InvalidSpecError(argument, value, problem) unless `condition`: validation for every spec."""
    if not condition:
        raise InvalidSpecError(argument, value, problem)


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP to load. `name` is an open_clip model name or a local directory."""

    name: str = "ViT-B-16"
    pretrained: str | None = "openai"  # open_clip pretrained tag; ignored for a local directory
    precision: str = "auto"  # auto: frozen weights fp16 on GPU, fp32 on CPU; or fp32 / fp16 / bf16
    # auto: QuickGELU for OpenAI weights (the activation they were trained with), else the config's own
    activation: str = "auto"

    ACTIVATIONS: ClassVar[tuple[str, ...]] = ("auto", "quickgelu", "gelu")

    def __post_init__(self) -> None:
        require(bool(self.name), "--model", self.name, "must not be empty")
        require(self.precision in {"auto", "fp32", "fp16", "bf16"}, "precision", self.precision,
                 "must be one of auto, fp32, fp16, bf16")
        require(self.activation in self.ACTIVATIONS, "activation", self.activation,
                 f"must be one of {', '.join(self.ACTIVATIONS)}")


@dataclass(frozen=True)
class PromptSpec:
    """The learnable prompt: a shared context of n_ctx tokens, class token at the end."""

    n_ctx: int = 4
    ctx_init: str | None = DEFAULT_CTX_INIT  # None: random N(0, 0.02^2) context
    template: str = DEFAULT_TEMPLATE
    coop_checkpoint: str | None = None  # path to a CoOp checkpoint whose `ctx` initialises the context

    def __post_init__(self) -> None:
        require(self.n_ctx >= 1, "n_ctx", self.n_ctx, "must be >= 1")
        require("{}" in self.template, "template", self.template, "must contain '{}' for the class name")
        if self.ctx_init is not None:
            words = self.ctx_init.replace("_", " ").split()
            require(len(words) == self.n_ctx, "ctx_init", self.ctx_init,
                     f"has {len(words)} words but n_ctx is {self.n_ctx}")


@dataclass(frozen=True)
class GenerationSpec:
    """Stable Diffusion image variations: everything that changes the generated pixels."""

    model: str = "lambdalabs/sd-image-variations-diffusers"  # hub id or local save_pretrained directory
    revision: str | None = "v2.0"
    scheduler: str = "default"  # the model's own scheduler, or "dpm-solver++"
    steps: int = 50
    guidance: float = 3.0
    per_sample: int = 63
    size: int = 512
    dtype: str = "auto"  # auto: fp16 on GPU, fp32 on CPU
    seed: int = 0

    SCHEDULERS: ClassVar[tuple[str, ...]] = ("default", "dpm-solver++", "ddim")

    def __post_init__(self) -> None:
        require(self.scheduler in self.SCHEDULERS, "--scheduler", self.scheduler,
                 f"unknown scheduler; choose one of {', '.join(self.SCHEDULERS)}")
        require(self.steps >= 1, "--steps", self.steps, "must be >= 1")
        require(self.guidance >= 0, "--guidance", self.guidance, "must be >= 0")
        require(self.per_sample >= 1, "--per-sample", self.per_sample, "must be >= 1")
        require(self.size >= 8 and self.size % 8 == 0, "--size", self.size, "must be a positive multiple of 8")
        require(self.dtype in {"auto", "fp32", "fp16", "bf16"}, "--dtype", self.dtype,
                 "must be one of auto, fp32, fp16, bf16")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        return fingerprint_of({"schema": SPEC_SCHEMA_VERSION, "generation": self.to_dict()})


def flatten(payload: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: for MLflow params and `--set` keys."""
    flat: dict[str, Any] = {}
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
