"""Figures written into a run folder, and the self-contained HTML report of ``attnssl analyze``."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch

from attnssl.functional.attention_metrics import top_mass_mask
from attnssl.runs.metrics_log import MetricsLog

SKIPPED_COLUMNS = ("step", "epoch")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_loss_curve(run_dir: str | Path) -> Path | None:
    """``loss_curve.png``: training loss (and learning rate) against the optimiser step."""
    rows = [r for r in MetricsLog(Path(run_dir) / "metrics.csv").read() if r.get("loss")]
    if not rows:
        return None
    steps = [int(float(r["step"])) for r in rows]
    fig, loss_axis = _pyplot().subplots(figsize=(6, 3.5), dpi=120)
    loss_axis.plot(steps, [float(r["loss"]) for r in rows], color="tab:blue", label="loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    if rows[0].get("lr"):
        lr_axis = loss_axis.twinx()
        lr_axis.plot(steps, [float(r["lr"]) for r in rows], color="tab:orange", alpha=0.6)
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    loss_axis.set_title(Path(run_dir).name, fontsize=9)
    return _save(fig, Path(run_dir) / "loss_curve.png")


def plot_training_curves(run_dir: str | Path, path: Path) -> Path | None:
    """Every logged column of ``metrics.csv`` that changes (loss, diagnostics, schedules)
    against the step; constant columns are listed in the title instead of drawn."""
    rows = MetricsLog(Path(run_dir) / "metrics.csv").read()
    if not rows:
        return None
    steps = [int(float(r["step"])) for r in rows]
    series = {}
    for column in (c for c in rows[0] if c not in SKIPPED_COLUMNS):
        values = [float(r[column]) if r.get(column) not in (None, "") else float("nan")
                  for r in rows]
        series[column] = values
    changing = {c: v for c, v in series.items()
                if len({x for x in v if x == x}) > 1}  # x == x leaves out nan
    constant = sorted(set(series) - set(changing))
    cols = max(1, min(4, len(changing)))
    rows_of_panels = max(1, -(-len(changing) // cols))
    fig, axes = _pyplot().subplots(rows_of_panels, cols, figsize=(3.4 * cols, 2.5 * rows_of_panels),
                                   dpi=100, squeeze=False)
    for axis, (column, values) in zip(axes.flat, changing.items(), strict=False):
        axis.plot(steps, values, lw=1)
        axis.set_title(column, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.set_ylabel(column, fontsize=8)
        axis.ticklabel_format(axis="y", useOffset=False, style="plain")
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(changing):]:
        axis.axis("off")
    if constant:
        fig.suptitle("constant, not drawn: " + ", ".join(constant), fontsize=8)
    return _save(fig, path)


LAYER_TITLES = {"entropy": "patch attention entropy (nats)", "distance": "mean attention "
                "distance (px)", "diversity": "diversity across queries", "cls_entropy":
                "class-token attention entropy (nats)", "jaccard": "segmentation Jaccard"}


def layer_metrics_figure(result: dict):
    """One panel per attention metric by layer: each head a dot, the mean over heads a line,
    the untrained backbone's mean (``result['untrained']``) dashed, and the uniform
    attention's entropy dotted; a legend in every panel, no offset on the axes."""
    metrics = [m for m in LAYER_TITLES if m in result["per_head"]]
    fig, axes = _pyplot().subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), dpi=100,
                                   squeeze=False)
    untrained = result.get("untrained", {}).get("per_layer", {})
    for axis, name in zip(axes[0], metrics, strict=True):
        per_head = torch.tensor(result["per_head"][name])  # (layers, heads)
        layers = torch.arange(1, per_head.shape[0] + 1)
        for head in range(per_head.shape[1]):
            axis.scatter(layers, per_head[:, head], s=12, alpha=0.6,
                         label="one head" if head == 0 else None, color="tab:blue")
        axis.plot(layers, per_head.mean(1), color="black", lw=1, label="mean over heads")
        if name in untrained:
            axis.plot(layers, untrained[name], color="tab:orange", ls="--", lw=1,
                      label="untrained backbone")
        if name in ("entropy", "cls_entropy"):
            axis.axhline(result["uniform_entropy"], ls=":", color="grey", lw=1,
                         label="uniform attention")
        axis.ticklabel_format(axis="y", useOffset=False, style="plain")
        axis.set_title(LAYER_TITLES[name], fontsize=9)
        axis.set_xlabel("layer")
        axis.set_xticks(layers.tolist())
        axis.legend(fontsize=6)
    return fig


def plot_layer_metrics(result: dict, path: Path) -> Path:
    return _save(layer_metrics_figure(result), path)


def _upsample(maps: torch.Tensor, grid: list[int], size: int) -> torch.Tensor:
    """``(..., P)`` patch values to ``(..., size, size)`` pixels (each patch fills its block)."""
    scale = size // grid[0]
    maps = maps.reshape(*maps.shape[:-1], grid[0], grid[1])
    return maps.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _show_image(axis, image: torch.Tensor) -> None:
    picture = image.permute(1, 2, 0).numpy()
    axis.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray")
    axis.set_xticks([])
    axis.set_yticks([])


def class_token_attention_figure(images: torch.Tensor, cls: torch.Tensor, grid: list[int],
                                titles: list[str] | None = None):
    """Rows: images; columns: the input, then each head's class-token attention over it, then
    the heads' mean. ``images (S, C, H, W)`` uint8, ``cls (S, heads, P)``. Every map shares one
    colour scale from 0 to the largest value in the figure, with a colour bar on which the
    uniform level 1/P is marked, so a map that is nearly uniform looks it. With ``titles`` the
    columns are ``cls``'s own maps under those titles (no mean column)."""
    if titles is None:
        titles = [f"head {h + 1}" for h in range(cls.shape[1])] + ["mean"]
        cls = torch.cat([cls, cls.mean(1, keepdim=True)], dim=1)
    shown, columns = cls.shape[:2]
    maps = _upsample(cls, grid, images.shape[-1])
    uniform = 1.0 / cls.shape[-1]
    top = max(float(cls.max()), 2 * uniform)
    fig, axes = _pyplot().subplots(shown, columns + 1, figsize=(1.5 * (columns + 1) + 1,
                                                                1.5 * shown),
                                   dpi=100, squeeze=False)
    picture = None
    for row in range(shown):
        _show_image(axes[row, 0], images[row])
        for col in range(columns):
            axis = axes[row, col + 1]
            _show_image(axis, images[row])
            picture = axis.imshow(maps[row, col].numpy(), cmap="inferno", alpha=0.65, vmin=0.0,
                                  vmax=top)
            if row == 0:
                axis.set_title(titles[col], fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    bar = fig.colorbar(picture, ax=axes.ravel().tolist(), shrink=0.8)
    bar.ax.axhline(uniform, color="cyan", lw=1.5)
    bar.set_label(f"attention weight (cyan: uniform 1/{cls.shape[-1]} = {uniform:.4f})",
                  fontsize=7)
    return fig


def plot_class_token_attention(images: torch.Tensor, cls: torch.Tensor, grid: list[int],
                               path: Path, titles: list[str] | None = None) -> Path:
    fig = class_token_attention_figure(images, cls, grid, titles)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_segmentation(images: torch.Tensor, foreground: torch.Tensor, cls: torch.Tensor,
                      grid: list[int], mass: float, path: Path) -> Path:
    """Rows: images; columns: input, foreground mask, the top-``mass`` patches of the heads'
    mean class-token attention."""
    predicted = _upsample(top_mass_mask(cls.mean(1), mass).float(), grid, images.shape[-1])
    fig, axes = _pyplot().subplots(len(images), 3, figsize=(4.5, 1.5 * len(images)), dpi=100,
                                   squeeze=False)
    for row in range(len(images)):
        _show_image(axes[row, 0], images[row])
        axes[row, 1].imshow(foreground[row].numpy(), cmap="gray")
        axes[row, 2].imshow(predicted[row].numpy(), cmap="gray")
        for axis in axes[row, 1:]:
            axis.set_xticks([])
            axis.set_yticks([])
    for axis, title in zip(axes[0], ("input", "foreground", f"top {mass:.0%} attention"),
                           strict=True):
        axis.set_title(title, fontsize=8)
    return _save(fig, path)


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_html_report(path: Path, result: dict, figures: list[tuple[str, Path]]) -> Path:
    """One HTML file holding the metrics and every figure as an embedded PNG (``data:`` URI), so
    it opens in any browser with no server and no other file."""
    per_layer = result["per_layer"]
    layer_names = [n for n in ("entropy", "distance", "diversity", "cls_entropy",
                               "jaccard_head_mean", "rollout_cls_entropy", "rollout_jaccard",
                               "rank_collapse") if n in per_layer]
    layer_rows = [[str(i + 1)] + [f"{per_layer[n][i]:.4f}" for n in layer_names]
                  for i in range(len(per_layer["entropy"]))]
    head_rows = [[str(layer + 1), str(head + 1)]
                 + [f"{result['per_head'][n][layer][head]:.4f}" for n in layer_names
                    if n in result["per_head"]]
                 for layer in range(len(per_layer["entropy"]))
                 for head in range(len(result["per_head"]["entropy"][0]))]
    head_names = [n for n in layer_names if n in result["per_head"]]
    sections = [
        f"<h1>attnssl analysis: {html.escape(Path(result['run_dir']).name)}</h1>",
        _table([[k, _fmt(result[k])] for k in ("method", "dataset", "step", "checkpoint",
                                               "images", "patch_size", "class_tokens",
                                               "features")]
               + [[f"model.{k}", str(v)] for k, v in result["model"].items()],
               ["run", ""]),
    ]
    if result.get("evaluation"):
        ev = result["evaluation"]
        names = {"knn_top1": "k-NN top-1", "linear_top1": "linear probe top-1",
                 "finetune_top1": "fine-tuned top-1"}
        rows = [[label, _fmt(ev[k])] for k, label in names.items() if k in ev]
        floor = ev.get("knn_top1_random_init")
        rows.append(["k-NN top-1 of the untrained backbone (random-init floor)",
                     _fmt(floor) if floor is not None else "not measured"])
        sections += ["<h2>Evaluation</h2>", _table(rows, ["score", "%"])]
    if result.get("uniform_layers"):
        sections.append("<p><b>" + html.escape(result["uniform_layers"]) + "</b></p>")
    sections += ["<h2>Collapse metrics of the features</h2>",
                 _table([[k, _fmt(v)] for k, v in result["collapse"].items()], ["metric", ""])]
    if "segmentation" in result:
        sections += ["<h2>Attention-map segmentation</h2>",
                     _table([[k, _fmt(v)] for k, v in result["segmentation"].items()],
                            ["", ""])]
    sections += [
        "<h2>Attention per layer (mean over heads)</h2>",
        f"<p>Uniform attention has entropy log P = {result['uniform_entropy']:.3f} nats.</p>",
        _table(layer_rows, ["layer", *layer_names]),
        "<h2>Attention per layer and head</h2>",
        _table(head_rows, ["layer", "head", *head_names]),
        "<h2>Figures</h2>",
    ]
    for title, figure in figures:
        data = base64.b64encode(figure.read_bytes()).decode("ascii")
        sections.append(f'<figure><img alt="{html.escape(figure.name)}" '
                        f'data-file="{html.escape(figure.name)}" '
                        f'src="data:image/png;base64,{data}"><figcaption>{html.escape(title)}'
                        "</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:2px 8px;font-size:13px;text-align:right}img{max-width:100%}"
             "figcaption{font-size:13px;color:#555}")
    document = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>attnssl analysis"
                f"</title><style>{style}</style></head><body>" + "\n".join(sections)
                + "<script type='application/json' id='analysis'>"
                + html.escape(json.dumps({k: v for k, v in result.items()
                                          if k != "summary_table"}))
                + "</script></body></html>")
    path.write_text(document, encoding="utf-8")
    return path
