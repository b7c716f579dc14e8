"""evaluate() on plain timm and OLTR models, compute_report() on arrays, and the report object."""

import json
import math
from typing import NamedTuple

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

import timm_oltr
from timm_oltr.evaluation import OLTRReport, calibrate_threshold, compute_report, evaluate

K = 5


def _loaders(n_known: int = 24, n_unknown: int = 8, seed: int = 0, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_known, 3, size, size, generator=g)
    labels = torch.arange(n_known) % K
    unknown = torch.randn(n_unknown, 3, size, size, generator=g)
    known_loader = DataLoader(TensorDataset(images, labels), batch_size=7)
    open_loader = DataLoader(TensorDataset(unknown, torch.full((n_unknown,), 3)), batch_size=5)
    return known_loader, open_loader, images, labels, unknown


@pytest.fixture(scope='module')
def timm_model():
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=K)


class _FakeOutput(NamedTuple):
    logits: torch.Tensor
    reachability: torch.Tensor
    min_distance: torch.Tensor


class _FakeConfig(NamedTuple):
    open_set_score: str = 'reachability'
    open_set_threshold: float = 1.5


class _FakeHead(nn.Module):
    def __init__(self, counts: list[int]) -> None:
        super().__init__()
        self.register_buffer('class_counts', torch.tensor(counts))
        self.register_buffer('initialized', torch.tensor(True))


class _FakeOLTR(nn.Module):
    """Logits from a linear map of the mean pixel; reachability = 1 / distance to a fixed point."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, K)
        self.dropout = nn.Dropout(0.5)
        self.head = _FakeHead([500, 200, 50, 10, 3])
        self.config = _FakeConfig()

    def forward_oltr(self, x: torch.Tensor) -> _FakeOutput:
        pooled = self.dropout(x.mean(dim=(2, 3)))
        distance = (pooled - 0.1).norm(dim=1) + 1e-3
        return _FakeOutput(self.proj(pooled), 1.0 / distance, distance)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_oltr(x).logits


def _collect_logits(model: nn.Module, *batches: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b) for b in batches])


def test_plain_timm_model_matches_compute_report(timm_model):
    known_loader, open_loader, images, labels, unknown = _loaders()
    counts = [500, 120, 100, 20, 4]
    report = evaluate(timm_model, known_loader, open_loader=open_loader, train_counts=counts, progress=False)
    logits = _collect_logits(timm_model, images, unknown)
    all_labels = torch.cat([labels, torch.full((len(unknown),), -1)])
    expected = compute_report(logits, all_labels, train_counts=counts)

    assert report.num_known == 24 and report.num_unknown == 8
    assert report.score == 'msp' and report.threshold == 0.1
    assert report.labels.tolist() == all_labels.tolist()
    np.testing.assert_allclose(report.scores, expected.scores, rtol=1e-5)
    assert report.f_measure == expected.f_measure
    assert report.top1 == expected.top1
    assert report.groups == expected.groups


def test_evaluate_figures_by_hand(timm_model):
    known_loader, open_loader, images, labels, unknown = _loaders(seed=1)
    report = evaluate(timm_model, known_loader, open_loader=open_loader, progress=False)
    logits = _collect_logits(timm_model, images, unknown)
    probs = logits.double().softmax(1)
    preds = probs.argmax(1)
    msp = probs.max(1).values

    hits = sum(int(preds[i]) == int(labels[i]) for i in range(len(labels)))
    assert report.top1 == pytest.approx(hits / len(labels))
    accepted_right = sum(int(preds[i]) == int(labels[i]) and msp[i] >= 0.1 for i in range(len(labels)))
    assert report.open_top1 == pytest.approx(accepted_right / len(labels))
    unknown_rejected = sum(float(m) < 0.1 for m in msp[len(labels) :])
    assert report.rejection_rate == pytest.approx(unknown_rejected / len(unknown))
    assert report.top5 == 1.0  # K = 5: the top 5 hold every class


def test_evaluate_restores_modes_and_uses_eval(timm_model):
    known_loader, _, _, _, _ = _loaders()
    timm_model.train()
    timm_model.fc.eval()  # a submodule left in another mode must come back as it was
    seen = []
    handle = timm_model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    try:
        evaluate(timm_model, known_loader, progress=False)
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert timm_model.training and not timm_model.fc.training
    timm_model.eval()


def test_mode_restored_after_error(timm_model):
    timm_model.train()
    bad = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 9, 2])), batch_size=4)
    with pytest.raises(ValueError, match=r'labels: known samples need class indices in \[0, 5\), got 9'):
        evaluate(timm_model, bad, progress=False)
    assert timm_model.training
    timm_model.eval()


def test_negative_label_in_known_loader(timm_model):
    bad = DataLoader(TensorDataset(torch.randn(2, 3, 32, 32), torch.tensor([0, -1])), batch_size=2)
    with pytest.raises(ValueError, match='got -1.*open_loader'):
        evaluate(timm_model, bad, progress=False)


def test_dict_batches_and_ignored_open_labels(timm_model):
    images = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    batches = [{'image': images[:3], 'label': labels[:3]}, {'image': images[3:], 'label': labels[3:]}]
    open_batches = [{'image': images[:2], 'label': torch.tensor([7, 8])}, images[2:4]]
    report = evaluate(timm_model, batches, open_loader=open_batches, progress=True)
    assert report.num_known == 6 and report.num_unknown == 4
    assert report.labels[6:].tolist() == [-1] * 4


def test_bad_batches(timm_model):
    with pytest.raises(TypeError, match="'image' and 'label'"):
        evaluate(timm_model, [{'img': torch.randn(2, 3, 32, 32)}], progress=False)
    with pytest.raises(TypeError, match='bare tensor'):
        evaluate(timm_model, [torch.randn(2, 3, 32, 32)], progress=False)
    with pytest.raises(ValueError, match=r'labels: expected integer class indices of shape \(2,\)'):
        evaluate(timm_model, [(torch.randn(2, 3, 32, 32), torch.rand(2, K))], progress=False)
    with pytest.raises(ValueError, match='no batches'):
        evaluate(timm_model, [], progress=False)


def test_plain_model_scores_and_thresholds(timm_model):
    known_loader, open_loader, _, _, _ = _loaders()
    with pytest.raises(ValueError, match="'reachability' needs an OLTR model"):
        evaluate(timm_model, known_loader, score='reachability', progress=False)
    with pytest.raises(ValueError, match="threshold: required for score='energy'"):
        evaluate(timm_model, known_loader, score='energy', progress=False)
    report = evaluate(timm_model, known_loader, open_loader=open_loader, score='energy', threshold=0.5, progress=False)
    assert report.score == 'energy' and report.threshold == 0.5
    assert report.auroc is not None


def test_fake_oltr_model_uses_config_and_head_counts():
    torch.manual_seed(0)
    model = _FakeOLTR()
    model.train()
    known_loader, open_loader, images, labels, unknown = _loaders()
    report = evaluate(model, known_loader, open_loader=open_loader, progress=False)

    assert report.score == 'reachability' and report.threshold == 1.5
    assert report.train_counts.tolist() == [500, 200, 50, 10, 3]
    assert report.groups['many'].num_classes == 2
    assert model.training and model.dropout.training  # restored after the pass
    model.eval()
    with torch.no_grad():
        out = model.forward_oltr(torch.cat([images, unknown]))
    np.testing.assert_allclose(report.scores, out.reachability.double().numpy(), rtol=1e-6)


def test_ddp_like_wrapper_is_unwrapped():
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    torch.manual_seed(0)
    inner = _FakeOLTR()
    known_loader, open_loader, _, _, _ = _loaders()
    wrapped = evaluate(Wrapper(inner), known_loader, open_loader=open_loader, progress=False)
    direct = evaluate(inner, known_loader, open_loader=open_loader, progress=False)
    assert wrapped.score == 'reachability'
    np.testing.assert_array_equal(wrapped.scores, direct.scores)


def test_autocast_bfloat16_cpu(timm_model):
    known_loader, open_loader, _, _, _ = _loaders()
    report = evaluate(
        timm_model, known_loader, open_loader=open_loader, autocast_dtype=torch.bfloat16, device='cpu', progress=False
    )
    assert report.scores.dtype == np.float64
    assert np.all(np.isfinite(report.scores))


def test_oltr_model_evaluate_and_calibrate():
    oltr = pytest.importorskip('timm_oltr.model')
    torch.manual_seed(0)
    model = oltr.wrap(timm.create_model('test_resnet', num_classes=K), num_classes=K)
    E = model.head.in_features
    counts = torch.tensor([300, 150, 60, 12, 2])
    model.head.set_centroids(torch.randn(K, E), counts)
    known_loader, open_loader, images, labels, unknown = _loaders(n_known=10, n_unknown=4)

    report = evaluate(model, known_loader, open_loader=open_loader, split='val', progress=False)
    assert report.score == model.config.open_set_score
    assert report.threshold == model.config.open_set_threshold
    assert report.train_counts.tolist() == counts.tolist()
    model.eval()
    with torch.no_grad():
        out = model.forward_oltr(torch.cat([images, unknown]))
    expected = compute_report(out.logits, report.labels, train_counts=counts, split='val')
    np.testing.assert_allclose(report.scores, expected.scores, rtol=1e-5)
    assert report.f_measure == expected.f_measure

    reach = evaluate(model, known_loader, open_loader=open_loader, score='reachability', threshold=0.0, progress=False)
    np.testing.assert_allclose(reach.scores, out.reachability.double().numpy(), rtol=1e-5)

    score, threshold, _ = calibrate_threshold(model, known_loader, method='tpr', target_tpr=0.5, progress=False)
    assert (model.config.open_set_score, model.config.open_set_threshold) == (score, threshold) == ('msp', threshold)
    assert np.mean(report.scores[report.labels >= 0] >= threshold) >= 0.5


def test_compute_report_custom_scores_and_errors():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.1]])
    labels = torch.tensor([0, 0, -1])
    report = compute_report(logits, labels, scores=[0.9, 0.8, 0.1], score='custom', threshold=0.5)
    assert report.score == 'custom'
    assert (report.f_measure.tp, report.f_measure.fp, report.f_measure.fn) == (1, 1, 0)
    assert report.top5 is None  # K = 2
    with pytest.raises(ValueError, match="threshold: required for score='max_logit'"):
        compute_report(logits, labels, score='max_logit')
    with pytest.raises(ValueError, match='split'):
        compute_report(logits, labels, split='')
    with pytest.raises(ValueError, match=r'train_counts: expected 2 counts'):
        compute_report(logits, labels, train_counts=[5, 5, 5])
    with pytest.raises(ValueError, match='got 2'):
        compute_report(logits, torch.tensor([0, 2, -1]))
    with pytest.raises(ValueError, match='shot_rule'):
        compute_report(logits, labels, shot_rule='loose')


def test_compute_report_paper_definition_and_inclusive_rule():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, -1])
    # msp of row 1 is 1/3: with threshold 0.5 it is rejected
    corrected = compute_report(logits, labels, threshold=0.5, train_counts=[100, 20, 7], shot_rule='inclusive')
    paper = compute_report(logits, labels, threshold=0.5, f_definition='paper')
    assert (corrected.f_measure.fp, paper.f_measure.fp) == (1, 0)
    assert corrected.groups['many'].num_classes == 1  # 100 is many under the inclusive rule
    assert corrected.groups['few'].num_classes == 2  # 20 is few under the inclusive rule
    assert corrected.to_dict()['conventions']['shot_rule'] == 'inclusive'


def test_case_c16_report_empty_group():
    logits = torch.eye(3) * 5
    report = compute_report(logits, torch.tensor([0, 1, 2]), train_counts=[50, 10, 99])
    d = report.to_dict()
    assert d['closed_set']['groups']['many'] == {'accuracy': None, 'micro': None, 'num_classes': 0, 'num_samples': 0}
    assert d['closed_set']['groups']['medium']['accuracy'] == 1.0
    assert d['closed_set']['groups']['few'] == {'accuracy': 1.0, 'micro': 1.0, 'num_classes': 1, 'num_samples': 1}
    assert 'nan' not in str(report).lower()


def test_case_c17_report_no_unknowns_has_reasons():
    report = compute_report(torch.eye(3) * 5, torch.tensor([0, 1, 2]))
    d = report.to_dict()
    assert d['open_set']['auroc'] is None and d['open_set']['oscr'] is None
    assert 'no unknown samples' in d['open_set']['undefined']['auroc']
    assert d['open_set']['rejection_rate'] is None
    assert 'no unknown samples' in str(report)


def test_case_c19_report_names_split(timm_model):
    known_loader, _, _, _, _ = _loaders()
    report = evaluate(timm_model, known_loader, split='val', progress=False)
    assert report.split == 'val'
    assert report.to_dict()['split'] == 'val'
    assert "split 'val'" in str(report)


def test_to_dict_is_strict_json_and_arrays_on_request():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(30, 6))
    labels = np.r_[rng.integers(0, 6, 20), -np.ones(10, dtype=np.int64)]
    report = compute_report(logits, labels, train_counts=[1000, 300, 50, 30, 10, 0])
    d = report.to_dict()
    text = json.dumps(d, allow_nan=False)  # raises on NaN or numpy types
    assert 'arrays' not in d
    assert json.loads(text)['per_class']['group'] == ['many', 'many', 'medium', 'medium', 'few', 'few']

    full = report.to_dict(include_arrays=True)
    json.dumps(full, allow_nan=False)
    assert full['arrays']['labels'] == labels.tolist()
    assert len(full['arrays']['scores']) == 30

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        else:
            assert x is None or type(x) in (bool, int, float, str)
            assert not (isinstance(x, float) and math.isnan(x))

    walk(full)


def test_str_table_lists_every_figure():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 6))
    labels = np.r_[rng.integers(0, 6, 20), -np.ones(10, dtype=np.int64)]
    text = str(compute_report(logits, labels, train_counts=[1000, 300, 50, 30, 10, 1]))
    for needle in (
        'many',
        'medium',
        'few',
        'overall',
        'macro',
        'micro',
        'F ',
        'P ',
        'R ',
        'TP ',
        'FP ',
        'FN ',
        'AUROC',
        'AUPR-in',
        'AUPR-out',
        'FPR@95',
        'OSCR',
        'rejection rate',
        'strict',
        "'msp'",
    ):
        assert needle in text, needle
    assert isinstance(compute_report(logits, labels), OLTRReport)


def test_calibrate_auto_picks_the_score_with_best_validation_auroc():
    torch.manual_seed(0)
    model = timm_oltr.wrap(timm.create_model('test_resnet', num_classes=K)).eval()
    model.head.set_centroids(torch.randn(K, model.head_hidden_size), torch.full((K,), 5))
    known_loader, open_loader, images, labels, unknown = _loaders(n_known=12, n_unknown=6)
    with torch.no_grad():
        out = model.forward_oltr(torch.cat([images, unknown]))
    truth = np.r_[np.ones(len(images)), np.zeros(len(unknown))]
    expected = {
        'msp': roc_auc_score(truth, out.logits.softmax(1).max(1).values.numpy()),
        'max_logit': roc_auc_score(truth, out.logits.max(1).values.numpy()),
        'energy': roc_auc_score(truth, out.logits.logsumexp(1).numpy()),
        'reachability': roc_auc_score(truth, out.reachability.numpy()),
    }
    score, threshold, aurocs = calibrate_threshold(
        model, known_loader, open_loader=open_loader, score='auto', progress=False
    )
    assert aurocs == pytest.approx(expected, abs=1e-6)
    assert score == max(expected, key=expected.get)
    assert model.config.open_set_score == score and model.config.open_set_threshold == threshold
    with pytest.raises(ValueError, match='needs open_loader'):
        calibrate_threshold(model, known_loader, score='auto', progress=False)
