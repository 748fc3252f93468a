"""Batches in a seeded order that a resumed run can pick up mid-epoch.

The order of epoch ``e`` is a permutation drawn from ``seed + e``; process ``r`` of ``W`` takes
every W-th index of it (as ``DistributedSampler`` does), and the trailing remainder that would
make an uneven last batch is dropped. Resuming at batch ``k`` skips the first ``k`` batches
without loading them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from attnssl.data.datasets import ImageDataset


def epoch_batches(
    dataset_size: int, batch_per_process: int, epoch: int, seed: int, rank: int = 0,
    world_size: int = 1,
) -> list[torch.Tensor]:
    """The index batches process ``rank`` sees in ``epoch`` (drop-last)."""
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed + epoch))
    steps = dataset_size // (batch_per_process * world_size)
    if steps == 0:
        raise ValueError(
            f"optim.batch_size={batch_per_process * world_size} is larger than the dataset "
            f"({dataset_size} images); use a batch size of at most {dataset_size}"
        )
    mine = order[: steps * batch_per_process * world_size][rank::world_size]
    return list(mine.view(steps, batch_per_process))


def _stack(items):
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def iterate_batches(
    dataset: ImageDataset, batches: list[torch.Tensor], num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images uint8 (B, C, H, W), labels (B,))`` for each index batch in order."""
    if dataset.in_memory or num_workers == 0:
        for indices in batches:
            yield dataset.get_batch(indices)
        return
    loader = DataLoader(
        dataset, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
        collate_fn=_stack, persistent_workers=False,
    )
    yield from loader
