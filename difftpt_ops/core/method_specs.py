"""Method specs: one frozen class per method with its reference defaults, and the `--set` parser.

The method registry (difftpt_ops.tta.methods) registers each method's spec class here; the built-in ones
are listed up front so that code importing only core sees them. Fingerprints and the shared specs are in
`specs`; the run specs in `run_specs`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.specs import PromptSpec, require


def _check_ratio(name: str, value: float) -> None:
    require(0.0 < value <= 1.0, name, value, "must be in (0, 1]")


MAX_VIEWS = 1024  # views of one sample are one batch: far above any reference's 64, far below running out of memory


def check_view_count(n_views: int, minimum: int = 1) -> None:
    """A sample's number of views: at least `minimum`, at most MAX_VIEWS (refused at submit, not by the OOM killer)."""
    require(minimum <= n_views <= MAX_VIEWS, "n_views", n_views, f"must be in [{minimum}, {MAX_VIEWS}]")


def check_view_tuning(spec: Any) -> None:
    """The settings TPT-style methods share: the views, the confidence selection and the AdamW steps."""
    check_view_count(spec.n_views)
    _check_ratio("selection_p", spec.selection_p)
    require(spec.steps >= 0, "steps", spec.steps, "must be >= 0")
    require(spec.lr > 0, "lr", spec.lr, "must be > 0")
    require(spec.weight_decay >= 0, "weight_decay", spec.weight_decay, "must be >= 0")


@dataclass(frozen=True)
class MethodSpec:
    """Base of the method specs; `method` names the algorithm."""

    method: ClassVar[str] = ""
    prompt: PromptSpec = field(default_factory=PromptSpec)
    resolution: int = 224
    # "store": read the views' image features that stored sets hold, encode (and store) the others;
    # "recompute": encode every view (same results; for checking the store). Left out of to_dict() at its
    # default, so fingerprints of specs that never set it are unchanged.
    features: str = "store"

    FEATURE_MODES: ClassVar[tuple[str, ...]] = ("store", "recompute")
    # Fields left out of to_dict() at the value given: options added after runs were stored, at the value
    # those runs used, so their fingerprints stay. Subclasses extend it.
    OMITTED_AT: ClassVar[dict[str, Any]] = {"features": "store"}

    def __post_init__(self) -> None:
        require(self.resolution >= 16, "resolution", self.resolution, "must be >= 16")
        require(self.features in self.FEATURE_MODES, "features", self.features,
                 f"must be one of {', '.join(self.FEATURE_MODES)}")

    def all_fields(self) -> dict[str, Any]:
        """Every field with its value, the method's name first (`to_dict` leaves some out at OMITTED_AT)."""
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.all_fields().items()
                if key not in self.OMITTED_AT or value != self.OMITTED_AT[key]}


# Class text features of the methods that take `prompts`: "single" is the spec's prompt ("a photo of a
# {}."); "ensemble" CLIP's 80 ImageNet templates; "tip" Tip-Adapter's 7 of them; a cross-domain dataset's
# format names the one hand-written prompt the TDA and DMN code bases use for that dataset; "cars-dpe" the two
# templates of DPE's Stanford Cars.
DATASET_PROMPT_SETS = ("flower102", "dtd", "pets", "cars", "ucf101", "food101", "aircraft", "eurosat")
PROMPT_SETS = ("single", "ensemble", "tip", *DATASET_PROMPT_SETS, "cars-dpe")

# Class descriptions (CuPL-style: sentences per class name, a JSON file the user supplies) are averaged in with
# the templates. At submit the file's path becomes the key of its stored content, "sha256:" + 64 hex digits,
# so the run's identity is the text itself, not where the file was.
DESCRIPTIONS_KEY = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_descriptions(value: str | None) -> None:
    """None, a stored key, or (before submit resolves it) the path of a JSON file: a non-empty string."""
    if value is not None:
        require(isinstance(value, str) and value.strip() != "", "descriptions", value,
                "must be the path of a JSON file of class descriptions")


def description_key(class_name: str) -> str:
    """The key a class's descriptions are filed under: its name with underscores as spaces (the reference's)."""
    return class_name.replace("_", " ")


def missing_descriptions(by_class: Any, class_names: Any) -> list[str]:
    """The keys of the classes `by_class` (key -> sentences) has no descriptions for, in class order."""
    return [description_key(name) for name in class_names if description_key(name) not in by_class]


def prompt_has_text(spec: Any) -> bool:
    """Whether the spec's class prompts are texts descriptions can be averaged with: a template set, or the
    single prompt with a ctx_init (a random or CoOp context has no text)."""
    if (getattr(spec, "prompts", None) or "single") != "single":
        return True
    return spec.prompt.ctx_init is not None and not spec.prompt.coop_checkpoint


@dataclass(frozen=True)
class ZeroShotSpec(MethodSpec):
    """Zero-shot CLIP: view 0 with the initial prompt, or with a prompt ensemble's class features."""

    method: ClassVar[str] = "zeroshot"
    # single: the prompt above; ensemble: CLIP's 80 ImageNet templates; tip: Tip-Adapter's 7 of them;
    # a dataset's prompt (PROMPT_SETS).
    # Left out of to_dict() at "single", so fingerprints of zero-shot runs from before the option are unchanged.
    prompts: str = "single"
    descriptions: str | None = None  # class descriptions averaged in with the prompts (see DESCRIPTIONS_KEY)

    PROMPT_SETS: ClassVar[tuple[str, ...]] = PROMPT_SETS
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "prompts": "single", "descriptions": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.prompts in self.PROMPT_SETS, "prompts", self.prompts,
                 f"unknown prompt set; choose one of {', '.join(self.PROMPT_SETS)}")
        check_descriptions(self.descriptions)


@dataclass(frozen=True)
class TPTSpec(MethodSpec):
    """TPT (Shu et al. 2022) with the reference defaults."""

    method: ClassVar[str] = "tpt"
    n_views: int = 64  # view 0 (resize + center crop) plus n_views - 1 random crops
    selection_p: float = 0.1  # keep int(n_views * p) lowest-entropy views
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01  # AdamW's default, as the reference uses it
    augmix: bool | None = None  # None: as the reference, on for the cross-domain sets only

    def __post_init__(self) -> None:
        super().__post_init__()
        check_view_tuning(self)


@dataclass(frozen=True)
class DiffTPTSpec(MethodSpec):
    """DiffTPT (Feng et al. 2023): TPT views plus Stable Diffusion variations, cosine then entropy filter."""

    method: ClassVar[str] = "difftpt"
    n_conventional: int = 64  # random-crop views besides the original
    n_generated: int = 63  # generated variations read per sample (fewer if fewer exist)
    selection_cosine: float = 0.8  # keep int(n_candidates * ratio) views most similar to the original
    selection_entropy: float = 0.3  # then keep int(n * ratio) lowest-entropy views of those plus the original
    steps: int = 4
    lr: float = 5e-3
    weight_decay: float = 0.01
    cosine_on: str = "logits"  # the reference code; "features" is the paper's description
    filter_mode: str = "chained"  # the reference code; "parallel" is the paper's separate filters per view kind
    augmix: bool | None = None
    # How the generated images are read. "source" (the reference's generator saved each variation under its
    # source image's extension with Pillow's defaults, and its loader read those files): a variation we store
    # losslessly is re-encoded that way first, JPEG at quality 75 for a JPEG source. "lossless": the pipeline's
    # pixels as stored. Left out of to_dict() at "lossless", which runs stored before the option used.
    generated_format: str = "source"

    GENERATED_FORMATS: ClassVar[tuple[str, ...]] = ("source", "lossless")
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "generated_format": "lossless"}

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.generated_format in self.GENERATED_FORMATS, "generated_format", self.generated_format,
                 f"must be one of {', '.join(self.GENERATED_FORMATS)}")
        for name, count in (("n_conventional", self.n_conventional), ("n_generated", self.n_generated)):
            require(0 <= count <= MAX_VIEWS, name, count, f"must be in [0, {MAX_VIEWS}]")
        _check_ratio("selection_cosine", self.selection_cosine)
        _check_ratio("selection_entropy", self.selection_entropy)
        require(self.steps >= 0, "steps", self.steps, "must be >= 0")
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.cosine_on in {"logits", "features"}, "cosine_on", self.cosine_on,
                 "must be 'logits' or 'features'")
        require(self.filter_mode in {"chained", "parallel"}, "filter_mode", self.filter_mode,
                 "must be 'chained' or 'parallel'")


@dataclass(frozen=True)
class NoopSpec(MethodSpec):
    """Bookkeeping only: predicts the label without model work. For measuring system overhead."""

    method: ClassVar[str] = "noop"


# Spec classes by method name. The method registry (difftpt_ops.tta.methods) registers each method's spec
# class here when its module is imported; the built-in ones are listed up front so that code importing only
# core (tests, spec parsing) sees them. `noop` is bookkeeping, never a registered method.
METHOD_SPECS: dict[str, type[MethodSpec]] = {
    cls.method: cls for cls in (ZeroShotSpec, TPTSpec, DiffTPTSpec, NoopSpec)
}
CORE_METHODS = frozenset(METHOD_SPECS)  # the spec classes core defines itself: none has dataset-dependent defaults
_INTERNAL_METHODS = frozenset({"noop"})


def register_method_spec(cls: type[MethodSpec]) -> None:
    """Make `cls` the spec class of method `cls.method` (called by the method registry)."""
    METHOD_SPECS[cls.method] = cls


def unregister_method_spec(method: str) -> None:
    """Forget a registered spec class (throw-away methods in tests); the built-in ones stay."""
    if method not in CORE_METHODS:
        METHOD_SPECS.pop(method, None)


# The package whose import registers every method. Named here, not imported: core stays free of torch, and
# parsing the built-in specs never loads the methods; a name core does not know yet loads them first.
REGISTRY_MODULE = "difftpt_ops.tta.methods"


def _load_registry() -> None:
    import importlib

    importlib.import_module(REGISTRY_MODULE)


def _spec_class(method: str) -> type[MethodSpec] | None:
    if method not in METHOD_SPECS:
        _load_registry()
    return METHOD_SPECS.get(method)


def resolve_for_dataset(spec: MethodSpec, dataset_format: str) -> MethodSpec:
    """The spec with its method's dataset-dependent defaults filled in (TDA's per-dataset config, C-TPT's
    lambda); unchanged for the built-in methods, which have none and need no registry (no torch import)."""
    if spec.method in CORE_METHODS:
        return spec
    import importlib

    registry = importlib.import_module(REGISTRY_MODULE)
    return registry.resolve_for_dataset(spec, dataset_format)  # type: ignore[no-any-return]


def user_methods() -> tuple[str, ...]:
    """Method names a user may submit, in registration order (every registered method)."""
    _load_registry()
    return tuple(name for name in METHOD_SPECS if name not in _INTERNAL_METHODS)


def __getattr__(name: str) -> Any:
    # USER_METHODS follows the registry: computed on each access, so methods registered later appear.
    if name == "USER_METHODS":
        return user_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _field_type(cls: type, name: str) -> Any:
    """The resolved annotation of dataclass field `name` of `cls` (any spec class, wherever it is defined)."""
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, field_type: Any, key: str) -> Any:
    """Parse a `--set` string by the field's annotation: bool, int, float, str, Literal, or X | None.

    Raises:
        InvalidSpecError: naming `--set <key>`, the value and what the field accepts.
    """
    if not isinstance(value, str):
        return value
    members = typing.get_args(field_type) if typing.get_origin(field_type) in (typing.Union, types.UnionType) else ()
    optional = type(None) in members
    if optional:
        field_type = next(m for m in members if m is not type(None))  # X | None: parse as X
    lowered = value.strip().lower()
    if lowered in {"none", "null"}:
        if optional:
            return None  # optional fields (ctx_init, augmix, coop_checkpoint)
        raise InvalidSpecError(f"--set {key}", value, f"is required; {_accepted(field_type)}")
    parsed = _parse_as(value.strip(), lowered, field_type)
    if parsed is _INVALID:
        none = ", or none" if optional else ""
        raise InvalidSpecError(f"--set {key}", value, f"{_accepted(field_type)}{none}")
    return parsed


_INVALID = object()


def _parse_as(value: str, lowered: str, field_type: Any) -> Any:
    """`value` as `field_type`, or _INVALID."""
    if field_type is bool:
        return True if lowered in _TRUE_WORDS else False if lowered in _FALSE_WORDS else _INVALID
    if field_type is int:
        return int(value) if _INTEGER.fullmatch(value) else _INVALID
    if field_type is float:
        try:
            number = float(value)
        except ValueError:
            return _INVALID
        return number if math.isfinite(number) else _INVALID
    if typing.get_origin(field_type) is typing.Literal:
        return value if value in typing.get_args(field_type) else _INVALID
    return value


def _accepted(field_type: Any) -> str:
    """What a field of this type accepts, for an error message."""
    if field_type is bool:
        return f"must be one of {', '.join(_TRUE_WORDS + _FALSE_WORDS)}"
    if field_type is int:
        return "must be a whole number (e.g. 4)"
    if field_type is float:
        return "must be a finite number (e.g. 0.5)"
    if typing.get_origin(field_type) is typing.Literal:
        return f"must be one of {', '.join(map(str, typing.get_args(field_type)))}"
    return f"must be a {getattr(field_type, '__name__', field_type)}"


def _valid_fields(cls: type) -> str:
    """The `--set` keys a method spec accepts: its own fields, then the prompt's as prompt.X."""
    own = [f.name for f in dataclasses.fields(cls) if f.name != "prompt"]
    return ", ".join(own + [f"prompt.{f.name}" for f in dataclasses.fields(PromptSpec)])


def method_spec_from(method: str, overrides: dict[str, Any] | None = None) -> MethodSpec:
    """Build a method spec with the reference defaults, then apply `overrides` (prompt fields as prompt.X).

    Raises:
        InvalidSpecError: unknown method, unknown field, or a value out of range.
    """
    if _spec_class(method) is None:
        raise InvalidSpecError("--method", method, f"unknown method; choose one of {', '.join(user_methods())}")
    cls = METHOD_SPECS[method]
    defaults = cls()
    top: dict[str, Any] = {}
    prompt: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if key.startswith("prompt."):
            sub = key.removeprefix("prompt.")
            if sub not in {f.name for f in dataclasses.fields(PromptSpec)}:
                raise InvalidSpecError("--set", key, f"unknown prompt field; valid: {_valid_fields(cls)}")
            prompt[sub] = _coerce(value, _field_type(PromptSpec, sub), key)
        elif key in {f.name for f in dataclasses.fields(cls)} and key != "prompt":
            top[key] = _coerce(value, _field_type(cls, key), key)
        else:
            raise InvalidSpecError("--set", key, f"unknown field of the {method} spec; valid: {_valid_fields(cls)}")
    try:
        if prompt:
            if "n_ctx" in prompt and "ctx_init" not in prompt:
                prompt["ctx_init"] = None
            top["prompt"] = dataclasses.replace(defaults.prompt, **prompt)
        return dataclasses.replace(defaults, **top)
    except InvalidSpecError as exc:  # a value out of range: name the option and the value as the user typed them
        typed = _typed_override(exc.argument, overrides or {})
        if typed is None:
            raise
        raise InvalidSpecError(f"--set {typed[0]}", typed[1], exc.problem) from None
    except (TypeError, ValueError) as exc:
        raise InvalidSpecError("--set", overrides, str(exc)) from exc


def _typed_override(field_name: str, overrides: dict[str, Any]) -> tuple[str, Any] | None:
    """The `--set` key and value that gave the spec field `field_name` (a prompt field is set as prompt.X), or
    None when the field was not set (a check about defaults or about two fields together)."""
    for key in (field_name, f"prompt.{field_name}"):
        if key in overrides:
            return key, overrides[key]
    return None


def method_spec_from_dict(payload: dict[str, Any]) -> MethodSpec:
    """Rebuild a method spec from `MethodSpec.to_dict()` output: a field it left out stands at its OMITTED_AT
    value (which need not be the field's default), so the rebuilt spec gives the same dict back."""
    data = dict(payload)
    method = data.pop("method")
    if _spec_class(method) is None:
        raise InvalidSpecError("method", method, f"unknown method; choose one of {', '.join(user_methods())}")
    prompt = PromptSpec(**data.pop("prompt", {}))
    cls = METHOD_SPECS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidSpecError("method", method, f"stored spec has unknown fields {unknown}")
    omitted = {key: value for key, value in cls.OMITTED_AT.items() if key in known and key not in data}
    return cls(prompt=prompt, **omitted, **data)
