"""Class-aware sampling for the second OLTR stage.

From "Large-Scale Long-Tailed Recognition in an Open World" (OLTR), Liu et al., CVPR 2019,
https://arxiv.org/abs/1904.05160. The official sampler cycles over the classes in a shuffled order and, for
each class drawn, yields the next ``samples_per_class`` indices of that class's own shuffled cycle; every
cycle is reshuffled when it wraps. A batch of 128 with 4 per class therefore holds 32 classes x 4 images.

This version keeps those semantics but builds plain index lists (the official nested generators hang with
DataLoader workers), seeds everything from a ``torch.Generator`` (``seed + epoch``), has a defined epoch
length, accepts any non-negative integer labels (gaps such as {0, 1, 5} are fine; classes without samples
simply never appear) and shards one global sequence across distributed ranks.
"""

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ['ClassAwareSampler']

_logger = logging.getLogger(__name__)


def _as_label_tensor(labels: Any) -> torch.Tensor:
    """Labels as a 1-D int64 CPU tensor, from a sequence, array, tensor or a dataset's ``targets``."""
    source = labels
    if not isinstance(labels, (torch.Tensor, np.ndarray, Sequence)) and hasattr(labels, 'targets'):
        source = labels.targets
    try:
        x = torch.as_tensor(np.asarray(source.cpu() if isinstance(source, torch.Tensor) else source))
    except (TypeError, ValueError) as e:
        raise TypeError(
            'labels must be a sequence, array or tensor of class ids, or a dataset with a `targets` attribute, '
            f'got {type(labels).__name__}.'
        ) from e
    if x.ndim != 1 or x.numel() == 0:
        raise ValueError(f'labels must be a non-empty 1-D sequence of class ids, got shape {tuple(x.shape)}.')
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise ValueError(f'labels must be integer class ids, got dtype {x.dtype}.')
    if int(x.min()) < 0:
        raise ValueError(f'labels must be non-negative class ids, got minimum {int(x.min())}.')
    return x.long()


def _distributed_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    active = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if active else 1
    if rank is None:
        rank = dist.get_rank() if active else 0
    if num_replicas < 1:
        raise ValueError(f'num_replicas must be >= 1, got {num_replicas}.')
    if not 0 <= rank < num_replicas:
        raise ValueError(f'rank must be in [0, {num_replicas}) for num_replicas={num_replicas}, got {rank}.')
    return num_replicas, rank


class ClassAwareSampler(Sampler[int]):
    """Class-aware sampler with the official OLTR semantics, reproducible and shardable.

    One global sequence is built per epoch from a generator seeded with ``seed + epoch``:

    1. the classes present in ``labels`` are visited in a shuffled order, reshuffled at every wrap;
    2. each visit takes the next ``samples_per_class`` indices from that class's own shuffled cycle, which
       is reshuffled when it wraps (a class smaller than ``samples_per_class`` repeats indices);
    3. these groups are concatenated. Under distributed training group g goes to rank ``g % num_replicas``,
       so every rank keeps whole per-class groups, ranks hold disjoint positions of the one global sequence,
       and all shards have the same length.

    Epoch length: ``num_samples`` indices over all ranks (default ``len(labels)``: as many draws per epoch as
    one pass over the data set, like the official trainer's ``len(train_set) / batch_size`` steps). Each rank
    yields ``len(self)``: ``ceil(num_samples / num_replicas)``, or ``floor`` with ``drop_last=True``. Unlike
    the official sampler, iteration state does not carry over between epochs; call ``set_epoch`` before each
    epoch to get a fresh (reproducible) sequence.

    Args:
        labels: class id per data set index: a list, array or tensor of non-negative ints, or a data set with
            a ``targets`` attribute (torchvision ``ImageFolder``-style).
        samples_per_class: consecutive indices per class visit (official 4).
        num_samples: indices per epoch over all ranks; default ``len(labels)``.
        seed: base seed, identical on every rank.
        num_replicas: number of ranks; default the ``torch.distributed`` world size, or 1.
        rank: this rank; default the ``torch.distributed`` rank, or 0.
        drop_last: round the per-rank length down instead of up.

    Example:
        >>> sampler = ClassAwareSampler([0, 0, 1, 5, 5, 5], samples_per_class=2, num_samples=8)
        >>> len(list(sampler))
        8
    """

    def __init__(
        self,
        labels: Any,
        *,
        samples_per_class: int = 4,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        label_tensor = _as_label_tensor(labels)
        if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
            raise ValueError(f'samples_per_class must be a positive int, got {samples_per_class!r}.')
        if num_samples is None:
            num_samples = label_tensor.numel()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f'num_samples must be a positive int or None, got {num_samples!r}.')
        self.num_replicas, self.rank = _distributed_defaults(num_replicas, rank)
        if drop_last and num_samples < self.num_replicas:
            raise ValueError(
                f'num_samples={num_samples} with drop_last=True leaves nothing for {self.num_replicas} replicas.'
            )

        # per-class index lists, in ascending class order; classes with no samples do not exist here
        order = torch.argsort(label_tensor, stable=True)
        self.classes, counts = torch.unique_consecutive(label_tensor[order], return_counts=True)
        self.class_indices = [chunk.tolist() for chunk in torch.split(order, counts.tolist())]

        self.samples_per_class = samples_per_class
        self.num_samples = num_samples
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the sequence depends only on ``seed + epoch`` (and the rank)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.num_replicas
        return -(-self.num_samples // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def indices(self, rank: int | None = None) -> list[int]:
        """This epoch's index list for ``rank`` (default this sampler's rank)."""
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.num_replicas:
            raise ValueError(f'rank must be in [0, {self.num_replicas}), got {rank}.')
        per_rank = len(self)
        spc = self.samples_per_class
        groups_per_rank = -(-per_rank // spc)
        groups = self._global_groups(groups_per_rank * self.num_replicas)
        shard = [i for group in groups[rank :: self.num_replicas] for i in group]
        return shard[:per_rank]

    def _global_groups(self, num_groups: int) -> list[list[int]]:
        """The epoch's global sequence as ``num_groups`` per-class groups of ``samples_per_class`` indices."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)

        def shuffled(items: list[int]) -> list[int]:
            return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]

        class_ids = list(range(len(self.class_indices)))
        class_cycle, class_pos = shuffled(class_ids), 0
        index_cycles = [shuffled(indices) for indices in self.class_indices]
        index_pos = [0] * len(self.class_indices)

        groups = []
        for _ in range(num_groups):
            if class_pos == len(class_cycle):
                class_cycle, class_pos = shuffled(class_ids), 0
            c = class_cycle[class_pos]
            class_pos += 1

            group = []
            for _ in range(self.samples_per_class):
                if index_pos[c] == len(index_cycles[c]):
                    index_cycles[c], index_pos[c] = shuffled(self.class_indices[c]), 0
                group.append(index_cycles[c][index_pos[c]])
                index_pos[c] += 1
            groups.append(group)
        return groups

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(num_classes={len(self.class_indices)}, samples_per_class={self.samples_per_class}, '
            f'num_samples={self.num_samples}, num_replicas={self.num_replicas}, rank={self.rank}, seed={self.seed})'
        )
