"""The tuning engine end to end on the tiny CLIP: results, exactness against the naive formulation, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InputError, InvalidSpecError, SampleError  # noqa: E402
from difftpt_ops.core.method_specs import NoopSpec, TPTSpec, method_spec_from  # noqa: E402
from difftpt_ops.core.specs import PromptSpec  # noqa: E402
from difftpt_ops.models.clip import LoadedClip, read_coop_checkpoint  # noqa: E402
from difftpt_ops.tta import SampleResult, prepare_classifier  # noqa: E402
from difftpt_ops.tta.engine import text_groups_for  # noqa: E402
from difftpt_ops.tta.naive import NaiveTuner  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, random_image, tiny_clip  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

# Small but complete settings: every code path runs, in a fraction of the reference's views.
TPT = {"n_views": 16, "selection_p": 0.25}
DIFFTPT = {"n_conventional": 8, "n_generated": 4, "steps": 2}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="module")
def generated() -> list:
    return [random_image(100 + i, (64, 64)) for i in range(5)]


def _same(a: SampleResult, b: SampleResult) -> bool:
    return (a.pred, a.top5, a.zeroshot_pred, a.n_kept) == (b.pred, b.top5, b.zeroshot_pred, b.n_kept) and abs(
        a.entropy_after - b.entropy_after) < 1e-6 and [v.kept for v in a.views] == [v.kept for v in b.views]


def test_zeroshot_uses_view_zero_only(clip: LoadedClip) -> None:
    tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from("zeroshot"))
    result = tuner.run(random_image(0), seed=0, sample_key="a")
    assert result.n_views == result.n_kept == 1
    assert [(v.index, v.kind, v.cosine, v.kept) for v in result.views] == [(0, "original", None, True)]
    assert result.pred == result.zeroshot_pred == result.top5[0]
    assert result.entropy_before == result.entropy_after and 0 < result.confidence_before <= 1


def test_tpt_result_fields(clip: LoadedClip) -> None:
    """n views, int(n * p) kept, entropies reported, and tuning lowers the marginal entropy's view-0 part."""
    tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", TPT))
    result = tuner.run(random_image(0), seed=0, sample_key="a")
    assert result.n_views == 16 and result.n_kept == 4 and sum(v.kept for v in result.views) == 4
    assert [v.kind for v in result.views] == ["original"] + ["conventional"] * 15
    assert all(v.cosine is None for v in result.views)
    kept = sorted(v.entropy for v in result.views if v.kept)
    assert kept == sorted(v.entropy for v in result.views)[:4]
    assert len(result.top5) == 5 and result.pred == result.top5[0]
    assert result.entropy_after != result.entropy_before
    assert result.seconds >= result.view_seconds > 0


def test_text_groups_default_to_the_device(clip: LoadedClip, generated: list) -> None:
    """Four length groups on a CPU, one on a GPU (fewer kernel launches); neither that choice nor running every
    prompt whole instead of sharing its prefix changes results."""
    assert text_groups_for("cpu") == 4 and text_groups_for("cuda") == text_groups_for(torch.device("cuda:1")) == 1
    spec = method_spec_from("difftpt", DIFFTPT)
    default = prepare_classifier(clip, CLASS_NAMES, spec)
    one = prepare_classifier(clip, CLASS_NAMES, spec, max_text_groups=1)
    whole = prepare_classifier(clip, CLASS_NAMES, spec, share_text_prefix=False)
    assert len(default.learner.groups) > 1 and len(one.learner.groups) == 1
    assert default.learner.share_prefix and not whole.learner.share_prefix
    image = random_image(3)
    expected = default.run(image, generated=generated, seed=0, sample_key="g")
    for other in (one, whole):
        assert _same(expected, other.run(image, generated=generated, seed=0, sample_key="g"))


def test_result_does_not_depend_on_earlier_samples(clip: LoadedClip, generated: list) -> None:
    """Sample B gives the same result alone and after sample A (prompt and optimiser reset per sample)."""
    for spec in (method_spec_from("tpt", TPT), method_spec_from("difftpt", DIFFTPT)):
        tuner = prepare_classifier(clip, CLASS_NAMES, spec)
        alone = tuner.run(random_image(1), generated=generated, seed=0, sample_key="b")
        fresh = prepare_classifier(clip, CLASS_NAMES, spec)
        fresh.run(random_image(2), generated=generated[::-1], seed=0, sample_key="a")
        after = fresh.run(random_image(1), generated=generated, seed=0, sample_key="b")
        assert _same(alone, after)


@pytest.mark.parametrize(("method", "overrides"), [
    ("tpt", TPT),
    ("tpt", {**TPT, "steps": 3, "prompt.n_ctx": 4}),  # n_ctx alone: random context
    ("difftpt", DIFFTPT),
    ("difftpt", {**DIFFTPT, "cosine_on": "features"}),
])
def test_fast_equals_naive(clip: LoadedClip, generated: list, method: str, overrides: dict) -> None:
    """Cached image features, truncated shared-prefix text and vectorised filters change nothing."""
    spec = method_spec_from(method, overrides)
    fast = prepare_classifier(clip, CLASS_NAMES, spec)
    naive = NaiveTuner(clip, CLASS_NAMES, spec)
    image = random_image(3)
    result = fast.run(image, generated=generated, seed=5, sample_key="x")
    reference = naive.run(image, generated=generated, seed=5, sample_key="x")
    assert (result.pred, result.top5, result.zeroshot_pred) == (reference.pred, reference.top5, reference.zeroshot_pred)
    assert sorted(v.index for v in result.views if v.kept) == sorted(reference.selected)
    assert torch.allclose(fast.learner.ctx, naive.ctx, atol=1e-5)  # the tuned context itself


def test_difftpt_layout_and_counts(clip: LoadedClip, generated: list) -> None:
    """original + 8 conventional + first 4 of 5 generated; cosine reported for views 1..n-1."""
    tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from("difftpt", DIFFTPT))
    result = tuner.run(random_image(0), generated=generated, seed=0, sample_key="a")
    assert [v.kind for v in result.views] == ["original"] + ["conventional"] * 8 + ["generated"] * 4
    assert result.views[0].cosine is None and all(v.cosine is not None for v in result.views[1:])
    assert result.n_kept == int((1 + int(12 * 0.8)) * 0.3)


def test_difftpt_without_generated_images(clip: LoadedClip) -> None:
    """No generated images: original + conventional views only, the chained filter over what exists."""
    tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from("difftpt", DIFFTPT))
    result = tuner.run(random_image(0), generated=(), seed=0, sample_key="a")
    assert result.n_views == 9 and "generated" not in {v.kind for v in result.views}
    assert result.n_kept == int((1 + int(8 * 0.8)) * 0.3)
    parallel_spec = method_spec_from("difftpt", {**DIFFTPT, "filter_mode": "parallel"})
    parallel = prepare_classifier(clip, CLASS_NAMES, parallel_spec)
    assert parallel.run(random_image(0), seed=0, sample_key="a").n_kept == int(9 * 0.3)


def test_spec_augmix_overrides_the_run_argument(clip: LoadedClip) -> None:
    on = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", {**TPT, "augmix": "true"}))
    default = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", TPT))
    image = random_image(0)
    views_on = on.make_views(image, seed=0, sample_key="a", augmix=False)
    assert torch.equal(views_on.pixels, default.make_views(image, seed=0, sample_key="a", augmix=True).pixels)


def test_coop_context_initialises_the_prompt(clip: LoadedClip, tmp_path: Path) -> None:
    path = tmp_path / "coop.pth"
    ctx = torch.randn(4, 64)
    torch.save({"state_dict": {"ctx": ctx}}, path)
    prompt = PromptSpec(n_ctx=4, ctx_init=None, coop_checkpoint=str(path))
    spec = TPTSpec(prompt=prompt, **TPT)
    tuner = prepare_classifier(clip, CLASS_NAMES, spec, coop_state=read_coop_checkpoint(path))
    assert torch.equal(tuner.learner.ctx_init, ctx)
    with pytest.raises(InvalidSpecError):  # named in the spec but not loaded
        prepare_classifier(clip, CLASS_NAMES, spec)
    torch.save({"state_dict": {"ctx": torch.randn(16, 64)}}, path)
    with pytest.raises(InvalidSpecError) as info:
        prepare_classifier(clip, CLASS_NAMES, spec, coop_state=read_coop_checkpoint(path))
    assert info.value.argument == "coop_checkpoint"


def test_bad_inputs_are_clear_errors(clip: LoadedClip) -> None:
    with pytest.raises(InputError) as info:
        prepare_classifier(clip, [], method_spec_from("tpt"))
    assert info.value.argument == "class_names"
    with pytest.raises(InvalidSpecError):
        method_spec_from("no-such-method")
    with pytest.raises(InvalidSpecError):
        prepare_classifier(clip, CLASS_NAMES, NoopSpec())
    for key in ("selection_p",):
        for value in (0, 1.5, -0.1):
            with pytest.raises(InvalidSpecError):
                method_spec_from("tpt", {key: value})
    with pytest.raises(InvalidSpecError):
        method_spec_from("difftpt", {"selection_cosine": 0})
    tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", TPT))
    with pytest.raises(InputError) as info:
        tuner.run(torch.rand(1, 3, 32, 32), seed=0, sample_key="a")
    assert info.value.argument == "image"


def test_non_finite_loss_is_a_sample_error(clip: LoadedClip) -> None:
    tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", TPT))
    tuner.logit_scale = torch.tensor(float("nan"))
    with pytest.raises(SampleError, match="non-finite loss"):
        tuner.run(random_image(0), seed=0, sample_key="a")
