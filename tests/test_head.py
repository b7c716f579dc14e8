"""MetaEmbeddingHead and CosineClassifier against a naive float64 reference written with loops."""

import math

import pytest
import torch

from timm_oltr import CosineClassifier, MetaEmbeddingHead, OLTRConfig


def _naive_head(head: MetaEmbeddingHead, v: torch.Tensor) -> tuple[list[list[float]], list[float]]:
    """Logits and min distances, one sample and one class at a time, in Python floats (float64)."""
    centroids = head.centroids.detach().double().tolist()
    w_h, b_h = head.hallucinator.weight.detach().double().tolist(), head.hallucinator.bias.detach().double().tolist()
    w_s, b_s = head.selector.weight.detach().double().tolist(), head.selector.bias.detach().double().tolist()
    w_c = head.classifier.weight.detach().double().tolist()
    valid = head.valid_classes.tolist()
    K, E = len(centroids), len(centroids[0])
    rho, scale = head.config.reachability_scale, head.config.cosine_scale
    all_logits, all_dmin = [], []
    for row in v.double().tolist():
        dists = [math.sqrt(sum((row[e] - centroids[k][e]) ** 2 for e in range(E))) for k in range(K) if valid[k]]
        dmin = max(min(dists), head.config.distance_eps)
        gamma = rho / dmin
        scores = [sum(w_h[k][e] * row[e] for e in range(E)) + b_h[k] for k in range(K)]
        top = max(scores[k] for k in range(K) if valid[k])
        exps = [math.exp(scores[k] - top) if valid[k] else 0.0 for k in range(K)]
        weights = [x / sum(exps) for x in exps]
        memory = [sum(weights[k] * centroids[k][e] for k in range(K)) for e in range(E)]
        selector = [math.tanh(sum(w_s[d][e] * row[e] for e in range(E)) + b_s[d]) for d in range(E)]
        meta = [gamma * (row[e] + selector[e] * memory[e]) for e in range(E)]
        norm = math.sqrt(sum(m * m for m in meta))
        squash = norm / (1 + norm) if head.config.squash == 'linear' else norm**2 / (1 + norm**2)
        logits = []
        for k in range(K):
            w_norm = math.sqrt(sum(w * w for w in w_c[k]))
            cos = sum(meta[e] * w_c[k][e] for e in range(E)) / (norm * w_norm)
            logits.append(scale * squash * cos)
        all_logits.append(logits)
        all_dmin.append(dmin)
    return all_logits, all_dmin


@pytest.mark.parametrize('squash', ['linear', 'square'])
def test_head_matches_naive_reference(squash):
    torch.manual_seed(0)
    head = MetaEmbeddingHead(5, 4, config=OLTRConfig(squash=squash))
    head.set_centroids(torch.randn(4, 5), torch.tensor([30, 8, 2, 1]))
    v = torch.randn(3, 5).relu()
    out = head(v)
    logits, dmin = _naive_head(head, v)
    torch.testing.assert_close(out.logits.double(), torch.tensor(logits, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.min_distance.double(), torch.tensor(dmin, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.reachability, 10.0 / out.min_distance)
    assert out.logits.abs().max() < 16


def test_excluded_class_is_out_of_search_and_memory():
    torch.manual_seed(1)
    head = MetaEmbeddingHead(5, 4)
    centroids = torch.randn(4, 5)
    head.set_centroids(centroids, torch.tensor([3, 0, 4, 2]))  # class 1 has no training images
    v = centroids[1:2] + 1e-3  # sits on the excluded centroid
    out = head(v)
    logits, dmin = _naive_head(head, v)
    assert out.min_distance.item() > 0.1  # not the excluded centroid
    torch.testing.assert_close(out.logits.double(), torch.tensor(logits, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    assert out.min_distance.item() == pytest.approx(dmin[0], rel=1e-5)


def test_head_gradients_match_float64_autograd():
    torch.manual_seed(2)
    head = MetaEmbeddingHead(6, 3)
    head.set_centroids(torch.randn(3, 6), torch.tensor([5, 5, 5]))
    v = torch.randn(4, 6, requires_grad=True)
    head(v).logits.square().sum().backward()

    ref = MetaEmbeddingHead(6, 3).double()
    ref.load_state_dict(head.state_dict())
    v64 = v.detach().double().requires_grad_()
    ref(v64).logits.square().sum().backward()
    torch.testing.assert_close(v.grad.double(), v64.grad, atol=1e-4, rtol=1e-3)
    assert head.centroids.grad is None, 'the classifier must read the centroids detached'


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_case_c03_feature_equal_to_centroid_stays_finite(dtype):
    head = MetaEmbeddingHead(8, 3)
    centroids = torch.rand(3, 8) * 5
    head.set_centroids(centroids, torch.tensor([1, 1, 1]))
    v = centroids.clone().requires_grad_()  # every sample sits exactly on its class centroid
    with torch.autocast('cpu', dtype=dtype):
        out = head(v)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.reachability).all()
    assert out.reachability.max().item() == pytest.approx(10.0 / head.config.distance_eps, rel=1e-3)
    out.logits.sum().backward()
    assert torch.isfinite(v.grad).all()


def test_cosine_classifier_zero_input_is_finite_and_bounded():
    classifier = CosineClassifier(4, 3, scale=16.0)
    logits = classifier(torch.zeros(2, 4))
    assert torch.equal(logits, torch.zeros(2, 3))
    big = classifier(torch.full((1, 4), 1e6))
    assert big.abs().max() < 16


def test_case_c01_head_owns_centroids_in_state_dict():
    head = MetaEmbeddingHead(4, 365)
    state = head.state_dict()
    assert state['centroids'].shape == (365, 4)
    assert {'class_counts', 'initialized'} <= set(state)
    # the forward takes the features only: nothing to scatter across replicas
    out = head.eval()(torch.randn(7, 4))
    assert out.logits.shape == (7, 365)


def test_set_centroids_validates():
    head = MetaEmbeddingHead(4, 3)
    with pytest.raises(ValueError, match='centroids has shape'):
        head.set_centroids(torch.zeros(3, 5), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match='NaN'):
        head.set_centroids(torch.full((3, 4), float('nan')), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match='class_counts'):
        head.set_centroids(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    assert not head.is_initialized


def test_head_rejects_bad_input_and_resets():
    head = MetaEmbeddingHead(4, 3)
    with pytest.raises(ValueError, match=r'x must have shape \(B, 4\)'):
        head(torch.zeros(2, 5))
    with pytest.raises(ValueError, match='num_classes'):
        MetaEmbeddingHead(4, 0)
    head.set_centroids(torch.ones(3, 4), torch.ones(3, dtype=torch.long))
    head.reset(7)
    assert head.centroids.shape == (7, 4) and head.hallucinator.out_features == 7
    assert not head.is_initialized


def test_initialized_flag_follows_load_state_dict():
    source = MetaEmbeddingHead(4, 3)
    source.set_centroids(torch.randn(3, 4), torch.tensor([2, 2, 2]))
    target = MetaEmbeddingHead(4, 3)
    assert not target.is_initialized
    target.load_state_dict(source.state_dict())
    assert target.is_initialized
