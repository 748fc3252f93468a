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


class _Batches:
    """A batch sampler whose batches the loader replaces before each epoch: the DataLoader
    built around it is made once, so its workers persist from one epoch to the next."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """``loader(batches)`` yields ``(images uint8 (B, C, H, W), labels (B,))`` for each index
    batch in order.

    In-memory sets, or ``num_workers=0``, are read in this process. Otherwise one DataLoader
    reads them in ``num_workers`` workers that persist across epochs, each ``prefetch`` batches
    ahead, into pinned memory when ``pin_memory`` (for a copy to a GPU that overlaps compute).
    The batches are whatever the caller passes (:func:`epoch_batches`), so the order and a
    resume mid-epoch are the same with workers or without.
    """

    def __init__(self, dataset: ImageDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch: int = 2):
        self.dataset = dataset
        self._sampler = _Batches()
        self._loader = None
        if not dataset.in_memory and num_workers > 0:
            self._loader = DataLoader(
                dataset, batch_sampler=self._sampler, num_workers=num_workers,
                collate_fn=_stack, persistent_workers=True, prefetch_factor=prefetch,
                pin_memory=pin_memory)

    def __call__(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            for indices in batches:
                yield self.dataset.get_batch(indices)
            return
        self._sampler.batches = [b.tolist() for b in batches]
        yield from self._loader

