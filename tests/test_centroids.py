"""init_centroids, class_means and centroid_drift on a wrapped timm test model and real photographs."""

import copy

import numpy as np
import pytest
import skimage.data
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from timm_oltr.centroids import centroid_drift, class_means, init_centroids
from timm_oltr.losses import OLTRLoss
from timm_oltr.model import wrap

IMG = 64
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')


def real_batch(crops_per_photo=3, labels=(0, 1, 2, 3)):
    """Crops of four photographs, class = photograph; (N, 3, IMG, IMG) normalised images and (N,) labels."""
    rng = np.random.default_rng(0)
    images, targets = [], []
    for name, label in zip(PHOTOS, labels, strict=True):
        photo = getattr(skimage.data, name)()[..., :3]
        for _ in range(crops_per_photo):
            top = rng.integers(0, photo.shape[0] - 2 * IMG)
            left = rng.integers(0, photo.shape[1] - 2 * IMG)
            crop = torch.from_numpy(photo[top : top + 2 * IMG : 2, left : left + 2 * IMG : 2].copy())
            images.append(crop.permute(2, 0, 1).float() / 255.0)
            targets.append(label)
    x = torch.stack(images)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return x, torch.tensor(targets)


def make_model(num_classes=4, **overrides):
    torch.manual_seed(0)
    return wrap(timm.create_model('test_resnet'), num_classes=num_classes, img_size=IMG, **overrides)


def loader_of(images, labels, batch_size=5):
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def naive_means_float64(features, labels, num_classes):
    """Per-class means with Python loops in float64; classes without samples are None."""
    means = []
    for c in range(num_classes):
        rows = [features[i].double() for i in range(len(labels)) if int(labels[i]) == c]
        total = torch.zeros(features.shape[1], dtype=torch.float64)
        for row in rows:
            total = total + row
        means.append(total / len(rows) if rows else None)
    return means


@pytest.mark.parametrize('autocast_dtype', [None, torch.bfloat16])
def test_init_centroids_match_naive_float64_class_means(autocast_dtype):
    images, labels = real_batch()
    model = make_model()
    loader = loader_of(images, labels)

    if autocast_dtype is None:
        # independent reference: a float64 copy of the model, one image at a time
        ref_model = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            feats = torch.cat(
                [ref_model.forward_head(ref_model.forward_features(x[None].double()), pre_logits=True) for x in images]
            )
    else:
        # the same batches under the same autocast, so the bf16 features are identical; only the sums differ
        ref_model = copy.deepcopy(model).eval()
        with torch.no_grad(), torch.autocast('cpu', dtype=autocast_dtype):
            feats = torch.cat(
                [ref_model.forward_head(ref_model.forward_features(x), pre_logits=True) for x, _ in loader]
            )
        assert feats.dtype == torch.bfloat16
    expected = torch.stack(naive_means_float64(feats, labels, 4))

    counts = init_centroids(model, loader, autocast_dtype=autocast_dtype, progress=False)

    assert counts.tolist() == [3, 3, 3, 3]
    assert model.head.class_counts.tolist() == [3, 3, 3, 3]
    assert bool(model.head.initialized)
    assert model.head.centroids.dtype == torch.float32
    torch.testing.assert_close(model.head.centroids.detach().double(), expected, rtol=0, atol=1e-5)


def test_case_c11_mode_restored_and_batchnorm_untouched():
    images, labels = real_batch()
    model = make_model()
    model.train()
    model.head.eval()  # mixed modes must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = {name: b.clone() for name, b in model.backbone.named_buffers()}
    assert any('running_mean' in name for name in buffers)

    init_centroids(model, loader_of(images, labels), progress=False)

    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, b in model.backbone.named_buffers():
        assert torch.equal(b, buffers[name]), f'{name} changed during centroid initialisation'
    assert all(p.grad is None for p in model.parameters())


def test_mode_restored_when_the_loader_fails():
    images, labels = real_batch()
    model = make_model()
    model.train()

    def failing_loader():
        yield images[:4], labels[:4]
        raise OSError('disk gone')

    with pytest.raises(OSError, match='disk gone'):
        init_centroids(model, failing_loader(), progress=False)
    assert all(m.training for m in model.modules())
    assert not bool(model.head.initialized)


def test_dict_batches_and_extra_tuple_items():
    images, labels = real_batch()
    ref = make_model()
    init_centroids(ref, loader_of(images, labels), progress=False)

    dict_model = make_model()
    batches = [{'image': images[i : i + 5], 'label': labels[i : i + 5]} for i in range(0, len(labels), 5)]
    init_centroids(dict_model, batches, progress=False)
    torch.testing.assert_close(dict_model.head.centroids, ref.head.centroids)

    tuple_model = make_model()
    triples = [(images[i : i + 5], labels[i : i + 5], 'paths') for i in range(0, len(labels), 5)]
    init_centroids(tuple_model, triples, progress=False)
    torch.testing.assert_close(tuple_model.head.centroids, ref.head.centroids)


def test_case_c02_empty_class_raises_with_class_ids():
    images, labels = real_batch(labels=(0, 1, 2, 4))  # 5 classes, class 3 has no image
    model = make_model(num_classes=5)
    with pytest.raises(ValueError, match=r"classes \[3\] have no samples.*missing='exclude'"):
        init_centroids(model, loader_of(images, labels), progress=False)
    assert not bool(model.head.initialized)


def test_case_c02_exclude_policy_keeps_everything_finite():
    images, labels = real_batch(labels=(0, 1, 2, 4))
    model = make_model(num_classes=5)
    counts = init_centroids(model, loader_of(images, labels), missing='exclude', progress=False)

    assert counts.tolist() == [3, 3, 3, 0, 3]
    assert model.head.valid_classes.tolist() == [True, True, True, False, True]
    assert torch.isfinite(model.head.centroids).all()
    assert torch.equal(model.head.centroids[3], torch.zeros_like(model.head.centroids[3]))

    model.eval()
    with torch.no_grad():
        out = model.forward_oltr(images)
    for name, value in out._asdict().items():
        assert torch.isfinite(value).all(), f'{name} has NaN or inf'

    model.train()
    out = model.forward_oltr(images)
    loss = OLTRLoss()(out, labels, model)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    drift = centroid_drift(model, loader_of(images, labels), progress=False)
    assert drift.distance[3] == 0 and torch.isfinite(drift.relative).all()


def test_case_c05_uninitialised_centroids_in_training_raise():
    images, labels = real_batch()
    model = make_model()
    model.train()
    with pytest.raises(RuntimeError, match='init_centroids'):
        model.forward_oltr(images[:2])

    # an output computed before the model went back to training does not slip through the loss
    model.eval()
    with pytest.warns(UserWarning, match='never initialised'):
        out = model.forward_oltr(images[:2])
    model.train()
    with pytest.raises(RuntimeError, match=r'timm_oltr.init_centroids\(model, loader\)'):
        OLTRLoss()(out, labels[:2], model)


def test_case_c06_drift_is_zero_after_init_and_tracks_a_known_shift():
    images, labels = real_batch()
    model = make_model()
    loader = loader_of(images, labels)
    init_centroids(model, loader, progress=False)

    drift = centroid_drift(model, loader, progress=False)
    assert drift.counts.tolist() == [3, 3, 3, 3]
    assert drift.distance.max() < 1e-5

    means = model.head.centroids.detach().clone()
    shift = torch.zeros_like(means)
    shift[1, 0] = 3.0
    shift[2, :4] = 0.5  # |shift_2| = 1.0
    with torch.no_grad():
        model.head.centroids.add_(shift)
    drift = centroid_drift(model, loader, progress=False)
    torch.testing.assert_close(drift.distance, torch.tensor([0.0, 3.0, 1.0, 0.0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(drift.relative[1], 3.0 / means[1].norm(), atol=1e-5, rtol=1e-5)


def test_class_means_match_init_and_leave_model_alone():
    images, labels = real_batch()
    model = make_model()
    result = class_means(model, loader_of(images, labels), progress=False)
    assert not bool(model.head.initialized)
    init_centroids(model, loader_of(images, labels), progress=False)
    torch.testing.assert_close(result.means, model.head.centroids.detach())
    assert result.counts.tolist() == [3, 3, 3, 3]


def test_drift_before_init_raises():
    images, labels = real_batch()
    with pytest.raises(RuntimeError, match='init_centroids'):
        centroid_drift(make_model(), loader_of(images, labels), progress=False)


@pytest.mark.parametrize(
    'batch, match',
    [
        ((torch.zeros(2, 3, IMG, IMG), torch.tensor([0, 4])), r'labels contains \[4\] outside \[0, 4\)'),
        ((torch.zeros(2, 3, IMG, IMG), torch.tensor([-1, 0])), r'labels contains \[-1\]'),
        ((torch.zeros(2, 3, IMG, IMG), torch.full((2, 4), 0.25)), r'\(B,\) integer class ids'),
        ({'img': torch.zeros(2, 3, IMG, IMG), 'label': torch.tensor([0, 1])}, 'a dict batch needs one of the keys'),
        (torch.zeros(2, 3, IMG, IMG), 'loader must yield'),
    ],
)
def test_bad_batches_raise(batch, match):
    with pytest.raises(ValueError, match=match):
        init_centroids(make_model(), [batch], progress=False)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="missing must be 'error' or 'exclude', got 'fill'"):
        init_centroids(make_model(), [], missing='fill')
    with pytest.raises(ValueError, match='loader yielded no samples'):
        init_centroids(make_model(), [], progress=False)
    with pytest.raises(TypeError, match='OLTRModel'):
        init_centroids(timm.create_model('test_resnet'), [], progress=False)


@pytest.mark.parametrize('fn', [init_centroids, class_means, centroid_drift])
@pytest.mark.parametrize(
    'kwargs, error, match',
    [
        ({'loader': None}, TypeError, r'loader must be an iterable of \(images, labels\) batches.*got NoneType'),
        ({'loader': 3}, TypeError, 'loader must be an iterable .* got int'),
        ({'loader': torch.zeros(2, 3)}, TypeError, 'loader must be an iterable .* got Tensor'),
        ({'autocast_dtype': 'bf16'}, TypeError, r"autocast_dtype must be a torch.dtype or None, got 'bf16' \(str\)"),
        ({'autocast_dtype': torch.int64}, ValueError, 'autocast_dtype must be a floating-point torch.dtype'),
    ],
)
def test_bad_loader_and_autocast_dtype_raise_before_any_work(fn, kwargs, error, match):
    model = make_model()
    model.head.set_centroids(torch.zeros(4, model.head_hidden_size), torch.ones(4, dtype=torch.long))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {'loader': [], **kwargs}
    with pytest.raises(error, match=match):
        fn(model, kwargs.pop('loader'), progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_generator_loader_is_accepted():
    images, labels = real_batch()
    model = make_model()
    counts = init_centroids(model, ((images[i : i + 4], labels[i : i + 4]) for i in range(0, 12, 4)), progress=False)
    assert counts.tolist() == [3, 3, 3, 3]


def test_case_c15_options_are_keyword_only():
    images, labels = real_batch()
    with pytest.raises(TypeError):
        init_centroids(make_model(), loader_of(images, labels), None, None, 'exclude')


def test_centroids_from_cached_backbone_features_equal_those_from_images():
    images, labels = real_batch()
    model = make_model()
    torch.nn.init.normal_(model.attention.out.weight, std=0.05)  # the attention must take part on both paths
    counts = init_centroids(model, loader_of(images, labels), progress=False)
    from_images = model.head.centroids.detach().clone()

    with torch.no_grad():
        cached = model.eval().backbone.forward_features(images)
    fresh = make_model()
    fresh.load_state_dict(model.state_dict())
    fresh_counts = init_centroids(fresh, loader_of(cached, labels), inputs='backbone_features', progress=False)
    torch.testing.assert_close(fresh.head.centroids, from_images, atol=1e-5, rtol=1e-5)
    assert torch.equal(fresh_counts, counts)
    with pytest.raises(ValueError, match='inputs'):
        init_centroids(fresh, loader_of(cached, labels), inputs='features', progress=False)
