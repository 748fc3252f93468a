"""Protocol B5 (docs/benchmarks.md): distributed scaling on CPU over gloo, 1 against 2 processes.

Two measurements for one method (BAM by default: its Sinkhorn balances the whole global batch,
so it is the method whose distributed maths is most at stake):

* throughput: the real command line, ``attnssl pretrain`` with ``trainer.devices=1`` (one process
  with every thread) and ``trainer.devices=2`` (two Fabric-launched gloo processes with one
  thread each, same global batch), alternated over ``--rounds``; images per second of the global
  batch, from each run's ``metrics.json``;
* equality: one training step's loss and gradients on a fixed global batch of real views, in
  float64, from one process and from two real gloo processes under ``DistributedDataParallel``
  (each holding half of every view). The two-process loss is the mean of the processes' losses
  and the gradients are DDP's average; both must equal the one-process values.

    python -m benchmarks.b5_distributed --readme
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnssl.config import load_config
from attnssl.data.datasets import DatasetSpec, load_dataset
from attnssl.methods import build_method, build_views
from attnssl.nn.vit import build_vit, resolve_size
from attnssl.train.environment import machine_description
from benchmarks.helpers import ROOT, machine_line, replace_readme_block

PRESETS = {"bam": "bam_fashion_mnist", "dino": "dino_fashion_mnist",
           "simclr": "simclr_fashion_mnist"}


def run_processes(preset: str, processes: int, subset: int, out_dir: Path) -> float:
    """One ``attnssl pretrain`` over ``subset`` images with 1 or 2 processes; images/s."""
    name = f"b5-{processes}p-{time.time_ns()}"
    threads = max(torch.get_num_threads() // processes, 1)
    command = [sys.executable, "-m", "attnssl", "pretrain", "-c", preset,
               f"run.out_dir={out_dir}", f"run.name={name}", f"data.subset={subset}",
               "optim.epochs=1", "eval.at_end=false", "trainer.progress_bar=false",
               "trainer.accelerator=cpu", f"trainer.devices={processes}",
               f"trainer.num_threads={threads}", "trainer.checkpoint_every_steps=100000"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out_dir / name / "metrics.json").read_text())["images_per_second"]


# ----------------------------------------------------------------------------- equality

def _model_and_views(preset: str, batch: int):
    """The method in float64 with the run's initial weights, and a fixed global batch of views."""
    config = load_config(preset)
    data = load_dataset(DatasetSpec("fashion-mnist"), "train")
    torch.manual_seed(config.run.seed)
    backbone = build_vit(config.model, data.image_size, data.channels)
    method = build_method(config, backbone).double()
    views = build_views(config, data.image_size, data.channels, *data.mean_std,
                        resolve_size(config.model).patch_size, seed=0)(data.images[:batch])
    return method, [v.double() for v in views]


def _loss_and_grads(method, views) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = method(views)["loss"]
    loss.backward()
    named = method.module.named_parameters() if hasattr(method, "module") else method.named_parameters()
    return loss.detach(), {k: p.grad.clone() for k, p in named if p.grad is not None}


def _worker(rank: int, world: int, port: int, preset: str, batch: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        method, views = _model_and_views(preset, batch)
        share = batch // world
        mine = [v[rank * share : (rank + 1) * share] for v in views]
        ddp = torch.nn.parallel.DistributedDataParallel(method)
        loss, grads = _loss_and_grads(ddp, mine)
        losses = [torch.zeros((), dtype=loss.dtype) for _ in range(world)]
        dist.all_gather(losses, loss)
        if rank == 0:
            torch.save({"loss": torch.stack(losses).mean(), "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def equality_check(preset: str, batch: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_worker, args=(2, port, preset, batch, out), nprocs=2)
        two = torch.load(out, weights_only=True)
    method, views = _model_and_views(preset, batch)
    loss, grads = _loss_and_grads(method, views)
    worst = max(((two["grads"][k] - g).abs().max() / g.abs().max().clamp_min(1e-300)).item()
                for k, g in grads.items())
    return {"batch": batch, "loss_1_process": loss.item(), "loss_2_processes": two["loss"].item(),
            "loss_relative_difference": abs(two["loss"].item() - loss.item()) / abs(loss.item()),
            "grad_max_relative_difference": worst, "parameters_compared": len(grads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="bam", choices=list(PRESETS))
    parser.add_argument("--subset", type=int, default=7680, help="training images per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--check-batch", type=int, default=64)
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "benchmarks" / "b5"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    preset, out_dir = PRESETS[args.method], Path(args.out_dir)
    speeds: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for processes in (1, 2):
            speeds[processes].append(run_processes(preset, processes, args.subset, out_dir))
            print(f"{processes} process(es): {speeds[processes][-1]:.1f} images/s", flush=True)
    check = equality_check(preset, args.check_batch)
    median = {p: statistics.median(v) for p, v in speeds.items()}
    command = "python -m benchmarks.b5_distributed " + " ".join(
        a for a in sys.argv[1:] if a != "--readme")
    result = {"machine": machine_description(), "command": command.strip(), "method": args.method,
              "subset": args.subset, "images_per_second": speeds, "median": median,
              "speed_up_2_over_1": median[2] / median[1], "equality": check}
    (ROOT / "benchmarks" / "results" / "b5.json").write_text(json.dumps(result, indent=1))
    table = "\n".join([
        "| method | 1 process img/s | 2 processes img/s | 2 / 1 | loss, 1 process | loss, 2 "
        "processes | max relative gradient difference |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {args.method} | {median[1]:.1f} | {median[2]:.1f} | {median[2] / median[1]:.2f}x | "
        f"{check['loss_1_process']:.10f} | {check['loss_2_processes']:.10f} | "
        f"{check['grad_max_relative_difference']:.1e} |",
        "",
        f"Throughput: medians of {args.rounds} alternating runs over {args.subset} images, batch "
        "256, one process with 2 threads against two gloo processes with 1 thread each. Equality: "
        f"one step on {args.check_batch} real images in float64, over "
        f"{check['parameters_compared']} parameter tensors.",
        "",
        machine_line(result["machine"], result["command"]),
    ])
    print(table)
    if args.readme:
        replace_readme_block("B5", table)


if __name__ == "__main__":
    main()
