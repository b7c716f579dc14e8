"""Discriminative centroid loss and OLTR loss: values and gradients against naive float64 loops."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from timm_oltr.losses import DiscriminativeCentroidLoss, OLTRLoss
from timm_oltr.model import wrap


def naive_official(features, centroids, weights, margin=10.0, repel_weight=0.01):
    """Official form written with explicit loops over samples, classes and feature dimensions."""
    B, E = features.shape
    K = centroids.shape[0]
    attract = 0.0
    dist_sum = 0.0
    for i in range(B):
        for j in range(K):
            d = 0.0
            for e in range(E):
                d = d + (features[i, e] - centroids[j, e]) ** 2
            attract = attract + weights[i][j] * d
            dist_sum = dist_sum + (1 - weights[i][j]) * d
    attract = attract / (2 * B)
    repel = margin - dist_sum / (B * K)
    repel = torch.clamp(repel, 0.0, 1e6) if isinstance(repel, torch.Tensor) else min(max(repel, 0.0), 1e6)
    return attract + repel_weight * repel, attract, repel


def naive_paper(features, centroids, weights, margin):
    B = features.shape[0]
    K = centroids.shape[0]
    total = 0.0
    for i in range(B):
        pos, neg, neg_w = 0.0, 0.0, 0.0
        for j in range(K):
            d = torch.sqrt(((features[i] - centroids[j]) ** 2).sum())
            pos = pos + weights[i][j] * d
            neg = neg + (1 - weights[i][j]) * d
            neg_w = neg_w + (1 - weights[i][j])
        total = total + torch.clamp(pos - neg / neg_w + margin, min=0.0)
    return total / B


def one_hot_rows(labels, K):
    return [[1.0 if j == int(y) else 0.0 for j in range(K)] for y in labels]


def make_batch(B=6, K=4, E=5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, E, generator=g) * scale
    centroids = torch.randn(K, E, generator=g) * scale
    labels = torch.randint(K, (B,), generator=g)
    return features, centroids, labels


def soft_targets(labels, K, seed=1):
    """Mixup-like targets: a 0.7/0.3 mix of two labels, plus label smoothing 0.1."""
    g = torch.Generator().manual_seed(seed)
    other = labels[torch.randperm(labels.numel(), generator=g)]
    t = 0.7 * F.one_hot(labels, K).double() + 0.3 * F.one_hot(other, K).double()
    return t * 0.9 + 0.1 / K


@pytest.mark.parametrize('margin', [0.5, 1e4])  # inactive and active repel hinge
@pytest.mark.parametrize('soft', [False, True])
def test_case_c14_official_value_and_grads_match_naive_reference(soft, margin):
    features, centroids, labels = make_batch()
    K = centroids.shape[0]
    targets = soft_targets(labels, K) if soft else labels
    weights = targets.tolist() if soft else one_hot_rows(labels, K)

    f64 = features.double().requires_grad_()
    c64 = centroids.double().requires_grad_()
    ref, ref_attract, ref_repel = naive_official(f64, c64, weights, margin=margin)
    ref.backward()

    f = features.clone().requires_grad_()
    c = centroids.clone().requires_grad_()
    loss_fn = DiscriminativeCentroidLoss(margin=margin, centroid_grad='autograd')
    parts = loss_fn.breakdown(f, c, targets.float() if soft else targets)
    parts.loss.backward()

    torch.testing.assert_close(parts.loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.attract.double(), ref_attract.detach(), rtol=1e-5, atol=1e-5)
    assert parts.repel_active.item() == (1.0 if margin > 1e3 else 0.0)
    torch.testing.assert_close(f.grad.double(), f64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.grad.double(), c64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('soft', [False, True])
def test_case_c14_paper_form_matches_naive_reference(soft):
    features, centroids, labels = make_batch(seed=3)
    K = centroids.shape[0]
    targets = soft_targets(labels, K) if soft else labels
    weights = targets.tolist() if soft else one_hot_rows(labels, K)

    f64 = features.double().requires_grad_()
    c64 = centroids.double().requires_grad_()
    ref = naive_paper(f64, c64, weights, margin=2.0)
    ref.backward()

    f = features.clone().requires_grad_()
    c = centroids.clone().requires_grad_()
    loss = DiscriminativeCentroidLoss(form='paper', margin=2.0)(f, c, targets.float() if soft else targets)
    loss.backward()

    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.grad.double(), f64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c.grad.double(), c64.grad, rtol=1e-4, atol=1e-6)


def test_hard_label_equals_one_hot_soft_target():
    features, centroids, labels = make_batch(seed=5)
    loss_fn = DiscriminativeCentroidLoss(margin=1e3)
    hard = loss_fn(features, centroids, labels)
    soft = loss_fn(features, centroids, F.one_hot(labels, 4).float())
    torch.testing.assert_close(hard, soft)


def official_centroid_grad_by_hand(features, centroids, labels):
    """g_j = (1/B) sum_{i: y_i = j} (c_j - f_i) / (1 + n_j), one class at a time."""
    B = features.shape[0]
    grad = torch.zeros_like(centroids, dtype=torch.float64)
    for j in range(centroids.shape[0]):
        members = [i for i in range(B) if int(labels[i]) == j]
        for i in members:
            grad[j] += (centroids[j].double() - features[i].double()) / (1 + len(members))
    return grad / B


@pytest.mark.parametrize('weight', [0.01, 1.0, 5.0])
def test_case_c13_official_rule_centroid_grad_ignores_loss_weight(weight):
    features = torch.tensor([[1.0, 0.0, 2.0, 0.5], [0.0, 1.0, -1.0, 2.0], [3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    centroids = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, -1.0, 0.0, 2.0], [-2.0, 0.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, 0, 0])  # class 0 three times, class 1 absent, class 2 once
    # hand-worked: B = 4, n_0 = 3, n_2 = 1
    g0 = ((centroids[0] - features[0]) + (centroids[0] - features[2]) + (centroids[0] - features[3])) / (4 * 4)
    g2 = (centroids[2] - features[1]) / (4 * 2)
    expected = torch.stack([g0, torch.zeros(4), g2])
    torch.testing.assert_close(expected.double(), official_centroid_grad_by_hand(features, centroids, labels))

    f = features.clone().requires_grad_()
    c = centroids.clone().requires_grad_()
    loss_fn = DiscriminativeCentroidLoss(margin=0.0)  # repel inactive: only the attraction acts
    (weight * loss_fn(f, c, labels, loss_weight=weight)).backward()

    torch.testing.assert_close(c.grad, expected)
    # the features keep the exact, weighted gradient (f_i - c_{y_i}) / B
    torch.testing.assert_close(f.grad, weight * (features - centroids[labels]) / 4)


def test_official_rule_passes_other_upstream_factors_through():
    # e.g. a GradScaler's scale S: the centroid gradient is S * g, which unscale_ turns back into g
    features, centroids, labels = make_batch(seed=4)
    expected = official_centroid_grad_by_hand(features, centroids, labels).float()
    c = centroids.clone().requires_grad_()
    scale, weight = 1024.0, 0.01
    (scale * weight * DiscriminativeCentroidLoss(margin=0.0)(features, c, labels, loss_weight=weight)).backward()
    torch.testing.assert_close(c.grad / scale, expected)


@pytest.mark.parametrize('form', ['official', 'paper'])
def test_loss_runs_in_float32_under_autocast(form):
    features, centroids, labels = make_batch(seed=12, scale=10.0)
    loss_fn = DiscriminativeCentroidLoss(form=form, margin=1e4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        autocast_loss = loss_fn(features, centroids, labels)
    torch.testing.assert_close(autocast_loss, loss_fn(features, centroids, labels), rtol=1e-6, atol=0)


def test_official_rule_value_equals_autograd_rule_value():
    features, centroids, labels = make_batch(seed=7)
    official = DiscriminativeCentroidLoss(margin=1e3)(features, centroids.requires_grad_(), labels)
    exact = DiscriminativeCentroidLoss(margin=1e3, centroid_grad='autograd')(features, centroids, labels)
    assert official.item() == pytest.approx(exact.item(), rel=1e-6)


def test_official_rule_repel_still_reaches_centroids_by_autograd():
    features, centroids, labels = make_batch(seed=8)
    c_off = centroids.clone().requires_grad_()
    c_att = centroids.clone().requires_grad_()
    DiscriminativeCentroidLoss(margin=1e4, repel_weight=1.0)(features, c_off, labels).backward()
    DiscriminativeCentroidLoss(margin=0.0, repel_weight=1.0)(features, c_att, labels).backward()
    # difference = gradient of the active repel term: d/dc_j of -mean_{ij, j != y_i} |f_i - c_j|^2
    B, K = features.shape[0], centroids.shape[0]
    expected = torch.zeros_like(centroids)
    for i in range(B):
        for j in range(K):
            if j != int(labels[i]):
                expected[j] -= 2 * (centroids[j] - features[i]) / (B * K)
    torch.testing.assert_close(c_off.grad - c_att.grad, expected, rtol=1e-5, atol=1e-6)


def test_soft_official_centroid_grad_uses_soft_counts():
    features, centroids, labels = make_batch(seed=9)
    B, K = features.shape[0], centroids.shape[0]
    t = soft_targets(labels, K).float()
    c = centroids.clone().requires_grad_()
    DiscriminativeCentroidLoss(margin=0.0)(features, c, t).backward()
    expected = torch.zeros(K, features.shape[1], dtype=torch.float64)
    for j in range(K):
        n_j = sum(float(t[i, j]) for i in range(B))
        for i in range(B):
            expected[j] += float(t[i, j]) * (centroids[j].double() - features[i].double()) / (1 + n_j)
    torch.testing.assert_close(c.grad.double(), expected / B, rtol=1e-5, atol=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operator produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize('soft', [False, True])
@pytest.mark.parametrize('form', ['official', 'paper'])
def test_no_b_k_e_tensor_in_forward_or_backward(form, soft):
    B, K, E = 6, 7, 11  # every legitimate intermediate is at most max(B*K, K*E, B*E) = 77 elements
    features = torch.randn(B, E, requires_grad=True)
    centroids = torch.randn(K, E, requires_grad=True)
    labels = torch.randint(K, (B,))
    targets = soft_targets(labels, K).float() if soft else labels
    with LargestTensor() as largest:
        DiscriminativeCentroidLoss(form=form)(features, centroids, targets).backward()
    assert 0 < largest.numel <= max(B * K, K * E, B * E)


def test_bf16_features_are_computed_in_float32():
    features, centroids, labels = make_batch(seed=11)
    loss = DiscriminativeCentroidLoss()(features.bfloat16(), centroids, labels)
    assert loss.dtype == torch.float32
    ref = DiscriminativeCentroidLoss()(features.bfloat16().float(), centroids, labels)
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize(
    'features, centroids, targets, match',
    [
        (torch.randn(4), torch.randn(3, 5), torch.zeros(4, dtype=torch.long), 'features must be a'),
        (torch.randn(4, 5), torch.randn(3, 5, 1), torch.zeros(4, dtype=torch.long), 'centroids must be a'),
        (torch.randn(4, 5), torch.randn(3, 6), torch.zeros(4, dtype=torch.long), 'centroids has width 6'),
        (torch.randn(4, 5), torch.randn(3, 5), torch.tensor([0, 1, 3, 0]), r'labels \[3\] outside \[0, 3\)'),
        (torch.randn(4, 5), torch.randn(3, 5), torch.tensor([0, -1, 2, 0]), r'labels \[-1\]'),
        (torch.randn(4, 5), torch.randn(3, 5), torch.zeros(5, dtype=torch.long), 'has 5 labels'),
        (torch.randn(4, 5), torch.randn(3, 5), torch.zeros(4), 'must be integer class ids'),
        (torch.randn(4, 5), torch.randn(3, 5), torch.full((4, 3), 0.5), 'rows summing to 1'),
        (torch.randn(4, 5), torch.randn(3, 5), torch.tensor([[1.5, -0.5, 0.0]] * 4), 'non-negative'),
        (torch.randn(4, 5), torch.randn(3, 5), torch.full((4, 4), 0.25), r'shape \(B, K\)'),
        (torch.randn(4, 5), torch.randn(3, 5), torch.zeros(4, 3, dtype=torch.long), 'floating point'),
        (torch.randn(4, 5), torch.randn(3, 5), torch.zeros(4, 3, 1), r'\(B,\) labels or'),
    ],
)
def test_bad_inputs_raise_value_error(features, centroids, targets, match):
    with pytest.raises(ValueError, match=match):
        DiscriminativeCentroidLoss()(features, centroids, targets)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="form must be 'official' or 'paper', got 'eq9'"):
        DiscriminativeCentroidLoss(form='eq9')
    with pytest.raises(ValueError, match='centroid_grad must be'):
        DiscriminativeCentroidLoss(centroid_grad='hook')
    with pytest.raises(ValueError, match="use centroid_grad='autograd'"):
        DiscriminativeCentroidLoss(form='paper', centroid_grad='official')
    with pytest.raises(ValueError, match='margin must be >= 0, got -1'):
        DiscriminativeCentroidLoss(margin=-1)
    with pytest.raises(TypeError):
        DiscriminativeCentroidLoss(10.0)  # keyword-only (C15)
    with pytest.raises(ValueError, match='centroid_weight must be >= 0'):
        OLTRLoss(centroid_weight=-0.1)
    with pytest.raises(ValueError, match='label_smoothing must be in'):
        OLTRLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match='loss_weight must be > 0'):
        DiscriminativeCentroidLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), loss_weight=0.0)


@pytest.mark.parametrize('value', [float('nan'), float('inf'), float('-inf')])
def test_non_finite_soft_targets_raise(value):
    targets = torch.full((4, 3), 1 / 3)
    targets[2, 1] = value
    with pytest.raises(ValueError, match=r'targets must be finite soft targets, got NaN or inf in rows \[2\]'):
        DiscriminativeCentroidLoss()(torch.randn(4, 5), torch.randn(3, 5), targets)


NAN, INF = float('nan'), float('inf')


@pytest.mark.parametrize(
    'name, value, error, expected',
    [
        ('centroid_weight', 'a', TypeError, r"a real number >= 0, got 'a' \(str\)"),
        ('centroid_weight', None, TypeError, r'a real number >= 0, got None \(NoneType\)'),
        ('centroid_weight', True, TypeError, r'a real number >= 0, got True \(bool\)'),
        ('centroid_weight', INF, ValueError, 'a finite number >= 0, got inf'),
        ('centroid_weight', NAN, ValueError, 'a finite number >= 0, got nan'),
        ('label_smoothing', NAN, ValueError, r'a finite number in \[0, 1\), got nan'),
        ('label_smoothing', -0.1, ValueError, r'in \[0, 1\), got -0.1'),
        ('label_smoothing', '0.1', TypeError, r"a real number in \[0, 1\), got '0.1'"),
        ('margin', INF, ValueError, 'a finite number >= 0, got inf'),
        ('margin', NAN, ValueError, 'a finite number >= 0, got nan'),
        ('margin', '10', TypeError, r"a real number >= 0, got '10' \(str\)"),
        ('repel_weight', NAN, ValueError, 'a finite number >= 0, got nan'),
        ('repel_weight', INF, ValueError, 'a finite number >= 0, got inf'),
        ('repel_weight', -0.01, ValueError, '>= 0, got -0.01'),
        ('repel_weight', [0.01], TypeError, r'a real number >= 0, got \[0.01\] \(list\)'),
    ],
)
def test_bad_numeric_options_name_the_argument(name, value, error, expected):
    cls = OLTRLoss if name in ('centroid_weight', 'label_smoothing') else DiscriminativeCentroidLoss
    with pytest.raises(error, match=f'{name} must be {expected}'):
        cls(**{name: value})


def test_bad_loss_weight_names_the_argument():
    args = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match='loss_weight must be a finite number > 0, got inf'):
        DiscriminativeCentroidLoss()(*args, loss_weight=float('inf'))
    with pytest.raises(TypeError, match='loss_weight must be a real number > 0'):
        DiscriminativeCentroidLoss()(*args, loss_weight='1')


def test_numeric_options_accept_ints_and_numpy_scalars_as_floats():
    loss = DiscriminativeCentroidLoss(margin=10, repel_weight=np.float32(0.5))
    assert (loss.margin, loss.repel_weight) == (10.0, 0.5) and type(loss.repel_weight) is float
    assert OLTRLoss(centroid_weight=0, label_smoothing=np.float64(0.1)).label_smoothing == 0.1


def test_empty_batch_gives_zero_and_grads():
    c = torch.randn(3, 5, requires_grad=True)
    loss = DiscriminativeCentroidLoss()(torch.randn(0, 5), c, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(c.grad, torch.zeros_like(c))


def make_oltr_model(num_classes=3):
    torch.manual_seed(0)
    model = wrap(timm.create_model('test_resnet'), num_classes=num_classes, img_size=32, neck_dim=6)
    model.head.set_centroids(torch.randn(num_classes, 6), torch.full((num_classes,), 4))
    return model


class Holder(torch.nn.Module):
    """Stands in for DistributedDataParallel: holds the model as `.module`."""

    def __init__(self, model):
        super().__init__()
        self.module = model


@pytest.mark.parametrize('soft', [False, True])
def test_oltr_loss_is_ce_plus_weighted_centroid_loss(soft):
    model = make_oltr_model().train()
    labels = torch.tensor([0, 2, 1, 2])
    targets = soft_targets(labels, 3).float() if soft else labels
    out = model.forward_oltr(torch.randn(4, 3, 32, 32))
    parts = OLTRLoss(centroid_weight=0.3).breakdown(out, targets, Holder(model))

    logits = out.logits.detach().double()
    log_probs = [[logits[i, j] - torch.logsumexp(logits[i], 0) for j in range(3)] for i in range(4)]
    weights = targets.tolist() if soft else one_hot_rows(labels, 3)
    ce = -sum(weights[i][j] * log_probs[i][j] for i in range(4) for j in range(3)) / 4
    centroid, attract, _ = naive_official(
        out.features.detach().double(), model.head.centroids.detach().double(), weights
    )

    torch.testing.assert_close(parts.ce.double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.centroid.double(), centroid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.attract.double(), attract, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.loss.double(), ce + 0.3 * centroid, rtol=1e-5, atol=1e-6)
    assert parts.loss.requires_grad and not parts.ce.requires_grad
    parts.loss.backward()
    assert model.head.centroids.grad is not None and model.head.hallucinator.weight.grad is not None


def test_oltr_loss_label_smoothing_on_ce_only():
    model = make_oltr_model().train()
    labels = torch.tensor([0, 2, 1, 2])
    out = model.forward_oltr(torch.randn(4, 3, 32, 32))
    plain = OLTRLoss().breakdown(out, labels, model)
    smooth = OLTRLoss(label_smoothing=0.2).breakdown(out, labels, model)
    # smoothing 0.2 over K = 3 is the soft target 0.8 * one_hot + 0.2 / 3
    manual = OLTRLoss().breakdown(out, soft_targets_from(labels, 0.2), model)
    torch.testing.assert_close(smooth.ce, manual.ce)
    assert not torch.equal(smooth.ce, plain.ce)
    torch.testing.assert_close(smooth.centroid, plain.centroid)


def soft_targets_from(labels, smoothing):
    return F.one_hot(labels, 3).float() * (1 - smoothing) + smoothing / 3


def test_oltr_loss_rejects_non_oltr_models_and_bad_targets():
    model = make_oltr_model().train()
    out = model.forward_oltr(torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match='OLTRModel'):
        OLTRLoss()(out, torch.tensor([0, 1]), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r'labels \[3\] outside \[0, 3\)'):
        OLTRLoss()(out, torch.tensor([0, 3]), model)
    with pytest.raises(TypeError):
        OLTRLoss(0.01)  # keyword-only (C15)


def test_oltr_loss_rejects_logits_in_place_of_the_oltr_output():
    model = make_oltr_model().train()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match=r'out must be the OLTROutput of model.forward_oltr\(x\), got Tensor'):
        OLTRLoss()(model(x), torch.tensor([0, 1]), model)
    with pytest.raises(TypeError, match='got tuple'):
        OLTRLoss().breakdown(tuple(model.forward_oltr(x)), torch.tensor([0, 1]), model)


def test_oltr_loss_rejects_non_finite_soft_targets():
    model = make_oltr_model().train()
    out = model.forward_oltr(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match='targets must be finite'):
        OLTRLoss()(out, torch.full((2, 3), float('nan')), model)
