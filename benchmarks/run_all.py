"""Every published benchmark in one command, within a time budget.

Runs the scripts below in order, each with ``--readme`` so it rewrites its
``benchmarks/results/*.json`` and its README table. A job starts only if its expected time fits
in what is left of ``--budget-minutes``: the time it took in the last ``run_all`` on this
machine (``benchmarks/results/run_all.json``), or else the estimate below (measured on the
2-core reference machine). A job that overruns the budget is stopped (SIGTERM: a training job
checkpoints first) and reported; the jobs skipped are listed with the reason, so a short budget
refreshes the cheap tables and a long one refreshes them all. The B1 rows come first among the
long jobs because the attention and dense analyses read their checkpoints.

    python -m benchmarks.run_all --budget-minutes 30          # the cheap tables
    python -m benchmarks.run_all --budget-minutes 600         # the benchmarks (about 8 h here)
    python -m benchmarks.run_all --budget-minutes 2400        # and the papers' questions
    python -m benchmarks.run_all --only b5 peers              # chosen jobs, by name
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass

from benchmarks.experiments import MINUTES as EXPERIMENT_MINUTES
from benchmarks.helpers import ROOT

B1_METHODS = ("bam", "dino", "udi", "simclr", "mae", "bam-cbsa")


@dataclass(frozen=True)
class Job:
    name: str
    argv: tuple[str, ...]
    minutes: float  # estimate on the 2-core reference machine


def b1_jobs() -> list[Job]:
    # minutes: 5 epochs of training plus evaluation, from the B1 table (fp32 / bf16-mixed)
    fp32 = {"bam": 45, "dino": 53, "udi": 76, "simclr": 35, "mae": 15, "bam-cbsa": 44}
    jobs = []
    for method in B1_METHODS:
        precisions = ["32"] if method == "bam-cbsa" else ["32", "bf16-mixed"]
        for precision in precisions:
            minutes = fp32[method] / (1.0 if precision == "32" else 1.7)
            jobs.append(Job(f"b1-{method}-{precision}",
                            ("b1_pretrain.py", "--methods", method, "--precisions", precision),
                            round(minutes)))
    return jobs


JOBS = [
    Job("views", ("views_throughput.py",), 1),
    Job("b4", ("b4_attention_cost.py",), 4),
    Job("b3", ("b3_bam_memory.py",), 4),
    Job("b2", ("b2_utilisation.py",), 6),
    Job("profile", ("profile_step.py",), 5),
    Job("levers", ("fp32_levers.py",), 6),
    Job("b5", ("b5_distributed.py",), 6),
    Job("b6", ("b6_input_pipeline.py",), 8),
    Job("peers", ("b1_peers.py",), 55),
    *b1_jobs(),
    Job("attention", ("attention_real_vits.py",), 6),
    Job("dense-b1", ("dense_patch_probe.py", "--b1", "--images", "10000", "--test-images", "2000",
                     "--probe-epochs", "10"), 15),
]
JOBS += [Job(f"experiment-{name}", ("experiments.py", name), minutes)
         for name, minutes in EXPERIMENT_MINUTES.items()]
RECORD = ROOT / "benchmarks" / "results" / "run_all.json"
STOP_GRACE_S = 900  # a job stopped at the budget ends its step (and scoring) and checkpoints


def expected_minutes(job: Job, history: dict) -> float:
    past = history.get(job.name, {})
    return past["minutes"] if past.get("status") == "done" else job.minutes


def run_job(command: list[str], seconds: float, grace_seconds: float = STOP_GRACE_S) -> str:
    """Run one job's command for at most ``seconds``; returns its status. At the budget the job
    is sent SIGTERM, so a training job stops after its step with a checkpoint (a section's
    sweep continues from it the next time), and it is killed only if it has not ended
    ``grace_seconds`` later."""
    child = subprocess.Popen(command, cwd=ROOT)
    try:
        code = child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        child.terminate()
        try:
            child.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return "stopped at the budget"
    return "done" if code == 0 else f"failed (exit {code})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-minutes", type=float, required=True)
    parser.add_argument("--only", nargs="+", metavar="JOB",
                        help=f"job names: {', '.join(j.name for j in JOBS)}")
    args = parser.parse_args()
    names = {j.name for j in JOBS}
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        raise SystemExit(f"unknown job(s) {unknown}; accepted: {', '.join(j.name for j in JOBS)}")
    history = json.loads(RECORD.read_text())["jobs"] if RECORD.exists() else {}
    deadline = time.monotonic() + args.budget_minutes * 60
    record = dict(history)
    for job in JOBS:
        if args.only and job.name not in args.only:
            continue
        left = (deadline - time.monotonic()) / 60
        expected = expected_minutes(job, history)
        if expected > left:
            print(f"skip {job.name}: expects {expected:.0f} min, {left:.0f} left", flush=True)
            continue
        module = "benchmarks." + job.argv[0].removesuffix(".py")
        command = [sys.executable, "-m", module, *job.argv[1:], "--readme"]
        print(f"run  {job.name}: {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        status = run_job(command, max(left * 60, 1))
        minutes = (time.monotonic() - started) / 60
        print(f"     {job.name}: {status} in {minutes:.1f} min", flush=True)
        record[job.name] = {"status": status, "minutes": round(minutes, 2),
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        RECORD.write_text(json.dumps({"jobs": record}, indent=1))


if __name__ == "__main__":
    main()
