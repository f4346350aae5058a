"""OGA against a transcription of the reference (cfuchs2023/OGA: OGA/OGA_core.py's GaussAdapt as runner.py
drives it), through the registered method, the engine and its checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.tta.methods import get_method, oga
from tests.unit.tta_support import feature_stream, run_online_steps

pytestmark = pytest.mark.unit

SIG_TYPES = {"ridge-moore-penrose": "RidgeMoorePenrose", "ridge": "Ridge", "moore-penrose": "MoorePenrose"}


class _GaussAdapt:
    """The reference's GaussAdapt, in the stream's dtype (it caches fp16 features and entropies and computes the
    rest in fp32). `class_mean="stored"` is this project's option, not the reference's."""

    def __init__(self, prototypes: torch.Tensor, shot_capacity: int, sig_type: str, class_mean: str) -> None:
        n_classes, d = prototypes.shape
        self.K, self.S, self.d, self.sig_type, self.class_mean = n_classes, shot_capacity, d, sig_type, class_mean
        self.mus = prototypes.clone()
        self.inv_sig = d * torch.eye(d, dtype=prototypes.dtype)
        self.memory_state = torch.zeros(n_classes, shot_capacity, dtype=torch.bool)
        self.memory = torch.zeros(n_classes, shot_capacity, d, dtype=prototypes.dtype)
        max_entropy = -torch.log(torch.tensor(1 / n_classes, dtype=torch.float64))
        self.memory_entropy = max_entropy * torch.ones(n_classes, shot_capacity, dtype=prototypes.dtype)

    def _update_memory_entropy(self, x: torch.Tensor, entropy: torch.Tensor, label: int) -> bool:
        if torch.any(entropy < self.memory_entropy[label, :]):
            idx_max = torch.argmax(self.memory_entropy[label, :])
            self.memory[label, idx_max] = x
            self.memory_entropy[label, idx_max] = entropy
            self.memory_state[label, idx_max] = True
            return True
        return False

    def update_memory(self, features: torch.Tensor, zs_entropy: torch.Tensor, zs_labels: torch.Tensor,
                      normalize_mu: bool) -> None:
        updated = False
        for ji in range(zs_labels.shape[0]):
            if self._update_memory_entropy(features[ji, :], zs_entropy[ji], int(zs_labels[ji])):
                updated = True
        if updated:
            self._update_mu(normalize_mu)
            self._update_sigma()

    def _update_mu(self, normalize_mu: bool) -> None:
        if self.class_mean == "capacity":
            means = torch.mean(self.memory_state[..., None] * self.memory, dim=1)
        else:
            means = torch.sum(self.memory_state[..., None] * self.memory, dim=1) / \
                torch.sum(self.memory_state, dim=1).clamp_min(1)[:, None]
        mask = torch.sum(self.memory_state, dim=1) >= 2
        self.mus[mask, :] = means[mask, :]
        if normalize_mu:
            self.mus[mask, :] = self.mus[mask, :] / torch.linalg.norm(self.mus[mask, :], dim=-1, keepdim=True)

    def _center_vecs(self) -> torch.Tensor:
        x = self.memory.view(self.K * self.S, self.d)
        x_state = self.memory_state.view(self.K * self.S)
        x_labels = torch.tensor([k for k in range(self.K) for _ in range(self.S)])
        return torch.cat([x[torch.logical_and(x_state, x_labels == k)] - self.mus[k:k + 1, :] for k in range(self.K)])

    def _update_sigma(self) -> None:
        if not torch.any(torch.sum(self.memory_state, dim=-1) > 2):
            return
        d = self.d
        eye = torch.eye(d, dtype=self.memory.dtype)
        center_vecs = self._center_vecs()
        if self.sig_type == "Ridge":
            m = center_vecs.T.cov()
            trace = torch.sum(m[range(d), range(d)])
            n = center_vecs.shape[0]
            self.inv_sig = d * torch.linalg.pinv((n - 1) * m + trace * eye)
        elif self.sig_type == "RidgeMoorePenrose":
            n = torch.sum(self.memory_state)
            c = center_vecs - center_vecs.mean(dim=0)[None, :]
            m = c.T @ c / (n - 1)
            if n <= 4 * d:
                trace = torch.sum(m[range(d), range(d)])
                self.inv_sig = d * torch.linalg.pinv((n - 1) * m + trace * eye)
            else:
                self.inv_sig = torch.linalg.pinv(m)
        else:
            self.inv_sig = torch.linalg.pinv(center_vecs.T.cov())

    def get_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.einsum("nd, dc -> cn", self.mus, self.inv_sig)
        b = -torch.einsum("nd, dc, nc -> n", self.mus, self.inv_sig, self.mus) / 2
        q = -torch.einsum("nd, dc, nc -> n", x, self.inv_sig, x) / 2
        return x @ w + b + q[:, None]

    @staticmethod
    def get_map(y_hat: torch.Tensor, memory_logits: torch.Tensor, tau: float) -> torch.Tensor:
        p = (tau * memory_logits).softmax(-1)
        z = y_hat * p
        return z / torch.sum(z, dim=1, keepdim=True)


def _oracle(features: torch.Tensor, text: torch.Tensor, p: oga.OGAParams, *, scale: float = 100.0,
            batch_size: int = 1) -> torch.Tensor:
    """runner.py's OGA loop over one stream order: the posteriors (n, C)."""
    return _reference_run(features, text, p, scale=scale, batch_size=batch_size)[0]


def _reference_run(features: torch.Tensor, text: torch.Tensor, p: oga.OGAParams, *, scale: float = 100.0,
                   batch_size: int = 1) -> tuple[torch.Tensor, _GaussAdapt]:
    """runner.py's OGA loop: per batch, update the memory, then the MAP of the batch. (n, C) and the model."""
    zs_logits = scale * features @ text.T
    zs_pred = torch.argmax(zs_logits, dim=-1)
    zs_probs = zs_logits.softmax(-1)
    zs_entropy = -torch.sum(torch.log(zs_probs + 1e-9) * zs_probs, dim=-1)
    model = _GaussAdapt(text, p.shot_capacity, SIG_TYPES[p.covariance], p.class_mean)
    out = []
    for start in range(0, features.shape[0], batch_size):
        idx = slice(start, start + batch_size)
        model.update_memory(features[idx], zs_entropy[idx], zs_pred[idx], p.normalize_mean)
        out.append(model.get_map(zs_probs[idx], model.get_log_probs(features[idx]), p.tau))
    return torch.cat(out), model


def _stream(n: int = 60, n_classes: int = 6, dim: int = 16, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    samples, text = feature_stream(n, n_classes, dim, 1, seed)
    return torch.cat(samples).to(dtype), text.to(dtype)


def _run(spec: oga.OGASpec, features: torch.Tensor, text: torch.Tensor, *,
         state: dict | None = None) -> tuple[list[torch.Tensor], dict]:
    return run_online_steps("oga", spec, features, text, state=state)


VARIANTS = [
    {},
    {"covariance": "ridge"},
    {"covariance": "moore-penrose"},
    {"normalize_mean": "true"},
    {"class_mean": "stored"},
    {"tau": "0.5", "shot_capacity": "3"},
]


@pytest.mark.parametrize("dim", [4, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_oga_matches_the_reference_loop_in_fp64(overrides: dict[str, str], seed: int, dim: int) -> None:
    """Every sample's posterior equals the reference's MAP (batch size 1): at d = 4 the 24 cached features
    pass 4d, so ridge-moore-penrose switches to the pseudo-inverse; at d = 16 it stays on the ridge."""
    features, text = _stream(dim=dim, seed=seed)
    spec = method_spec_from("oga", overrides)
    expected, model = _reference_run(features, text, spec.params())
    outputs, state = _run(spec, features, text)
    got = torch.stack(outputs)
    assert torch.allclose(got.exp(), expected, atol=1e-10, rtol=0)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert int(state["filled"].sum(1).max()) >= 3  # the covariance was refitted
    # The end state is the reference's: the same cache slot for slot, entropies, means and precision.
    assert torch.equal(state["filled"], model.memory_state) and torch.equal(state["memory"], model.memory)
    assert torch.allclose(state["entropy"], model.memory_entropy, atol=1e-12, rtol=0)
    assert torch.allclose(state["means"], model.mus, atol=1e-12, rtol=0)
    assert float((state["precision"] - model.inv_sig).abs().max()) <= 1e-9 * float(model.inv_sig.abs().max())


@pytest.mark.parametrize("overrides", [{}, {"covariance": "ridge"}, {"class_mean": "stored"}],
                         ids=["defaults", "ridge", "stored"])
@pytest.mark.parametrize("seed", [0, 3])
def test_fp32_agrees_with_the_fp64_reference(overrides: dict[str, str], seed: int) -> None:
    """fp32 (the engine's features) agrees with the fp64 reference loop, and the adaptation matters: the
    posteriors move away from the zero-shot probabilities (on these near-text streams, not their argmax)."""
    features, text = _stream(n=80, seed=seed, dtype=torch.float32)
    spec = method_spec_from("oga", overrides)
    expected = _oracle(features.double(), text.double(), spec.params())
    outputs, _ = _run(spec, features, text)
    got = torch.stack(outputs)
    assert torch.allclose(got.exp().double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert float((expected - torch.softmax(100 * features.double() @ text.double().T, -1)).abs().max()) > 1e-2


def test_the_switch_to_the_pseudo_inverse_and_the_moore_penrose_estimator_in_fp32() -> None:
    """Small d, so the scatter is well conditioned: the pseudo-inverse branches agree in fp32 too."""
    features, text = _stream(n=80, dim=4, seed=5, dtype=torch.float32)
    for covariance in ("ridge-moore-penrose", "moore-penrose"):
        spec = oga.OGASpec(covariance=covariance)
        expected = _oracle(features.double(), text.double(), spec.params())
        got = torch.stack(_run(spec, features, text)[0])
        assert torch.allclose(got.exp().double(), expected, atol=1e-5, rtol=0), covariance
        assert torch.equal(got.argmax(1), expected.argmax(1)), covariance


def test_each_sample_updates_the_cache_before_it_is_predicted() -> None:
    """The reference predicts a batch after caching it; with one sample per batch, a sample that enters the cache
    is predicted by the model it changed (another order would give other numbers)."""
    features, text = _stream(seed=1)
    spec = oga.OGASpec()
    outputs, _ = _run(spec, features, text)
    late = _oracle(features, text, spec.params())
    # Predicting before the update: sample i by the model after samples 0..i-1.
    early = torch.cat([_oracle_prefix_predict(features, text, spec.params(), i) for i in range(features.shape[0])])
    assert torch.allclose(torch.stack(outputs).exp(), late, atol=1e-9, rtol=0)
    assert not torch.allclose(late, early, atol=1e-3, rtol=0)


def _oracle_prefix_predict(features: torch.Tensor, text: torch.Tensor, p: oga.OGAParams, i: int) -> torch.Tensor:
    """The reference model after samples 0..i-1, predicting sample i (1, C)."""
    zs_logits = 100 * features @ text.T
    zs_probs = zs_logits.softmax(-1)
    zs_entropy = -torch.sum(torch.log(zs_probs + 1e-9) * zs_probs, dim=-1)
    model = _GaussAdapt(text, p.shot_capacity, SIG_TYPES[p.covariance], p.class_mean)
    for j in range(i):
        model.update_memory(features[j:j + 1], zs_entropy[j:j + 1], zs_logits[j:j + 1].argmax(-1), p.normalize_mean)
    return model.get_map(zs_probs[i:i + 1], model.get_log_probs(features[i:i + 1]), p.tau)


def _run_in_batches(spec: oga.OGASpec, features: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The stream as the online runner drives a method that predicts in batches: a step per sample, then, at the
    end of each batch of `spec.batch_size` and of the stream, `predict` for every sample of the batch with the
    state after it. The posteriors (n, C) and the end state."""
    from difftpt_ops.tta.methods import StepInputs

    method = get_method("oga")
    assert method.block_size(spec) == spec.batch_size
    state = method.init_state(spec, n_classes=text.shape[0], dim=text.shape[1], device=torch.device("cpu"))
    held: list[StepInputs] = []
    final = []
    for i, x in enumerate(features):
        views = x[None]
        inputs = StepInputs(image_features=views, text_features=text, logit_scale=torch.tensor(100.0),
                            logits=100.0 * views @ text.T, kinds=("original",))
        _, state = method.step(spec, state, inputs)
        held.append(inputs)
        if (i + 1) % spec.batch_size == 0 or i + 1 == features.shape[0]:
            final += [method.predict(spec, state, inputs) for inputs in held]
            held = []
    return torch.stack(final).exp(), state


@pytest.mark.parametrize("batch_size", [32, 5, 2])
@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("overrides", [{}, {"covariance": "ridge"}, {"class_mean": "stored", "shot_capacity": "3"}],
                         ids=["defaults", "ridge", "stored-3"])
def test_batches_match_the_reference_loop_with_its_batch_size(overrides: dict[str, str], seed: int,
                                                              batch_size: int) -> None:
    """runner.py's batches (its default 32; 70 samples end with a shorter one): every sample is predicted with
    the model fitted on its whole batch, later samples of the batch included; the end state is the reference's
    and the same as with batches of 1 (the batch only delays the predictions)."""
    features, text = _stream(n=70, dim=16, seed=seed)
    spec = method_spec_from("oga", {**overrides, "batch_size": str(batch_size)})
    expected, model = _reference_run(features, text, spec.params(), batch_size=batch_size)
    got, state = _run_in_batches(spec, features, text)
    assert torch.allclose(got, expected, atol=1e-10, rtol=0)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.equal(state["memory"], model.memory) and torch.allclose(state["means"], model.mus, atol=1e-12)
    assert float((state["precision"] - model.inv_sig).abs().max()) <= 1e-9 * float(model.inv_sig.abs().max())
    per_sample, sample_state = _run(spec, features, text)
    assert torch.equal(state["precision"], sample_state["precision"])
    # The batches matter: the same stream predicted sample by sample (batch 1) gives other posteriors, by far
    # more than the tolerance above.
    assert float((got - torch.stack(per_sample).exp()).abs().max()) > 1e-3


def test_checkpointed_state_continues_exactly() -> None:
    """The state through safetensors mid-stream gives the uninterrupted stream's outputs bit for bit, at several
    cut points (before the covariance's first refit and after it)."""
    features, text = _stream(n=40, dtype=torch.float32)
    spec = oga.OGASpec(shot_capacity=4)
    method = get_method("oga")
    whole, _ = _run(spec, features, text)
    for cut in (1, 5, 17, 33):
        first, state = _run(spec, features[:cut], text)
        saved = load_safetensors(save_safetensors(method.state_dict(state)))
        restored = method.load_state_dict(spec, saved, device=torch.device("cpu"))
        rest, _ = _run(spec, features[cut:], text, state=restored)
        assert all(torch.equal(a, b) for a, b in zip(first + rest, whole, strict=True)), f"cut at {cut}"


def test_the_checkpoint_keeps_only_the_filled_slots() -> None:
    features, text = _stream(n=5, n_classes=10, dtype=torch.float32)
    method = get_method("oga")
    _, state = _run(oga.OGASpec(), features, text)
    saved = method.state_dict(state)
    assert saved["memory"].shape == (int(state["filled"].sum()), 16)
    assert method.state_dict(method.init_state(oga.OGASpec(), n_classes=10, dim=16,
                                               device=torch.device("cpu"))) == {"seen": torch.tensor(0)}


def test_tau_zero_is_zero_shot() -> None:
    """With tau = 0 the Gaussian factor is uniform: the posterior is the zero-shot softmax."""
    features, text = _stream(n=20)
    outputs, _ = _run(oga.OGASpec(tau=0.0), features, text)
    assert torch.allclose(torch.stack(outputs).exp(), torch.softmax(100 * features @ text.T, -1), atol=1e-12)


def test_defaults_are_the_references_and_bad_settings_name_the_field() -> None:
    spec = method_spec_from("oga")
    assert (spec.tau, spec.shot_capacity, spec.covariance, spec.normalize_mean, spec.class_mean, spec.batch_size) == (
        0.05, 8, "ridge-moore-penrose", False, "capacity", 32)
    assert (spec.prompts, get_method("oga").views(spec).n_views) == (None, 1)
    for field, value in [("tau", "-1"), ("tau", "nan"), ("shot_capacity", "0"), ("covariance", "ledoit"),
                         ("class_mean", "median"), ("order_seed", "-2"), ("prompts", "nope"),
                         ("batch_size", "0"), ("batch_size", "5000")]:
        with pytest.raises(InvalidSpecError, match=field if field != "prompts" else "prompt") as raised:
            method_spec_from("oga", {field: value})
        assert "\n" not in str(raised.value) and value in str(raised.value)


def test_runs_stored_before_the_batches_read_back_as_batches_of_one() -> None:
    """A spec stored without batch_size (runs made when each sample was predicted as it arrived) rebuilds as
    batch_size 1 and keeps its fingerprint; the default's 32 is stored."""
    from difftpt_ops.core.method_specs import method_spec_from_dict

    per_sample = method_spec_from("oga", {"batch_size": "1"})
    assert "batch_size" not in per_sample.to_dict()
    assert method_spec_from_dict(per_sample.to_dict()) == per_sample
    assert method_spec_from("oga").to_dict()["batch_size"] == 32
    assert method_spec_from_dict(method_spec_from("oga").to_dict()).batch_size == 32


def test_prompts_resolve_per_dataset_format() -> None:
    method = get_method("oga")
    spec = method_spec_from("oga")
    assert method.resolve_for_dataset(spec, "imagenet").prompts == "single"
    assert method.resolve_for_dataset(spec, "dtd").prompts == "dtd"
    assert method.resolve_for_dataset(spec, "imagefolder").prompts == "single"
    assert method.resolve_for_dataset(method_spec_from("oga", {"prompts": "tip"}), "dtd").prompts == "tip"


def test_the_engine_runs_the_stream_as_the_reference_loop(tmp_path: Path) -> None:
    """Through the engine on a tiny CLIP: its view-0 features, text features and logit scale fed to the
    reference loop give the engine's stored posteriors, across a checkpoint taken half-way."""
    from PIL import Image

    from difftpt_ops.tta import prepare_classifier
    from tests.unit.tta_support import CLASS_NAMES, tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    spec = method_spec_from("oga", {"prompts": "single"})
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(8)]
    tuner = prepare_classifier(clip, CLASS_NAMES, spec)
    results = [tuner.run(image, seed=0, sample_key=i) for i, image in enumerate(images[:4])]
    resumed = prepare_classifier(clip, CLASS_NAMES, spec)
    resumed.load_state_dict(load_safetensors(save_safetensors(tuner.state_dict())))
    results += [resumed.run(image, seed=0, sample_key=i + 4) for i, image in enumerate(images[4:])]
    features = torch.cat([tuner.encode_images(tuner.make_views(image, generated=[], seed=0, sample_key=i,
                                                               augmix=False).pixels) for i, image in enumerate(images)])
    text = tuner._initial_text_features()  # noqa: SLF001 - the fixed text features the steps used
    expected = _oracle(features.double(), text.double(), spec.params(), scale=float(tuner.logit_scale))
    got = torch.stack([r.logits for r in results]).double().exp()
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert [r.pred for r in results] == expected.argmax(1).tolist()
    assert int(resumed.state["seen"]) == 8
    assert int(resumed.state["filled"].sum(1).max()) >= 3  # the covariance was refitted on the way


def test_the_engine_holds_a_batch_until_it_closes(tmp_path: Path) -> None:
    """Through the engine: each run's prediction is provisional (the reference's batch of 1) and the tuner holds
    the sample; `close_block` gives the batch's final posteriors (the reference's with batch_size 3) and empties
    it; a reset or a restored state drops what was held."""
    from PIL import Image

    from difftpt_ops.tta import prepare_classifier
    from tests.unit.tta_support import CLASS_NAMES, tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    spec = method_spec_from("oga", {"prompts": "single", "batch_size": "3"})
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(8)]
    tuner = prepare_classifier(clip, CLASS_NAMES, spec)
    provisional, final = [], []
    for i, image in enumerate(images):
        provisional.append(tuner.run(image, seed=0, sample_key=i).logits)
        if (i + 1) % 3 == 0 or i == 7:
            assert tuner.held == (i % 3) + 1
            final += tuner.close_block()
            assert tuner.held == 0
    features = torch.cat([tuner.encode_images(tuner.make_views(image, generated=[], seed=0, sample_key=i,
                                                               augmix=False).pixels) for i, image in enumerate(images)])
    text = tuner._initial_text_features()  # noqa: SLF001 - the fixed text features the steps used
    scale = float(tuner.logit_scale)
    batched = _oracle(features.double(), text.double(), spec.params(), scale=scale, batch_size=3)
    one_by_one = _oracle(features.double(), text.double(), spec.params(), scale=scale)
    assert torch.allclose(torch.stack(final).double().exp(), batched, atol=1e-5, rtol=0)
    assert torch.allclose(torch.stack(provisional).double().exp(), one_by_one, atol=1e-5, rtol=0)
    tuner.run(images[0], seed=0, sample_key=0)
    saved = tuner.state_dict()
    tuner.reset_state()
    assert tuner.held == 0
    tuner.run(images[0], seed=0, sample_key=0)
    tuner.load_state_dict(saved)
    assert tuner.held == 0 and tuner.close_block() == []


def test_the_precision_refit_survives_matrices_on_which_lapacks_svd_fails() -> None:
    """A 512 x 512 ridge matrix of 355 random residuals on which the CPU's divide-and-conquer SVD (the default
    pinv) stops with "failed to converge" on one thread, as a run's refit did: the refit's eigendecomposition
    gives the pseudo-inverse that fp64 gives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        residuals = 0.05 * torch.randn(355, 512, generator=torch.Generator().manual_seed(40))
        precision = oga._precision(residuals, "ridge")
    finally:
        torch.set_num_threads(threads)
    wide = residuals.double()
    centred = wide - wide.mean(0)
    scatter = centred.T @ centred / 354
    expected = 512 * torch.linalg.pinv(354 * scatter + torch.trace(scatter) * torch.eye(512, dtype=torch.float64))
    assert torch.allclose(precision.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
