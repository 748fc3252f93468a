"""What the benchmark scripts share: the repository root, the generated blocks of README.md and
docs/ (``<!-- NAME:START -->`` ... ``<!-- NAME:END -->``), the machine line under each table, and
time and peak memory measured in a fresh Python process.

Peak memory (Linux): a child runs the measured code after one warm-up call, having reset its
resident high-water mark (``/proc/self/clear_refs``); the peak above the resident memory at that
point is the computation's peak. Large buffers come from mmap (``MALLOC_MMAP_THRESHOLD_``) and
go back to the system when freed, so that the high-water mark measures this computation alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# MAE as the official code samples it, one sample per image a step, at the learning rate that
# setting scored best with (the MAE preset until it took four samples at 5e-3): the tables that
# compare MAE with lightly's, B1 v1, and the B1 v2 rows mae-1x
MAE_ONE_SAMPLE = ["views.global_crops=1", "optim.lr=3e-3"]
# SimCLR as its paper, the official code and lightly view each image: two views a step (the
# SimCLR preset until it took four): the lightly comparison, B1 v1 and the B1 v2 rows simclr-2v
SIMCLR_TWO_VIEWS = ["views.global_crops=2"]
# BAM's EMA teacher, which the BAM preset dropped in its tenth tuning round (the student's own
# similarities give the targets), at the preset's momentum 0.95: the B1 v2 rows bam-teacher*
BAM_TEACHER = ["method.teacher=true"]
# BAM's weight decay and stem until its fifteenth tuning round: a constant 0.05 and timm's
# learned positions with a trained patch projection (since then the official 0.04 -> 0.4 and
# fixed sine-cosine positions with a frozen projection): every B1 v2 BAM row trained before it,
# and the experiments' BAM sections
BAM_TIMM_STEM = ["optim.weight_decay=0.05", "optim.weight_decay_end=null",
                 "model.pos_embed=learned", "model.freeze_patch_embed=false"]
# BAM's projector without batch norm (its ViT scripts'; the preset took the code's default
# batch norms in its twelfth round)
BAM_PLAIN_PROJECTOR = ["method.projector_batchnorm=false", "method.projector_last_batchnorm=false"]
# BAM as the official code trains it, as far as the preset departed from it when the sections
# were first run: the EMA teacher, two global views a step (the preset took four in its tenth
# round), positive masking and crops of 40-100 % (turned off and narrowed in its eighth; the
# official ViT scripts crop 25-100 % beside six local crops, 40-100 % is DINO's global scale),
# a projector without batch norm, and the weight decay and stem of BAM_TIMM_STEM (not the
# official ones the preset has now, so that stored sections and rows stay reproducible): the
# experiments' BAM sections and the B1 v2 rows bam-masked
BAM_OFFICIAL = [*BAM_TEACHER, "views.global_crops=2", "method.positive_masking=true",
                "views.global_scale=[0.4,1.0]", *BAM_PLAIN_PROJECTOR, *BAM_TIMM_STEM]


DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))


def readme_block_holder(name: str, documents=DOCUMENTS) -> Path:
    """The one document holding the block ``name``; a benchmark that writes one calls this
    before it trains, so that a missing block is said at once, not after hours of training."""
    pattern = _block_pattern(name)
    holders = [path for path in documents if pattern.search(path.read_text())]
    if len(holders) != 1:
        where = ", ".join(str(p.relative_to(ROOT)) for p in holders) or \
            "no document (add the two marker lines where the table should go)"
        raise SystemExit(f"<!-- {name}:START --> ... <!-- {name}:END --> must be in exactly one of "
                         f"README.md and docs/*.md; found in {where}")
    return holders[0]


def replace_readme_block(name: str, body: str, documents=DOCUMENTS) -> None:
    holder = readme_block_holder(name, documents)
    block = f"<!-- {name}:START -->\n{body}\n<!-- {name}:END -->"
    holder.write_text(_block_pattern(name).sub(lambda _: block, holder.read_text(), count=1))


def _block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"<!-- {re.escape(name)}:START -->.*?<!-- {re.escape(name)}:END -->",
                      flags=re.S)


def machine_line(machine: dict, command: str) -> str:
    return f"Machine: {_machine_words(machine)}. Command: `{command}`"


def machines_line(counted: list[tuple[dict, int]], command: str) -> str:
    """:func:`machine_line` for results trained on one machine; where they trained on several
    (another CPU, another thread count), each with its number of runs."""
    if len(counted) == 1:
        return machine_line(counted[0][0], command)
    each = "; ".join(f"{_machine_words(machine)}: {count} run{'s' if count > 1 else ''}"
                     for machine, count in counted)
    return f"Machines (the runs did not all train on one): {each}. Command: `{command}`"


def _machine_words(machine: dict) -> str:
    bf16 = f" (bf16 {machine['cpu_bf16']})" if machine.get("cpu_bf16") else ""
    return f"{machine['cpu']}{bf16}, {machine['threads']} threads, torch {machine['torch']}"

# The child's prelude: ``timed_peak(fn, repeats)`` -> {"seconds": median, "peak_mb": ...}
PRELUDE = r"""
import json, sys, time
import torch


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def timed_peak(fn, repeats):
    fn()  # warm-up: kernels, thread pools, gradient buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark
    base = status_kb("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"seconds": sorted(times)[len(times) // 2],
            "peak_mb": (status_kb("VmHWM") - base) / 1024}
"""


def run_child(body: str, *args, timeout: int = 3600) -> dict:
    """Run ``PRELUDE + body`` with ``args`` as ``sys.argv[1:]``; it prints one JSON line."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", PRELUDE + body, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])
