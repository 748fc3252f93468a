"""Protocol B3 of BENCHMARKS.md: the BAM loss's time and peak memory against batch size.

Forward + backward of the BAM loss alone (no backbone), full matrices against the blockwise
computation, for B images per step and V views (2 global). Each measurement runs in a fresh
subprocess: after one warm-up call its resident high-water mark is reset, and the peak above
the resident memory at that point (inputs and gradient buffer) is the loss's peak. A
computation whose peak, extrapolated from the previous batch size (quadratic), would pass
``--memory-gb`` is not run and is reported as not fitting. Prints a table, writes
``benchmarks/results/b3.json`` and, with ``--readme``, replaces the B3 block of README.md.

    python benchmarks/b3_bam_memory.py --readme
    python benchmarks/b3_bam_memory.py --batches 256 1024 --views 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from readme_block import ROOT, machine_line, replace_readme_block

CHILD = r"""
import json, sys, time
import torch
from attnssl.losses import BAMLoss


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


batch, views, dim, blockwise, repeats = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                         sys.argv[4] == "1", int(sys.argv[5]))
torch.manual_seed(0)
student = torch.randn(views * batch, dim, requires_grad=True)
teacher = torch.randn(views * batch, dim)
loss_fn = BAMLoss(views, 2, blockwise=blockwise)
loss_fn(student, teacher).backward()  # warm-up: kernels, thread pools, the gradient buffer
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the resident high-water mark
base = status_kb("VmRSS")
times = []
for _ in range(repeats):
    start = time.perf_counter()
    loss_fn(student, teacher).backward()
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": sorted(times)[len(times) // 2],
                  "peak_mb": (status_kb("VmHWM") - base) / 1024}))
"""


def measure(batch: int, views: int, dim: int, blockwise: bool, repeats: int) -> dict:
    # large buffers come from mmap and go back to the system when freed, so that the
    # resident high-water mark measures this computation's peak (Linux /proc only)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(batch), str(views), str(dim), str(int(blockwise)),
         str(repeats)], capture_output=True, text=True, timeout=3600, env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_within(budget_mb: float, previous: dict | None, batch: int, **kwargs) -> dict:
    """Measure, unless the previous batch's peak scaled by (B / B_prev)^2 passes the budget."""
    if previous is not None and "peak_mb" in previous:
        predicted = previous["peak_mb"] * (batch / previous["batch"]) ** 2
        if predicted > budget_mb:
            return {"batch": batch, "fits": False, "predicted_mb": predicted}
    if previous is not None and not previous.get("fits", True):
        return {"batch": batch, "fits": False}
    result = measure(batch=batch, **kwargs)
    result.update(batch=batch, fits=result["peak_mb"] <= budget_mb)
    return result


def table(rows: list[dict], memory_gb: float) -> str:
    lines = [
        "| views | batch | full: s | full: peak MB | blockwise: s | blockwise: peak MB | "
        "memory ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        full, block = r["full"], r["blockwise"]

        def cell(m, key, fmt):
            return format(m[key], fmt) if m.get("fits") else f"> {memory_gb:g} GB"

        ratio = (f"{full['peak_mb'] / max(block['peak_mb'], 1e-3):.1f}x"
                 if full.get("fits") and block.get("fits") else "-")
        lines.append(f"| {r['views']} | {r['batch']} | {cell(full, 'seconds', '.3f')} | "
                     f"{cell(full, 'peak_mb', '.0f')} | {cell(block, 'seconds', '.3f')} | "
                     f"{cell(block, 'peak_mb', '.0f')} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--views", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-gb", type=float, default=8.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b3.json"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()

    from attnssl.train.trainer import machine_description

    machine = machine_description()
    rows = []
    budget_mb = args.memory_gb * 1024
    for views in args.views:
        last = {False: None, True: None}
        for batch in args.batches:
            repeats = args.repeats if batch * views <= 4096 else 1
            row = {"views": views, "batch": batch}
            for blockwise, key in ((False, "full"), (True, "blockwise")):
                row[key] = measure_within(budget_mb, last[blockwise], batch, views=views,
                                          dim=args.dim, blockwise=blockwise, repeats=repeats)
                last[blockwise] = row[key]
            rows.append(row)
            print(table(rows, args.memory_gb), flush=True)
    markdown = table(rows, args.memory_gb)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "dim": args.dim, "memory_gb": args.memory_gb,
                               "rows": rows}, indent=2))
    if args.readme:
        command = ("python benchmarks/b3_bam_memory.py --batches "
                   + " ".join(map(str, args.batches)) + " --views "
                   + " ".join(map(str, args.views)) + f" --memory-gb {args.memory_gb:g} --readme")
        replace_readme_block("B3", machine_line(machine, command) + "\n\n" + markdown)


if __name__ == "__main__":
    main()
