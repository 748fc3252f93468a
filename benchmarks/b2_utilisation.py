"""Protocol B2 (docs/benchmarks.md): how close each method's training step comes to the machine's
matmul peak.

In one run: the peak of a 2048^3 matmul in fp32 and in bf16 (median of ``--repeats``, FLOPs
``2 n^3``), then, for each B1 method and precision, the model FLOPs of one training step
(forward and backward of everything the method runs, counted by
``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention) and the
median time of ``--steps`` real steps on Fashion-MNIST batches (views, forward, loss, backward,
optimiser and teacher update, as the trainer runs them). Utilisation is model FLOP/s over the
peak of the step's precision (fp32 peak for ``32``, bf16 peak for ``bf16-mixed``).

    python -m benchmarks.b2_utilisation --readme
    python -m benchmarks.b2_utilisation --methods simclr --steps 5     # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from attnssl.config import load_config
from attnssl.train.environment import machine_description
from attnssl.train.trainer import Pretrainer
from benchmarks.b1_pretrain import PRESETS
from benchmarks.helpers import ROOT, machine_line, replace_readme_block


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matmul (median of ``repeats`` after a warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def build_trainer(method: str, precision: str, out_dir: Path, extra: tuple[str, ...] = (),
                  name: str | None = None) -> Pretrainer:
    """A set-up B1 trainer of ``method``; ``extra`` overrides go after the preset's."""
    preset, overrides = PRESETS[method]
    config = load_config(preset, [*overrides, *extra, f"trainer.precision={precision}",
                                  "trainer.progress_bar=false", "eval.at_end=false",
                                  f"run.out_dir={out_dir}",
                                  f"run.name={name or f'{method}-{precision}'}"])
    trainer = Pretrainer(config, out_dir / config.run.name)
    trainer.setup()
    return trainer


def batches(trainer: Pretrainer, count: int):
    size = trainer.batch_per_process
    for i in range(count):
        yield trainer.train_set.get_batch(torch.arange(i * size, (i + 1) * size))[0]


def measure(method: str, precision: str, steps: int, out_dir: Path) -> dict:
    trainer = build_trainer(method, precision, out_dir)
    images = list(batches(trainer, steps + 3))
    with FlopCounterMode(display=False) as counter:
        trainer.training_step(images[0])
    flops = counter.get_total_flops()
    for warm in images[1:3]:
        trainer.training_step(warm)
    times = []
    for batch in images[3:]:
        start = time.perf_counter()
        trainer.training_step(batch)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"method": method, "precision": precision, "gflop_per_step": flops / 1e9,
            "step_seconds": step, "images_per_second": trainer.config.optim.batch_size / step,
            "model_gflops": flops / step / 1e9}


def markdown(peaks: dict, rows: list[dict]) -> str:
    lines = [f"Matmul peak (2048^3): fp32 {peaks['32'] / 1e9:.0f} GFLOP/s, bf16 "
             f"{peaks['bf16-mixed'] / 1e9:.0f} GFLOP/s ({peaks['bf16-mixed'] / peaks['32']:.1f}x).",
             "",
             "| method | precision | GFLOP per step | step (s) | images/s | model GFLOP/s "
             "| utilisation of the precision's peak |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['precision']} | {r['gflop_per_step']:.1f} | "
                     f"{r['step_seconds']:.3f} | {r['images_per_second']:.0f} | "
                     f"{r['model_gflops']:.0f} | {100 * r['utilisation']:.1f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["bam", "dino", "udi", "simclr", "mae"],
                        choices=list(PRESETS))
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"],
                        choices=["32", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b2.json"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()

    peaks = {"32": matmul_peak(torch.float32, repeats=args.repeats),
             "bf16-mixed": matmul_peak(torch.bfloat16, repeats=args.repeats)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for precision in args.precisions:
                row = measure(method, precision, args.steps, Path(tmp))
                row["utilisation"] = row["model_gflops"] * 1e9 / peaks[precision]
                rows.append(row)
                print(markdown(peaks, rows).splitlines()[-1], flush=True)
    table = markdown(peaks, rows)
    print(table)
    machine = machine_description()
    command = ("python -m benchmarks.b2_utilisation --methods " + " ".join(args.methods)
               + f" --steps {args.steps} --readme")
    Path(args.out).write_text(json.dumps({"machine": machine, "peaks": peaks, "rows": rows,
                                          "command": command}, indent=2))
    if args.readme:
        replace_readme_block("B2", machine_line(machine, command) + "\n\n" + table)


if __name__ == "__main__":
    main()
