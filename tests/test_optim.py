"""param_groups, freeze_backbone and the official centroid update through a real optimizer step."""

import pytest
import timm
import torch

from timm_oltr.losses import DiscriminativeCentroidLoss, OLTRLoss
from timm_oltr.model import wrap
from timm_oltr.optim import freeze_backbone, param_groups

IMG = 32


def make_model(num_classes=3, **overrides):
    torch.manual_seed(0)
    return wrap(timm.create_model('test_resnet'), num_classes=num_classes, img_size=IMG, **overrides)


def init_randomly(model):
    K, E = model.head.centroids.shape
    model.head.set_centroids(torch.randn(K, E), torch.full((K,), 5))


def test_groups_are_named_disjoint_and_complete():
    model = make_model(neck_dim=8)
    groups = param_groups(model, lr=0.1, backbone_lr=0.01, centroid_lr=0.02, centroid_weight_decay=0.0)
    by_name = {g['name']: g for g in groups}
    assert list(by_name) == ['centroids', 'backbone', 'attention', 'head']

    ids = [id(p) for g in groups for p in g['params']]
    assert len(ids) == len(set(ids)), 'a parameter is in two groups'
    assert set(ids) == {id(p) for p in model.parameters()}

    assert by_name['centroids']['params'] == [model.head.centroids]
    assert {id(p) for p in by_name['backbone']['params']} == {id(p) for p in model.backbone.parameters()}
    expected_attention = [*model.attention.parameters(), *model.neck.parameters()]
    assert {id(p) for p in by_name['attention']['params']} == {id(p) for p in expected_attention}
    head_ids = {id(p) for p in by_name['head']['params']}
    assert id(model.head.centroids) not in head_ids
    assert head_ids == {id(p) for p in model.head.parameters()} - {id(model.head.centroids)}

    assert [(g['lr'], g['weight_decay']) for g in groups] == [(0.02, 0.0), (0.01, 5e-4), (0.01, 5e-4), (0.1, 5e-4)]
    torch.optim.SGD(groups, momentum=0.9)  # accepted as is


def test_learning_rate_defaults():
    model = make_model()
    lrs = {g['name']: g['lr'] for g in param_groups(model, lr=0.1)}
    assert lrs == {'centroids': 0.1, 'backbone': 0.1, 'attention': 0.1, 'head': 0.1}
    lrs = {g['name']: g['lr'] for g in param_groups(model, lr=0.1, backbone_lr=0.001, attention_lr=0.05)}
    assert lrs == {'centroids': 0.1, 'backbone': 0.001, 'attention': 0.05, 'head': 0.1}


def test_frozen_parameters_are_skipped():
    model = make_model()
    freeze_backbone(model)
    model.head.selector.weight.requires_grad_(False)
    groups = param_groups(model, lr=0.1)
    assert [g['name'] for g in groups] == ['centroids', 'attention', 'head']
    assert all(p.requires_grad for g in groups for p in g['params'])


@pytest.mark.parametrize(
    'kwargs, match',
    [
        ({'lr': -0.1}, 'lr must be a non-negative number, got -0.1'),
        ({'lr': None}, 'lr must be a non-negative number, got None'),
        ({'lr': 0.1, 'centroid_lr': -1}, 'centroid_lr must be'),
        ({'lr': 0.1, 'centroid_weight_decay': 'x'}, 'centroid_weight_decay must be'),
    ],
)
def test_bad_rates_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        param_groups(make_model(), **kwargs)


def test_non_oltr_model_raises():
    with pytest.raises(TypeError, match='OLTRModel'):
        param_groups(timm.create_model('test_resnet'), lr=0.1)
    with pytest.raises(TypeError, match='OLTRModel'):
        freeze_backbone(timm.create_model('test_resnet'))


def test_case_c11_frozen_backbone_keeps_batchnorm_stats_after_train_mode_forward():
    model = make_model(neck_dim=8)
    init_randomly(model)
    handles = freeze_backbone(model)
    assert handles

    # by module identity: nothing outside the backbone is frozen (official bug #4 froze the attention)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    for part in (model.attention, model.neck, model.head):
        assert all(p.requires_grad for p in part.parameters())

    stats = {name: b.clone() for name, b in model.backbone.named_buffers()}
    model.train()
    x = torch.randn(4, 3, IMG, IMG) * 3 + 1
    loss = OLTRLoss()(model.forward_oltr(x), torch.tensor([0, 1, 2, 0]), model)
    loss.backward()
    for name, b in model.backbone.named_buffers():
        assert torch.equal(b, stats[name]), f'{name} moved in a train-mode forward'
    assert model.attention.query.weight.grad is not None

    # a batch of one would crash a train-mode BatchNorm; frozen ones are in eval mode
    model.forward_oltr(torch.randn(1, 3, IMG, IMG))

    # without the hooks the same forward does move the statistics
    for handle in handles:
        handle.remove()
    model.train()
    model.forward_oltr(x)
    moved = [
        name for name, b in model.backbone.named_buffers() if 'running_mean' in name and not torch.equal(b, stats[name])
    ]
    assert moved


def test_keep_norm_eval_false_follows_official_code():
    model = make_model()
    init_randomly(model)
    assert freeze_backbone(model, keep_norm_eval=False) == []
    stats = {name: b.clone() for name, b in model.backbone.named_buffers() if 'running_mean' in name}
    model.train()
    model.forward_oltr(torch.randn(4, 3, IMG, IMG))
    assert any(not torch.equal(b, stats[name]) for name, b in model.backbone.named_buffers() if name in stats)


@pytest.mark.parametrize('centroid_weight', [0.01, 1.0])
def test_case_c13_sgd_step_moves_centroids_by_lr_times_g(centroid_weight):
    # 3 classes x 4-d features (neck_dim=4), official rule, repel off to isolate the attraction
    model = make_model(num_classes=3, neck_dim=4)
    init_randomly(model)
    criterion = OLTRLoss(centroid_weight=centroid_weight, centroid_loss=DiscriminativeCentroidLoss(margin=0.0))
    groups = param_groups(model, lr=0.1, centroid_lr=0.01, centroid_weight_decay=0.0)
    optimizer = torch.optim.SGD(groups, momentum=0.9)
    labels = torch.tensor([0, 0, 2, 0, 2])  # n_0 = 3, n_1 = 0, n_2 = 2, B = 5

    model.train()
    x = torch.randn(5, 3, IMG, IMG)
    out = model.forward_oltr(x)
    before = model.head.centroids.detach().clone()
    f = out.features.detach()

    # g_j = (1/B) sum_{i: y_i = j} (c_j - f_i) / (1 + n_j), written out per class
    g = torch.zeros(3, 4)
    g[0] = ((before[0] - f[0]) + (before[0] - f[1]) + (before[0] - f[3])) / (5 * (1 + 3))
    g[2] = ((before[2] - f[2]) + (before[2] - f[4])) / (5 * (1 + 2))

    criterion(out, labels, model).backward()
    torch.testing.assert_close(model.head.centroids.grad, g)
    optimizer.step()  # first step: the momentum buffer equals the gradient
    torch.testing.assert_close(model.head.centroids.detach(), before - 0.01 * g)
    assert torch.equal(model.head.centroids[1].detach(), before[1]), 'an absent class moved'


def test_centroid_weight_decay_reaches_every_row():
    model = make_model(num_classes=3, neck_dim=4)
    init_randomly(model)
    groups = param_groups(model, lr=0.1, centroid_lr=0.01, centroid_weight_decay=0.5)
    optimizer = torch.optim.SGD([g for g in groups if g['name'] == 'centroids'])
    before = model.head.centroids.detach().clone()
    model.head.centroids.grad = torch.zeros_like(before)
    optimizer.step()
    torch.testing.assert_close(model.head.centroids.detach(), before * (1 - 0.01 * 0.5))


def test_case_c15_options_are_keyword_only():
    model = make_model()
    with pytest.raises(TypeError):
        param_groups(model, 0.1)
    with pytest.raises(TypeError):
        freeze_backbone(model, False)
