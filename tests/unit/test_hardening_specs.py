"""`--set` values mean what users type: parsed by the field's type, or refused with one line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import _coerce, _field_type, method_spec_from

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("word", "expected"), [
    ("true", True), ("yes", True), ("on", True), ("1", True), ("TRUE", True),
    ("false", False), ("no", False), ("off", False), ("0", False), ("No", False),
])
def test_booleans_accept_the_eight_words(word: str, expected: bool) -> None:
    """augmix=no turns AugMix off (it used to store the truthy string "no")."""
    assert method_spec_from("tpt", {"augmix": word}).augmix is expected
    assert method_spec_from("difftpt", {"augmix": word}).augmix is expected


@pytest.mark.parametrize("word", ["maybe", "2", "y", "", "truee"])
def test_other_boolean_words_are_refused_listing_the_valid_ones(word: str) -> None:
    with pytest.raises(InvalidSpecError) as caught:
        method_spec_from("tpt", {"augmix": word})
    assert caught.value.argument == "--set augmix"
    assert "true, yes, on, 1, false, no, off, 0" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("key", "value"), [
    ("steps", "abc"), ("steps", "2.5"), ("n_views", "1e3"), ("prompt.n_ctx", "four"), ("lr", "fast"),
    ("lr", "nan"), ("lr", "inf"), ("n_views", "none"),
])
def test_numbers_that_are_not_numbers_of_the_field_type_are_refused(key: str, value: str) -> None:
    with pytest.raises(InvalidSpecError) as caught:
        method_spec_from("tpt", {key: value})
    assert caught.value.argument == f"--set {key}" and caught.value.value == value
    assert "number" in caught.value.problem


@pytest.mark.parametrize(("method", "key", "value"), [
    ("tpt", "steps", "-1"), ("tpt", "n_views", "0"), ("tpt", "selection_p", "1.5"), ("tpt", "lr", "0"),
    ("difftpt", "selection_cosine", "0"), ("difftpt", "cosine_on", "pixels"), ("tpt", "prompt.n_ctx", "0"),
    ("oga", "tau", "-2"),
])
def test_out_of_range_values_are_refused_by_the_spec_naming_the_field(method: str, key: str, value: str) -> None:
    """As parse errors do: the option as typed (`--set KEY`, a prompt field as prompt.X) and the value as typed
    (not the parsed float)."""
    with pytest.raises(InvalidSpecError) as caught:
        method_spec_from(method, {key: value})
    assert caught.value.argument == f"--set {key}" and caught.value.value == value and "must" in caught.value.problem
    assert str(caught.value).startswith(f"--set {key}={value}: ")


def test_good_values_arrive_typed() -> None:
    spec = method_spec_from("difftpt", {"steps": "2", "lr": "1e-3", "selection_cosine": "0.5", "augmix": "off",
                                        "cosine_on": "features", "prompt.ctx_init": "none"})
    expected = (2, 1e-3, 0.5, False, "features")
    assert (spec.steps, spec.lr, spec.selection_cosine, spec.augmix, spec.cosine_on) == expected
    assert spec.prompt.ctx_init is None and isinstance(spec.steps, int)


@dataclass(frozen=True)
class _AnySpec:
    """A spec class defined elsewhere (as a registered method's would be): the parser reads its annotations."""

    flag: bool = False
    count: int | None = None
    mode: Literal["fast", "exact"] = "exact"
    ratio: float = 0.5


def test_the_parser_works_for_any_spec_class_by_its_annotations() -> None:
    assert _coerce("off", _field_type(_AnySpec, "flag"), "flag") is False
    assert _coerce("7", _field_type(_AnySpec, "count"), "count") == 7
    assert _coerce("none", _field_type(_AnySpec, "count"), "count") is None
    assert _coerce("fast", _field_type(_AnySpec, "mode"), "mode") == "fast"
    with pytest.raises(InvalidSpecError, match="must be one of fast, exact"):
        _coerce("slow", _field_type(_AnySpec, "mode"), "mode")
    with pytest.raises(InvalidSpecError, match=r"--set count=7\.0: must be a whole number.*or none"):
        _coerce("7.0", _field_type(_AnySpec, "count"), "count")
    assert _coerce("3", _field_type(_AnySpec, "ratio"), "ratio") == 3.0
