"""Two CPU ranks (gloo on 127.0.0.1): centroid initialisation, sampler shards and DDP training steps (C01)."""

import os
import socket
import sys
from datetime import timedelta

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from timm_oltr.centroids import init_centroids
from timm_oltr.losses import DiscriminativeCentroidLoss, OLTRLoss
from timm_oltr.model import wrap
from timm_oltr.optim import param_groups
from timm_oltr.sampler import ClassAwareSampler

WORLD = 2
IMG = 32
STEPS = 3
BATCH = 4


def dataset():
    """16 images of 4 classes (6, 4, 4, 2), each class with its own mean colour."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 6 + [1] * 4 + [2] * 4 + [3] * 2)
    images = torch.randn(len(labels), 3, IMG, IMG, generator=g) + labels[:, None, None, None].float()
    return images, labels


def make_model():
    torch.manual_seed(0)
    return wrap(timm.create_model('test_resnet'), num_classes=4, img_size=IMG)


def make_sampler(**kwargs):
    sampler = ClassAwareSampler(dataset()[1], samples_per_class=2, num_samples=WORLD * STEPS * BATCH, seed=3, **kwargs)
    sampler.set_epoch(1)
    return sampler


class ForwardOLTR(nn.Module):
    """Lets DistributedDataParallel run `forward_oltr`, so its forward hooks (gradient sync) are in the loop."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, x):
        return self.module.forward_oltr(x)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def worker(rank, port, out_dir):
    if sys.platform.startswith('linux'):
        os.environ.setdefault('GLOO_SOCKET_IFNAME', 'lo')
    torch.set_num_threads(1)
    dist.init_process_group(
        'gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        images, labels = dataset()
        model = make_model()

        # centroid initialisation over this rank's shard only
        shard = torch.arange(rank, len(labels), WORLD)
        loader = DataLoader(TensorDataset(images[shard], labels[shard]), batch_size=3)
        counts = init_centroids(model, loader, progress=False)
        init = model.head.centroids.detach().clone()

        # the sampler takes rank and world size from the process group
        sampler = make_sampler()
        indices = list(sampler)

        # DDP steps on this rank's own class-aware batches; the repel term is active (large margin)
        ddp = DistributedDataParallel(ForwardOLTR(model))
        criterion = OLTRLoss(centroid_weight=0.5, centroid_loss=DiscriminativeCentroidLoss(margin=1e4))
        optimizer = torch.optim.SGD(param_groups(model, lr=0.05, centroid_lr=0.5), momentum=0.9)
        model.train()
        for step in range(STEPS):
            batch = indices[step * BATCH : (step + 1) * BATCH]
            loss = criterion(ddp(images[batch]), labels[batch], ddp)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        torch.save(
            {
                'counts': counts,
                'init': init,
                'indices': indices,
                'replicas': (sampler.num_replicas, sampler.rank),
                'batches': [labels[indices[s * BATCH : (s + 1) * BATCH]].tolist() for s in range(STEPS)],
                'state': {k: v.detach().clone() for k, v in model.state_dict().items()},
            },
            os.path.join(out_dir, f'rank{rank}.pt'),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('ddp'))
    mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f'rank{r}.pt'), weights_only=True) for r in range(WORLD)]


def test_case_c01_init_centroids_under_ddp_equals_single_process(ranks):
    images, labels = dataset()
    single = make_model()
    counts = init_centroids(single, DataLoader(TensorDataset(images, labels), batch_size=5), progress=False)

    assert counts.tolist() == [6, 4, 4, 2]
    for r in ranks:
        assert r['counts'].tolist() == [6, 4, 4, 2]
        torch.testing.assert_close(r['init'], single.head.centroids.detach(), rtol=0, atol=1e-5)
    assert torch.equal(ranks[0]['init'], ranks[1]['init']), 'ranks hold different centroids after init'


def test_case_c12_sampler_shards_under_ddp(ranks):
    assert [r['replicas'] for r in ranks] == [(WORLD, 0), (WORLD, 1)]
    shards = [r['indices'] for r in ranks]
    assert [len(s) for s in shards] == [STEPS * BATCH] * WORLD

    # positions of one global sequence, split by whole per-class groups of 2
    global_seq = make_sampler(num_replicas=1, rank=0).indices()
    groups = [global_seq[k : k + 2] for k in range(0, len(global_seq), 2)]
    for rank, shard in enumerate(shards):
        assert [shard[k : k + 2] for k in range(0, len(shard), 2)] == groups[rank::WORLD]

    labels = dataset()[1]
    for shard in shards:
        assert {int(labels[i]) for i in shard} == {0, 1, 2, 3}
    assert ranks[0]['batches'] != ranks[1]['batches'], 'ranks trained on the same batches'


def test_case_c01_ddp_training_keeps_centroids_identical_across_ranks(ranks):
    first, second = (r['state'] for r in ranks)
    assert not torch.allclose(first['head.centroids'], ranks[0]['init']), 'the centroids did not train'
    assert torch.equal(first['head.centroids'], second['head.centroids'])
    # every parameter and buffer but BatchNorm running statistics, which DDP broadcasts from rank 0 before each
    # forward, so they differ by the last local batch
    compared = [name for name in first if 'running_' not in name]
    assert 'head.class_counts' in compared and len(compared) > len(first) // 2
    for name in compared:
        assert torch.equal(first[name], second[name]), f'{name} differs across ranks'
