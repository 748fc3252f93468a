"""Every registered method under DDP: one float64 step with two real gloo processes, set up by
Lightning Fabric's DDP strategy as the trainer does, each process on half of the images, equals
one process on the whole batch: the loss, every gradient, and everything the step updates (the
parameters, the EMA teacher, centres and batch-norm statistics)."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from attnssl.config import load_config
from attnssl.data.udi_views import UDISampling
from attnssl.methods import build_method, build_views, method_names
from attnssl.nn.vit import build_vit

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # real gloo processes

WORLD, IMAGES, SIZE, PATCH = 2, 8, 32, 4
LR = 0.05
# each method's Fashion-MNIST preset on 32 px colour images, a small backbone; no random
# dropping of the last layer's gradients or of steps, so that one step is the whole story
SMALL = ["data.dataset=synthetic", "model.preset=null", "model.patch_size=4",
         "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "trainer.precision=32",
         f"optim.batch_size={IMAGES}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _method(name: str):
    config = load_config(f"{name}_fashion_mnist", SMALL)
    torch.manual_seed(0)  # the same initial weights in every process
    backbone = build_vit(config.model, SIZE, 3)
    return config, build_method(config, backbone).double()


def _inputs(name: str) -> dict:
    """The global batch's views (and the method's other inputs), made once."""
    config, method = _method(name)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (IMAGES, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    views_maker = build_views(config, SIZE, 3, (0.5,) * 3, (0.25,) * 3, PATCH, seed=2)
    views = [v.double() for v in views_maker(images)]
    extra = {k: dict(vars(v)) if k == "sampling" else v  # plain tensors, for weights_only loads
             for k, v in views_maker.extra_inputs().items()}
    grid = SIZE // PATCH
    if name == "mae":  # one row per sample: (views x images, patches), view-major
        extra["noise"] = torch.rand(len(views) * IMAGES, grid * grid, generator=generator,
                                    dtype=torch.float64)
    if name == "ibot":
        torch.manual_seed(3)
        extra["masks"] = method.draw_masks(method.n_global * IMAGES, (grid, grid))
    return {"views": views, "extra": extra}


def _share(inputs: dict, rank: int) -> tuple[list[torch.Tensor], dict]:
    """Process ``rank``'s images: its slice of every view and of the other inputs."""
    part = slice(rank * IMAGES // WORLD, (rank + 1) * IMAGES // WORLD)
    views = [v[part] for v in inputs["views"]]
    extra = {}
    for key, value in inputs["extra"].items():
        if key == "sampling":  # images on axis 1 of the global tensors, 2 of the local ones
            extra[key] = {f: t[:, :, part] if f.startswith("local") else t[:, part]
                          for f, t in value.items()}
        elif key in ("masks", "noise"):  # (views x images, ...), view-major
            masks = value.view(-1, IMAGES, *value.shape[1:])
            extra[key] = masks[:, part].reshape(-1, *value.shape[1:])
        else:  # (images, ...)
            extra[key] = value[part]
    return views, extra


def _method_inputs(extra: dict) -> dict:
    """The method's keyword inputs: UDI's sampling as the dataclass it takes."""
    return {k: UDISampling(**v) if k == "sampling" else v for k, v in extra.items()}


def _step(method, views, extra, backward, optimizer):
    """One training step as the trainer takes it; returns the loss and the gradients."""
    module = getattr(method, "module", method)
    module.before_step(0, 10, 10)
    loss = method(views, **_method_inputs(extra))["loss"]
    backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.before_optimizer_step()
    optimizer.step()
    module.after_step(0, 10)
    return loss.detach(), grads, {k: v.detach().clone() for k, v in module.state_dict().items()}


def _worker(rank: int, port: int, folder: str) -> None:
    """One process of two: every method's step in turn, under one Fabric DDP setup each."""
    from lightning_fabric import Fabric

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    fabric = Fabric(accelerator="cpu", devices=WORLD, strategy="ddp", precision="64-true")
    fabric.launch()
    try:
        for name in method_names():
            _, method = _method(name)
            optimizer = torch.optim.SGD(method.parameters(), lr=LR)
            method, optimizer = fabric.setup(method, optimizer)
            inputs = torch.load(os.path.join(folder, f"{name}-inputs.pt"), weights_only=True)
            views, extra = _share(inputs, rank)
            loss, grads, state = _step(method, views, extra, fabric.backward, optimizer)
            torch.save({"losses": fabric.all_gather(loss), "grads": grads, "state": state},
                       os.path.join(folder, f"{name}-rank{rank}.pt"))
        torch.distributed.barrier()  # both done before either tears down
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory) -> Path:
    """Every registered method's step on two real gloo processes (one launch for all)."""
    folder = tmp_path_factory.mktemp("ddp")
    for name in method_names():
        torch.save(_inputs(name), folder / f"{name}-inputs.pt")
    mp.spawn(_worker, args=(_free_port(), str(folder)), nprocs=WORLD)
    return folder


@pytest.mark.parametrize("name", method_names())
def test_two_processes_take_the_step_one_process_takes_on_the_global_batch(two_process_steps,
                                                                            name):
    inputs = torch.load(two_process_steps / f"{name}-inputs.pt", weights_only=True)
    _, method = _method(name)
    optimizer = torch.optim.SGD(method.parameters(), lr=LR)
    loss, grads, state = _step(method, inputs["views"], inputs["extra"],
                               lambda value: value.backward(), optimizer)
    for rank in range(WORLD):
        got = torch.load(two_process_steps / f"{name}-rank{rank}.pt", weights_only=True)
        # each process's loss is its share of the global mean: their mean is the global loss
        assert got["losses"].mean().item() == pytest.approx(loss.item(), rel=1e-7, abs=1e-10)
        assert got["grads"].keys() == grads.keys()
        for key, value in grads.items():  # DDP averaged them
            # float64 sums in another order: errors scale with the gradient's own size (DINO's
            # cold teacher makes its position-embedding gradient 8 and the error 6e-10), so the
            # bound of 1e-10 applies to gradients up to 1 and scales with larger ones
            scale = max(1.0, value.abs().max().item())
            torch.testing.assert_close(got["grads"][key], value, rtol=1e-7, atol=1e-10 * scale,
                                       msg=lambda m, key=key: f"{name} gradient {key}: {m}")
        for key, value in state.items():  # parameters, teacher, centres, statistics
            torch.testing.assert_close(got["state"][key], value, rtol=1e-7, atol=1e-10,
                                       msg=lambda m, key=key: f"{name} state {key}: {m}")
