"""Where a B1 training step's time goes, per method and precision (issue 8's profile).

Runs ``--steps`` real steps of each method on Fashion-MNIST batches under ``torch.profiler``
and reads the phases the trainer marks with ``record_function``: ``step/views`` (crops, flips,
colour on the batch), ``step/forward_and_loss``, ``step/backward``, ``step/optimizer``
(clipping and AdamW) and ``step/after_step`` (the EMA teacher); ``data`` is reading the batch.
Prints each phase's share of the step and the operators with the most self time; writes
``results/profile.json``; ``--readme`` replaces the block PROFILE (docs/results.md).

    python -m benchmarks.profile_step --readme
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from attnssl.train.environment import machine_description
from benchmarks.b2_utilisation import build_trainer
from benchmarks.helpers import ROOT, machine_line, replace_readme_block

PHASES = ("data", "views", "forward_and_loss", "backward", "optimizer", "after_step")


def profile_method(method: str, precision: str, steps: int, out_dir: Path) -> dict:
    trainer = build_trainer(method, precision, out_dir)
    size = trainer.batch_per_process

    def batch(i: int) -> torch.Tensor:
        with record_function("step/data"):
            return trainer.train_set.get_batch(torch.arange(i * size, (i + 1) * size))[0]

    for i in range(2):
        trainer.training_step(batch(i))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(2, 2 + steps):
            trainer.training_step(batch(i))
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    phase_ms = {p: 0.0 for p in PHASES}
    for event in events:
        if event.key.startswith("step/"):
            phase_ms[event.key.removeprefix("step/")] += event.cpu_time_total / 1e3 / steps
    operators = sorted((e for e in events if not e.key.startswith("step/")),
                       key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    return {
        "method": method, "precision": precision, "step_ms": wall * 1e3,
        "phase_ms": phase_ms,
        "top_operators": [{"name": e.key, "self_share": e.self_cpu_time_total / total_self}
                          for e in operators],
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| method | precision | step (ms, profiled) | " + " | ".join(PHASES)
             + " | top operators (share of self time) |",
             "| --- " * (4 + len(PHASES)) + "|"]
    for r in rows:
        total = sum(r["phase_ms"].values()) or 1.0
        shares = " | ".join(f"{100 * r['phase_ms'][p] / total:.0f} %" for p in PHASES)
        top = ", ".join(f"{o['name']} {100 * o['self_share']:.0f} %"
                        for o in r["top_operators"][:4])
        lines.append(f"| {r['method']} | {r['precision']} | {r['step_ms']:.0f} | {shares} | "
                     f"{top} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["bam", "dino", "udi", "simclr", "mae"])
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"],
                        choices=["32", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile.json"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for precision in args.precisions:
                rows.append(profile_method(method, precision, args.steps, Path(tmp)))
                print(markdown(rows).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    machine = machine_description()
    command = ("python -m benchmarks.profile_step --methods " + " ".join(args.methods)
               + " --precisions " + " ".join(args.precisions) + f" --steps {args.steps}"
               + (" --readme" if args.readme else f" --out {args.out}"))
    Path(args.out).write_text(json.dumps({"machine": machine, "command": command, "rows": rows},
                                         indent=2))
    if args.readme:
        replace_readme_block("PROFILE", machine_line(machine, command) + "\n\n" + table)


if __name__ == "__main__":
    main()
