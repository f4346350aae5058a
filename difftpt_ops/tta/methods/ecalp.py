"""ECALP (Li et al., ICLR 2025): efficient and context-aware label propagation over a graph of class text nodes
and test nodes that grows by one sample at a time; the zero-shot, training-free path.

Pure torch, no I/O. The formulation follows the reference code (Yushu-Li/ECALP, main.py and
utils/iterative_label_propagation.py, zero-shot mode). Text nodes are the C class text features t_c, labelled
one-hot and never changed. The i-th test sample (from 0) joins the graph twice: as node i, which stays, and as
a transient copy, node i + 1, whose propagated scores are the prediction (the next sample's node takes that
index, so the copy lives for one step only).

1. Context-aware similarity between test nodes: the class text features' per-dimension variance, L2-normalised,
   is a weight vector w; the similarity of an earlier node a and a later node b is cos(w * x_a, x_b).
2. Each test node keeps a bounded list of its most similar test nodes, updated incrementally: on a new
   sample the list drops the previous copy, takes the newcomer and its copy (both at the same similarity) and
   keeps the best `width`, where width follows the reference's schedule (`list_width`: up to k_image + 2, so
   one removal per step never starves the k_image edges that are read). The newcomer's own list is its best
   `width` of every test node, itself and its copy included. The graph reads each list's first
   min(k_image, nodes) entries; those are not always the exact nearest neighbours early in the stream, and
   the lists are what the reference's are, tie-breaking included.
3. Each test node also links to its k_text best classes by plain x . t_c.
4. Every edge weight s is raised to the power gamma, the graph symmetrised (W + W^T) and normalised as
   D^-1/2 W D^-1/2 with D^-1/2 = 1 / (sqrt(degree) + 1e-6).
5. Test scores start from each earlier node's carried label (its top class score from the previous step,
   divided by 5; the newcomer and its copy start at zero) and iterate `iterations` times
   Y <- alpha * W_test,: [I_C; Y] + (1 - alpha) * Y0. The copy's row is the prediction; every node's top
   class score / 5 is carried to the next sample.

The reference returns softmax(10000 * scores); the stored logits are 10000 * scores, whose softmax is that.
The state holds every test node's weighted feature (d floats), its lists and its carried label: it grows
with the stream (docs/methods.md gives the sizes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from difftpt_ops.core.method_specs import MethodSpec, check_descriptions
from difftpt_ops.core.specs import require
from difftpt_ops.tta.methods.base import OnlineMethod, StepInputs, StepOutput, ViewPlan, ViewScores, register
from difftpt_ops.tta.methods.dmn import PROMPTS_BY_FORMAT
from difftpt_ops.tta.methods.ensemble import PromptSetOption, check_prompt_set

NAME = "ecalp"
PAPER = ("Li et al., Efficient and Context-Aware Label Propagation for Zero-/Few-Shot Training-Free Adaptation "
         "of Vision-Language Model, ICLR 2025")
CARRY = 0.2  # the carried label is a node's top score divided by 5 (the reference's constant)
PROBABILITY_SCALE = 10000.0  # the reference's softmax(pred * 10000)
DEGREE_EPS = 1e-6  # in 1 / (sqrt(degree) + eps)
DROPPED = -1.0  # the similarity the previous copy's list entries get: the lowest cosine, so top-k drops them


@dataclass(frozen=True)
class ECALPParams:
    """The numbers ECALP's step needs (main.py's argparse defaults)."""

    k_image: int = 8
    k_text: int = 3
    gamma: float = 10.0
    alpha: float = 1.0
    iterations: int = 3


def list_width(earlier: int, k_image: int) -> tuple[int, int]:
    """(edges read per list, list width) when `earlier` test samples came before the newcomer.

    With N = earlier + 2 test nodes the graph reads min(k_image, N) entries. The lists hold that many while
    the earlier samples are few, then one more, then two: the reference's schedule, which keeps at least the
    read count after the previous copy is dropped.
    """
    read = min(k_image, earlier + 2)
    if earlier == read + 1:
        return read, read + 1
    return read, (read + 2 if earlier > read else read)


def init_state(dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """An empty graph: no test node yet (the text nodes are the run's fixed text features)."""
    empty_long = torch.zeros(0, 0, dtype=torch.long, device=device)
    return {"keys": torch.zeros(0, dim, device=device, dtype=dtype),
            "neighbours": empty_long, "similarity": torch.zeros(0, 0, device=device, dtype=dtype),
            "text_neighbours": empty_long.clone(), "text_similarity": torch.zeros(0, 0, device=device, dtype=dtype),
            "label": torch.zeros(0, dtype=torch.long, device=device),
            "label_score": torch.zeros(0, device=device, dtype=dtype)}


def context_weights(text: Tensor) -> Tensor:
    """The per-dimension variance of the class text features, L2-normalised: dimensions along which the
    classes differ count more in the test-test similarity."""
    return F.normalize(text.var(dim=0), dim=0)


def _grow_lists(state: dict[str, Tensor], pair: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Every test node's list after the newcomer (node n, copy n + 1) joined: (indices, similarities), (n + 1,
    width); the copy's list is the newcomer's (its last row). `pair` (n + 1,) is each node's similarity to the
    newcomer, [n] the newcomer's to itself."""
    n = pair.shape[0] - 1
    # The newcomer's list over every node, its copy last at its own similarity.
    new_sim, new_idx = torch.cat([pair, pair[n:]]).topk(width)
    if n == 0:
        return new_idx[None], new_sim[None]
    old_idx, old_sim = state["neighbours"], state["similarity"]
    # Node n was the previous copy: what pointed to it goes (the newcomer now has that index).
    old_sim = old_sim.masked_fill(old_idx == n, DROPPED)
    both = pair[:n, None].expand(n, 2)
    added = torch.tensor([n, n + 1], device=old_idx.device).expand(n, 2)
    sim, pos = torch.cat([old_sim, both], dim=1).topk(width, dim=1)
    idx = torch.cat([old_idx, added], dim=1).gather(1, pos)
    return torch.cat([idx, new_idx[None]]), torch.cat([sim, new_sim[None]])


def _append(rows: Tensor, row: Tensor) -> Tensor:
    """`rows` with `row` below (the empty state's (0, 0) rows take any width)."""
    return row[None] if rows.shape[0] == 0 else torch.cat([rows, row[None]])


def _edges(neighbours: Tensor, similarity: Tensor, text_neighbours: Tensor, text_similarity: Tensor,
           read: int, n_classes: int, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """(source, target, weight) of every directed edge, node indices with the text nodes first; the last
    test row (the copy) repeats the newcomer's lists."""
    image_idx = torch.cat([neighbours, neighbours[-1:]])[:, :read] + n_classes
    image_sim = torch.cat([similarity, similarity[-1:]])[:, :read]
    text_idx = torch.cat([text_neighbours, text_neighbours[-1:]])
    text_sim = torch.cat([text_similarity, text_similarity[-1:]])
    targets = torch.cat([image_idx, text_idx], dim=1)
    weights = torch.cat([image_sim, text_sim], dim=1).pow(gamma)
    sources = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets) + n_classes
    return sources.flatten(), targets.flatten(), weights.flatten()


def propagation_matrix(sources: Tensor, targets: Tensor, weights: Tensor, n_nodes: int, n_classes: int) -> Tensor:
    """The test rows of D^-1/2 (W + W^T) D^-1/2, (tests, nodes) sparse: both directions of every edge,
    repeated edges summed. (The indices are in range by construction: no invariant checks, and no warning.)"""
    rows, cols = torch.cat([sources, targets]), torch.cat([targets, sources])
    graph = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.cat([weights, weights]),
                                    (n_nodes, n_nodes), check_invariants=False).coalesce()
    degree = torch.sparse.sum(graph, dim=1).to_dense()
    scale = 1.0 / (degree.sqrt() + DEGREE_EPS)
    (row, col), value = graph.indices(), graph.values()
    test = row >= n_classes
    return torch.sparse_coo_tensor(torch.stack([row[test] - n_classes, col[test]]),
                                   value[test] * scale[row[test]] * scale[col[test]],
                                   (n_nodes - n_classes, n_nodes), check_invariants=False).coalesce()


def propagate(matrix: Tensor, start: Tensor, *, alpha: float, iterations: int) -> Tensor:
    """Iterate Y <- alpha * M [I; Y] + (1 - alpha) * Y0 from Y0 = `start` (tests, C): text labels stay fixed."""
    n_classes = start.shape[1]
    labels = torch.eye(n_classes, dtype=start.dtype, device=start.device)
    scores = start
    for _ in range(iterations):
        scores = alpha * torch.sparse.mm(matrix, torch.cat([labels, scores])) + (1 - alpha) * start
    return scores


def step(state: dict[str, Tensor], feature: Tensor, text: Tensor, *,
         params: ECALPParams) -> tuple[Tensor, dict[str, Tensor]]:
    """The propagated class scores (C,) of one sample and the state after it (a new dict).

    `feature` is its image feature (d,), `text` the normalised class text features (C, d); both as the engine
    gives them (normalised).
    """
    n, n_classes = int(state["keys"].shape[0]), text.shape[0]
    keys = torch.cat([state["keys"], F.normalize(feature * context_weights(text), dim=0)[None]])
    # earlier nodes weighted, the newcomer plain: cos(w x_a, x_b); as the reference's (N, d) @ (d, 2) product
    # (a matrix-vector product can round differently, which decides ties between repeated images)
    pair = (keys @ F.normalize(feature, dim=0)[None].expand(2, -1).t())[:, 0]
    read, width = list_width(n, params.k_image)
    neighbours, similarity = _grow_lists(state, pair, width)
    text_sim, text_idx = (feature @ text.T).topk(min(params.k_text, n_classes))
    text_neighbours = _append(state["text_neighbours"], text_idx)
    text_similarity = _append(state["text_similarity"], text_sim)
    # The newcomer's and its copy's edges are the reference's `sim_new`: the top `read` of its similarities by a
    # top-k of their own (on ties, not always the first `read` entries of its wider list).
    read_sim, read_idx = torch.cat([pair, pair[n:]]).topk(read)
    edges = _edges(torch.cat([neighbours[:-1, :read], read_idx[None]]),
                   torch.cat([similarity[:-1, :read], read_sim[None]]),
                   text_neighbours, text_similarity, read, n_classes, params.gamma)
    matrix = propagation_matrix(*edges, n_nodes=n_classes + n + 2, n_classes=n_classes)
    start = torch.zeros(n + 2, n_classes, dtype=feature.dtype, device=feature.device)
    start[torch.arange(n, device=feature.device), state["label"]] = state["label_score"]
    scores = propagate(matrix, start, alpha=params.alpha, iterations=params.iterations)
    top_score, top_class = scores.topk(1, dim=1)
    state = {"keys": keys, "neighbours": neighbours, "similarity": similarity, "text_neighbours": text_neighbours,
             "text_similarity": text_similarity, "label": top_class[: n + 1, 0],
             "label_score": top_score[: n + 1, 0] * CARRY}  # the copy's label goes with it
    return scores[-1], state


def state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy for a checkpoint: the node indices as int32 (a list entry is at most the node count)."""
    saved = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}
    for name in ("neighbours", "text_neighbours", "label"):
        saved[name] = saved[name].to(torch.int32)
    return saved


def load_state_dict(saved: Mapping[str, Tensor], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The state from `state_dict` output, on `device`."""
    return {name: tensor.to(device, torch.long if not tensor.is_floating_point() else tensor.dtype).clone()
            for name, tensor in saved.items()}


# --- The registered method ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ECALPSpec(MethodSpec):
    """ECALP, zero-shot, with the reference's defaults (main.py's argparse defaults)."""

    method: ClassVar[str] = NAME
    order_seed: int = 0  # the stream order: a seeded permutation of the dataset version's samples
    k_image: int = 8  # test-test edges read per test node
    k_text: int = 3  # test-text edges per test node
    gamma: float = 10.0  # every edge weight is its similarity to this power
    alpha: float = 1.0  # propagation weight; 1 - alpha of the carried labels is added back each iteration
    iterations: int = 3  # propagation iterations per sample
    prompts: str | None = None  # None: the templates of DMN's classifier for the dataset (its features' source)
    descriptions: str | None = None  # class descriptions averaged in with the prompts (docs/methods.md)
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "descriptions": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.order_seed >= 0, "order_seed", self.order_seed, "must be >= 0")
        for name in ("k_image", "k_text", "iterations"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.gamma > 0, "gamma", self.gamma, "must be > 0")
        require(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "must be in [0, 1]")
        if self.prompts is not None:
            check_prompt_set(self.prompts)
        check_descriptions(self.descriptions)

    def params(self) -> ECALPParams:
        return ECALPParams(k_image=self.k_image, k_text=self.k_text, gamma=self.gamma, alpha=self.alpha,
                           iterations=self.iterations)


@register
class ECALP(PromptSetOption, OnlineMethod):
    name: ClassVar[str] = NAME
    spec_class = ECALPSpec
    summary: ClassVar[str] = "label propagation over a graph of class texts and the test stream, grown per sample"
    paper: ClassVar[str] = PAPER
    reference: ClassVar[str] = "Yushu-Li/ECALP"

    def views(self, spec: ECALPSpec) -> ViewPlan:
        return ViewPlan(n_conventional=0, resolution=spec.resolution)

    def resolve_for_dataset(self, spec: ECALPSpec, dataset_format: str) -> ECALPSpec:
        """The spec with DMN's templates for the dataset (the reference classifies with DMN's text features)."""
        return dataclasses.replace(spec, prompts=spec.prompts or PROMPTS_BY_FORMAT.get(dataset_format, "single"))

    def init_state(self, spec: ECALPSpec, *, n_classes: int, dim: int, device: torch.device,
                   stream_length: int | None = None) -> dict[str, Tensor]:
        return init_state(dim, device)

    def step(self, spec: ECALPSpec, state: dict[str, Tensor],
             inputs: StepInputs) -> tuple[StepOutput, dict[str, Tensor]]:
        # On the features' device: each step propagates over every test node so far.
        scores, state = step(state, inputs.image_features[0], inputs.text_features, params=spec.params())
        return StepOutput(logits=(PROBABILITY_SCALE * scores).to(inputs.logits.device),
                          scores=ViewScores.original_only(inputs.logits)), state

    def state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state_dict(state)

    def load_state_dict(self, spec: ECALPSpec, tensors: Mapping[str, Tensor], *,
                        device: torch.device) -> dict[str, Tensor]:
        return load_state_dict(tensors, device)
