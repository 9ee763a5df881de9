"""Samplers: which samples each rank takes. Training (`TrainSampler`) shuffles per epoch, splits
one order across ranks and can start part-way into an epoch (resume); evaluation
(`ShardSampler`) gives every sample to exactly one rank."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler


class TrainSampler(Sampler):
    """Shuffles with (seed, epoch), splits the order across ranks (dropping the remainder so
    that ranks take equal steps) and can start part-way into an epoch (resume).

    Default (k = 1): one random permutation; rank r takes every world-th index of it.
    Grouped (k > 1, `image_keys` gives each sample's image): each image's sentences, shuffled,
    are cut into units of up to k; the units are shuffled and laid end to end, and rank r takes
    every world-th chunk of `batch` consecutive indices, so a micro-batch keeps its units
    together (b/k images of k sentences each where the data allows). A frozen image encoder
    then runs once per distinct image (`common.cache.frozen_features`).

    Either way a global micro-batch (world x batch samples) is one contiguous window of the
    epoch's order, which depends on (seed, epoch, k) alone: a resumed run with the same global
    batch continues exactly, whatever world size x batch x accumulation make it.

    Yields (epoch, index) keys for `EpochKeyed`: the epoch travels with each index, so that
    persistent loader workers, which never see `set_epoch` on their copy of the dataset, still
    augment each epoch differently."""

    def __init__(self, n: int, rank: int, world: int, seed: int,
                 image_keys: list[str] | None = None, k: int = 1, batch: int = 1):
        if k < 1:
            raise ValueError(f"--sentences-per-image must be >= 1, got {k}")
        if k > 1 and image_keys is None:
            raise ValueError("--sentences-per-image needs each sample's image (image_key)")
        self.n, self.rank, self.world, self.seed, self.k = n, rank, world, seed, k
        self.chunk = batch if k > 1 else 1  # consecutive indices a rank takes at a time
        self.epoch, self.start = 0, 0
        self.by_image: list[list[int]] = []  # sample indices of each image, in dataset order
        if k > 1:
            first: dict[str, int] = {}
            for i, key in enumerate(image_keys):
                if key not in first:
                    first[key] = len(self.by_image)
                    self.by_image.append([])
                self.by_image[first[key]].append(i)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """The epoch's order of every sample index."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.k == 1:
            return torch.randperm(self.n, generator=g).tolist()
        units = []
        for idx in self.by_image:
            shuffled = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            units += [shuffled[s : s + self.k] for s in range(0, len(shuffled), self.k)]
        return [i for u in torch.randperm(len(units), generator=g).tolist() for i in units[u]]

    def __iter__(self):
        order, c, w = self.order(), self.chunk, self.world
        mine = [order[j] for j in range(len(self) * w) if (j // c) % w == self.rank]
        return iter([(self.epoch, i) for i in mine[self.start :]])

    def __len__(self) -> int:
        return self.n // (self.world * self.chunk) * self.chunk


class EpochKeyed(Dataset):
    """A prepared dataset (data.PreparedDataset) indexed by TrainSampler's (epoch, index) keys."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict | None:
        epoch, i = key
        self.dataset.set_epoch(epoch)
        return self.dataset[i]


class ShardSampler(Sampler):
    """Rank r of w takes samples r, r+w, r+2w, ...: every sample exactly once over all ranks,
    whatever the split size (unlike DistributedSampler, which pads by repeating samples)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
