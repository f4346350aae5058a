"""ECALP against a transcription of the reference's zero-shot loop (Yushu-Li/ECALP, main.py and
utils/iterative_label_propagation.py), through the registered method, the engine and its checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.tta.methods import ecalp, get_method, resolve_for_dataset
from tests.unit.tta_support import feature_stream, run_online_steps

pytestmark = pytest.mark.unit


class _Reference:
    """The reference's zero-shot path written out as its code runs it: its module globals are attributes here.
    Only the label matrices' dtype follows the features (the code makes them float32: fp64 features would
    not multiply with them), and the final row is read from the dense matrix (this torch cannot index a sparse
    one as the 1.13 the authors used could)."""

    def __init__(self, p: ecalp.ECALPParams) -> None:
        self.p = p
        self.sim_im2im = self.knn_im2im = self.sim_store = self.knn_store = None
        self.sim_im2text = self.knn_im2text = None
        self.y0 = self.y_txt = None

    @staticmethod
    def _reweighted(x: torch.Tensor, q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # edge_reweighting(X, Q, a, force_1=True, return_full=True)
        weights = F.normalize(a.var(dim=0), p=2, dim=0)
        return F.normalize(q * weights, p=2, dim=1) @ F.normalize(x, p=2, dim=1).t()

    def _graph(self, features: torch.Tensor, clf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # dynamic_graph_expansion without few-shot features
        num_classes, num_features = clf.shape[0], features.shape[0]
        first_time = self.sim_im2im is None or num_features == 2
        k = min(self.p.k_image, num_features)
        if first_time:
            full = self._reweighted(features, features, clf)
            self.sim_im2im, self.knn_im2im = full[:num_features, :num_features].topk(k, largest=True, dim=1)
            self.sim_store, self.knn_store = self.sim_im2im.clone(), self.knn_im2im.clone()
        else:
            cr = self._reweighted(features[-2:], features, clf).t()
            sim_new, knn_new = cr.topk(k, largest=True, dim=1)
            new_idx = torch.full((self.knn_im2im.shape[0] - 1, 1), num_features - 1, dtype=knn_new.dtype)
            self.sim_store[self.knn_store == num_features - 2] = -1.0
            sim_ext = torch.cat([self.sim_store[:-1], cr[:, :num_features - 2].transpose(1, 0)], dim=1)
            knn_ext = torch.cat([self.knn_store[:-1], new_idx - 1, new_idx], dim=1)
            if sim_ext.shape[0] == k + 1:
                k_new = k + 1
            elif sim_ext.shape[0] > k:
                k_new = k + 2
            else:
                k_new = k
            self.sim_store, ht = sim_ext.topk(k_new, largest=True, dim=1)
            sim_im2im = self.sim_store[:, :k]
            self.knn_store = knn_ext.gather(1, ht)
            knn_im2im = self.knn_store[:, :k]
            if sim_ext.shape[0] > k:
                more_sim, more_knn = cr.topk(k_new, largest=True, dim=1)
                self.sim_store = torch.cat([self.sim_store, more_sim], dim=0)
                self.knn_store = torch.cat([self.knn_store, more_knn], dim=0)
            else:
                self.sim_store = torch.cat([self.sim_store, sim_new], dim=0)
                self.knn_store = torch.cat([self.knn_store, knn_new], dim=0)
            self.sim_im2im = torch.cat([sim_im2im, sim_new], dim=0)
            self.knn_im2im = torch.cat([knn_im2im, knn_new], dim=0)
        k_text = min(self.p.k_text, num_classes)
        if first_time:
            self.sim_im2text, self.knn_im2text = features.mm(clf.t())[:num_features].topk(k_text, largest=True, dim=1)
        else:
            sim_new, knn_new = features[-1].unsqueeze(0).mm(clf.t()).topk(k_text, largest=True, dim=1)
            self.sim_im2text = torch.cat((self.sim_im2text[:-1], sim_new, sim_new), dim=0)
            self.knn_im2text = torch.cat((self.knn_im2text[:-1], knn_new, knn_new), dim=0)
        knn = torch.cat((self.knn_im2im + num_classes, self.knn_im2text), dim=1)
        sim = torch.cat((self.sim_im2im, self.sim_im2text), dim=1)
        knn = torch.cat((-1 * torch.ones((num_classes, knn.shape[1]), dtype=knn.dtype), knn), dim=0)
        sim = torch.cat((torch.zeros((num_classes, sim.shape[1]), dtype=sim.dtype), sim), dim=0)
        return knn, sim

    @staticmethod
    def _adjacency(knn: torch.Tensor, s: torch.Tensor, num_nodes: int) -> torch.Tensor:
        # knn_to_weighted_adj_matrix
        knn_indices, distances = knn.flatten(), s.flatten()
        knn_indices[knn_indices == -1] = 0
        rows = torch.arange(num_nodes).repeat_interleave(knn.shape[1])
        keep = distances != 0
        return torch.sparse_coo_tensor(torch.stack([rows[keep], knn_indices[keep]]), distances[keep],
                                       (num_nodes, num_nodes))

    @staticmethod
    def _rows(matrix: torch.Tensor, start: int, end: int) -> torch.Tensor:
        # sparse_slice
        indices, values = matrix.indices(), matrix.values()
        mask = (indices[0] >= start) & (indices[0] < end)
        new_indices = indices[:, mask]
        new_indices[0] = new_indices[0] - start
        return torch.sparse_coo_tensor(new_indices, values[mask], (end - start, matrix.size(1)))

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        # iterative_label_propagation without few-shot features: the raw scores (before * 10000 and softmax)
        if image_features.shape[0] == 2:
            self.y0 = self.y_txt = None
        num_class, dtype = text_features.shape[0], image_features.dtype
        knn, sim = self._graph(image_features, text_features)
        mask = knn < num_class
        sim[mask] = sim[mask] ** self.p.gamma
        mask = knn >= num_class
        sim[mask] = sim[mask] ** self.p.gamma
        w = self._adjacency(knn, sim, image_features.shape[0] + num_class)
        w = w.transpose(0, 1) + w
        diag = 1 / (torch.sqrt(torch.sparse.sum(w, dim=1).to_dense()) + 1e-6)
        indices = torch.arange(w.size(0))
        d = torch.sparse_coo_tensor(torch.stack([indices, indices]), diag, (w.size(0), w.size(0)))
        w_tilde = torch.sparse.mm(d, torch.sparse.mm(w, d))
        if self.y_txt is None or self.y_txt.shape[0] != num_class:
            self.y_txt = torch.eye(num_class, dtype=dtype).to_sparse()
            self.y0 = torch.zeros((w_tilde.size(0) - num_class, num_class), dtype=dtype).to_sparse()
        else:
            self.y0 = torch.cat((self.y0[:-1], torch.zeros((2, num_class), dtype=dtype)), dim=0).to_sparse()
        y_hat = torch.cat((self.y_txt, self.y0), dim=0)
        w0 = self._rows(w_tilde.coalesce(), num_class, w_tilde.size(0))
        for _ in range(self.p.iterations):
            y_t = self.p.alpha * torch.sparse.mm(w0, y_hat) + (1 - self.p.alpha) * self.y0
            y_hat = torch.cat((self.y_txt, y_t), dim=0)
        dense = y_hat.to_dense()
        pred = dense[-1, :num_class]
        tensor = dense[num_class:, :num_class]
        top_values, top_indices = torch.topk(tensor, 1, dim=1)
        self.y0 = torch.zeros_like(tensor)
        self.y0.scatter_(1, top_indices, top_values / 5)
        return pred


def _oracle(features: torch.Tensor, text: torch.Tensor, p: ecalp.ECALPParams) -> torch.Tensor:
    """main.py's loop: sample i joins as the stream so far plus itself again. Raw scores, (n, C)."""
    reference = _Reference(p)
    with torch.no_grad():
        return torch.stack([reference(torch.cat((features[: i + 1], features[i].unsqueeze(0)), dim=0), text)
                            for i in range(features.shape[0])])


def _stream(n: int = 30, n_classes: int = 6, dim: int = 16, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    samples, text = feature_stream(n, n_classes, dim, 1, seed)
    return torch.cat(samples).to(dtype), text.to(dtype)


def _run(spec: ecalp.ECALPSpec, features: torch.Tensor, text: torch.Tensor,
         state: dict | None = None) -> tuple[list[torch.Tensor], dict]:
    return run_online_steps("ecalp", spec, features, text, state=state)


# The code's settings: its defaults, short lists (every phase of the list-width schedule within a few samples),
# one text edge, another power, a propagation that keeps some of the carried labels, one and five iterations.
VARIANTS = {"defaults": {}, "k_image=3": {"k_image": 3}, "k_text=1": {"k_text": 1}, "gamma=4": {"gamma": 4.0},
            "alpha=0.7": {"alpha": 0.7}, "iterations=1": {"iterations": 1},
            "iterations=5,k_image=2": {"iterations": 5, "k_image": 2}}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ecalp_matches_the_reference_loop_in_fp64(variant: str, seed: int) -> None:
    """Every sample's scores (the logits / 10000) equal the reference's prediction row (to 1e-9 relative:
    well inside 1e-6; the two differ by summation order only)."""
    features, text = _stream(seed=seed)
    spec = ecalp.ECALPSpec(**VARIANTS[variant])
    expected = _oracle(features, text, spec.params())
    outputs, _ = _run(spec, features, text)
    got = torch.stack(outputs) / ecalp.PROBABILITY_SCALE
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-15), float((got - expected).abs().max())
    assert torch.equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("seed", [3, 4])
def test_fp32_matches_the_reference_and_propagation_changes_predictions(seed: int) -> None:
    """fp32 (the engine's features) agrees with the reference run in fp32 and in fp64; the graph matters: the
    predictions differ from zero-shot's argmax on this stream."""
    features, text = _stream(n=60, seed=seed, dtype=torch.float32)
    spec = ecalp.ECALPSpec()
    outputs, _ = _run(spec, features, text)
    got = torch.stack(outputs) / ecalp.PROBABILITY_SCALE
    same_precision = _oracle(features, text, spec.params())
    assert torch.allclose(got, same_precision, rtol=2e-5, atol=1e-9)  # observed: 4e-6 relative
    assert torch.equal(got.argmax(1), same_precision.argmax(1))
    double = _oracle(features.double(), text.double(), spec.params())
    assert torch.allclose(got.double(), double, rtol=1e-3, atol=1e-6)
    zeroshot = (features @ text.T).argmax(1)
    assert not torch.equal(got.argmax(1), zeroshot)


def test_list_width_follows_the_references_schedule() -> None:
    """Lists as wide as the nodes while they are few, then k, k + 1 and finally k + 2; k edges read."""
    widths = [ecalp.list_width(earlier, 8) for earlier in range(13)]
    assert widths == [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (8, 8), (8, 8), (8, 9), (8, 10),
                      (8, 10), (8, 10)]


def test_the_state_holds_every_test_node_and_nothing_per_class() -> None:
    """After n samples: n weighted features, n lists of k + 2, n text lists and carried labels."""
    features, text = _stream(n=20, dtype=torch.float32)
    _, state = _run(ecalp.ECALPSpec(), features, text)
    assert state["keys"].shape == (20, 16) and state["neighbours"].shape == state["similarity"].shape == (20, 10)
    assert state["text_neighbours"].shape == (20, 3) and state["label"].shape == state["label_score"].shape == (20,)
    assert int(state["neighbours"].max()) <= 20  # the newest copy's index at most


def test_checkpointed_state_continues_exactly() -> None:
    """The state through safetensors mid-stream gives the uninterrupted stream's outputs bit for bit."""
    features, text = _stream(n=24, dtype=torch.float32)
    spec = ecalp.ECALPSpec()
    method = get_method("ecalp")
    whole, _ = _run(spec, features, text)
    for cut in (1, 11):
        first, state = _run(spec, features[:cut], text)
        saved = load_safetensors(save_safetensors(method.state_dict(state)))
        assert saved["neighbours"].dtype == torch.int32
        restored = method.load_state_dict(spec, saved, device=torch.device("cpu"))
        rest, _ = _run(spec, features[cut:], text, state=restored)
        assert all(torch.equal(a, b) for a, b in zip(first + rest, whole, strict=True)), f"cut at {cut}"


def test_defaults_are_the_references_and_bad_settings_name_the_field() -> None:
    spec = method_spec_from("ecalp")
    assert (spec.k_image, spec.k_text, spec.gamma, spec.alpha, spec.iterations) == (8, 3, 10.0, 1.0, 3)
    assert get_method("ecalp").views(spec).n_views == 1
    assert resolve_for_dataset(spec, "imagenet-a").prompts == "tip"
    assert resolve_for_dataset(spec, "dtd").prompts == "dtd"
    for field, value in [("k_image", "0"), ("k_text", "0"), ("gamma", "0"), ("alpha", "1.5"), ("iterations", "0"),
                         ("order_seed", "-1"), ("prompts", "nope")]:
        with pytest.raises(InvalidSpecError, match=field if field != "prompts" else "prompt"):
            method_spec_from("ecalp", {field: value})


def test_the_engine_runs_the_stream_as_the_reference_loop(tmp_path: Path) -> None:
    """Through the engine on a tiny CLIP: its view-0 features and its text features fed to the reference loop
    give the engine's stored logits, and a tuner restored from a checkpoint mid-stream continues them."""
    from PIL import Image

    from difftpt_ops.tta import prepare_classifier
    from tests.unit.tta_support import CLASS_NAMES, tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    spec = method_spec_from("ecalp")
    tuner = prepare_classifier(clip, CLASS_NAMES, spec)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(12)]
    results = [tuner.run(image, seed=0, sample_key=i) for i, image in enumerate(images)]
    features = torch.cat([tuner.encode_images(tuner.make_views(image, generated=[], seed=0, sample_key=i,
                                                               augmix=False).pixels) for i, image in enumerate(images)])
    text = tuner._text_features(grad=False)  # noqa: SLF001 - the class features the steps used
    expected = _oracle(features.double(), text.double(), spec.params())
    got = torch.stack([r.logits for r in results]).double() / ecalp.PROBABILITY_SCALE
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-6)
    assert [r.pred for r in results] == expected.argmax(1).tolist()

    method = get_method("ecalp")
    half = prepare_classifier(clip, CLASS_NAMES, spec)
    for i, image in enumerate(images[:5]):
        half.run(image, seed=0, sample_key=i)
    saved = load_safetensors(save_safetensors(method.state_dict(half.state)))
    resumed = prepare_classifier(clip, CLASS_NAMES, spec)
    resumed.state = method.load_state_dict(spec, saved, device=torch.device("cpu"))
    rest = [resumed.run(image, seed=0, sample_key=i + 5) for i, image in enumerate(images[5:])]
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(rest, results[5:], strict=True))


@pytest.mark.parametrize("k_image", [1, 3, 8])
def test_a_stream_with_repeated_images_matches_the_reference(k_image: int) -> None:
    """A test set with duplicate images (the same features twice in the stream) against the transcription. Ties
    between a repeated node, the newcomer and its copy are decided as the reference decides them: by the rounding of
    its (N, d) @ (d, 2) product, and for the newcomer's edges by a top-k of width k_image of their own."""
    features, text = _stream(seed=0)
    features = torch.cat([features[:10], features[:10], features[10:20]])
    spec = ecalp.ECALPSpec(k_image=k_image)
    expected = _oracle(features, text, spec.params())
    got = torch.stack(_run(spec, features, text)[0]) / ecalp.PROBABILITY_SCALE
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-12), float((got - expected).abs().max())
