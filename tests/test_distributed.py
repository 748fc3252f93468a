"""One real 2-process gloo run: NT-Xent, BAM, DINO and the global batch norm across processes
equal one process on the global batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnssl.losses import BAMLoss, DINOLoss, NTXentLoss

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # real gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORLD = 2


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One process of the one real gloo run: every part computes its process's results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {"ntxent": _ntxent_part(rank, world), "bam": _bam_part(rank, world),
                   "dino": _dino_part(rank, world), "bn": _bn_part(rank, world)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both done before either tears down (gloo aborts on a torn pair)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory) -> list[dict]:
    """Each process's losses, gradients and states from one 2-process gloo run (one launch
    for every test here: each launch costs two interpreters importing torch)."""
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(_gloo_worker, args=(WORLD, _free_port(), str(out_dir)), nprocs=WORLD)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _global_batch(world: int, batch: int, dim: int) -> torch.Tensor:
    """View-major per process: rows [r] are process r's (2*batch, dim) block."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(world, 2 * batch, dim, generator=g, dtype=torch.float64)


NTX_BATCH, NTX_DIM = 4, 8


def _ntxent_part(rank: int, world: int) -> dict:
    local = _global_batch(world, NTX_BATCH, NTX_DIM)[rank].clone().requires_grad_(True)
    loss = NTXentLoss(2, 0.2)(local)
    loss.backward()
    losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    # DDP averages gradients over processes; do the same here
    return {"grad": local.grad / world, "loss": torch.stack(losses).mean()}


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


def test_two_process_ntxent_equals_one_process(gloo_runs):
    loss_ref, grads_ref = _single_process_reference(WORLD, NTX_BATCH, NTX_DIM)
    for rank in range(WORLD):
        out = gloo_runs[rank]["ntxent"]
        assert torch.allclose(out["loss"], loss_ref, rtol=1e-10)
        assert torch.allclose(out["grad"], grads_ref[rank], rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- BAM

BAM_VIEWS, BAM_TARGETS = 3, 2
BAM_BATCH, BAM_DIM = 3, 5
BAM_CASES = [  # (teacher, blockwise)
    (False, False), (True, False), (False, True), (True, True),
]


def _bam_inputs(world: int, batch: int, dim: int):
    g = torch.Generator().manual_seed(5)
    shape = (world, BAM_VIEWS * batch, dim)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randn(shape, generator=g, dtype=torch.float64))


def _bam(teacher_on: bool, blockwise: bool, normalization: str = "global") -> BAMLoss:
    return BAMLoss(BAM_VIEWS, BAM_TARGETS, top_k=5, blockwise=blockwise, block_images=2,
                   normalization=normalization)


def _bam_part(rank: int, world: int) -> dict:
    students, teachers = _bam_inputs(world, BAM_BATCH, BAM_DIM)
    results = {}
    for case in BAM_CASES + [(True, False, "local")]:
        teacher_on, blockwise, *normalization = case
        local = students[rank].clone().requires_grad_(True)
        loss = _bam(teacher_on, blockwise, *normalization)(
            local, teachers[rank] if teacher_on else None).loss
        loss.backward()
        losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        # DDP averages gradients over processes; do the same here
        results[str(case)] = {"loss": torch.stack(losses), "grad": local.grad / world}
    return results


def _to_global(blocks: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-process view-major blocks -> one view-major global batch."""
    world, _, dim = blocks.shape
    return blocks.view(world, BAM_VIEWS, batch, dim).transpose(0, 1).reshape(-1, dim)


def _to_blocks(rows: torch.Tensor, world: int, batch: int) -> torch.Tensor:
    dim = rows.shape[-1]
    return rows.view(BAM_VIEWS, world, batch, dim).transpose(0, 1).reshape(world, -1, dim)


def test_two_process_bam_equals_one_process(gloo_runs):
    """Global normalisation: 2 processes = 1 process on the global batch (loss and gradients)."""
    world, batch, dim = WORLD, BAM_BATCH, BAM_DIM
    students, teachers = _bam_inputs(world, batch, dim)
    outs = [run["bam"] for run in gloo_runs]
    for teacher_on, blockwise in BAM_CASES:
        z = _to_global(students, batch).requires_grad_(True)
        loss = _bam(teacher_on, blockwise)(
            z, _to_global(teachers, batch) if teacher_on else None).loss
        loss.backward()
        grads = _to_blocks(z.grad, world, batch)
        for rank, out in enumerate(outs):
            got = out[str((teacher_on, blockwise))]
            assert torch.allclose(got["loss"].mean(), loss.detach(), rtol=1e-10)
            assert torch.allclose(got["grad"], grads[rank], rtol=1e-8, atol=1e-12)


def test_two_process_bam_local_normalisation_is_per_process(gloo_runs):
    world, batch, dim = WORLD, BAM_BATCH, BAM_DIM
    students, teachers = _bam_inputs(world, batch, dim)
    for rank in range(world):
        got = gloo_runs[rank]["bam"][str((True, False, "local"))]
        z = students[rank].clone().requires_grad_(True)
        loss = _bam(True, False)(z, teachers[rank]).loss
        loss.backward()
        assert torch.allclose(got["loss"][rank], loss.detach(), rtol=1e-10)
        assert torch.allclose(got["grad"] * world, z.grad, rtol=1e-8, atol=1e-12)
        # and it differs from the global computation
        z_global = _to_global(students, batch)
        global_loss = _bam(True, False)(z_global, _to_global(teachers, batch)).loss
        assert not torch.allclose(got["loss"].mean(), global_loss)


# --------------------------------------------------------------------------- DINO

DINO_VIEWS, DINO_GLOBAL, DINO_DIM = 4, 2, 6


def _dino_inputs(world: int, batch: int):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(world, DINO_VIEWS * batch, DINO_DIM, generator=g, dtype=torch.float64),
            torch.randn(world, DINO_GLOBAL * batch, DINO_DIM, generator=g, dtype=torch.float64))


def _dino_loss() -> DINOLoss:
    return DINOLoss(DINO_DIM, DINO_VIEWS, DINO_GLOBAL, teacher_temp=0.05,
                    center_momentum=0.7).double()


DINO_BATCH = 3


def _dino_part(rank: int, world: int) -> dict:
    students, teachers = _dino_inputs(world, DINO_BATCH)
    local = students[rank].clone().requires_grad_(True)
    criterion = _dino_loss()
    loss = criterion(local, teachers[rank]).loss
    loss.backward()
    losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    return {"loss": torch.stack(losses), "grad": local.grad / world, "center": criterion.center}


def test_two_process_dino_equals_one_process(gloo_runs):
    """Per-image losses average over processes; the centre is all-reduced to the global mean."""
    world, batch = WORLD, DINO_BATCH
    students, teachers = _dino_inputs(world, batch)

    def to_global(blocks, views):
        return blocks.view(world, views, batch, -1).transpose(0, 1).reshape(-1, DINO_DIM)

    z = to_global(students, DINO_VIEWS).requires_grad_(True)
    criterion = _dino_loss()
    loss = criterion(z, to_global(teachers, DINO_GLOBAL)).loss
    loss.backward()
    grads = z.grad.view(DINO_VIEWS, world, batch, -1).transpose(0, 1).reshape(world, -1, DINO_DIM)
    for rank in range(world):
        out = gloo_runs[rank]["dino"]
        assert torch.allclose(out["loss"].mean(), loss.detach(), rtol=1e-10)
        assert torch.allclose(out["grad"], grads[rank], rtol=1e-8, atol=1e-12)
        assert torch.allclose(out["center"], criterion.center, rtol=1e-10)


# --------------------------------------------------------------------------- global batch norm

BN_ROWS = (3, 5)  # unequal per-process batches (one per process): the count is all-reduced too
BN_CHANNELS = 4


def _bn_inputs(trailing: tuple[int, ...]):
    """Per-process inputs ``(rows_r, C, *trailing)`` and the loss weights on the outputs."""
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(n, BN_CHANNELS, *trailing, generator=g, dtype=torch.float64) * 3 + 1
          for n in BN_ROWS]
    ws = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]
    return xs, ws


def _bn_layer(cls, momentum: float | None, shift: bool = True):
    """A batch norm with fixed random scales and shifts; ``shift=False``: the global layer has
    no shift, torch's a shift of zero (the same function)."""
    extra = {} if cls is torch.nn.BatchNorm1d else {"shift": shift}
    layer = cls(BN_CHANNELS, momentum=momentum, **extra).double()
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(BN_CHANNELS, generator=g, dtype=torch.float64) + 0.5)
        shifts = torch.randn(BN_CHANNELS, generator=g, dtype=torch.float64)
        if layer.bias is not None:
            layer.bias.copy_(shifts if shift else torch.zeros_like(shifts))
    return layer


BN_CASES = {"rows": ((), 0.3, True), "rows-length": ((2,), 0.3, True),
            "cumulative-average": ((), None, True), "scale-only": ((), 0.3, False)}


def _bn_part(rank: int, world: int) -> dict:
    from attnssl.nn.global_batch_norm import GlobalBatchNorm1d

    results = {}
    for case, (trailing, momentum, shift) in BN_CASES.items():
        xs, ws = _bn_inputs(trailing)
        layer = _bn_layer(GlobalBatchNorm1d, momentum, shift).train()
        x = xs[rank].clone().requires_grad_(True)
        for _ in range(2):  # two steps: the running estimates compound
            y = layer(x)
        (y * ws[rank]).sum().backward()
        results[case] = {"y": y.detach(), "x_grad": x.grad, "weight_grad": layer.weight.grad,
                         "bias_grad": None if layer.bias is None else layer.bias.grad,
                         "state": layer.state_dict()}
    return results


@pytest.mark.parametrize("case", list(BN_CASES))
def test_two_process_global_batch_norm_equals_torch_batch_norm_on_the_global_batch(
        gloo_runs, case):
    """SimCLR's global BN: outputs, every gradient and the running estimates match torch's
    ``nn.BatchNorm1d`` run once on both processes' rows (per-process weight gradients sum to
    the global one; DDP then averages them). Scale-only (SimCLR's output BN): torch's layer
    with a zero shift, and no shift in the state dict."""
    trailing, momentum, shift = BN_CASES[case]
    xs, ws = _bn_inputs(trailing)
    reference = _bn_layer(torch.nn.BatchNorm1d, momentum, shift).train()
    x = torch.cat(xs).requires_grad_(True)
    for _ in range(2):
        y = reference(x)
    (y * torch.cat(ws)).sum().backward()
    outs = [run["bn"][case] for run in gloo_runs]
    assert torch.allclose(torch.cat([o["y"] for o in outs]), y.detach(), atol=1e-12)
    assert torch.allclose(torch.cat([o["x_grad"] for o in outs]), x.grad, atol=1e-12)
    assert torch.allclose(sum(o["weight_grad"] for o in outs), reference.weight.grad, atol=1e-12)
    if shift:
        assert torch.allclose(sum(o["bias_grad"] for o in outs), reference.bias.grad,
                              atol=1e-12)
    else:
        assert all(o["bias_grad"] is None and "bias" not in o["state"] for o in outs)
    for out in outs:
        for name, value in reference.state_dict().items():
            if name != "bias" or shift:
                assert torch.allclose(out["state"][name], value, atol=1e-12), name
    # per-process statistics (plain BN on each process's rows) would differ
    local = _bn_layer(torch.nn.BatchNorm1d, momentum, shift).train()(xs[0])
    assert not torch.allclose(local, outs[0]["y"], atol=1e-3)
