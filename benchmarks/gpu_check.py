"""The prepared GPU check: every registered method pretrains a few steps of a ViT-S/16 at
224 px on synthetic images in bf16-mixed, without and with ``trainer.compile``, and a run
saved halfway and resumed ends where the uninterrupted run ends.

Per method and compile setting it reports whether every loss was finite, images/s over the
steps after the first (which include compilation) and the peak memory the device allocated;
per method, the largest difference between the final weights of the resumed and the
uninterrupted run (0 is bit-exact; GPU kernels that add in a nondeterministic order can leave
a last-bit difference, shown as it is), and between the views of one batch made on the device
(as the trainer makes them) and on the CPU from the same seed. Sized to finish within 8
minutes on one GPU; ``--tiny`` runs the same checks on a small backbone at 32 px, so the script
can be run here (a test calls it) and is ready whenever a GPU is.

    python -m benchmarks.gpu_check                          # one GPU: the table for the docs
    python -m benchmarks.gpu_check --device cpu --tiny      # here, in a minute or two
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from attnssl.config import load_config
from attnssl.methods import method_names
from attnssl.runs.checkpoint import list_checkpoints, safe_torch_load
from attnssl.runs.metrics_log import MetricsLog
from attnssl.train.environment import machine_description
from attnssl.train.trainer import pretrain
from benchmarks.helpers import ROOT

# (model, image size, local crop size, batch, steps) for the GPU and for --tiny
FULL = (["model.preset=vit_small_p16"], 224, 96, 64, 30)
TINY = (["model.preset=null", "model.patch_size=4", "model.embed_dim=32", "model.depth=1",
         "model.num_heads=2"], 32, 12, 16, 4)


def overrides(name: str, device: str, tiny: bool, out: Path, run: str, steps: int,
              compile_blocks: bool) -> list[str]:
    model, size, local, batch, _ = TINY if tiny else FULL
    return [*model, f"views.local_size={local}", "data.dataset=synthetic", f"data.image_size={size}",
            f"data.synthetic_size={batch * steps}", f"optim.batch_size={batch}",
            "optim.epochs=1", f"trainer.max_steps={steps}", f"trainer.accelerator={device}",
            "trainer.precision=bf16-mixed" if device != "cpu" else "trainer.precision=auto",
            f"trainer.compile={str(compile_blocks).lower()}", "trainer.progress_bar=false",
            f"trainer.checkpoint_every_steps={max(steps // 2, 1)}", "eval.at_end=false",
            f"run.out_dir={out}", f"run.name={run}"]


def _peak_mb(device: str) -> float | None:
    if device == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def train(name: str, device: str, tiny: bool, out: Path, run: str, steps: int,
          compile_blocks: bool, stop_at: int | None = None, resume: Path | None = None) -> dict:
    """One run; ``stop_at`` ends it early with a checkpoint, ``resume`` continues one."""
    args = overrides(name, device, tiny, out, run, steps, compile_blocks)
    if stop_at is not None:
        args[args.index(f"trainer.max_steps={steps}")] = f"trainer.max_steps={stop_at}"
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    config = load_config(f"{name}_fashion_mnist", args)
    started = time.perf_counter()
    metrics = pretrain(config, resume=str(resume) if resume is not None else None)
    seconds = time.perf_counter() - started
    run_dir = out / run
    rows = MetricsLog(run_dir / "metrics.csv").read()
    losses = [float(r["loss"]) for r in rows if r.get("loss") not in (None, "")]
    speeds = [float(r["images_per_second"]) for r in rows[1:] if r.get("images_per_second")]
    return {"finite": bool(losses) and all(math.isfinite(v) for v in losses),
            "last_loss": losses[-1] if losses else None,
            "images_per_second": (sum(speeds) / len(speeds)) if speeds
            else metrics.get("images_per_second"),
            "peak_mb": _peak_mb(device), "seconds": seconds, "run_dir": str(run_dir)}


def final_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return safe_torch_load(list_checkpoints(Path(run_dir))[-1])["method"]


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return math.inf
    return max(((x.double() - b[k].double()).abs().max().item() if x.numel() else 0.0)
               for k, x in a.items() if x.is_floating_point())


def views_difference(name: str, device: str, tiny: bool) -> float:
    """Largest difference between the method's views of one batch made on ``device`` and on
    the CPU from the same seed (the trainer makes them on the device)."""
    from attnssl.methods import build_views

    model, size, local, batch, _ = TINY if tiny else FULL
    config = load_config(f"{name}_fashion_mnist", [*model, f"views.local_size={local}",
                                                   "data.dataset=synthetic"])
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    patch = 4 if tiny else 16
    made = [build_views(config, size, 3, (0.5,) * 3, (0.25,) * 3, patch, seed=0)(x)
            for x in (images, images.to(device))]
    return max((a - b.cpu()).abs().max().item() for a, b in zip(*made, strict=True))


def check(methods: list[str], device: str, tiny: bool, out: Path) -> list[dict]:
    steps = (TINY if tiny else FULL)[-1]
    rows = []
    for name in methods:
        runs = {flag: train(name, device, tiny, out, f"{name}-compile-{flag}", steps, flag)
                for flag in (False, True)}
        train(name, device, tiny, out, f"{name}-halves", steps, False, stop_at=steps // 2)
        resumed = train(name, device, tiny, out, f"{name}-halves", steps, False,
                        resume=out / f"{name}-halves")
        difference = largest_difference(final_weights(runs[False]["run_dir"]),
                                        final_weights(resumed["run_dir"]))
        rows.append({"method": name, "plain": runs[False], "compiled": runs[True],
                     "resume_max_difference": difference,
                     "views_max_difference": views_difference(name, device, tiny)})
        print(json.dumps({"method": name, "finite": runs[False]["finite"] and runs[True]["finite"],
                          "resume_max_difference": difference}), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def speed(run):
        return f"{run['images_per_second']:.0f}" if run["images_per_second"] else "-"

    def peak(run):
        return f"{run['peak_mb']:.0f}" if run["peak_mb"] is not None else "-"

    lines = ["| method | finite losses | images/s | images/s compiled | peak MB | peak MB "
             "compiled | resumed vs uninterrupted (largest weight difference) | views on the "
             "device vs the CPU (largest difference) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        plain, compiled = row["plain"], row["compiled"]
        finite = "yes" if plain["finite"] and compiled["finite"] else "NO"
        lines.append(f"| {row['method']} | {finite} | {speed(plain)} | {speed(compiled)} | "
                     f"{peak(plain)} | {peak(compiled)} | {row['resume_max_difference']:.3g} | "
                     f"{row['views_max_difference']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true",
                        help="a small backbone at 32 px and 4 steps (for the CPU)")
    names = method_names()
    parser.add_argument("--methods", nargs="+", default=names, choices=names)
    parser.add_argument("--out", help="results JSON (default benchmarks/results/gpu_check.json, "
                        "or gpu_check_tiny.json with --tiny)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --tiny for the CPU check")
    machine = machine_description()
    with tempfile.TemporaryDirectory() as folder:
        rows = check(args.methods, args.device, args.tiny, Path(folder))
    for row in rows:
        for run in (row["plain"], row["compiled"]):
            run.pop("run_dir")
    markdown = table(rows)
    print(markdown)
    default = "gpu_check_tiny.json" if args.tiny else "gpu_check.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "device": args.device, "tiny": args.tiny,
                               "rows": rows, "table": markdown}, indent=2))
    bad = [r["method"] for r in rows if not (r["plain"]["finite"] and r["compiled"]["finite"])]
    if bad:
        raise SystemExit(f"non-finite losses: {', '.join(bad)}")


if __name__ == "__main__":
    main()
