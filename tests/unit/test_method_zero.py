"""ZERO against straightforward formulations of the paper and of the reference code (its float16 votes under
CUDA autocast), its tie-break, edge cases and bad settings."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InvalidSpecError  # noqa: E402
from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.tta.methods import StepInputs, get_method  # noqa: E402
from difftpt_ops.tta.methods.zero import ZeroSpec, vote_logits, zero_predict  # noqa: E402

pytestmark = pytest.mark.unit

SCALE = 100.0


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.double(), dim=-1).float()


def _random(seed: int, n_views: int, n_classes: int, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return _unit(torch.randn(n_views, dim, generator=g)), _unit(torch.randn(n_classes, dim, generator=g))


def paper_zero(image: torch.Tensor, text: torch.Tensor, gamma: float) -> tuple[list[int], list[int]]:
    """The paper: predict every view, keep the int(N * gamma) most confident (lowest entropy), let each kept
    view vote with its argmax (softmax at temperature 0), count. Returns (kept views, votes per class)."""
    n, c = image.shape[0], text.shape[0]
    entropies = []
    for i in range(n):
        cos = [float(image[i].double() @ text[j].double()) for j in range(c)]
        top = max(cos)
        z = sum(math.exp(SCALE * (v - top)) for v in cos)
        p = [math.exp(SCALE * (v - top)) / z for v in cos]
        entropies.append(-sum(q * math.log(q) for q in p if q > 0))
    kept = sorted(range(n), key=lambda i: (entropies[i], i))[:int(n * gamma)]
    votes = [0] * c
    for i in kept:
        cos = [float(image[i].double() @ text[j].double()) for j in range(c)]
        votes[cos.index(max(cos))] += 1
    return kept, votes


@pytest.mark.parametrize("n_classes", [2, 7, 200])
def test_matches_the_paper_formulation(n_classes: int) -> None:
    """Same kept views and vote counts on random features; same prediction wherever the vote has one winner."""
    winners = 0
    for seed in range(12):
        image, text = _random(seed, 64, n_classes)
        kept, votes = paper_zero(image, text, 0.3)
        out = zero_predict(image, text, SCALE, gamma=0.3, vote="argmax")
        assert sorted(kept) == torch.nonzero(out.kept).flatten().tolist()
        assert torch.allclose(out.probs * len(kept), torch.tensor(votes, dtype=torch.float32), atol=1e-5)
        if votes.count(max(votes)) == 1:
            winners += 1
            assert out.pred == votes.index(max(votes)) and not out.tie
    assert winners >= 3  # the comparison of predictions actually ran


def reference_code_votes(image: torch.Tensor, text: torch.Tensor, gamma: float) -> tuple[list[int], torch.Tensor]:
    """The reference's `zero` as it runs under `torch.cuda.amp.autocast()`, written out on the CPU: the matmul
    casts its inputs to float16 and returns float16 (the code's `l`); the filter ranks softmax(l / temp) by entropy
    (here in float32: only the rounding of l / temp differs); `torch.finfo(l.dtype).eps` is float16's, 2^-10;
    `l / eps` stays float16 (exact: a power of two); autocast's softmax is float32; votes sum over kept views.
    The entropy is the code's `-(p * p.log()).sum(1)` as written: NaN where a probability underflows to 0, which
    the ascending argsort places last (stable here: ties in entropy by view index, as we document)."""
    logits16 = (image.half().float() @ text.half().float().t()).half()  # float32 accumulation, float16 result
    probs = (logits16.float() * SCALE).softmax(1)
    entropy = -(probs * probs.log()).sum(1)
    kept = torch.argsort(entropy, stable=True)[:int(image.shape[0] * gamma)]
    eps = torch.finfo(logits16.dtype).eps
    assert eps == 2.0 ** -10
    p_bar = (logits16[kept] / eps).float().softmax(1).sum(0)
    return kept.tolist(), p_bar


@pytest.mark.parametrize("n_classes", [200, 1000])
def test_code_votes_match_the_reference_under_autocast(n_classes: int) -> None:
    """vote="code" (the default): same kept views and the same fractional votes as the reference formulation.
    Random 512-d features with hundreds of classes have CLIP-like gaps of thousandths between the top cosines,
    so some views split their vote: the comparison is not the paper's count in disguise."""
    split = 0
    for seed in range(12):
        image, text = _random(seed, 64, n_classes, dim=512)
        kept, p_bar = reference_code_votes(image, text, 0.3)
        out = zero_predict(image, text, SCALE, gamma=0.3)
        assert sorted(kept) == torch.nonzero(out.kept).flatten().tolist()
        assert torch.allclose(out.probs * len(kept), p_bar, atol=1e-5)
        if not out.tie:
            assert out.pred == int(p_bar.argmax())
        split += int(((p_bar - p_bar.round()).abs() > 0.01).any())
    assert split >= 3  # the votes really are soft somewhere: the comparison is not the paper's in disguise


def test_a_view_whose_probability_underflows_ranks_last_as_in_the_code() -> None:
    """View 0 is the most confident by far, but one of its classes is 135 logits below its top one: its float32
    probability is 0 and the code's entropy, -(p * log p).sum(), is NaN, which its argsort ranks after every
    finite entropy. vote="code" drops it as the code does; vote="argmax" (the paper) keeps it."""
    text = torch.eye(4)[:3]
    rows = [[0.75, -0.6, 0.0]] + [[0.2, 0.3 + 0.01 * i, 0.1] for i in range(1, 10)]
    image = torch.tensor([row + [(1 - sum(v * v for v in row)) ** 0.5] for row in rows])
    kept, p_bar = reference_code_votes(image, text, 0.1)
    assert kept == [9]
    out = zero_predict(image, text, SCALE, gamma=0.1)
    assert torch.nonzero(out.kept).flatten().tolist() == kept and out.pred == 1 == int(p_bar.argmax())
    assert torch.isfinite(out.entropy).all()  # what is stored per view stays the (finite) entropy
    paper = zero_predict(image, text, SCALE, gamma=0.1, vote="argmax")
    assert torch.nonzero(paper.kept).flatten().tolist() == [0] and paper.pred == 0


def test_a_vote_splits_when_two_classes_are_a_thousandth_apart() -> None:
    """One view, two classes 0.001 apart in cosine: the code's vote is about 0.73 / 0.27, the paper's one-hot."""
    text = torch.eye(3)[:2]
    image = torch.tensor([[0.3005, 0.2995, (1 - 0.3005**2 - 0.2995**2) ** 0.5]]).repeat(4, 1)
    code = zero_predict(image, text, SCALE, gamma=0.25)
    paper = zero_predict(image, text, SCALE, gamma=0.25, vote="argmax")
    # float16 rounds the cosines to steps of 2^-12, so the gap is 3 or 4 steps: a vote of 0.68 to 0.73.
    assert 0.65 < float(code.probs[0]) < 0.76 and paper.probs.tolist() == [1.0, 0.0]
    assert code.pred == paper.pred == 0


def test_runs_stored_before_the_vote_option_read_as_argmax() -> None:
    """Their specs have no `vote` key: they voted at float32's eps, which is vote="argmax", and keep their
    fingerprint; the new default is part of the spec, so it makes new runs."""
    from difftpt_ops.core.method_specs import method_spec_from_dict

    old = {key: value for key, value in ZeroSpec().to_dict().items() if key != "vote"}
    assert method_spec_from_dict(old).vote == "argmax"
    assert method_spec_from_dict(old).to_dict() == old
    assert ZeroSpec().to_dict()["vote"] == "code"


def _peaked(cls: int, n_classes: int, sharp: float) -> torch.Tensor:
    """A view feature pointing at class `cls` (text features are the basis); larger `sharp`, lower entropy."""
    v = torch.ones(n_classes)
    v[cls] += sharp
    return v


def _tie_case(order: list[tuple[int, float]], n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = _unit(torch.stack([_peaked(c, n_classes, s) for c, s in order]))
    return image, torch.eye(n_classes)


def test_tie_is_broken_by_the_first_later_view_in_view_order() -> None:
    """Two votes each for classes 0 and 1: views int(N * gamma).. are walked in view order (not confidence)."""
    # Views 0-3 are the confident ones (two vote 0, two vote 1); view 4 votes 2 (not tied), view 5 votes 1.
    order = [(0, 9.0), (1, 9.0), (0, 9.0), (1, 9.0), (2, 0.5), (1, 0.5), (0, 0.5), (0, 0.5), (0, 0.5), (0, 0.5)]
    out = zero_predict(*_tie_case(order, 3), SCALE, gamma=0.4)
    assert out.tie and out.pred == 1
    assert out.scores.tolist() == [2.0, 3.0, 0.0]  # the winner gets one extra vote, as the reference
    # The confident views at 5..8 instead: the walk starts at view 4 and reaches kept view 5 (votes 0) first.
    order = [(2, 0.5), (2, 0.5), (2, 0.5), (2, 0.5), (2, 0.5), (0, 9.0), (1, 9.0), (0, 9.0), (1, 9.0), (2, 0.5)]
    assert zero_predict(*_tie_case(order, 3), SCALE, gamma=0.4).pred == 0


def reference_code_fp32(image: torch.Tensor, text: torch.Tensor, gamma: float) -> torch.Tensor:
    """The reference's whole `zero` (ttas/zero.py, confidence_filter in ttas/base.py, greedy_break and
    break_sample_tie in utils/tools.py) as it runs on float32 tensors, i.e. without autocast, where its "zero"
    temperature is float32's eps: our vote="argmax". Returns its output p_bar (the +1 on a broken tie's winner
    included); its argmax is the prediction. Ties in entropy by view index (stable sort), as we document."""
    logits = image @ text.t()
    probs = (logits * SCALE).softmax(1)
    entropy = -(probs * probs.log()).sum(1)
    kept = logits[torch.argsort(entropy, stable=True)[:int(entropy.shape[0] * gamma)]]
    p_bar = (kept / torch.finfo(kept.dtype).eps).softmax(1).sum(0)
    max_count, pred = torch.max(p_bar, dim=-1)
    ties = [int(pred)] + [i for i in range(len(p_bar)) if i != int(pred) and p_bar[i] == max_count]
    if len(ties) > 1:
        rest = logits[int(image.shape[0] * gamma):]
        tie_tensor = torch.tensor(ties, dtype=torch.int)
        hits = [p for p in torch.argmax(rest, dim=1) if p in tie_tensor]
        if hits:
            pred = hits[0]
        else:
            row = rest[0].clone()
            row[~tie_tensor] = -torch.inf  # a bitwise not on class indices, as the code writes it
            pred = torch.argmax(row)
        p_bar[pred] += 1
    return p_bar


def test_matches_a_transcription_of_the_reference_ties_included() -> None:
    """Few classes and views make ties common: the whole decision (filter, count, greedy walk, fallback, the
    extra vote) against the reference written out on float32 tensors."""
    ties = 0
    for seed in range(60):
        image, text = _random(seed, 10, 3, dim=64)
        expected = reference_code_fp32(image, text, 0.3)
        out = zero_predict(image, text, SCALE, gamma=0.3, vote="argmax")
        assert torch.allclose(out.scores, expected, atol=1e-5), seed
        assert out.pred == int(expected.argmax()), seed
        ties += int(out.tie)
    assert ties >= 10  # the tie-break really ran


def test_tie_fallback_reproduces_the_reference_or_stays_among_tied_classes() -> None:
    """No later view votes a tied class: the code's mask (classes C-1-t) can pick an untied class."""
    # 5 classes; confident views 0-1 tie classes 0 and 1; every later view votes class 2.
    order = [(0, 9.0), (1, 9.0), (2, 0.6), (2, 0.5), (2, 0.5)]
    image, text = _tie_case(order, 5)
    # View 2 (the fallback row): class 3 highest (untied, so the walk passes it), then 2, then 1 above 0.
    # Masking the tied classes themselves would give 3; the code's masks (4 and 3) give 2; among tied, 1.
    image[2] = _unit(torch.tensor([1.0, 1.2, 1.5, 2.0, 1.0]))
    code = zero_predict(image, text, SCALE, gamma=0.4, tie_break="code")
    assert code.tie_winner == 2
    # The code reports its output p_bar through topk, not the class its break returned: the extra vote lifts
    # class 2 to 1, level with the tied classes, so the top is a three-way tie; we take the first class.
    expected = reference_code_fp32(image, text, 0.4)  # the transcription takes the same fallback
    assert torch.equal(zero_predict(image, text, SCALE, gamma=0.4, vote="argmax").scores, expected)
    assert expected.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0] and code.pred == 0
    tied = zero_predict(image, text, SCALE, gamma=0.4, tie_break="tied")
    assert tied.pred == tied.tie_winner == 1


def test_a_fallback_outside_the_tie_does_not_become_the_prediction() -> None:
    """Classes 0 and 1 tie with two votes each and no later view votes either: the code's break returns class 2,
    which its extra vote lifts to 1, still below the tied classes; what the code reports (the top of p_bar) is
    a tied class, and so is our prediction, which is what the step's logits say."""
    order = [(0, 9.0), (1, 9.0), (0, 9.0), (1, 9.0), (2, 0.6), (2, 0.5), (2, 0.5), (2, 0.5), (2, 0.5), (2, 0.5)]
    image, text = _tie_case(order, 5)
    out = zero_predict(image, text, SCALE, gamma=0.4)
    expected = reference_code_fp32(image, text, 0.4)
    assert out.tie and out.tie_winner == 2 and expected.tolist() == [2.0, 2.0, 1.0, 0.0, 0.0]
    assert torch.equal(out.scores, expected) and out.pred in (0, 1) and out.pred == int(expected.argmax())
    assert out.pred == int(vote_logits(out.scores).argmax())


def test_all_views_alike_and_all_classes_alike() -> None:
    """Identical views vote together; identical class features tie everywhere and resolve to class 0."""
    image = _unit(torch.ones(8, 4) + torch.tensor([3.0, 0, 0, 0]))
    out = zero_predict(image, torch.eye(4), SCALE)
    assert out.pred == 0 and out.kept.sum() == int(8 * 0.3) and not out.tie
    same_text = _unit(torch.ones(5, 4))
    out = zero_predict(_random(1, 8, 5, 4)[0], same_text, SCALE)
    assert out.tie and out.pred == 0 and torch.isfinite(vote_logits(out.scores)).all()


def test_one_view_votes_nothing_and_predicts_its_argmax() -> None:
    """int(1 * 0.3) = 0 views vote; every class ties and the walk from view 0 returns its argmax."""
    image, text = _random(3, 1, 7)
    out = zero_predict(image, text, SCALE)
    assert out.kept.sum() == 0 and out.pred == int((image @ text.t()).argmax())
    assert out.probs[out.pred] == 1.0


def test_gamma_one_keeps_every_view() -> None:
    """With every view kept a tie has no later view; view 0 decides (the reference would fail here)."""
    image = _unit(torch.stack([_peaked(0, 3, 5.0), _peaked(1, 3, 5.0)]))
    out = zero_predict(image, torch.eye(3), SCALE, gamma=1.0)
    assert out.kept.all() and out.tie and out.pred in (0, 1)


def test_step_returns_vote_shares_and_kept_views() -> None:
    """The registered step: softmax of its logits is the vote share; kept views in confidence order."""
    image, text = _random(5, 20, 6)
    method = get_method("zero")
    inputs = StepInputs(image_features=image, text_features=text, logit_scale=torch.tensor(SCALE),
                        logits=SCALE * image @ text.t(), kinds=("original",) + ("conventional",) * 19)
    output = method.step(ZeroSpec(n_views=20), inputs)
    direct = zero_predict(image, text, SCALE, gamma=0.3)
    assert int(output.logits.argmax()) == direct.pred
    assert torch.allclose(output.logits.softmax(-1), direct.scores / direct.scores.sum(), atol=1e-6)
    kept = output.scores.indices.tolist()
    assert len(kept) == 6 and sorted(kept) == torch.nonzero(direct.kept).flatten().tolist()
    assert output.scores.entropy[kept].diff().ge(0).all()
    assert method.views(ZeroSpec()).n_views == 64 and method.views(ZeroSpec()).augmix is False


@pytest.mark.parametrize(("field", "value"), [("gamma", "0"), ("gamma", "1.5"), ("gamma", "-0.1"),
                                              ("prompts", "fancy"), ("tie_break", "random"), ("n_views", "0"),
                                              ("vote", "soft")])
def test_bad_settings_name_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidSpecError, match=field):
        method_spec_from("zero", {field: value})
