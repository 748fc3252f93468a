"""Protocol B3 (docs/benchmarks.md): the BAM loss's time and peak memory against batch size.

Forward + backward of the BAM loss alone (no backbone), full matrices against the blockwise
computation, for B images per step and V views (2 global). Each measurement runs in a fresh
subprocess (``benchmarks.helpers.run_child``): the peak above the resident memory after a warm-up call
(inputs and gradient buffer) is the loss's peak. A
computation whose peak, extrapolated from the previous batch size (quadratic), would pass
``--memory-gb`` is not run and is reported as not fitting. Prints a table, writes
``benchmarks/results/b3.json`` and, with ``--readme``, replaces the B3 block (docs/results.md).

    python -m benchmarks.b3_bam_memory --readme
    python -m benchmarks.b3_bam_memory --batches 256 1024 --views 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.helpers import ROOT, machine_line, replace_readme_block, run_child

CHILD = r"""
from attnssl.losses import BAMLoss

batch, views, dim, blockwise, repeats = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                         sys.argv[4] == "1", int(sys.argv[5]))
torch.manual_seed(0)
student = torch.randn(views * batch, dim, requires_grad=True)
teacher = torch.randn(views * batch, dim)
loss_fn = BAMLoss(views, 2, blockwise=blockwise)
print(json.dumps(timed_peak(lambda: loss_fn(student, teacher).loss.backward(), repeats)))
"""


def measure(batch: int, views: int, dim: int, blockwise: bool, repeats: int) -> dict:
    return run_child(CHILD, batch, views, dim, int(blockwise), repeats)


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

    from attnssl.train.environment import machine_description

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
        command = ("python -m benchmarks.b3_bam_memory --batches "
                   + " ".join(map(str, args.batches)) + " --views "
                   + " ".join(map(str, args.views)) + f" --memory-gb {args.memory_gb:g} --readme")
        replace_readme_block("B3", machine_line(machine, command) + "\n\n" + markdown)


if __name__ == "__main__":
    main()
