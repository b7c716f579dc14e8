"""ClassAwareSampler: official batch composition, epoch length, reproducibility, gaps, sharding."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from timm_oltr.sampler import ClassAwareSampler

# classes {0, 1, 5}: 10, 6 and 4 samples; classes 2, 3, 4 have none
GAP_LABELS = [0] * 10 + [1] * 6 + [5] * 4


class IndexDataset(Dataset):
    def __init__(self, labels):
        self.targets = list(labels)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return i


def groups_of(indices, size):
    return [indices[k : k + size] for k in range(0, len(indices), size)]


def test_case_c12_gaps_groups_and_class_cycles():
    sampler = ClassAwareSampler(GAP_LABELS, samples_per_class=4, num_samples=60)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 60

    group_classes = []
    for group in groups_of(indices, 4):
        classes = {GAP_LABELS[i] for i in group}
        assert len(classes) == 1, 'each group of 4 consecutive indices comes from one class'
        group_classes.append(classes.pop())
    # the class cycle visits every present class once per 3 draws
    for k in range(0, len(group_classes), 3):
        assert sorted(group_classes[k : k + 3]) == [0, 1, 5]


def test_each_class_cycle_exhausts_its_indices_before_repeating():
    sampler = ClassAwareSampler(GAP_LABELS, samples_per_class=4, num_samples=120, seed=3)
    per_class = {c: [] for c in (0, 1, 5)}
    for i in sampler:
        per_class[GAP_LABELS[i]].append(i)
    for c, drawn in per_class.items():
        members = [i for i, y in enumerate(GAP_LABELS) if y == c]
        n = len(members)
        for start in range(0, len(drawn) - n + 1, n):
            assert sorted(drawn[start : start + n]) == members, f'class {c} cycle {start // n} is not a permutation'


def test_case_c12_batches_of_10_with_dataloader_workers():
    dataset = IndexDataset(GAP_LABELS)
    sampler = ClassAwareSampler(dataset, samples_per_class=4)
    loader = DataLoader(dataset, batch_size=10, sampler=sampler, num_workers=2)
    batches = [b.tolist() for b in loader]
    assert [len(b) for b in batches] == [10, 10]  # default epoch length: len(labels) = 20
    flat = [i for b in batches for i in b]
    assert flat == sampler.indices()


def test_case_c12_set_epoch_reproducible_and_different_across_epochs():
    a = ClassAwareSampler(GAP_LABELS, seed=7, num_samples=40)
    b = ClassAwareSampler(GAP_LABELS, seed=7, num_samples=40)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert list(a) == list(a), 'iterating twice in one epoch gives the same sequence'

    epoch2 = list(a)
    a.set_epoch(3)
    assert list(a) != epoch2
    assert list(ClassAwareSampler(GAP_LABELS, seed=8, num_samples=40)) != list(
        ClassAwareSampler(GAP_LABELS, seed=7, num_samples=40)
    )


def test_case_c12_two_ranks_disjoint_equal_shards_of_one_sequence():
    world = 2
    single = ClassAwareSampler(GAP_LABELS, samples_per_class=4, num_samples=48, seed=1)
    shards = [
        ClassAwareSampler(GAP_LABELS, samples_per_class=4, num_samples=48, seed=1, num_replicas=world, rank=r)
        for r in range(world)
    ]
    for s in [single, *shards]:
        s.set_epoch(4)
    global_seq = list(single)
    lists = [list(s) for s in shards]

    assert [len(x) for x in lists] == [len(s) for s in shards] == [24, 24]
    # shard r holds groups r, r + 2, r + 4, ... of the single-process sequence: disjoint positions, same union
    global_groups = groups_of(global_seq, 4)
    for r, shard in enumerate(lists):
        assert groups_of(shard, 4) == global_groups[r::world]
    assert sorted(lists[0] + lists[1]) == sorted(global_seq)
    # every rank sees every present class, never an absent one
    for shard in lists:
        assert {GAP_LABELS[i] for i in shard} == {0, 1, 5}


def test_per_rank_length_rounding():
    kwargs = dict(samples_per_class=4, num_samples=21, num_replicas=2)
    assert len(ClassAwareSampler(GAP_LABELS, rank=0, **kwargs)) == 11
    assert len(ClassAwareSampler(GAP_LABELS, rank=1, **kwargs)) == 11
    assert len(list(ClassAwareSampler(GAP_LABELS, rank=1, **kwargs))) == 11
    assert len(ClassAwareSampler(GAP_LABELS, rank=1, drop_last=True, **kwargs)) == 10


def test_class_smaller_than_samples_per_class_repeats():
    labels = [0, 1, 1, 1, 1, 1]
    indices = list(ClassAwareSampler(labels, samples_per_class=4, num_samples=16))
    groups = groups_of(indices, 4)
    zero_groups = [g for g in groups if labels[g[0]] == 0]
    assert zero_groups and all(g == [0, 0, 0, 0] for g in zero_groups)


@pytest.mark.parametrize('kind', ['list', 'numpy', 'tensor', 'dataset'])
def test_label_sources(kind):
    source = {
        'list': GAP_LABELS,
        'numpy': np.array(GAP_LABELS, dtype=np.int32),
        'tensor': torch.tensor(GAP_LABELS),
        'dataset': IndexDataset(GAP_LABELS),
    }[kind]
    sampler = ClassAwareSampler(source, seed=2)
    assert list(sampler) == list(ClassAwareSampler(GAP_LABELS, seed=2))
    assert sampler.classes.tolist() == [0, 1, 5]


def test_long_epoch_balances_classes():
    labels = [0] * 100 + [1] * 3 + [2] * 10
    counts = Counter(labels[i] for i in ClassAwareSampler(labels, samples_per_class=4, num_samples=1200))
    assert counts == {0: 400, 1: 400, 2: 400}


def test_distributed_defaults_without_process_group():
    sampler = ClassAwareSampler(GAP_LABELS)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


@pytest.mark.parametrize(
    'labels, kwargs, error, match',
    [
        ([], {}, ValueError, 'non-empty 1-D'),
        ([[0, 1]], {}, ValueError, 'non-empty 1-D'),
        ([0.0, 1.0], {}, ValueError, 'integer class ids'),
        ([0, -2], {}, ValueError, 'non-negative class ids, got minimum -2'),
        (['cat', 'dog'], {}, TypeError, 'labels must be a sequence'),
        (object(), {}, TypeError, 'labels must be a sequence'),
        ([0, 1], {'samples_per_class': 0}, ValueError, 'samples_per_class must be a positive int, got 0'),
        ([0, 1], {'num_samples': 0}, ValueError, 'num_samples must be a positive int or None, got 0'),
        ([0, 1], {'num_replicas': 2, 'rank': 2}, ValueError, r'rank must be in \[0, 2\)'),
        ([0, 1], {'num_replicas': 0, 'rank': 0}, ValueError, 'num_replicas must be >= 1'),
        ([0, 1], {'num_samples': 1, 'num_replicas': 2, 'rank': 0, 'drop_last': True}, ValueError, 'leaves nothing'),
    ],
)
def test_bad_arguments(labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        ClassAwareSampler(labels, **kwargs)


def test_keyword_only_options():
    with pytest.raises(TypeError):
        ClassAwareSampler(GAP_LABELS, 4)
