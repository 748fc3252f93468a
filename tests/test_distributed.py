"""Real 2-process gloo runs: NT-Xent across processes equals one process on the global batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnssl.losses import NTXentLoss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(world: int, batch: int, dim: int) -> torch.Tensor:
    """View-major per process: rows [r] are process r's (2*batch, dim) block."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(world, 2 * batch, dim, generator=g, dtype=torch.float64)


def _worker(rank: int, world: int, port: int, batch: int, dim: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = _global_batch(world, batch, dim)[rank].clone().requires_grad_(True)
        loss = NTXentLoss(2, 0.2)(local)
        loss.backward()
        # DDP averages gradients over processes; do the same here
        grad = local.grad / world
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach().float())
        torch.save({"grad": grad, "loss": torch.stack(losses).mean()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_reference(world: int, batch: int, dim: int):
    """One process on the same images: the global batch reordered view-major."""
    blocks = _global_batch(world, batch, dim)
    first_views = blocks[:, :batch].reshape(world * batch, dim)
    second_views = blocks[:, batch:].reshape(world * batch, dim)
    z = torch.cat([first_views, second_views]).requires_grad_(True)
    loss = NTXentLoss(2, 0.2)(z)
    loss.backward()
    grads = z.grad.view(2, world, batch, dim)
    per_rank = [torch.cat([grads[0, r], grads[1, r]]) for r in range(world)]
    return loss.detach(), per_rank


def test_two_process_ntxent_equals_one_process(tmp_path):
    world, batch, dim = 2, 4, 8
    mp.spawn(_worker, args=(world, _free_port(), batch, dim, str(tmp_path)), nprocs=world)
    loss_ref, grads_ref = _single_process_reference(world, batch, dim)
    for rank in range(world):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(out["loss"].double(), loss_ref, atol=1e-5)
        assert torch.allclose(out["grad"].double(), grads_ref[rank], atol=1e-6)
