"""Class descriptions (CuPL-style sentences per class) averaged in with the prompt texts, for every method that
takes `prompts` (zero-shot, ZERO, MTA, TDA, DMN-ZS, DPE, BoostAdapter).

The oracle (test_method_ensemble.clip_ensemble with descriptions) is DMN's `tip_cupl` classifier written out
plainly: per class, the templates filled with the name followed by that class's descriptions, each encoded by
CLIP's own encode_text on padded 77-token prompts and normalised, their mean over all of the class's texts,
normalised again.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InputError, InvalidSpecError  # noqa: E402
from difftpt_ops.core.method_specs import ZeroShotSpec, method_spec_from, method_spec_from_dict  # noqa: E402
from difftpt_ops.core.specs import PromptSpec  # noqa: E402
from difftpt_ops.models.clip import LoadedClip  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.methods.dmn import DMNSpec  # noqa: E402
from difftpt_ops.tta.methods.dpe import DPESpec  # noqa: E402
from difftpt_ops.tta.methods.ensemble import prompt_templates  # noqa: E402
from difftpt_ops.tta.methods.mta import MTASpec  # noqa: E402
from difftpt_ops.tta.methods.tda import TDASpec  # noqa: E402
from difftpt_ops.tta.methods.zero import ZeroSpec  # noqa: E402
from tests.unit.test_method_ensemble import clip_ensemble  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, random_image, tiny_clip  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

KEY = "sha256:" + "ab" * 32
# Different numbers of sentences per class: the mean is per class over its own texts.
DESCRIPTIONS = {name.replace("_", " "): [f"A {name.replace('_', ' ')} seen from the side.",
                                         f"A close photo of a {name.replace('_', ' ')} in the wild."][:1 + i % 2]
                for i, name in enumerate(CLASS_NAMES)}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.mark.parametrize(("spec", "templates"), [
    (DMNSpec(prompts="tip", descriptions=KEY), prompt_templates("tip")),
    (DMNSpec(prompts="dtd", descriptions=KEY), prompt_templates("dtd")),
    (ZeroShotSpec(prompts="ensemble", descriptions=KEY), prompt_templates("ensemble")),
    (ZeroShotSpec(descriptions=KEY), ("a photo of a {}.",)),
    (TDASpec(prompts="tip", descriptions=KEY), prompt_templates("tip")),
    (ZeroSpec(descriptions=KEY), ("a photo of a {}.",)),
    (MTASpec(prompts="pets", descriptions=KEY), prompt_templates("pets")),
    (DPESpec(prompts="cars-dpe", descriptions=KEY), prompt_templates("cars-dpe")),
], ids=["dmn-tip", "dmn-dtd", "zeroshot-ensemble", "zeroshot-single", "tda-tip", "zero-single", "mta-pets",
        "dpe-cars"])
def test_text_features_equal_the_references_tip_cupl_classifier(clip: LoadedClip, spec: object,
                                                                templates: tuple[str, ...]) -> None:
    tuner = prepare_classifier(clip, CLASS_NAMES, spec, descriptions=DESCRIPTIONS)  # type: ignore[arg-type]
    expected = clip_ensemble(clip, templates, DESCRIPTIONS)
    torch.testing.assert_close(tuner._initial_text_features().float(), expected, atol=1e-5, rtol=0)  # noqa: SLF001
    plain = prepare_classifier(clip, CLASS_NAMES, dataclasses.replace(spec, descriptions=None))  # type: ignore[type-var]
    without = plain._initial_text_features()  # noqa: SLF001
    assert not torch.allclose(without.float(), expected, atol=1e-3)  # the descriptions change the classifier


def test_engine_equals_the_naive_formulation_with_descriptions(clip: LoadedClip) -> None:
    """Both read the same class features (the test above checks them against the reference's recipe); this
    checks that the naive formulation takes descriptions too, so the equivalence tests cover such specs."""
    from difftpt_ops.tta.naive import NaiveTuner

    spec = DMNSpec(prompts="tip", descriptions=KEY, n_views=4)
    fast = prepare_classifier(clip, CLASS_NAMES, spec, descriptions=DESCRIPTIONS)
    naive = NaiveTuner(clip, CLASS_NAMES, spec, descriptions=DESCRIPTIONS)
    for sample in range(4):
        a = fast.run(random_image(sample), seed=5, sample_key=sample)
        b = naive.run(random_image(sample), seed=5, sample_key=sample)
        assert (a.pred, a.top5) == (b.pred, b.top5), f"sample {sample}"


def test_a_spec_naming_descriptions_needs_them_passed(clip: LoadedClip) -> None:
    with pytest.raises(InvalidSpecError, match="descriptions.*not loaded"):
        prepare_classifier(clip, CLASS_NAMES, DMNSpec(prompts="tip", descriptions=KEY))


def test_a_class_without_descriptions_is_named(clip: LoadedClip) -> None:
    partial = {k: v for k, v in DESCRIPTIONS.items() if k != "goldfish"}
    with pytest.raises(InputError, match="descriptions.*goldfish"):
        prepare_classifier(clip, CLASS_NAMES, DMNSpec(prompts="tip", descriptions=KEY), descriptions=partial)


def test_a_random_context_has_no_text_to_average_with(clip: LoadedClip) -> None:
    spec = ZeroShotSpec(descriptions=KEY, prompt=PromptSpec(ctx_init=None))
    with pytest.raises(InvalidSpecError, match="descriptions"):
        prepare_classifier(clip, CLASS_NAMES, spec, descriptions=DESCRIPTIONS)


@pytest.mark.parametrize("method", ["zeroshot", "zero", "mta", "tda", "dmn-zs", "dpe", "boostadapter", "onzeta",
                                    "ecalp", "oga"])
def test_no_descriptions_is_left_out_of_the_stored_spec(method: str) -> None:
    """Runs stored before the field existed keep their fingerprints; a key is stored and read back."""
    plain = method_spec_from(method)
    assert "descriptions" not in plain.to_dict()
    named = method_spec_from(method, {"descriptions": KEY})
    assert named.to_dict()["descriptions"] == KEY
    assert method_spec_from_dict(named.to_dict()) == named
    with pytest.raises(InvalidSpecError, match="descriptions"):
        method_spec_from(method, {"descriptions": " "})


def test_a_missing_class_is_named_as_the_file_must_key_it() -> None:
    """Keys are class names with underscores as spaces (the reference's lookup): the message shows that form."""
    from difftpt_ops.services.running.descriptions import check_covers, parse_descriptions

    parsed = parse_descriptions(json.dumps({"tench": ["a fish."]}).encode(), "f.json")
    with pytest.raises(InputError, match="descriptions=f.json.*1 of the dataset's 2 classes.*'great white shark'"):
        check_covers(parsed.by_class, ["tench", "great_white_shark"], "f.json")
    # The same texts in another key order or spacing are the same file: one key.
    again = parse_descriptions(b'{ "tench" : [ "a fish." ] }', "g.json")
    assert again.key == parsed.key and again.data == parsed.data
