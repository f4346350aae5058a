"""Run specs: what a tune, generate or features run is, stored as its row's spec JSON with its fingerprint."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import MethodSpec, method_spec_from, method_spec_from_dict
from difftpt_ops.core.specs import SPEC_SCHEMA_VERSION, GenerationSpec, ModelSpec, fingerprint_of, require


@dataclass(frozen=True)
class TuneRunSpec:
    """A tuning run: method, model, data and seed. Its fingerprint identifies the run."""

    method: MethodSpec
    model: ModelSpec
    dataset_fingerprint: str  # of the dataset version: content, not name
    generation_fingerprint: str | None = None  # DiffTPT only
    seed: int = 0
    # The kind of device (cpu, cuda, mps), resolved at submit: precision "auto" and GPU kernels change
    # results, so a run names where it runs; which GPU of that kind does not.
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "tune",
            "method": self.method.to_dict(),
            "model": dataclasses.asdict(self.model),
            "dataset_fingerprint": self.dataset_fingerprint,
            "generation_fingerprint": self.generation_fingerprint,
            "seed": self.seed,
            "device": self.device,
        }

    def fingerprint(self) -> str:
        return fingerprint_of({"schema": SPEC_SCHEMA_VERSION, **self.to_dict()})

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> TuneRunSpec:
        """Rebuild a tune run spec from `to_dict()` output (a run row's spec JSON); extra keys are ignored.

        Raises:
            InvalidSpecError: not a tune spec, or a method spec that no longer validates.
        """
        _check_kind(payload, "tune", default="tune")
        return cls(method=method_spec_from_dict(payload["method"]), model=ModelSpec(**payload["model"]),
                   dataset_fingerprint=str(payload["dataset_fingerprint"]),
                   generation_fingerprint=payload.get("generation_fingerprint"),
                   seed=int(payload.get("seed", 0)), device=str(payload.get("device", "cpu")))


@dataclass(frozen=True)
class GenerateRunSpec:
    """A generation run: a generator config over a dataset version, on a kind of device.

    Its identity (and fingerprint) is the config, the dataset and the device; the batch size is
    execution only (images are the same for any batch size on one device, up to summation order).
    """

    generation: GenerationSpec
    dataset_fingerprint: str
    device: str = "cpu"
    batch_size: int = 4

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "--batch-size", self.batch_size, "must be >= 1")

    def identity(self) -> dict[str, Any]:
        return {"kind": "generate", "generation": self.generation.to_dict(),
                "dataset_fingerprint": self.dataset_fingerprint, "device": self.device}

    def to_dict(self) -> dict[str, Any]:
        return {**self.identity(), "execution": {"batch_size": self.batch_size}}

    def fingerprint(self) -> str:
        return fingerprint_of(self.identity())

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> GenerateRunSpec:
        """Rebuild from `to_dict()` output (a generate run row's spec JSON).

        Raises:
            InvalidSpecError: not a generate run spec.
        """
        _check_kind(payload, "generate")
        return cls(generation=GenerationSpec(**payload["generation"]),
                   dataset_fingerprint=str(payload["dataset_fingerprint"]), device=str(payload.get("device", "cpu")),
                   batch_size=int((payload.get("execution") or {}).get("batch_size", 4)))


FEATURE_VIEWS = ("tpt", "difftpt")  # `submit features --views`: whose default views to store


@dataclass(frozen=True)
class FeaturesRunSpec:
    """A features run: the image features of one method's default views (`views`: tpt or difftpt), encoded
    by one model over a dataset version (and, for DiffTPT's views, one generation config), on a kind of device.

    Its identity (and fingerprint) is all of it; the method spec of `views` is part of the stored dict, so
    a change to that method's default views makes another run.
    """

    views: str
    model: ModelSpec
    dataset_fingerprint: str
    generation_fingerprint: str | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        require(self.views in FEATURE_VIEWS, "--views", self.views, f"must be one of {', '.join(FEATURE_VIEWS)}")

    @property
    def method(self) -> MethodSpec:
        """The method whose default views the run stores."""
        return method_spec_from(self.views)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "features", "model": dataclasses.asdict(self.model), "views": self.views,
                "method": self.method.to_dict(), "dataset_fingerprint": self.dataset_fingerprint,
                "generation_fingerprint": self.generation_fingerprint, "seed": self.seed, "device": self.device}

    def fingerprint(self) -> str:
        return fingerprint_of(self.to_dict())

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> FeaturesRunSpec:
        """Rebuild from `to_dict()` output (a features run row's spec JSON).

        Raises:
            InvalidSpecError: not a features run spec.
        """
        _check_kind(payload, "features")
        return cls(views=str(payload["views"]), model=ModelSpec(**payload["model"]),
                   dataset_fingerprint=str(payload["dataset_fingerprint"]),
                   generation_fingerprint=payload.get("generation_fingerprint"), seed=int(payload.get("seed", 0)),
                   device=str(payload.get("device", "cpu")))


def _check_kind(payload: dict[str, Any], kind: str, *, default: str | None = None) -> None:
    """A stored run spec is of `kind` (`default`: what a spec without a `kind` key is)."""
    if payload.get("kind", default) != kind:
        raise InvalidSpecError("spec.kind", payload.get("kind"), f"is not a {kind} run spec")


def stream_order(n_samples: int, order_seed: int) -> list[int]:
    """The sample indices of a dataset version in the order an online run sees them (a seeded permutation)."""
    order = list(range(n_samples))
    random.Random(order_seed).shuffle(order)
    return order
