"""The theory paper's synthetic experiment: masked modelling against contrastive learning on a
one-layer softmax attention (Huang, Wen, Chi & Liang, ICLR 2025).

The paper has no official code; this is our reconstruction of its data model and measurements:

* Images are ``P`` patches on a grid; each belongs to one of ``K`` clusters. Cluster ``k``
  splits the patches into one **global area** and ``n_local`` **local areas** of ``C`` patches
  each (a random partition drawn once per cluster).
* Features ``v_{k,j}`` (cluster ``k``, area ``j``; ``j = 0`` global) and positions ``e_p`` are
  orthonormal (standard basis vectors of ``R^d``, ``d = K (1 + n_local) + P``). Patch ``p`` in
  area ``j`` of an image of cluster ``k`` is ``x_p = z_j v_{k,j}`` with one ``z_j`` per image and
  area: ``z_0 ~ U[L, U] * imbalance`` for the global area, ``z_j ~ U[L, U] * local_scale`` for
  local ones. ``imbalance`` is the knob: how much stronger the global feature is.
* The model is one softmax attention with a merged key-query matrix ``Q`` (initialised 0, so
  attention starts uniform) on inputs ``h_p = x_p + e_p``, values ``x_q`` (a masked patch has
  ``x = 0``; its position stays):

      F_p = sum_q softmax_q(h_q^T Q h_p) x_q.

* ``attention="linear"`` replaces the softmax by linear attention (Katharopoulos et al. 2020)
  on the same query ``Q h_p`` and key ``h_q``: ``a_pq = phi(Q h_p).phi(h_q) / sum_q'
  phi(Q h_p).phi(h_q')`` with ``phi = elu + 1``; at ``Q = 0`` it is nearly uniform (each key
  weighted by ``sum_d phi(h_q)_d``, between ``d`` and ``d + 3`` here).
* ``layers = L > 1`` stacks ``L`` such attentions, each with its own ``Q_l`` (all from 0) and
  no residual or value matrix, so that the one-layer model is the case ``L = 1``: layer ``l``
  attends on ``h^l = x^l + e`` and outputs ``x^{l+1}_p = sum_q softmax_q(h^l_q^T Q_l h^l_p)
  x^l_q`` with ``x^0 = x``; ``F = x^L``. Each layer is measured on its own inputs.
* MAE: each patch is masked with probability ``gamma``; loss ``1/2 sum_{p masked} ||F_p - x_p||^2``
  (mean over images). CL: two independently masked views of each image, pooled outputs
  ``mean_p F_p``, InfoNCE (NT-Xent) against the batch's other images.
* Measured on clean images: per query patch, the attention mass on its own area and on the
  global area (local and global queries apart), and the diversity ``1 - mean cos(a_p, a_q)``
  over query pairs in different areas (:func:`attnssl.functional.attention_metrics.attention_diversity`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from attnssl.functional.attention_metrics import attention_diversity
from attnssl.functional.info_nce import nt_xent
from attnssl.nn.linear_attention import elu_feature_map


@dataclass(frozen=True)
class DataModel:
    """The patch/cluster/area structure and the feature magnitudes."""

    grid: int = 6
    clusters: int = 2
    local_areas: int = 3
    local_size: int = 3
    low: float = 1.0
    high: float = 2.0
    imbalance: float = 2.0
    local_scale: float = 0.3
    seed: int = 0

    @property
    def patches(self) -> int:
        return self.grid * self.grid

    @property
    def width(self) -> int:
        return self.clusters * (1 + self.local_areas) + self.patches

    def areas(self) -> torch.Tensor:
        """``(K, P)``: the area of each patch in each cluster (0 global, 1..n_local local)."""
        if self.local_areas * self.local_size >= self.patches:
            raise ValueError(
                f"local_areas * local_size = {self.local_areas * self.local_size} leaves no "
                f"global area on {self.patches} patches; lower one of them"
            )
        g = torch.Generator().manual_seed(self.seed)
        areas = torch.zeros(self.clusters, self.patches, dtype=torch.long)
        for k in range(self.clusters):
            order = torch.randperm(self.patches, generator=g)
            for j in range(self.local_areas):
                areas[k, order[j * self.local_size:(j + 1) * self.local_size]] = j + 1
        return areas


def feature_index(data: DataModel, cluster: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Basis index of ``v_{k,j}``; positions ``e_p`` follow at ``K (1 + n_local) + p``."""
    return cluster * (1 + data.local_areas) + area


def sample_images(data: DataModel, count: int, generator: torch.Generator,
                  areas: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x (B, P, d)`` patch features, ``cluster (B,)`` and ``area (B, P)`` of each patch."""
    cluster = torch.randint(0, data.clusters, (count,), generator=generator)
    area = areas[cluster]  # (B, P)
    z = data.low + (data.high - data.low) * torch.rand(count, 1 + data.local_areas,
                                                       generator=generator)
    z[:, 0] *= data.imbalance
    z[:, 1:] *= data.local_scale
    x = torch.zeros(count, data.patches, data.width)
    index = feature_index(data, cluster.view(-1, 1), area)
    x.scatter_(2, index.unsqueeze(-1), z.gather(1, area).unsqueeze(-1))
    return {"x": x, "cluster": cluster, "area": area}


def positions(data: DataModel) -> torch.Tensor:
    """``(P, d)``: the positional embeddings ``e_p`` (basis vectors after the features)."""
    e = torch.zeros(data.patches, data.width)
    e[torch.arange(data.patches), data.clusters * (1 + data.local_areas)
      + torch.arange(data.patches)] = 1
    return e


ATTENTIONS = ("softmax", "linear")


def attention(q: torch.Tensor, x: torch.Tensor, e: torch.Tensor,
              kind: str = "softmax") -> torch.Tensor:
    """``(B, P_query, P_key)``: ``softmax_q(h_q^T Q h_p)`` with ``h = x + e``, or its linear
    counterpart ``phi(Q h_p).phi(h_q)`` normalised over ``q`` (``kind="linear"``)."""
    h = x + e
    queries = h @ q.T  # row p: (Q h_p)^T
    if kind == "softmax":
        return (queries @ h.transpose(1, 2)).softmax(dim=-1)
    if kind == "linear":
        sim = elu_feature_map(queries) @ elu_feature_map(h).transpose(1, 2)
        return sim / sim.sum(dim=-1, keepdim=True)
    raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {kind!r}")


def stack_attention(q: torch.Tensor, x: torch.Tensor, e: torch.Tensor,
                    kind: str = "softmax") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer's attention and the stack's output ``F = x^L`` for ``q`` of shape ``(d, d)``
    (one layer) or ``(L, d, d)``: ``x^{l+1} = A_l(x^l + e) x^l``, ``x^0 = x``."""
    maps = []
    for q_layer in (q.unsqueeze(0) if q.dim() == 2 else q):
        maps.append(attention(q_layer, x, e, kind))
        x = maps[-1] @ x
    return maps, x


def forward(q: torch.Tensor, x: torch.Tensor, e: torch.Tensor,
            kind: str = "softmax") -> torch.Tensor:
    """``F (B, P, d)``: each query's attention-weighted sum of the patch features (through every
    layer of a stack)."""
    return stack_attention(q, x, e, kind)[1]


def mae_loss(q, x, e, mask, kind: str = "softmax") -> torch.Tensor:
    """``1/2 sum_{p masked} ||F_p - x_p||^2``, mean over images; ``mask (B, P)`` 1 = masked."""
    visible = x * (1 - mask).unsqueeze(-1)
    error = (forward(q, visible, e, kind) - x).pow(2).sum(-1)
    return 0.5 * (error * mask).sum(1).mean()


def cl_loss(q, x, e, mask_a, mask_b, temperature: float, kind: str = "softmax") -> torch.Tensor:
    """InfoNCE between the pooled outputs of two masked views of each image."""
    pooled = [forward(q, x * (1 - m).unsqueeze(-1), e, kind).mean(1) for m in (mask_a, mask_b)]
    return nt_xent(torch.cat(pooled), torch.cat(pooled), 2, temperature)


@torch.no_grad()
def measure(q, batch: dict, e: torch.Tensor, kind: str = "softmax") -> dict:
    """Attention mass of local and global queries on their own area and on the global area,
    and the diversity across areas, on clean images: the last layer's at the top level and
    every layer's under ``per_layer`` (first to last)."""
    maps, _ = stack_attention(q, batch["x"], e, kind)
    per_layer = [measure_map(attn, batch["area"]) for attn in maps]
    return {**per_layer[-1], "per_layer": per_layer}


def measure_map(attn: torch.Tensor, area: torch.Tensor) -> dict[str, float]:
    """The four measurements of one attention map ``(B, P, P)``."""
    same_area = (area.unsqueeze(2) == area.unsqueeze(1)).float()  # (B, query, key)
    on_global = (area == 0).float().unsqueeze(1)  # (B, 1, key)
    own = (attn * same_area).sum(-1)  # (B, P)
    glob = (attn * on_global).sum(-1)
    local_q = area > 0
    diversity = attention_diversity(attn, area)
    return {
        "local_own_area": own[local_q].mean().item(),
        "local_on_global": glob[local_q].mean().item(),
        "global_own_area": own[~local_q].mean().item(),
        "diversity": diversity.mean().item(),
    }


@dataclass
class TrainSettings:
    steps: int = 3000
    lr: float = 0.5
    batch: int = 64
    mask_prob: float = 0.5
    temperature: float = 0.5
    log_every: int = 100
    eval_images: int = 256
    seed: int = 0
    attention: str = "softmax"
    layers: int = 1


@dataclass
class Curve:
    objective: str
    imbalance: float
    steps: list[int] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)


def random_mask(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """``(B, P)``: 1 where a patch is masked, each with probability ``prob``."""
    return (torch.rand(x.shape[:2], generator=generator) < prob).float()


def train(objective: str, data: DataModel, settings: TrainSettings) -> Curve:
    """Gradient descent on ``Q`` (from 0) with fresh images every step; the curve of
    :func:`measure` every ``log_every`` steps (step 0 included)."""
    if objective not in ("mae", "cl"):
        raise ValueError(f"objective must be 'mae' or 'cl', got {objective!r}")
    areas, e = data.areas(), positions(data)
    generator = torch.Generator().manual_seed(settings.seed)
    eval_batch = sample_images(data, settings.eval_images, torch.Generator().manual_seed(10**6),
                               areas)
    if settings.layers < 1:
        raise ValueError(f"layers must be at least 1, got {settings.layers}")
    shape = (data.width, data.width) if settings.layers == 1 else \
        (settings.layers, data.width, data.width)
    q = torch.zeros(shape, requires_grad=True)
    curve = Curve(objective, data.imbalance)
    for step in range(settings.steps + 1):
        if step % settings.log_every == 0 or step == settings.steps:
            curve.steps.append(step)
            curve.metrics.append(measure(q, eval_batch, e, settings.attention))
        if step == settings.steps:
            break
        x = sample_images(data, settings.batch, generator, areas)["x"]
        if objective == "mae":
            loss = mae_loss(q, x, e, random_mask(x, settings.mask_prob, generator),
                            settings.attention)
        else:
            loss = cl_loss(q, x, e, random_mask(x, settings.mask_prob, generator),
                           random_mask(x, settings.mask_prob, generator), settings.temperature,
                           settings.attention)
        (grad,) = torch.autograd.grad(loss, q)
        with torch.no_grad():
            q -= settings.lr * grad
    return curve


METRIC_NAMES = ("local_own_area", "local_on_global", "global_own_area", "diversity")


def table(curves: list[Curve]) -> str:
    lines = ["| objective | imbalance | step | local query: own area | local query: global area "
             "| global query: own area | diversity |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for curve in curves:
        picks = sorted({0, len(curve.steps) // 4, len(curve.steps) // 2, len(curve.steps) - 1})
        for i in picks:
            m = curve.metrics[i]
            lines.append(f"| {curve.objective} | {curve.imbalance:g} | {curve.steps[i]} | "
                         + " | ".join(f"{m[k]:.3f}" for k in METRIC_NAMES) + " |")
    return "\n".join(lines)


PHASES = (("global_own_area", 0.9), ("local_own_area", 0.5), ("diversity", 0.5))


def first_step(curve: Curve, metric: str, threshold: float) -> int | None:
    """The first logged step at which ``metric`` reaches ``threshold`` (None: never)."""
    for step, values in zip(curve.steps, curve.metrics, strict=True):
        if values[metric] >= threshold:
            return step
    return None


def phase_table(curves: list[Curve]) -> str:
    """When each phase is reached: global queries settle on the global area, local queries on
    their own area, and the attention of different areas separates (``-``: not within the
    run)."""
    heads = [f"{metric.replace('_', ' ')} >= {threshold:g}" for metric, threshold in PHASES]
    lines = ["| objective | imbalance | " + " | ".join(f"first step: {h}" for h in heads)
             + " | final local own area | final diversity |", "| --- " * (4 + len(PHASES)) + "|"]
    for curve in curves:
        steps = [first_step(curve, metric, threshold) for metric, threshold in PHASES]
        last = curve.metrics[-1]
        lines.append(f"| {curve.objective} | {curve.imbalance:g} | "
                     + " | ".join("-" if s is None else str(s) for s in steps)
                     + f" | {last['local_own_area']:.3f} | {last['diversity']:.3f} |")
    return "\n".join(lines)


def plot(curves: list[Curve], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"local_own_area": "local queries: mass on own area",
              "local_on_global": "local queries: mass on global area",
              "global_own_area": "global queries: mass on global area",
              "diversity": "attention diversity across areas"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), dpi=110)
    colours = {imbalance: f"C{i}" for i, imbalance in
               enumerate(dict.fromkeys(c.imbalance for c in curves))}
    for curve in curves:
        style = "-" if curve.objective == "mae" else "--"
        for axis, key in zip(axes, METRIC_NAMES, strict=True):
            axis.plot(curve.steps, [m[key] for m in curve.metrics], style,
                      color=colours[curve.imbalance],
                      label=f"{curve.objective.upper()}, imbalance {curve.imbalance:g}")
    for axis, key in zip(axes, METRIC_NAMES, strict=True):
        axis.set_title(titles[key], fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_theory(out_dir: Path, data: DataModel, settings: TrainSettings,
               imbalances: list[float]) -> dict:
    """Train MAE and CL for each imbalance; write ``theory.json``, ``theory.md``, ``theory.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = []
    for imbalance in imbalances:
        for objective in ("mae", "cl"):
            curves.append(train(objective, DataModel(**{**asdict(data), "imbalance": imbalance}),
                                settings))
    result = {"data": asdict(data), "settings": asdict(settings), "imbalances": imbalances,
              "curves": [asdict(c) for c in curves]}
    (out_dir / "theory.json").write_text(json.dumps(result, indent=2))
    (out_dir / "theory.md").write_text(phase_table(curves) + "\n\n" + table(curves) + "\n")
    plot(curves, out_dir / "theory.png")
    return result
