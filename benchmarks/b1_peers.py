"""Protocol B1 peer rows: lightly's own DINO, SimCLR and MAE against ours, measured in one run.

The peer is what a lightly user writes (github.com/lightly-ai/lightly, ``examples/pytorch`` and
``benchmarks/imagenet/vitb16``): lightly's heads, losses, masking utilities, momentum update,
schedules and per-image torchvision transforms in a ``DataLoader``, around a plain timm
``VisionTransformer`` of the B1 size (img 28, patch 4, width 128, depth 4, 4 heads, timm's own
fused attention). Every method setting lightly exposes is set to our preset's value (head sizes,
temperatures and their warm-up, centring, teacher momentum, mask ratio, per-patch normalised
targets, crop scales and sizes, flips, the presets' brightness/contrast jitter: lightly's
``ColorJitter`` with saturation and hue 0, as ours on grayscale images); the preset's batch,
AdamW learning rate and weight decay without decay on biases and norms, warm-up then cosine, DINO's
per-parameter gradient clip at 3.0 and frozen last layer in epoch 0. What stays lightly's own:
the forward is one call per view (as its examples), SimCLR's projector ends with a batch norm,
MAE's crop is bicubic, torchvision's jitter applies its changes in a random order (ours in a
fixed one).

Each method's entry in the results file keeps the settings it was measured with; a new
measurement with other settings replaces the whole entry (a throughput-only run does not keep
accuracy rows of another recipe), and the table names the methods whose settings the presets
have since moved away from, since the command would now train another recipe.

Two measurements, both written to ``benchmarks/results/b1_peers.json``:

* throughput, alternating ours and the peer's in rounds (A B A B ...), each round ``--round-steps``
  training steps on the first images of the training set, in every precision asked for; images
  per second over the whole loop (ours: views on batched tensors inside the step; peer: the
  time the step waits for its ``DataLoader`` included). The peer's loader gets its fastest worker
  count on this machine, picked by a short timed trial of 0, 1 and 2 workers;
* accuracy at the same budget for both: ``--budget-images`` training images for ``--epochs``
  epochs (B1's schedule on a subset), then our evaluation (weighted k-NN, k=20, T=0.07, and the
  linear probe) on the evaluated backbone (DINO's teacher) over the full train and test splits.

    python -m benchmarks.b1_peers --readme                 # published: all three methods
    python -m benchmarks.b1_peers --methods mae --rounds 1 --round-steps 4 --budget-images 1024
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from attnssl.config import config_to_dict, flatten_config, load_config, nest_config, with_defaults
from attnssl.data.datasets import NORMALISATION, DatasetSpec, load_dataset
from attnssl.eval.evaluate import evaluate_features, load_eval_splits
from attnssl.train.environment import machine_description
from attnssl.train.optimisation import clip_each_parameter
from attnssl.train.trainer import pretrain
from benchmarks.helpers import MAE_ONE_SAMPLE, ROOT, SIMCLR_TWO_VIEWS, machine_line, replace_readme_block

PRESETS = {"dino": "dino_fashion_mnist", "simclr": "simclr_fashion_mnist",
           "mae": "mae_fashion_mnist"}
# lightly's examples sample (MAE) or view (SimCLR: two views) each image as the official
# code does: ours the same, like with like
PEER_OVERRIDES = {"mae": MAE_ONE_SAMPLE, "simclr": SIMCLR_TWO_VIEWS}


def peer_config(method: str, overrides: list[str] | tuple = ()):
    """Our preset for ``method`` as it is compared with the peer's, with ``overrides``."""
    return load_config(PRESETS[method], [*PEER_OVERRIDES.get(method, []), *overrides])


def grayscale_jitter(views) -> dict:
    """lightly's colour-jitter arguments for our views on grayscale images: brightness and
    contrast with the preset's probability and strengths (lightly scales each by
    ``cj_strength``), no saturation or hue, as ours skips on one channel."""
    return {"cj_prob": views.color_jitter_prob, "cj_strength": 1.0,
            "cj_bright": views.brightness, "cj_contrast": views.contrast,
            "cj_sat": 0.0, "cj_hue": 0.0}


def recorded_settings(config) -> dict:
    """What a row was measured with, as dotted keys (run and trainer keys left out: they do
    not change the recipe)."""
    return recipe(flatten_config(config_to_dict(config)))


def recipe(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if not k.startswith(("run.", "trainer."))}


def moved_settings(method: str, entry: dict) -> list[str] | None:
    """The keys whose preset value differs now from the one ``entry`` was measured with, a
    setting added since counting at its default (None: the entry did not record its
    settings)."""
    if "settings" not in entry:
        return None
    now = recorded_settings(peer_config(method))
    then = recipe(flatten_config(with_defaults(nest_config(entry["settings"]))))
    return sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))


def lightly_modules():
    """Import lightly only here: it is the optional ``bench`` group, not a dependency."""
    try:
        import lightly  # noqa: F401
    except ImportError as err:
        raise SystemExit("the peer rows need lightly: pip install -e '.[bench]'") from err
    from lightly import loss, transforms
    from lightly.models import modules, utils
    from lightly.utils import scheduler
    return loss, modules, utils, transforms, scheduler


def timm_vit(model_cfg, channels: int) -> nn.Module:
    """The B1 backbone as plain timm builds it (timm's attention, no attnssl code)."""
    from timm.models.vision_transformer import VisionTransformer

    from attnssl.nn.vit import resolve_size
    size = resolve_size(model_cfg)
    return VisionTransformer(img_size=28, patch_size=size.patch_size, in_chans=channels,
                             num_classes=0, embed_dim=size.embed_dim, depth=size.depth,
                             num_heads=size.num_heads, mlp_ratio=size.mlp_ratio,
                             dynamic_img_size=True)


# ----------------------------------------------------------------------------- lightly's methods

class PeerDINO(nn.Module):
    """lightly's DINO (``examples/pytorch/dino.py``) with our preset's settings."""

    def __init__(self, config, channels: int):
        loss, modules, utils, _, _ = lightly_modules()
        m = config.method
        self.utils = utils
        super().__init__()
        self.student_backbone = timm_vit(config.model, channels)
        head = lambda: modules.DINOProjectionHead(  # noqa: E731
            self.student_backbone.embed_dim, m.head_hidden, m.head_bottleneck, m.out_dim,
            freeze_last_layer=m.freeze_last_layer_epochs)
        self.student_head, self.teacher_head = head(), head()
        # the teacher starts as the student (official DINO); a weight-normed head cannot be
        # deep-copied, so lightly's example builds a second one, loaded here
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        utils.deactivate_requires_grad(self.teacher_backbone)
        utils.deactivate_requires_grad(self.teacher_head)
        self.criterion = loss.DINOLoss(
            m.out_dim, warmup_teacher_temp=m.warmup_teacher_temp, teacher_temp=m.teacher_temp,
            warmup_teacher_temp_epochs=m.warmup_teacher_temp_epochs, student_temp=m.student_temp,
            center_momentum=m.center_momentum)
        self.base_momentum, self.clip = m.teacher_momentum, config.optim.clip_grad

    @property
    def evaluation_backbone(self) -> nn.Module:
        return self.teacher_backbone

    def before_step(self, step: int, total_steps: int) -> None:
        from lightly.utils.scheduler import cosine_schedule
        momentum = cosine_schedule(step, total_steps, self.base_momentum, 1.0)
        self.utils.update_momentum(self.student_backbone, self.teacher_backbone, momentum)
        self.utils.update_momentum(self.student_head, self.teacher_head, momentum)

    def loss(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = [self.teacher_head(self.teacher_backbone(v)) for v in views[:2]]
        student_out = [self.student_head(self.student_backbone(v)) for v in views]
        return self.criterion(teacher_out, student_out, epoch=epoch)

    def before_optimizer_step(self, epoch: int) -> None:
        clip_each_parameter(self.parameters(), self.clip)
        self.student_head.cancel_last_layer_gradients(current_epoch=epoch)

    @staticmethod
    def transform(config, normalize):
        v = config.views
        return lightly_modules()[3].DINOTransform(
            global_crop_size=28, global_crop_scale=tuple(v.global_scale), local_crop_size=v.local_size,
            local_crop_scale=tuple(v.local_scale), n_local_views=v.local_crops, hf_prob=v.hflip_prob,
            random_gray_scale=0.0, gaussian_blur=(0.0, 0.0, 0.0), solarization_prob=0.0,
            normalize=normalize, **grayscale_jitter(v))


class PeerSimCLR(nn.Module):
    """lightly's SimCLR (``examples/pytorch/simclr.py``) with our preset's settings."""

    def __init__(self, config, channels: int):
        loss, modules, _, _, _ = lightly_modules()
        m = config.method
        super().__init__()
        self.backbone = timm_vit(config.model, channels)
        self.projection_head = modules.SimCLRProjectionHead(
            self.backbone.embed_dim, m.projector_hidden, m.projector_out, m.projector_layers)
        self.criterion = loss.NTXentLoss(temperature=m.temperature)

    @property
    def evaluation_backbone(self) -> nn.Module:
        return self.backbone

    def loss(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        z0, z1 = (self.projection_head(self.backbone(v)) for v in views)
        return self.criterion(z0, z1)

    @staticmethod
    def transform(config, normalize):
        v = config.views
        return lightly_modules()[3].SimCLRTransform(
            input_size=28, min_scale=v.global_scale[0], random_gray_scale=0.0,
            gaussian_blur=0.0, hf_prob=v.hflip_prob, normalize=normalize, **grayscale_jitter(v))


class PeerMAE(nn.Module):
    """lightly's MAE (``examples/pytorch/mae.py``, the ``MaskedVisionTransformerDecoderTIMM``
    form) with our preset's settings and ``normalize_mean_var`` targets (norm_pix_loss)."""

    def __init__(self, config, channels: int):
        _, modules, utils, _, _ = lightly_modules()
        m = config.method
        super().__init__()
        self.utils, self.mask_ratio, self.norm_pix = utils, m.mask_ratio, m.norm_pix_loss
        vit = timm_vit(config.model, channels)
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = modules.MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder_embed = nn.Linear(vit.embed_dim, m.decoder_dim)
        self.decoder = modules.MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=m.decoder_dim,
            depth=m.decoder_depth, num_heads=m.decoder_heads)
        self.decoder_pred = nn.Linear(m.decoder_dim, self.patch_size ** 2 * channels)

    @property
    def evaluation_backbone(self) -> nn.Module:
        return self.backbone.vit

    def loss(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        u, images = self.utils, views[0]
        idx_keep, idx_mask = u.random_token_mask((images.shape[0], self.sequence_length),
                                                 mask_ratio=self.mask_ratio)
        encoded = self.decoder_embed(self.backbone.encode(images=images, idx_keep=idx_keep))
        tokens = u.repeat_token(self.decoder.mask_token, (images.shape[0], self.sequence_length))
        tokens = u.set_at_index(tokens, idx_keep, encoded.type_as(tokens))
        decoded = self.decoder.decode(self.decoder.preprocess(tokens))
        prediction = self.decoder_pred(u.get_at_index(decoded, idx_mask))
        target = u.get_at_index(u.patchify(images, self.patch_size), idx_mask - 1)
        if self.norm_pix:
            target = u.normalize_mean_var(target, dim=-1)
        return nn.functional.mse_loss(prediction, target)

    @staticmethod
    def transform(config, normalize):
        return lightly_modules()[3].MAETransform(input_size=28, min_scale=config.views.global_scale[0],
                                                 normalize=normalize)


PEERS = {"dino": PeerDINO, "simclr": PeerSimCLR, "mae": PeerMAE}


class PILImages(torch.utils.data.Dataset):
    """Fashion-MNIST's uint8 tensors as the PIL images lightly's transforms take."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[index, 0].numpy(), mode="L"))


def peer_optimizer(model: nn.Module, optim, steps_per_epoch: int, epochs: int):
    """lightly's AdamW groups (no decay on biases and norms) and its per-step warm-up cosine."""
    _, _, utils, _, scheduler = lightly_modules()
    decay, no_decay = utils.get_weight_decay_parameters(
        [m for m in model.children() if any(p.requires_grad for p in m.parameters())])
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr,
        betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    lr_schedule = scheduler.CosineWarmupScheduler(
        optimizer, warmup_epochs=round(optim.warmup_epochs * steps_per_epoch),
        max_epochs=steps_per_epoch * epochs, end_value=optim.min_lr / optim.lr)
    return optimizer, lr_schedule


def train_peer(method: str, config, images: torch.Tensor, epochs: int, precision: str,
               workers: int, seed: int = 0) -> tuple[nn.Module, dict]:
    """Train lightly's implementation; returns the model and images/s over the whole loop."""
    torch.manual_seed(seed)
    peer_cls = PEERS[method]
    model = peer_cls(config, images.shape[1])
    mean, std = NORMALISATION["fashion-mnist"]
    dataset = PILImages(images, peer_cls.transform(config, {"mean": list(mean), "std": list(std)}))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.optim.batch_size, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed))
    total_steps = len(loader) * epochs
    optimizer, lr_schedule = peer_optimizer(model, config.optim, len(loader), epochs)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed"
                else nullcontext())
    model.train()
    step, started = 0, time.perf_counter()
    for epoch in range(epochs):
        for views in loader:
            if hasattr(model, "before_step"):
                model.before_step(step, total_steps)
            with autocast:
                loss = model.loss(views, epoch)
            loss.backward()
            if hasattr(model, "before_optimizer_step"):
                model.before_optimizer_step(epoch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_schedule.step()
            step += 1
            if not torch.isfinite(loss):
                raise SystemExit(f"lightly {method} diverged at step {step} (loss {loss.item()})")
    seconds = time.perf_counter() - started
    return model, {"images_per_second": step * config.optim.batch_size / seconds,
                   "train_seconds": seconds, "final_loss": loss.item()}


def fastest_workers(method: str, config, images: torch.Tensor, steps: int) -> tuple[int, dict]:
    """The peer's DataLoader worker count (0, 1 or 2) that trains fastest here."""
    trial = images[: steps * config.optim.batch_size]
    speeds = {w: train_peer(method, config, trial, 1, "32", w)[1]["images_per_second"]
              for w in (0, 1, 2)}
    return max(speeds, key=speeds.get), speeds


def ours(method: str, config_overrides: list[str], out_dir: Path) -> dict:
    config = peer_config(method, [
        *config_overrides, f"run.out_dir={out_dir}", "trainer.progress_bar=false",
        "trainer.checkpoint_every_steps=100000", f"run.name=peer-{method}-{time.time_ns()}"])
    return pretrain(config)


def throughput_rounds(method: str, args, images: torch.Tensor, workers: int, out_dir: Path) -> dict:
    """Alternate ours and the peer's, every precision, ``args.rounds`` times (A B A B ...)."""
    config = peer_config(method)
    subset = args.round_steps * config.optim.batch_size
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for precision in args.ours_precisions:
            metrics = ours(method, [f"trainer.precision={precision}", f"data.subset={subset}",
                                    "optim.epochs=1", "eval.at_end=false"], out_dir)
            runs.setdefault(f"attnssl {precision}", []).append(metrics["images_per_second"])
        for precision in args.peer_precisions:
            _, stats = train_peer(method, config, images[:subset], 1, precision, workers)
            runs.setdefault(f"lightly {precision}", []).append(stats["images_per_second"])
    return {name: {"runs": values, "median": statistics.median(values)}
            for name, values in runs.items()}


def budget_rows(method: str, args, images: torch.Tensor, workers: int, out_dir: Path,
                splits) -> dict:
    """Same images, epochs and schedule for both, once per seed; our evaluation of both backbones.

    Each row holds every seed's scores (``seeds``) and their mean under the plain keys.
    """
    budget = [f"data.subset={args.budget_images}", f"optim.epochs={args.epochs}"]
    ours_name = f"attnssl {args.ours_precisions[0]}"
    config = peer_config(method, budget)
    runs: dict[str, list[dict]] = {ours_name: [], **({} if args.skip_peer_budget else
                                                     {"lightly 32": []})}
    for seed in args.budget_seeds:
        metrics = ours(method, [f"trainer.precision={args.ours_precisions[0]}", *budget,
                                f"run.seed={seed}", *args.ours_overrides], out_dir)
        runs[ours_name].append({
            **{k: metrics["eval"][k] for k in ("knn_top1", "linear_top1", "knn_top1_random_init")},
            "images_per_second": metrics["images_per_second"], "seed": seed})
        print(method, ours_name, json.dumps(runs[ours_name][-1]), flush=True)
        if args.skip_peer_budget:
            continue
        model, stats = train_peer(method, config, images[: args.budget_images], args.epochs, "32",
                                  workers, seed=seed)
        scores = evaluate_features(model.evaluation_backbone.eval(), config, *splits)
        runs["lightly 32"].append({"knn_top1": scores["knn_top1"],
                                   "linear_top1": scores["linear_top1"],
                                   "images_per_second": stats["images_per_second"], "seed": seed})
        print(method, "lightly 32", json.dumps(runs["lightly 32"][-1]), flush=True)
    return {name: {**{key: statistics.mean(r[key] for r in rows) for key in rows[0] if key != "seed"},
                   "seeds": rows}
            for name, rows in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-steps", type=int, default=24)
    parser.add_argument("--ours-precisions", nargs="+", default=["bf16-mixed", "32"])
    parser.add_argument("--peer-precisions", nargs="+", default=["32", "bf16-mixed"])
    parser.add_argument("--budget-images", type=int, default=12288)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--budget-seeds", type=int, nargs="+", default=[0],
                        help="train both once per seed; the table shows the mean")
    parser.add_argument("--ours-overrides", nargs="*", default=[],
                        help="extra config overrides for our budget runs, e.g. "
                             "views.interpolation=bicubic")
    parser.add_argument("--skip-budget", action="store_true", help="throughput rounds only")
    parser.add_argument("--skip-throughput", action="store_true", help="budget runs only")
    parser.add_argument("--skip-peer-budget", action="store_true",
                        help="budget runs of ours only (to compare settings of ours)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "b1_peers.json"),
                        help="results file; methods measured now replace their entries in it")
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "benchmarks" / "peers"))
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--readme-block", default="PEERS",
                        help="README block the table replaces (one per machine measured)")
    args = parser.parse_args()
    argv, shown = sys.argv[1:], []
    for index, arg in enumerate(argv):  # the command as reproduced: README options left out
        if arg != "--readme" and not arg.startswith("--readme-block") \
                and not (index and argv[index - 1] == "--readme-block"):
            shown.append(arg)
    command = " ".join(["python -m benchmarks.b1_peers", *shown])

    images = load_dataset(DatasetSpec("fashion-mnist"), "train").images
    splits = None if args.skip_budget else load_eval_splits(load_config(PRESETS["dino"]))
    out_dir, path = Path(args.out_dir), Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {"methods": {}}
    machine = machine_description()
    if results.get("machine", machine) != machine:
        raise SystemExit(f"{path} holds rows measured on another machine ({results['machine']}); "
                         f"pass --json with a new file for this one ({machine})")
    results["machine"] = machine
    for method in args.methods:
        config = peer_config(method)
        previous = results["methods"].get(method, {})
        if moved_settings(method, previous) != []:  # other or unrecorded settings: not kept
            previous = {}
        entry = {**previous, "command": command, "settings": recorded_settings(config)}
        workers = 0
        if not (args.skip_throughput and (args.skip_budget or args.skip_peer_budget)):
            workers, trial = fastest_workers(method, config, images, steps=6)
            print(f"{method}: lightly loader workers {trial} -> {workers}", flush=True)
            entry.update(peer_workers=workers, peer_worker_trial=trial)
        if not args.skip_throughput:
            entry["rounds"] = args.rounds
            entry["throughput"] = throughput_rounds(method, args, images, workers, out_dir)
            print(method, json.dumps(entry["throughput"]), flush=True)
        if not args.skip_budget:
            entry["budget_setting"] = {"images": args.budget_images, "epochs": args.epochs,
                                       "seeds": args.budget_seeds,
                                       "ours_overrides": args.ours_overrides}
            entry["budget"] = budget_rows(method, args, images, workers, out_dir, splits)
            print(method, json.dumps(entry["budget"]), flush=True)
        results["methods"][method] = entry
        path.write_text(json.dumps(results, indent=1))
    table = peers_table(results)
    print(table)
    if args.readme:
        replace_readme_block(args.readme_block, table)


def peers_table(results: dict) -> str:
    lines = [
        "| method | attnssl bf16 img/s | attnssl fp32 img/s | lightly fp32 img/s | "
        "lightly bf16 img/s | speed-up vs lightly's faster | budget seeds | k-NN attnssl | "
        "k-NN lightly | linear attnssl | linear lightly |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    commands = []
    for method, entry in results["methods"].items():
        tp = {k: v["median"] for k, v in entry.get("throughput", {}).items()}
        best_ours = max((v for k, v in tp.items() if k.startswith("attnssl")), default=0)
        best_peer = max((v for k, v in tp.items() if k.startswith("lightly")), default=0)
        speed_up = f"{best_ours / best_peer:.2f}x" if best_ours and best_peer else "-"
        budget, setting = entry.get("budget", {}), entry.get("budget_setting", {})
        ours_b = next((v for k, v in budget.items() if k.startswith("attnssl")), {})
        peer_b = budget.get("lightly 32", {})
        cell = lambda d, k, digits=2: f"{d[k]:.{digits}f}" if k in d else "-"  # noqa: E731
        lines.append(
            f"| {method} | {cell(tp, 'attnssl bf16-mixed', 0)} | {cell(tp, 'attnssl 32', 0)} | "
            f"{cell(tp, 'lightly 32', 0)} | {cell(tp, 'lightly bf16-mixed', 0)} | "
            f"{speed_up} | {len(setting.get('seeds', [])) or '-'} | "
            f"{cell(ours_b, 'knn_top1')} | {cell(peer_b, 'knn_top1')} | "
            f"{cell(ours_b, 'linear_top1')} | {cell(peer_b, 'linear_top1')} |")
        if entry["command"] not in commands:
            commands.append(entry["command"])
    entries = results["methods"].values()
    rounds = {e["rounds"] for e in entries if "rounds" in e}
    budgets = {(e["budget_setting"]["images"], e["budget_setting"]["epochs"])
               for e in entries if "budget_setting" in e}
    rounds = rounds.pop() if len(rounds) == 1 else "-"
    images, epochs = budgets.pop() if len(budgets) == 1 else ("-", "-")
    ours_precision = " or ".join(sorted({k.split()[1] for e in entries for k in e.get("budget", {})
                                         if k.startswith("attnssl")})) or "-"
    accuracy = ("" if images == "-" else
                " Accuracy: both trained on the first "
                f"{images} training images for {epochs} epochs (B1's schedule), attnssl in "
                f"{ours_precision}, lightly in fp32, scored by the same k-NN and linear probe on "
                "the full splits; the mean over the budget seeds.")
    lines += ["", f"Throughput: medians of {rounds} alternating rounds (attnssl, lightly, attnssl, "
              f"lightly, ...).{accuracy}", "", *stale_note(results), "",
              machine_line(results["machine"], "`; `".join(commands))]
    return "\n".join(lines)


def stale_note(results: dict) -> list[str]:
    """A line naming the rows whose presets have moved on since they were measured, or which
    did not record their settings."""
    notes = []
    for method, entry in results["methods"].items():
        moved = moved_settings(method, entry)
        if moved is None:
            notes.append(f"{method} (settings not recorded)")
        elif moved:
            shown = ", ".join(f"`{k}`" for k in moved[:4]) + (" ..." if len(moved) > 4 else "")
            notes.append(f"{method} (changed since: {shown})")
    if not notes:
        return []
    return [f"Rows that may not match today's presets: {'; '.join(notes)}. The command trains "
            f"the presets as they are now."]


if __name__ == "__main__":
    main()
