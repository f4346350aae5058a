"""DynaPrompt against a plain transcription of the reference's per-sample loop (zzzx1224/DynaPrompt:
dynap_classification.py's `test_time_adapt_eval` and `test_time_tuning`, the buffer of prompts of
clip/custom_clip_lessctx.py), through the registered method, the engine and its checkpoints."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.tta.methods import ContextTuning, StepInputs, get_method
from tests.unit.tta_support import feature_stream

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


# --- The reference, transcribed -------------------------------------------------------------------------------


def _entropy(outputs: torch.Tensor) -> torch.Tensor:
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    return -(logits * logits.exp()).sum(dim=-1)


def _avg_entropy(outputs: torch.Tensor) -> torch.Tensor:
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - np.log(logits.shape[0])
    avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


def _select_confident_samples(logits: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    if batch_entropy.dim() > 1:
        batch_entropy = batch_entropy.mean(-1)
    # The reference's int(n * top), at least 1 (int(64 * 0.1) = 6 at its defaults; 0 would be a NaN loss there).
    idx = torch.argsort(batch_entropy, descending=False)[:max(1, int(logits.size()[0] * top))]
    return logits[idx], idx


class _Reference:
    """The reference's model with its prompt buffer: ctx (P, n_ctx, width) residuals over init_ctx, ctx_order,
    ctx_use; `encode` maps contexts (P, n_ctx, width) to normalised class text features (P * C, d), prompt-major
    (its TextEncoder on prompt_learner()'s (P, C, L, width) prompts)."""

    def __init__(self, init_ctx: torch.Tensor, num_p: int, encode: Callable[[torch.Tensor], torch.Tensor],
                 logit_scale: float) -> None:
        self.init_ctx = init_ctx
        self.ctx = torch.nn.Parameter(torch.zeros(num_p, *init_ctx.shape, dtype=init_ctx.dtype))
        self.ctx_order = list(range(num_p))
        self.ctx_use = [0] * num_p
        self.encode = encode
        self.logit_scale = logit_scale

    def __call__(self, image_features: torch.Tensor, p_s: np.ndarray | None = None) -> torch.Tensor:
        ctx = self.ctx + self.init_ctx
        ctx = ctx[p_s - 1] if p_s is not None else ctx
        # The reference encodes the prompts as one batch and multiplies once. Here prompt by prompt: identical
        # prompts (every unused one) then tie exactly, as they do mathematically, where a batched product may
        # round them apart in either direction (it does on this CPU); ties are then ranked by index.
        return torch.cat([self.logit_scale * image_features @ self.encode(c[None]).t() for c in ctx], dim=1)


def _reference_stream(samples: list[torch.Tensor], model: _Reference, *, lr: float, selection_p: float,
                      tta_steps: int, log_date: str = "250129") -> list[torch.Tensor]:
    """test_time_adapt_eval with --tpt --onlinetpt: the prediction logits (C,) of each sample, in order; the
    view features stand for the images (the image encoder is frozen and under no_grad)."""
    num_prompts = model.ctx.shape[0]
    optimizer = torch.optim.AdamW([model.ctx], lr)
    optim_state = copy.deepcopy(optimizer.state_dict())
    outputs = []
    for images in samples:
        image = images[:1]
        with torch.no_grad():
            if model.ctx_use.count(0) == 0 and "noapp" not in log_date:
                model.ctx_use[model.ctx_order[0]] = 0
                model.ctx[model.ctx_order[0]] = model.ctx[model.ctx_order[0]] * 0
        optimizer.load_state_dict(optim_state)
        # test_time_tuning
        for _ in range(tta_steps):
            output = model(images)
            p_pred = output.view(output.size()[0], num_prompts, -1).detach()
            p_ent = _entropy(p_pred).mean(0)
            plpd = p_pred[0].max(-1)[0].unsqueeze(0) - p_pred[1:].max(dim=-1)[0]
            plpd = plpd.mean(0)
            # The one change to the code: its topk leaves exact ties (unused prompts) in no promised order; the
            # project ranks them by index, on every device.
            ent_order = torch.sort(p_ent, descending=True, stable=True)[1]
            init_p_position = model.ctx_order[0]
            exactnumber = torch.where(ent_order == init_p_position)[0].item()
            plpd_order = torch.sort(plpd, descending=True, stable=True)[1]
            exactnumberlist1 = ent_order[min(exactnumber + 1, num_prompts - 1):]
            exactnumberlist2 = plpd_order[:exactnumber]
            alllist = np.intersect1d(exactnumberlist1.cpu().numpy(), exactnumberlist2.cpu().numpy())
            if set(alllist):
                exactnumber = torch.cat([ent_order[alllist], ent_order[[exactnumber]]], dim=0).cpu().numpy()
            else:
                exactnumber = ent_order[exactnumber].cpu().numpy()
            output = output.view(images.shape[0], num_prompts, -1)[:, exactnumber]
            for i in np.array(exactnumber).reshape(-1).tolist():
                model.ctx_order.remove(i)
                model.ctx_use[i] += 1
                model.ctx_order.append(i)
            output, _ = _select_confident_samples(output, selection_p)
            loss = _avg_entropy(output).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        p_s = exactnumber
        with torch.no_grad():
            p_s = p_s.reshape(-1)
            output = model(image, p_s + 1)
            output = output.view(output.size()[0], p_s.reshape(-1).shape[0], -1)
            outputs.append(output.mean(1)[0])
    return outputs


# --- A toy text encoder for feature streams -------------------------------------------------------------------


class _ToyText:
    """Class text features as a smooth function of a context: normalise(base + (flattened ctx) @ W)."""

    def __init__(self, base: torch.Tensor, n_ctx: int, width: int, seed: int) -> None:
        g = torch.Generator().manual_seed(1000 + seed)
        self.base = base
        self.weight = torch.randn(n_ctx * width, base.numel(), generator=g, dtype=torch.float64).to(base.dtype)
        self.shape = base.shape

    def one(self, ctx: torch.Tensor) -> torch.Tensor:
        """(n_ctx, width) -> (C, d), as the engine lends it."""
        return F.normalize(self.base + (ctx.reshape(-1) @ self.weight).view(self.shape), dim=-1)

    def many(self, ctx: torch.Tensor) -> torch.Tensor:
        """(P, n_ctx, width) -> (P * C, d), the reference's batch of prompts."""
        shifted = self.base + (ctx.reshape(ctx.shape[0], -1) @ self.weight).view(ctx.shape[0], *self.shape)
        return F.normalize(shifted, dim=-1).reshape(-1, self.shape[1])


def _context(encode: Callable[[torch.Tensor], torch.Tensor], initial: torch.Tensor) -> ContextTuning:
    def minimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return ContextTuning(initial=initial, encode=encode, minimise=minimise)


def _problem(seed: int, *, n: int = 30, views: int = 16, n_classes: int = 7, dim: int = 16, n_ctx: int = 3,
             width: int = 8, dtype: torch.dtype = torch.float64
             ) -> tuple[list[torch.Tensor], _ToyText, torch.Tensor]:
    samples, text = feature_stream(n, n_classes, dim, views, seed)
    init = torch.randn(n_ctx, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    toy = _ToyText(text.double().to(dtype), n_ctx, width, seed)
    return [s.to(dtype) for s in samples], toy, init.to(dtype)


def _run(spec, samples: list[torch.Tensor], toy: _ToyText, init: torch.Tensor, *,  # type: ignore[no-untyped-def]
         state: dict | None = None, scale: float = 100.0) -> tuple[list[torch.Tensor], dict]:
    method = get_method("dynaprompt")
    if state is None:
        state = method.init_state(spec, n_classes=toy.shape[0], dim=toy.shape[1], device=torch.device("cpu"))
    context = _context(toy.one, init)
    outputs = []
    for views in samples:
        text = toy.one(init).detach()
        inputs = StepInputs(image_features=views, text_features=text, logit_scale=torch.tensor(scale),
                            logits=scale * views @ text.T, kinds=("original",) + ("conventional",) * (len(views) - 1),
                            context=context)
        output, state = method.step(spec, state, inputs)
        outputs.append(output.logits)
    return outputs, state


def _oracle(spec, samples: list[torch.Tensor], toy: _ToyText, init: torch.Tensor,  # type: ignore[no-untyped-def]
            scale: float = 100.0) -> tuple[list[torch.Tensor], _Reference]:
    model = _Reference(init, spec.num_prompts, toy.many, scale)
    outputs = _reference_stream(samples, model, lr=spec.lr, selection_p=spec.selection_p, tta_steps=spec.steps,
                                log_date="250129" if spec.append else "250129noapp")
    return outputs, model


VARIANTS = [
    {"num_prompts": "4", "selection_p": "0.25"},
    {"num_prompts": "6", "lr": "0.05", "selection_p": "0.25"},
    {"num_prompts": "5", "steps": "2", "lr": "0.05", "selection_p": "0.25"},
    {"num_prompts": "4", "append": "false", "lr": "0.05", "selection_p": "0.25"},
    {"num_prompts": "12", "lr": "0.05"},
]


def _spec(overrides: dict[str, str]):  # type: ignore[no-untyped-def]
    return method_spec_from("dynaprompt", overrides)


@pytest.mark.parametrize("scale", [100.0, 20.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_dynaprompt_matches_the_reference_loop_in_fp64(overrides: dict[str, str], seed: int, scale: float) -> None:
    """Every prediction, the buffer's residuals, its order and its use counters equal the reference's."""
    spec = _spec(overrides)
    samples, toy, init = _problem(seed)
    got, state = _run(spec, samples, toy, init, scale=scale)
    expected, model = _oracle(spec, samples, toy, init, scale=scale)
    assert torch.allclose(torch.stack(got), torch.stack(expected), atol=1e-10, rtol=0)
    assert torch.allclose(state["delta"], model.ctx.detach(), atol=1e-12, rtol=0)
    assert state["order"].tolist() == model.ctx_order and state["use"].tolist() == model.ctx_use
    assert int(state["seen"]) == len(samples)


def test_the_buffer_moves_recycles_and_selects_several_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream above exercises what the method is about: prompts are recycled (all were used before a sample),
    several prompts are selected at once (the reference prompt twice, too, through the code's indexing), and
    the tuned prompts differ from one another."""
    from difftpt_ops.tta.methods import dynaprompt

    selections: list[list[int]] = []
    select = dynaprompt.select_prompts
    monkeypatch.setattr(dynaprompt, "select_prompts", lambda *a: selections.append(select(*a)) or selections[-1])
    spec = _spec(VARIANTS[1])
    samples, toy, init = _problem(0)
    state, recycled = None, 0
    for views in samples:
        recycled += state is not None and bool((state["use"] > 0).all())
        _, state = _run(spec, [views], toy, init, state=state)
    assert recycled > 0 and max(len(s) for s in selections) >= 3
    assert any(len(set(s)) < len(s) for s in selections)
    delta = state["delta"].flatten(1)
    assert float(torch.pdist(delta).min()) > 0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("overrides", VARIANTS[:2], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fp32_agrees_with_the_fp64_reference(overrides: dict[str, str], seed: int) -> None:
    """At a logit scale of 20: at 100 these streams are so confident that the gradients are of the order of
    AdamW's eps (1e-8), where its sign-like first step amplifies fp32 rounding, and fp32 drifts from fp64."""
    spec = _spec(overrides)
    samples, toy, init = _problem(seed)
    expected, _ = _oracle(spec, samples, toy, init, scale=20.0)
    samples32, toy32, init32 = _problem(seed, dtype=torch.float32)
    got, _ = _run(spec, samples32, toy32, init32, scale=20.0)
    assert torch.allclose(torch.stack(got).double(), torch.stack(expected), atol=1e-4, rtol=0)


def test_checkpointed_state_continues_exactly() -> None:
    """The state through safetensors after every few samples gives the uninterrupted stream bit for bit."""
    spec = _spec(VARIANTS[2])
    samples, toy, init = _problem(3)
    whole, final = _run(spec, samples, toy, init)
    method = get_method("dynaprompt")
    state, pieces = None, []
    for start in range(0, len(samples), 7):
        if state is not None:
            state = method.load_state_dict(spec, load_safetensors(save_safetensors(method.state_dict(state))),
                                           device=torch.device("cpu"))
        out, state = _run(spec, samples[start:start + 7], toy, init, state=state)
        pieces += out
    assert all(torch.equal(a, b) for a, b in zip(whole, pieces, strict=True))
    assert all(torch.equal(final[k], state[k]) for k in final)
    empty = method.state_dict(method.init_state(spec, n_classes=7, dim=16, device=torch.device("cpu")))
    assert set(empty) == {"seen"} and set(method.state_dict(final)) == {"seen", "delta", "order", "use"}
    assert int(method.load_state_dict(spec, empty, device=torch.device("cpu"))["seen"]) == 0


def test_the_step_needs_the_engines_context() -> None:
    spec = method_spec_from("dynaprompt")
    samples, toy, init = _problem(0, n=1)
    method = get_method("dynaprompt")
    text = toy.one(init)
    inputs = StepInputs(image_features=samples[0], text_features=text, logit_scale=torch.tensor(100.0),
                        logits=100.0 * samples[0] @ text.T, kinds=("original",) * 16)
    with pytest.raises(RuntimeError, match="context"):
        method.step(spec, method.init_state(spec, n_classes=7, dim=16, device=torch.device("cpu")), inputs)


def test_defaults_are_the_references_and_bad_settings_name_the_field() -> None:
    spec = method_spec_from("dynaprompt")
    assert (spec.n_views, spec.selection_p, spec.steps, spec.lr, spec.weight_decay, spec.num_prompts, spec.append,
            spec.augmix, spec.order_seed) == (64, 0.1, 1, 5e-3, 0.01, 12, True, None, 0)
    assert (spec.prompt.n_ctx, spec.prompt.ctx_init) == (4, "a photo of a")
    method = get_method("dynaprompt")
    assert (method.kind, method.tunes_context, method.views(spec).n_views, method.views(spec).augmix) == (
        "online", True, 64, None)
    assert method.draws_at_random(spec)
    for field, value in [("num_prompts", "1"), ("num_prompts", "257"), ("n_views", "1"), ("selection_p", "0"),
                         ("selection_p", "1.5"), ("steps", "0"), ("lr", "0"), ("lr", "nan"), ("weight_decay", "-1"),
                         ("order_seed", "-1")]:
        with pytest.raises(InvalidSpecError, match=field) as raised:
            method_spec_from("dynaprompt", {field: value})
        assert "\n" not in str(raised.value) and value in str(raised.value)


# --- Through the engine, on a tiny CLIP ----------------------------------------------------------------------


class _PlainText:
    """The reference's TextEncoder over its PromptLearner's prompts, on the tiny CLIP in fp64: full 77-token
    prompts [SOS][ctx][class name, '.', EOT, padding], read at the EOT token."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, n_ctx: int) -> None:
        self.model = model
        self.tokens = tokens
        with torch.no_grad():
            embedding = model.token_embedding(tokens).double()
        self.prefix, self.suffix = embedding[:, :1], embedding[:, 1 + n_ctx:]

    def many(self, ctx: torch.Tensor) -> torch.Tensor:
        n_p, n_cls = ctx.shape[0], self.tokens.shape[0]
        ctx = ctx.unsqueeze(1).expand(-1, n_cls, -1, -1)
        prompts = torch.cat([self.prefix.expand(n_p, -1, -1, -1), ctx, self.suffix.expand(n_p, -1, -1, -1)], dim=-2)
        x = prompts.reshape(-1, *prompts.shape[-2:]) + self.model.positional_embedding
        x = self.model.ln_final(self.model.transformer(x, attn_mask=self.model.attn_mask))
        pool = self.tokens.argmax(-1).repeat(n_p)
        x = x[torch.arange(x.shape[0]), pool] @ self.model.text_projection
        return x / x.norm(dim=-1, keepdim=True)


def test_the_engine_runs_the_stream_as_the_reference_loop(tmp_path: Path) -> None:
    """Through the engine on a tiny CLIP (its truncated, shared-prefix text tower in fp32, its view features):
    the reference loop on the same view features with the plain 77-token text encoder in fp64 gives the
    engine's predictions, across a checkpoint taken half-way."""
    from PIL import Image

    from difftpt_ops.tta import prepare_classifier
    from difftpt_ops.tta.prompts import class_prompt_texts
    from tests.unit.tta_support import CLASS_NAMES, tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    with torch.no_grad():  # at 100 the random model's views get entropies down to 1e-11: see the fp32 test
        clip.model.logit_scale.fill_(math.log(20.0))
    spec = method_spec_from("dynaprompt", {"num_prompts": "4", "n_views": "12", "selection_p": "0.25",
                                           "lr": "0.05"})
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(8)]
    tuner = prepare_classifier(clip, CLASS_NAMES, spec)
    results = [tuner.run(image, seed=0, sample_key=i, augmix=True) for i, image in enumerate(images[:4])]
    resumed = prepare_classifier(clip, CLASS_NAMES, spec)
    resumed.load_state_dict(load_safetensors(save_safetensors(tuner.state_dict())))
    results += [resumed.run(image, seed=0, sample_key=i + 4, augmix=True) for i, image in enumerate(images[4:])]
    features = [tuner.encode_images(tuner.make_views(image, seed=0, sample_key=i, augmix=True).pixels).double()
                for i, image in enumerate(images)]
    reference_clip = copy.deepcopy(clip.model).double()
    plain = _PlainText(reference_clip, clip.tokenizer(class_prompt_texts(CLASS_NAMES, spec.prompt)), 4)
    model = _Reference(tuner.learner.ctx_init.double(), 4, plain.many, float(tuner.logit_scale))
    expected = _reference_stream(features, model, lr=spec.lr, selection_p=spec.selection_p, tta_steps=spec.steps)
    got = torch.stack([r.logits for r in results]).double()
    assert torch.allclose(got, torch.stack(expected), atol=1e-4, rtol=0)
    assert [r.pred for r in results] == [int(x.argmax()) for x in expected]
    assert resumed.state["order"].tolist() == model.ctx_order and resumed.state["use"].tolist() == model.ctx_use
    assert torch.allclose(resumed.state["delta"].double(), model.ctx.detach(), atol=1e-5, rtol=0)
    assert int(resumed.state["seen"]) == 8 and math.isfinite(float(got.sum()))
    assert all(r.n_views == 12 and r.n_kept == 3 for r in results)


def _tiny_clip_at(directory: Path, precision: str, scale: float = 20.0):  # type: ignore[no-untyped-def]
    from difftpt_ops.core.specs import ModelSpec
    from difftpt_ops.models.clip import load_clip
    from difftpt_ops.models.tiny_clip import make_tiny_clip

    if not directory.exists():
        make_tiny_clip(directory)
    clip = load_clip(ModelSpec(name=str(directory), pretrained=None, precision=precision))
    with torch.no_grad():
        clip.model.logit_scale.fill_(math.log(scale))
    return clip


SMALL = {"num_prompts": "4", "n_views": "12", "selection_p": "0.25", "lr": "0.05"}


def test_the_engine_equals_the_naive_formulation(tmp_path: Path) -> None:
    """The engine's truncated, shared-prefix text path and the naive tuner's full 77-token prompts (what the GPU
    check compares in fp16) lend the step the same text encoder: the same stream of predictions and buffer."""
    from difftpt_ops.tta import prepare_classifier
    from difftpt_ops.tta.naive import NaiveTuner
    from tests.unit.tta_support import CLASS_NAMES, random_image

    clip = _tiny_clip_at(tmp_path / "clip", "fp32")
    spec = method_spec_from("dynaprompt", SMALL)
    fast, naive = prepare_classifier(clip, CLASS_NAMES, spec), NaiveTuner(clip, CLASS_NAMES, spec)
    for sample in range(6):
        image = random_image(sample)
        a = fast.run(image, seed=5, sample_key=sample, augmix=True)
        b = naive.run(image, seed=5, sample_key=sample, augmix=True)
        assert a.pred == b.pred and torch.allclose(a.logits, b.logits, atol=1e-4, rtol=0), f"sample {sample}"
        assert a.zeroshot_pred == b.zeroshot_pred
    assert fast.state["order"].tolist() == naive.state["order"].tolist()
    assert fast.state["use"].tolist() == naive.state["use"].tolist()
    assert torch.allclose(fast.state["delta"], naive.state["delta"], atol=1e-5, rtol=0)


def test_half_precision_weights_tune_an_fp32_buffer(tmp_path: Path) -> None:
    """bf16 frozen weights under CPU autocast (the dtype path of fp16 on CUDA): the buffer stays fp32, gets
    gradients through the half-precision tower, and the predictions are finite and, but for rounding flips
    (none on this stream), the fp32 run's."""
    from difftpt_ops.tta import prepare_classifier
    from tests.unit.tta_support import CLASS_NAMES, random_image

    spec = method_spec_from("dynaprompt", SMALL)
    half = prepare_classifier(_tiny_clip_at(tmp_path / "clip", "bf16"), CLASS_NAMES, spec)
    full = prepare_classifier(_tiny_clip_at(tmp_path / "clip", "fp32"), CLASS_NAMES, spec)
    agree = 0
    for sample in range(4):
        image = random_image(sample)
        a = half.run(image, seed=5, sample_key=sample, augmix=True)
        b = full.run(image, seed=5, sample_key=sample, augmix=True)
        assert torch.isfinite(a.logits).all()
        agree += a.pred == b.pred
    assert agree >= 3
    assert half.state["delta"].dtype == torch.float32 and float(half.state["delta"].abs().max()) > 0


@pytest.mark.parametrize("n_prompts", [6, 12])
def test_prompts_that_tie_exactly_rank_by_index_in_fp32_as_in_fp64(n_prompts: int) -> None:
    """Unused prompts give identical logits: their statistics must tie bit for bit, and ties rank by index (the
    code's topk promises no order), so fp32 selects what fp64 selects. Prompt 0 tuned, the others identical, the
    reference prompt each of them in turn, 20 random draws."""
    from difftpt_ops.tta.methods import dynaprompt

    assert dynaprompt.decreasing(torch.zeros(12)) == list(range(12))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tuned = 20 * torch.randn(16, 1, 7, generator=g, dtype=torch.float64)
        unused = 20 * torch.randn(16, 1, 7, generator=g, dtype=torch.float64).expand(16, n_prompts - 1, 7)
        logits = torch.cat([tuned, unused], dim=1)
        for reference in range(n_prompts):
            wide = dynaprompt.select_prompts(logits, reference)
            assert dynaprompt.select_prompts(logits.float(), reference) == wide
