"""Specs: reference defaults, validation, fingerprints."""

from __future__ import annotations

import dataclasses as dc

import pytest

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import DiffTPTSpec, TPTSpec, method_spec_from, method_spec_from_dict
from difftpt_ops.core.run_specs import FeaturesRunSpec, GenerateRunSpec, TuneRunSpec
from difftpt_ops.core.specs import GenerationSpec, ModelSpec, fingerprint_of, flatten

pytestmark = pytest.mark.unit


def test_reference_defaults() -> None:
    """Defaults are the reference code's: TPT 64 views, 10%, 1 step; DiffTPT 0.8/0.3, 4 steps."""
    tpt, diff = TPTSpec(), DiffTPTSpec()
    assert (tpt.n_views, tpt.selection_p, tpt.steps, tpt.lr, tpt.weight_decay) == (64, 0.1, 1, 5e-3, 0.01)
    assert (diff.n_conventional, diff.n_generated, diff.selection_cosine, diff.selection_entropy, diff.steps) == (
        64, 63, 0.8, 0.3, 4)
    assert (diff.cosine_on, diff.filter_mode) == ("logits", "chained")
    assert tpt.prompt.ctx_init == "a photo of a" and tpt.prompt.n_ctx == 4
    gen = GenerationSpec()
    assert (gen.guidance, gen.steps, gen.per_sample, gen.size, gen.revision) == (3.0, 50, 63, 512, "v2.0")


def test_overrides_coerce_and_round_trip() -> None:
    spec = method_spec_from("tpt", {"steps": "2", "selection_p": "0.2", "augmix": "true"})
    assert isinstance(spec, TPTSpec) and spec.steps == 2 and spec.selection_p == 0.2 and spec.augmix is True
    assert method_spec_from_dict(spec.to_dict()) == spec


def test_every_spec_round_trips_with_options_at_their_omitted_values() -> None:
    """A field `to_dict` leaves out reads back at its omitted value, not the field's default (TDA's `prompts`
    is None until submit resolves it; a stored "single" must not come back as None and change the dict)."""
    import difftpt_ops.tta.methods  # noqa: F401 - registers every method's spec
    from difftpt_ops.core.method_specs import user_methods

    checked = 0
    for method in user_methods():
        base = method_spec_from(method)
        known = {f.name for f in dc.fields(base)}
        for key, value in base.OMITTED_AT.items():
            if key not in known:
                continue
            spec = dc.replace(base, **{key: value})
            stored = spec.to_dict()
            assert key not in stored and method_spec_from_dict(stored) == spec, (method, key)
            assert method_spec_from_dict(stored).to_dict() == stored
            checked += 1
    assert checked > len(user_methods())  # every spec has `features`, some more


def test_every_method_refuses_more_views_than_one_batch_can_hold() -> None:
    """n_views above MAX_VIEWS (and DMN's memory_size above its bound) is refused at submit; before, TDA with
    n_views=100000000 was accepted and the process was killed for memory with a half-made run behind it."""
    import difftpt_ops.tta.methods  # noqa: F401 - registers every method's spec
    from difftpt_ops.core.method_specs import MAX_VIEWS, user_methods

    with_views = [m for m in user_methods() if "n_views" in {f.name for f in dc.fields(method_spec_from(m))}]
    assert {"tpt", "tda", "dmn-zs", "zero", "mta", "rtpt", "boostadapter"} <= set(with_views)
    for method in with_views:
        method_spec_from(method, {"n_views": str(MAX_VIEWS)})
        with pytest.raises(InvalidSpecError) as info:
            method_spec_from(method, {"n_views": str(MAX_VIEWS + 1)})
        assert info.value.argument == "--set n_views", method
    with pytest.raises(InvalidSpecError, match="memory_size"):
        method_spec_from("dmn-zs", {"memory_size": "1000000000000"})
    for key in ("n_conventional", "n_generated"):  # DiffTPT's views, of two kinds
        with pytest.raises(InvalidSpecError, match=key):
            method_spec_from("difftpt", {key: str(MAX_VIEWS + 1)})


@pytest.mark.parametrize("method, overrides, argument", [
    ("magic", {}, "--method"),
    ("tpt", {"selection_p": "0"}, "--set selection_p"),
    ("tpt", {"selection_p": "1.5"}, "--set selection_p"),
    ("difftpt", {"selection_cosine": "-0.1"}, "--set selection_cosine"),
    ("difftpt", {"cosine_on": "pixels"}, "--set cosine_on"),
    ("tpt", {"no_such_field": "1"}, "--set"),
])
def test_bad_specs_name_the_argument(method: str, overrides: dict[str, str], argument: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        method_spec_from(method, overrides)
    assert info.value.argument == argument


def test_generation_spec_rejects_bad_values() -> None:
    with pytest.raises(InvalidSpecError, match="--per-sample"):
        GenerationSpec(per_sample=0)
    with pytest.raises(InvalidSpecError, match="--scheduler"):
        GenerationSpec(scheduler="euler-magic")


def test_fingerprint_changes_with_results_relevant_fields_only() -> None:
    base = TuneRunSpec(method=TPTSpec(), model=ModelSpec(), dataset_fingerprint="d")
    assert base.fingerprint() == TuneRunSpec(method=TPTSpec(), model=ModelSpec(), dataset_fingerprint="d").fingerprint()
    assert base.fingerprint() != TuneRunSpec(method=TPTSpec(steps=2), model=ModelSpec(),
                                             dataset_fingerprint="d").fingerprint()
    assert base.fingerprint() != TuneRunSpec(method=TPTSpec(), model=ModelSpec(), dataset_fingerprint="d",
                                             seed=1).fingerprint()


def test_none_means_none_for_optional_fields() -> None:
    """`--set prompt.ctx_init=none` asks for a random context; `--set augmix=none` restores the default."""
    spec = method_spec_from("tpt", {"prompt.ctx_init": "none", "augmix": "none"})
    assert spec.prompt.ctx_init is None and spec.augmix is None
    with pytest.raises(InvalidSpecError):
        method_spec_from("tpt", {"steps": "none"})


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_generate_run_spec_round_trips_and_batch_size_is_not_identity() -> None:
    """A generate run's spec is typed: from_dict(to_dict()) is equal; the batch size is execution only."""
    spec = GenerateRunSpec(generation=GenerationSpec(steps=10, per_sample=4, dtype="fp16"), dataset_fingerprint="ab",
                           device="cuda", batch_size=8)
    assert GenerateRunSpec.from_dict(spec.to_dict()) == spec
    other_batch = GenerateRunSpec(generation=spec.generation, dataset_fingerprint="ab", device="cuda", batch_size=2)
    assert other_batch.fingerprint() == spec.fingerprint()
    on_cpu = GenerateRunSpec(generation=spec.generation, dataset_fingerprint="ab", device="cpu", batch_size=8)
    assert on_cpu.fingerprint() != spec.fingerprint()
    with pytest.raises(InvalidSpecError, match="batch-size"):
        GenerateRunSpec(generation=spec.generation, dataset_fingerprint="ab", batch_size=0)
    with pytest.raises(InvalidSpecError, match="spec.kind"):
        GenerateRunSpec.from_dict({"kind": "tune"})


def test_features_run_spec_round_trips_and_keeps_the_stored_layout() -> None:
    """The typed spec writes the dict features runs have always stored (so their fingerprints stay), and reads it."""
    model = ModelSpec(name="ViT-B-16", pretrained="openai", precision="fp32")
    spec = FeaturesRunSpec(views="difftpt", model=model, dataset_fingerprint="d" * 64, generation_fingerprint="g" * 64,
                           seed=3, device="cpu")
    stored = {"kind": "features", "model": dc.asdict(model), "views": "difftpt",
              "method": method_spec_from("difftpt").to_dict(), "dataset_fingerprint": "d" * 64,
              "generation_fingerprint": "g" * 64, "seed": 3, "device": "cpu"}
    assert spec.to_dict() == stored and spec.fingerprint() == fingerprint_of(stored)
    assert FeaturesRunSpec.from_dict(stored) == spec
    with pytest.raises(InvalidSpecError, match="--views"):
        FeaturesRunSpec(views="zero", model=model, dataset_fingerprint="d" * 64)
    with pytest.raises(InvalidSpecError, match="spec.kind"):
        FeaturesRunSpec.from_dict({**stored, "kind": "tune"})
