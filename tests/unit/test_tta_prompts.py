"""The prompt learner and the text tower: initialisation, exactness of truncation and prefix sharing."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InputError, InvalidSpecError  # noqa: E402
from difftpt_ops.core.specs import PromptSpec  # noqa: E402
from difftpt_ops.models.clip import LoadedClip  # noqa: E402
from difftpt_ops.tta.prompts import (  # noqa: E402
    PromptLearner,
    _length_groups,
    class_prompt_texts,
    coop_context,
    initial_context,
)
from difftpt_ops.tta.text import TextTower  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, tiny_clip  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


def _learner(clip: LoadedClip, prompt: PromptSpec | None = None, **kwargs: object) -> PromptLearner:
    prompt = prompt or PromptSpec()
    tower = TextTower(clip.model)
    tokens = clip.tokenizer(class_prompt_texts(CLASS_NAMES, prompt))
    return PromptLearner(tower, tokens, initial_context(tower, clip.tokenizer, prompt), **kwargs)


def test_prompt_texts() -> None:
    """"a photo of a {class}." with underscores turned into spaces; X placeholders for a random context."""
    assert class_prompt_texts(["great_white_shark"], PromptSpec()) == ["a photo of a great white shark."]
    random_prompt = PromptSpec(n_ctx=2, ctx_init=None)
    assert class_prompt_texts(["dog"], random_prompt) == ["X X dog."]
    with pytest.raises(InputError) as info:
        class_prompt_texts([], PromptSpec())
    assert info.value.argument == "class_names"


def test_initial_context_is_the_token_embedding_of_ctx_init(clip: LoadedClip) -> None:
    tower = TextTower(clip.model)
    ctx = initial_context(tower, clip.tokenizer, PromptSpec())
    tokens = clip.tokenizer(["a photo of a"])[0, 1:5]
    assert torch.equal(ctx, clip.model.token_embedding.weight[tokens])


def test_random_context_is_seeded_small_noise(clip: LoadedClip) -> None:
    tower = TextTower(clip.model)
    prompt = PromptSpec(n_ctx=4, ctx_init=None)
    a, b = (initial_context(tower, clip.tokenizer, prompt, seed=1) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (4, 64)
    assert 0.01 < float(a.std()) < 0.04


def test_ctx_init_must_tokenise_to_n_ctx_tokens(clip: LoadedClip) -> None:
    """Four words, but one of them is several BPE tokens: the context would be misaligned."""
    with pytest.raises(InvalidSpecError) as info:
        initial_context(TextTower(clip.model), clip.tokenizer, PromptSpec(ctx_init="a photo of qzxjvkw"))
    assert info.value.argument == "ctx_init"


def test_coop_context_loads_and_checks_its_size() -> None:
    """CoOp's checkpoint layout {"state_dict": {"ctx": ...}} is read; a wrong size names coop_checkpoint."""
    ctx = torch.randn(4, 64)
    assert torch.equal(coop_context({"state_dict": {"ctx": ctx}}, n_ctx=4, width=64), ctx)
    assert torch.equal(coop_context(ctx, n_ctx=4, width=64), ctx)
    for bad in ({"state_dict": {"ctx": torch.randn(16, 64)}}, {"state_dict": {}}, torch.randn(4, 32)):
        with pytest.raises(InvalidSpecError) as info:
            coop_context(bad, n_ctx=4, width=64)
        assert info.value.argument == "coop_checkpoint"


def test_truncated_text_equals_full_length_encode_text(clip: LoadedClip) -> None:
    """Cut after the EOT, grouped by length, prefix shared: same features as open_clip's 77-token encode_text."""
    tokens = clip.tokenizer(class_prompt_texts(CLASS_NAMES, PromptSpec()))
    with torch.no_grad():
        reference = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1)
        for kwargs in ({}, {"share_prefix": False}, {"max_groups": 1}, {"truncate": False}):
            learner = _learner(clip, **kwargs)
            assert torch.allclose(learner.text_features(), reference, atol=1e-5), kwargs


def test_speed_ups_are_exact_for_a_tuned_context(clip: LoadedClip) -> None:
    """With an arbitrary context (not a token embedding), shared-prefix features equal full-length ones."""
    fast, full = _learner(clip), _learner(clip, truncate=False)
    assert fast.share_prefix and not full.share_prefix
    assert fast.token_count < full.token_count / 5
    with torch.no_grad():
        noise = torch.randn(fast.ctx.shape, generator=torch.Generator().manual_seed(0))
        fast.ctx.add_(noise)
        full.ctx.add_(noise)
        assert torch.allclose(fast.text_features(), full.text_features(), atol=1e-5)


def test_only_the_context_gets_gradients(clip: LoadedClip) -> None:
    learner = _learner(clip)
    assert [name for name, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    learner.text_features().sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.model.parameters())


def test_reset_restores_the_initial_context(clip: LoadedClip) -> None:
    learner = _learner(clip)
    initial = learner.ctx.detach().clone()
    with torch.no_grad():
        learner.ctx.add_(1.0)
    learner.reset()
    assert torch.equal(learner.ctx, initial)


def test_length_groups_minimise_padding() -> None:
    """One group pads to the longest; enough groups pad nothing; two groups pick the cheaper split."""
    lengths = torch.tensor([8, 9, 12, 8, 9])
    one = _length_groups(lengths, 1)
    assert [(idx.tolist(), length) for idx, length in one] == [([0, 1, 2, 3, 4], 12)]
    exact = _length_groups(lengths, 16)
    assert [(idx.tolist(), length) for idx, length in exact] == [([0, 3], 8), ([1, 4], 9), ([2], 12)]
    two = _length_groups(lengths, 2)  # {8, 9} + {12}: 4 * 9 + 12 = 48 tokens beats {8} + {9, 12}: 16 + 36
    assert [(idx.tolist(), length) for idx, length in two] == [([0, 1, 3, 4], 9), ([2], 12)]
