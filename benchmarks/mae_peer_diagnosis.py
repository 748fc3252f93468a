"""Why lightly's MAE scores above ours at the B1 peer budget: its model fed by our views.

``b1_peers.py`` trains lightly's MAE with lightly's per-image transforms. This script trains the
same lightly model (``b1_peers.PeerMAE``, lightly's loop: its weight-decay groups and
``CosineWarmupScheduler``) on attnssl's batched views instead, so the views are no longer a
difference, and optionally re-initialises the two linears that lightly 1.6's example leaves at
torch's ``nn.Linear`` default (the decoder's input embedding and pixel prediction) with the
official xavier-uniform. Scores come from our k-NN and linear probe, as in ``b1_peers.py``.

    python -m benchmarks.mae_peer_diagnosis --seeds 0 1 --io-init torch xavier
"""

from __future__ import annotations

import argparse
import json

import torch

from attnssl.config import load_config
from attnssl.data.datasets import NORMALISATION, DatasetSpec, load_dataset
from attnssl.data.views import MultiCropViews
from attnssl.eval.evaluate import evaluate_features, load_eval_splits
from attnssl.nn.mae import xavier_linears_
from attnssl.train.environment import machine_description
from benchmarks.b1_peers import PeerMAE, peer_optimizer
from benchmarks.helpers import MAE_ONE_SAMPLE, ROOT


def train_lightly_on_our_views(config, images: torch.Tensor, epochs: int, seed: int,
                               io_init: str) -> PeerMAE:
    torch.manual_seed(seed)
    model = PeerMAE(config, images.shape[1])
    if io_init == "xavier":
        xavier_linears_(model.decoder_embed)
        xavier_linears_(model.decoder_pred)
    views = MultiCropViews(config.views, images.shape[-1], images.shape[1],
                           *NORMALISATION["fashion-mnist"], seed=seed)
    optim = config.optim
    steps_per_epoch = len(images) // optim.batch_size
    optimizer, lr_schedule = peer_optimizer(model, optim, steps_per_epoch, epochs)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        permutation = torch.randperm(len(images), generator=order)
        for step in range(steps_per_epoch):
            batch = images[permutation[step * optim.batch_size:(step + 1) * optim.batch_size]]
            loss = model.loss(views(batch), epoch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_schedule.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--io-init", nargs="+", default=["torch", "xavier"],
                        choices=["torch", "xavier"])
    parser.add_argument("--budget-images", type=int, default=12288)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    config = load_config("mae_fashion_mnist", [*MAE_ONE_SAMPLE,  # as lightly's MAE
                                               f"data.subset={args.budget_images}",
                                               f"optim.epochs={args.epochs}"])
    images = load_dataset(DatasetSpec("fashion-mnist"), "train").images[: args.budget_images]
    splits = load_eval_splits(config)
    rows = []
    for io_init in args.io_init:
        for seed in args.seeds:
            model = train_lightly_on_our_views(config, images, args.epochs, seed, io_init)
            scores = evaluate_features(model.evaluation_backbone.eval(), config, *splits)
            rows.append({"io_init": io_init, "seed": seed, "knn_top1": scores["knn_top1"],
                         "linear_top1": scores["linear_top1"]})
            print(json.dumps(rows[-1]), flush=True)
    path = ROOT / "benchmarks" / "results" / "mae_peer_diagnosis.json"
    path.write_text(json.dumps({"machine": machine_description(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
