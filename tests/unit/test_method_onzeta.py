"""OnZeta against a transcription of the reference loop (idstcv/OnZeta, main_online.py), through the
registered method, the engine and its checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.tta.methods import get_method, onzeta
from tests.unit.tta_support import feature_stream, run_online_steps

pytestmark = pytest.mark.unit


def _oracle(image_feat: torch.Tensor, text_classifier: torch.Tensor, p: onzeta.OnZetaParams) -> tuple[
        torch.Tensor, torch.Tensor]:
    """The reference's loop over one stream order, as written there: (combo labels, text labels), (n, C)."""
    n, num_class = image_feat.shape[0], text_classifier.shape[1]
    combo_label = torch.zeros(n, num_class, dtype=image_feat.dtype)
    text_label = torch.zeros(n, num_class, dtype=image_feat.dtype)
    w = text_classifier.clone()
    rho = torch.zeros(num_class, dtype=image_feat.dtype)
    for i in range(n):
        lr = p.cw / math.sqrt(i + 1)
        rlr = p.cr / math.sqrt(i + 1)
        beta = p.beta * math.sqrt((i + 1) / n)
        x = image_feat[i, :]
        tlabel = F.softmax(x @ text_classifier / p.tau_t, dim=0)
        tlabel = tlabel * torch.exp(rho)
        tlabel /= torch.sum(tlabel)
        rho -= rlr * (tlabel - p.alpha / num_class)
        rho[rho < 0] = 0
        text_label[i, :] = tlabel
        vision_label = F.softmax(x @ w / p.tau_i, dim=0)
        combo_label[i, :] = beta * vision_label + (1 - beta) * tlabel
        grad = torch.outer(x, vision_label - tlabel)
        w -= (lr / p.tau_i) * grad
        w = F.normalize(w, dim=0)
    return combo_label, text_label


def _stream(n: int = 40, n_classes: int = 6, dim: int = 16, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    samples, text = feature_stream(n, n_classes, dim, 1, seed)
    return torch.cat(samples).to(dtype), text.to(dtype)


def _run(spec: onzeta.OnZetaSpec, features: torch.Tensor, text: torch.Tensor, *, stream_length: int | None = None,
         state: dict | None = None) -> tuple[list[torch.Tensor], dict]:
    return run_online_steps("onzeta", spec, features, text, state=state, stream_length=stream_length)


@pytest.mark.parametrize("predict", ["combo", "text"])
def test_onzeta_matches_the_reference_loop_in_fp64(predict: str) -> None:
    """Every sample's probabilities equal the reference's combo (OnZeta) or text (OnLab) labels."""
    features, text = _stream()
    spec = onzeta.OnZetaSpec(predict=predict)
    combo, text_label = _oracle(features, text.T, spec.params())
    outputs, _ = _run(spec, features, text)
    expected = combo if predict == "combo" else text_label
    assert torch.allclose(torch.stack(outputs).exp(), expected, atol=1e-12, rtol=0)


def test_the_reference_defaults_in_fp32_match_and_adaptation_changes_predictions() -> None:
    """fp32 (the engine's features) agrees with the fp64 reference loop; the online updates matter: the
    predictions differ from zero-shot's argmax on this stream."""
    features, text = _stream(n=60, seed=3, dtype=torch.float32)
    spec = onzeta.OnZetaSpec()
    combo, _ = _oracle(features.double(), text.T.double(), spec.params())
    outputs, _ = _run(spec, features, text)
    assert torch.allclose(torch.stack(outputs).exp().double(), combo, atol=1e-5, rtol=0)
    assert torch.equal(torch.stack(outputs).argmax(1), combo.argmax(1))
    zeroshot = (features @ text.T).argmax(1)
    assert not torch.equal(combo.argmax(1), zeroshot)


def test_the_schedule_uses_the_whole_streams_length() -> None:
    """A prefix of a stream of n (a --limit run) gives the first outputs of the full run, not a run of its
    own length: beta_i = beta * sqrt((i + 1) / n) with n the whole stream."""
    features, text = _stream(n=30)
    spec = onzeta.OnZetaSpec()
    full, _ = _run(spec, features, text)
    prefix, _ = _run(spec, features[:10], text, stream_length=30)
    alone, _ = _run(spec, features[:10], text)
    assert all(torch.equal(a, b) for a, b in zip(prefix, full[:10], strict=True))
    assert not all(torch.allclose(a, b) for a, b in zip(alone, full[:10], strict=True))


def test_checkpointed_state_continues_exactly() -> None:
    """The state through safetensors half-way gives the uninterrupted stream's outputs bit for bit."""
    features, text = _stream(n=24, dtype=torch.float32)
    spec = onzeta.OnZetaSpec()
    method = get_method("onzeta")
    whole, _ = _run(spec, features, text)
    first, state = _run(spec, features[:11], text, stream_length=24)
    saved = load_safetensors(save_safetensors(method.state_dict(state)))
    restored = method.load_state_dict(spec, saved, device=torch.device("cpu"))
    rest, _ = _run(spec, features[11:], text, state=restored)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, whole, strict=True))


def test_a_stream_without_its_length_is_refused() -> None:
    method = get_method("onzeta")
    with pytest.raises(ValueError, match="stream length"):
        method.init_state(onzeta.OnZetaSpec(), n_classes=3, dim=4, device=torch.device("cpu"))


def test_defaults_are_the_references_and_bad_settings_name_the_field() -> None:
    spec = method_spec_from("onzeta")
    assert (spec.tau_t, spec.tau_i, spec.cw, spec.cr, spec.alpha, spec.beta) == (0.01, 0.04, 0.5, 20.0, 1.0, 0.8)
    assert (spec.prompts, spec.predict, get_method("onzeta").views(spec).n_views) == ("tip", "combo", 1)
    for field, value in [("tau_t", "0"), ("tau_i", "-1"), ("cr", "-1"), ("beta", "1.5"), ("predict", "vision"),
                         ("prompts", "nope")]:
        with pytest.raises(InvalidSpecError, match=field if field != "prompts" else "prompt"):
            method_spec_from("onzeta", {field: value})


def test_the_engine_runs_the_stream_as_the_reference_loop(tmp_path: Path) -> None:
    """Through the engine on a tiny CLIP: its view-0 features and its 7-template text features fed to the
    reference loop give the engine's stored probabilities."""
    from PIL import Image

    from difftpt_ops.tta import prepare_classifier
    from tests.unit.tta_support import CLASS_NAMES, tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    spec = method_spec_from("onzeta")
    tuner = prepare_classifier(clip, CLASS_NAMES, spec)
    tuner.stream_length = 5
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(5)]
    results = [tuner.run(image, seed=0, sample_key=i) for i, image in enumerate(images)]
    features = torch.cat([tuner.encode_images(tuner.make_views(image, generated=[], seed=0, sample_key=i,
                                                               augmix=False).pixels) for i, image in enumerate(images)])
    text = tuner._initial_text_features()  # noqa: SLF001 - the fixed 7-template features the steps used
    combo, _ = _oracle(features.double(), text.T.double(), spec.params())
    got = torch.stack([r.logits for r in results]).double().exp()
    assert torch.allclose(got, combo, atol=1e-5, rtol=0)
