"""Metric functions against scikit-learn or hand computations written with plain loops."""

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from timm_oltr import metrics as M


def _toy(seed: int = 0, n_known: int = 60, n_unknown: int = 20, num_classes: int = 6):
    """Known samples labelled 0..K-1, unknown -1; scores higher for knowns on average, no ties."""
    rng = np.random.default_rng(seed)
    labels = np.r_[rng.integers(0, num_classes, n_known), -np.ones(n_unknown, dtype=np.int64)]
    preds = np.where(rng.random(len(labels)) < 0.7, labels, rng.integers(0, num_classes, len(labels)))
    preds[labels < 0] = rng.integers(0, num_classes, n_unknown)
    scores = rng.random(len(labels)) + 0.4 * (labels >= 0)
    return scores, preds, labels


# --- hand references, deliberately naive ----------------------------------------------------------------


def _ref_f(preds, labels, definition):
    tp = fp = fn = 0
    for p, y in zip(preds.tolist(), labels.tolist(), strict=True):
        if y != -1 and p == y:
            tp += 1
        elif y != -1 and p != y:
            if definition == 'corrected' or p != -1:
                fp += 1
        elif y == -1 and p != -1:
            fn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return f, precision, recall, tp, fp, fn


def _ref_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y >= 0]
    neg = [s for s, y in zip(scores, labels, strict=True) if y < 0]
    total = 0.0
    for a in pos:
        for b in neg:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


def _ref_average_precision(scores, is_positive):
    # no ties assumed: walk down the ranking, average the precision at each positive
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if is_positive[i]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def _ref_fpr_at_tpr(scores, labels, tpr):
    known = [s for s, y in zip(scores, labels, strict=True) if y >= 0]
    unknown = [s for s, y in zip(scores, labels, strict=True) if y < 0]
    best = None
    for t in sorted(set(scores.tolist())):  # ascending: keep the highest threshold still reaching tpr
        if sum(k >= t for k in known) / len(known) >= tpr:
            best = t
    return sum(u >= best for u in unknown) / len(unknown)


def _ref_oscr(scores, preds, labels):
    known = labels >= 0
    n_known, n_unknown = known.sum(), (~known).sum()
    points = [(0.0, 0.0)]
    for t in sorted(set(scores.tolist()), reverse=True):
        ccr = sum(1 for s, p, y in zip(scores, preds, labels, strict=True) if y >= 0 and p == y and s >= t)
        fpr = sum(1 for s, y in zip(scores, labels, strict=True) if y < 0 and s >= t)
        points.append((fpr / n_unknown, ccr / n_known))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        area += (x1 - x0) * (y0 + y1) / 2
    return area


# --- shot groups ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'rule, expected',
    [
        ('strict', ['many', 'medium', 'medium', 'medium', 'few', 'few']),
        ('inclusive', ['many', 'many', 'medium', 'few', 'few', 'few']),
    ],
)
def test_shot_groups_boundaries(rule, expected):
    # 101, 100 (bound), 50, 20 (bound), 19, 0
    assert M.shot_groups([101, 100, 50, 20, 19, 0], rule=rule).tolist() == expected


def test_shot_groups_settable_bounds_and_masks():
    counts = torch.tensor([60, 50, 10, 5])
    assert M.shot_groups(counts, many=50, few=10).tolist() == ['many', 'medium', 'medium', 'few']
    masks = M.shot_group_masks(counts, many=50, few=10, rule='inclusive')
    assert masks['many'].tolist() == [True, True, False, False]
    assert masks['few'].tolist() == [False, False, True, True]
    assert not masks['medium'].any()


@pytest.mark.parametrize(
    'kwargs, match',
    [
        ({'rule': 'loose'}, 'rule'),
        ({'many': 20, 'few': 20}, 'few'),
    ],
)
def test_shot_groups_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.shot_groups([5, 500], **kwargs)


def test_shot_groups_rejects_negative_counts():
    with pytest.raises(ValueError, match='non-negative'):
        M.shot_groups([5, -1])


def test_case_c16_empty_many_group():
    # every class below 100 training images: 'many' is empty, the other groups are computed as usual
    counts = [50, 30, 10, 5]  # medium, medium, few, few
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, -1])
    preds = np.array([0, 1, 1, 1, 0, 2, 3, 3, 0])
    groups = M.shot_group_accuracy(preds, labels, counts)

    assert groups['many'] == M.GroupAccuracy(None, None, 0, 0)
    # medium: class 0 -> 1/2, class 1 -> 2/2; few: class 2 -> 1/2, class 3 -> 2/2
    assert groups['medium'] == M.GroupAccuracy(0.75, 0.75, 2, 4)
    assert groups['few'] == M.GroupAccuracy(0.75, 0.75, 2, 4)
    for g in groups.values():
        assert g.accuracy is None or math.isfinite(g.accuracy)


def test_shot_group_accuracy_matches_loop():
    scores, preds, labels = _toy(1, num_classes=6)
    counts = np.array([500, 150, 100, 40, 20, 3])
    got = M.shot_group_accuracy(preds, labels, counts, rule='inclusive')
    for name, members in {'many': [0, 1, 2], 'medium': [3], 'few': [4, 5]}.items():
        per_class, hits, total = [], 0, 0
        for c in members:
            idx = [i for i, y in enumerate(labels) if y == c]
            if idx:
                right = sum(preds[i] == c for i in idx)
                per_class.append(right / len(idx))
                hits, total = hits + right, total + len(idx)
        assert got[name].accuracy == pytest.approx(sum(per_class) / len(per_class))
        assert got[name].micro == pytest.approx(hits / total)
        assert got[name].num_classes == len(members)
        assert got[name].num_samples == total


def test_group_with_classes_but_no_test_samples_is_none():
    groups = M.shot_group_accuracy([0, 0], [0, 0], [500, 5])
    assert groups['few'] == M.GroupAccuracy(None, None, 1, 0)
    assert groups['many'].accuracy == 1.0


# --- closed set -----------------------------------------------------------------------------------------


def test_topk_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7))
    labels = rng.integers(0, 7, 50)
    for k in (1, 3, 5):
        expected = top_k_accuracy_score(labels, logits, k=k, labels=np.arange(7))
        assert M.topk_accuracy(torch.from_numpy(logits), labels, k=k) == pytest.approx(expected)


def test_topk_ignores_unknown_and_breaks_ties_like_argmax():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [5.0, 0.0, 0.0]])
    labels = np.array([0, 2, -1])
    assert M.topk_accuracy(logits, labels, k=1) == 0.5  # row 0 argmax 0 (hit), row 1 argmax 1 (miss)
    assert M.topk_accuracy(logits, labels, k=2) == 1.0


def test_topk_k_too_large_and_no_knowns():
    with pytest.raises(ValueError, match='k: expected 1 <= k <= K = 3, got 5'):
        M.topk_accuracy(np.zeros((2, 3)), [0, 1], k=5)
    assert M.topk_accuracy(np.zeros((2, 3)), [-1, -1]) is None


def test_single_class():
    logits = np.zeros((4, 1))
    assert M.topk_accuracy(logits, [0, 0, 0, -1]) == 1.0
    assert M.macro_accuracy([0, 0, -1], [0, 0, 0], 1) == pytest.approx(2 / 3)
    assert M.shot_group_accuracy([0], [0], [7])['few'].accuracy == 1.0


def test_accuracy_and_macro_match_sklearn():
    _, preds, labels = _toy(2)
    known = labels >= 0
    assert M.accuracy(preds, labels) == pytest.approx(np.mean(preds[known] == labels[known]))
    assert M.macro_accuracy(preds, labels, 6) == pytest.approx(balanced_accuracy_score(labels[known], preds[known]))


def test_per_class_accuracy_loop_and_missing_class():
    preds = torch.tensor([0, 1, -1, 2, 2])
    labels = torch.tensor([0, 0, 0, 2, -1])
    acc, counts = M.per_class_accuracy(preds, labels, 4)
    assert counts.tolist() == [3, 0, 1, 0]
    assert acc[0] == pytest.approx(1 / 3)
    assert acc[2] == 1.0
    assert np.isnan(acc[1]) and np.isnan(acc[3])
    assert M.macro_accuracy(preds, labels, 4) == pytest.approx((1 / 3 + 1) / 2)


def test_label_out_of_range():
    with pytest.raises(ValueError, match=r'labels: expected class indices in \[0, 3\), -1 for unknown samples, got 7'):
        M.per_class_accuracy([0, 1], [0, 7], 3)
    with pytest.raises(ValueError, match='got -2'):
        M.shot_group_accuracy([0, 1], [0, -2], [5, 500])


def test_shape_and_type_errors():
    with pytest.raises(ValueError, match='same length'):
        M.accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match=r'labels: expected shape \(N,\)'):
        M.accuracy([0, 1], [[0, 1]])
    with pytest.raises(TypeError, match='integer class indices'):
        M.accuracy([0, 1], [0.5, 1.0])
    with pytest.raises(ValueError, match=r'logits: expected shape \(N, K\)'):
        M.topk_accuracy(np.zeros(3), [0, 1, 2])


# --- open set at a threshold ----------------------------------------------------------------------------


def test_case_c17_four_sample_hand_case():
    # two knowns right (TP=2); one known rejected (FP under 'corrected' only); one unknown accepted (FN=1);
    # one unknown rejected (TN=1)
    labels = np.array([0, 1, 2, -1, -1])
    preds = np.array([0, 1, -1, 1, -1])
    corrected = M.f_measure(preds, labels)
    # P = 2 / (2 + 1), R = 2 / (2 + 1), F = 2 * (2/3)(2/3) / (4/3) = 2/3
    assert corrected.definition == 'corrected'
    assert (corrected.tp, corrected.fp, corrected.fn, corrected.tn) == (2, 1, 1, 1)
    assert corrected.precision == pytest.approx(2 / 3)
    assert corrected.recall == pytest.approx(2 / 3)
    assert corrected.f == pytest.approx(2 / 3)

    paper = M.f_measure(preds, labels, definition='paper')
    # the rejected known counts nowhere: P = 2 / 2 = 1, R = 2/3, F = 2 * (2/3) / (5/3) = 0.8
    assert (paper.tp, paper.fp, paper.fn) == (2, 0, 1)
    assert paper.precision == pytest.approx(1.0)
    assert paper.recall == pytest.approx(2 / 3)
    assert paper.f == pytest.approx(0.8)


@pytest.mark.parametrize('definition', ['corrected', 'paper'])
def test_f_measure_matches_loop(definition):
    scores, preds, labels = _toy(3)
    thresholded = np.where(scores >= 0.6, preds, -1)
    got = M.f_measure(torch.from_numpy(thresholded), torch.from_numpy(labels), definition=definition)
    f, precision, recall, tp, fp, fn = _ref_f(thresholded, labels, definition)
    assert (got.tp, got.fp, got.fn) == (tp, fp, fn)
    assert got.f == pytest.approx(f)
    assert got.precision == pytest.approx(precision)
    assert got.recall == pytest.approx(recall)


def test_case_c17_degenerate_inputs_are_finite():
    # all unknown, all accepted: no TP, so P = R = F = 0
    all_unknown = M.f_measure([0, 1, 2], [-1, -1, -1])
    assert (all_unknown.f, all_unknown.precision, all_unknown.recall, all_unknown.fn) == (0.0, 0.0, 0.0, 3)
    assert M.rejection_rate([0, -1, 2], [-1, -1, -1]) == pytest.approx(1 / 3)

    # no unknowns: FN = 0, R = 1 whenever there is a TP
    none_unknown = M.f_measure([0, 1, 1], [0, 1, 0])
    assert none_unknown.precision == pytest.approx(2 / 3)
    assert none_unknown.recall == 1.0
    assert none_unknown.f == pytest.approx(0.8)
    assert M.rejection_rate([0, 1, 1], [0, 1, 0]) is None

    # a threshold rejecting everything: TP = 0 under either definition
    labels = np.array([0, 1, -1])
    rejected = M.apply_threshold([0, 1, 0], [0.5, 0.6, 0.2], threshold=2.0)
    assert rejected.tolist() == [-1, -1, -1]
    for definition in ('corrected', 'paper'):
        fm = M.f_measure(rejected, labels, definition=definition)
        assert (fm.f, fm.precision, fm.recall) == (0.0, 0.0, 0.0)
    assert M.f_measure(rejected, labels).fp == 2
    assert M.f_measure(rejected, labels, definition='paper').fp == 0
    assert M.rejection_rate(rejected, labels) == 1.0

    # no samples at all
    empty = M.f_measure([], [])
    assert (empty.f, empty.tp) == (0.0, 0)


def test_apply_threshold_accepts_equal_score():
    assert M.apply_threshold([3, 4, 5], np.array([0.1, 0.0999, 0.2]), 0.1).tolist() == [3, -1, 5]


def test_rejection_rate_monotone_in_threshold():
    scores, preds, labels = _toy(4)
    rates = [M.rejection_rate(M.apply_threshold(preds, scores, t), labels) for t in np.linspace(-0.1, 1.5, 40)]
    assert all(a <= b for a, b in zip(rates[:-1], rates[1:], strict=True))
    assert rates[0] == 0.0 and rates[-1] == 1.0


@pytest.mark.parametrize('definition', ['corrected', 'paper'])
def test_threshold_sweep_matches_loop(definition):
    scores, preds, labels = _toy(5)
    thresholds = [0.9, 0.0, 0.5, 1.2]
    sweep = M.threshold_sweep(scores, preds, labels, thresholds, definition=definition)
    assert sweep.thresholds.tolist() == sorted(thresholds)
    for i, t in enumerate(sorted(thresholds)):
        thresholded = [p if s >= t else -1 for s, p in zip(scores, preds, strict=True)]
        f, precision, recall, tp, fp, fn = _ref_f(np.array(thresholded), labels, definition)
        assert (sweep.tp[i], sweep.fp[i], sweep.fn[i]) == (tp, fp, fn)
        assert sweep.f[i] == pytest.approx(f)
        assert sweep.precision[i] == pytest.approx(precision)
        assert sweep.recall[i] == pytest.approx(recall)
        known = [s for s, y in zip(scores, labels, strict=True) if y >= 0]
        unknown = [s for s, y in zip(scores, labels, strict=True) if y < 0]
        assert sweep.known_acceptance[i] == pytest.approx(sum(s >= t for s in known) / len(known))
        assert sweep.rejection_rate[i] == pytest.approx(sum(s < t for s in unknown) / len(unknown))
        assert sweep.accuracy[i] == pytest.approx(tp / len(known))


def test_threshold_sweep_default_range_and_no_unknowns():
    sweep = M.threshold_sweep([0.2, 0.8, 0.5], [0, 1, 1], [0, 1, 0], num_thresholds=7)
    assert sweep.thresholds[0] == 0.2 and sweep.thresholds[-1] == 0.8 and len(sweep.thresholds) == 7
    assert sweep.rejection_rate is None
    assert np.all(np.isfinite(sweep.f))


def test_paper_f_rises_with_threshold_corrected_does_not():
    # the paper's F-measure bug: rejecting a misclassified known improves it; under the corrected definition
    # it stays a false positive. The unknowns score above every threshold, so FN is the same throughout.
    labels = np.array([0, 1, 2, 3, -1, -1])
    preds = np.array([0, 1, 0, 0, 1, 2])
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.95, 0.85])
    paper = M.threshold_sweep(scores, preds, labels, [0.0, 0.25, 0.35], definition='paper').f
    corrected = M.threshold_sweep(scores, preds, labels, [0.0, 0.25, 0.35]).f
    assert paper[0] < paper[1] < paper[2]
    np.testing.assert_allclose(corrected, corrected[0])


# --- scores and thresholds ------------------------------------------------------------------------------


def test_open_set_scores_against_torch():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 4
    msp = M.open_set_scores(logits, 'msp')
    assert msp.dtype == np.float64
    np.testing.assert_allclose(msp, logits.double().softmax(1).max(1).values.numpy(), rtol=1e-12)
    np.testing.assert_allclose(M.open_set_scores(logits, 'max_logit'), logits.max(1).values.double().numpy())
    np.testing.assert_allclose(M.open_set_scores(logits.numpy(), 'energy'), logits.double().logsumexp(1).numpy())
    np.testing.assert_allclose(
        M.open_set_scores(logits.bfloat16(), 'msp'),
        logits.bfloat16().float().softmax(1).max(1).values.numpy(),
        rtol=1e-6,
    )


def test_open_set_scores_sign_convention():
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.1, 0.0, 0.0]])
    for kind in ('msp', 'max_logit', 'energy'):
        assert M.open_set_scores(confident, kind)[0] > M.open_set_scores(unsure, kind)[0]
    near, far = torch.tensor([0.5]), torch.tensor([4.0])
    assert M.open_set_scores(None, 'reachability', min_distance=near) > M.open_set_scores(
        None, 'reachability', min_distance=far
    )
    np.testing.assert_allclose(M.open_set_scores(None, 'reachability', reachability=[2.0, 3.0]), [2.0, 3.0])
    np.testing.assert_allclose(M.open_set_scores(None, 'reachability', min_distance=[2.0]), [-2.0])


def test_open_set_scores_errors():
    with pytest.raises(ValueError, match='reachability or min_distance'):
        M.open_set_scores(torch.zeros(2, 3), 'reachability')
    with pytest.raises(ValueError, match="kind: expected one of .*got 'softmax'"):
        M.open_set_scores(torch.zeros(2, 3), 'softmax')
    with pytest.raises(ValueError, match='logits: required'):
        M.open_set_scores(None, 'energy')
    with pytest.raises(ValueError, match='finite'):
        M.open_set_scores(None, 'reachability', reachability=[1.0, float('nan')])


def test_choose_threshold_tpr():
    scores = np.arange(1, 21) / 20.0  # 20 knowns, 0.05 .. 1.0
    labels = np.zeros(20, dtype=np.int64)
    t = M.choose_threshold(scores, labels, target_tpr=0.95)
    assert t == pytest.approx(0.10)  # 19 of 20 accepted
    assert np.mean(scores >= t) >= 0.95
    assert np.mean(scores >= t + 1e-9) < 0.95
    assert M.choose_threshold(scores, labels, target_tpr=1.0) == pytest.approx(0.05)
    # explicit method with unknowns present ignores them
    t2 = M.choose_threshold(np.r_[scores, 0.99], np.r_[labels, -1], method='tpr', target_tpr=0.95)
    assert t2 == pytest.approx(0.10)


def test_choose_threshold_f_measure_brute_force():
    scores, preds, labels = _toy(6)
    t = M.choose_threshold(scores, labels, preds)
    best_f, best_t = -1.0, None
    for cand in sorted(set(scores.tolist())):
        f = _ref_f(np.where(scores >= cand, preds, -1), labels, 'corrected')[0]
        if f > best_f + 1e-15:
            best_f, best_t = f, cand
    assert t == pytest.approx(best_t)


def test_choose_threshold_errors():
    with pytest.raises(ValueError, match='needs known samples'):
        M.choose_threshold([0.1, 0.2], [-1, -1])
    with pytest.raises(ValueError, match='predictions: required'):
        M.choose_threshold([0.1, 0.2], [0, -1])
    with pytest.raises(ValueError, match='unknown validation samples'):
        M.choose_threshold([0.1, 0.2], [0, 1], [0, 1], method='f_measure')
    with pytest.raises(ValueError, match='target_tpr'):
        M.choose_threshold([0.1, 0.2], [0, 1], target_tpr=0.0)


# --- threshold-free -------------------------------------------------------------------------------------


def test_threshold_free_metrics_match_references():
    scores, preds, labels = _toy(7)
    is_known = labels >= 0
    assert M.auroc(scores, labels) == pytest.approx(_ref_auroc(scores, labels))
    assert M.aupr_in(scores, labels) == pytest.approx(_ref_average_precision(scores, is_known))
    assert M.aupr_out(scores, labels) == pytest.approx(_ref_average_precision(-scores, ~is_known))
    assert M.fpr_at_tpr(scores, labels) == pytest.approx(_ref_fpr_at_tpr(scores, labels, 0.95))
    assert M.fpr_at_tpr(scores, labels, 0.5) == pytest.approx(_ref_fpr_at_tpr(scores, labels, 0.5))
    assert M.oscr(scores, preds, labels) == pytest.approx(_ref_oscr(scores, preds, labels))


def test_auroc_with_ties_matches_pair_count():
    scores = np.array([0.5, 0.5, 0.9, 0.1, 0.5, 0.3])
    labels = np.array([0, 1, 2, -1, -1, -1])
    assert M.auroc(scores, labels) == pytest.approx(_ref_auroc(scores, labels))
    assert M.oscr(scores, np.array([0, 1, 2, 0, 0, 0]), labels) == pytest.approx(M.auroc(scores, labels))


def test_oscr_equals_auroc_when_all_knowns_correct_and_zero_when_all_wrong():
    scores, _, labels = _toy(8)
    perfect = np.where(labels >= 0, labels, 0)
    assert M.oscr(scores, perfect, labels) == pytest.approx(_ref_auroc(scores, labels))
    wrong = np.where(labels >= 0, labels + 1, 0)
    assert M.oscr(scores, wrong, labels) == 0.0


def test_case_c18_perfect_separation_and_sign():
    labels = np.array([0, 1, 2, 1, -1, -1, -1])
    scores = np.array([0.9, 0.8, 0.95, 0.7, 0.2, 0.1, 0.3])
    assert M.auroc(scores, labels) == 1.0
    assert M.aupr_in(scores, labels) == 1.0
    assert M.aupr_out(scores, labels) == 1.0
    assert M.fpr_at_tpr(scores, labels) == 0.0
    assert M.oscr(scores, np.array([0, 1, 2, 1, 0, 0, 0]), labels) == 1.0
    # flipped scores: every unknown above every known
    assert M.auroc(-scores, labels) == 0.0
    assert M.fpr_at_tpr(-scores, labels) == 1.0


def test_case_c18_aupr_in_and_out_not_mirrored():
    # 9 knowns, 1 unknown ranked first. AUPR-in (knowns positive): precision at the k-th known is k / (k + 1).
    # AUPR-out (unknown positive, scores negated): the unknown is ranked last, precision 1/10.
    scores = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    labels = np.array([-1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    expected_in = sum(k / (k + 1) for k in range(1, 10)) / 9
    assert M.aupr_in(scores, labels) == pytest.approx(expected_in)
    assert M.aupr_out(scores, labels) == pytest.approx(0.1)
    assert M.auroc(scores, labels) == 0.0


def test_case_c18_agrees_with_sklearn_on_toy_data():
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores, _, labels = _toy(9)
    assert M.auroc(scores, labels) == pytest.approx(roc_auc_score(labels != -1, scores))
    assert M.aupr_in(scores, labels) == pytest.approx(average_precision_score(labels != -1, scores))
    assert M.aupr_out(scores, labels) == pytest.approx(average_precision_score(labels == -1, -scores))


@pytest.mark.parametrize('labels', [[0, 1, 2], [-1, -1, -1], []], ids=['no_unknown', 'all_unknown', 'empty'])
def test_case_c17_threshold_free_degenerate_is_none(labels):
    labels = np.array(labels, dtype=np.int64)
    scores = np.linspace(0, 1, len(labels))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert M.auroc(scores, labels) is None
        assert M.aupr_in(scores, labels) is None
        assert M.aupr_out(scores, labels) is None
        assert M.fpr_at_tpr(scores, labels) is None
        assert M.oscr(scores, np.zeros_like(labels), labels) is None
    assert isinstance(M.undefined_reason(labels), str)


def test_undefined_reason_none_when_defined():
    assert M.undefined_reason([0, -1]) is None
    assert 'no unknown' in M.undefined_reason([0, 1])
    assert 'no known' in M.undefined_reason([-1])


def test_auroc_by_shot_group_matches_subsets():
    scores, _, labels = _toy(10, num_classes=4)
    counts = [500, 50, 5, 300]  # many, medium, few, many
    got = M.auroc_by_shot_group(scores, labels, counts)
    members = {'many': {0, 3}, 'medium': {1}, 'few': {2}}
    for name, classes in members.items():
        keep = [i for i, y in enumerate(labels) if y < 0 or y in classes]
        assert got[name] == pytest.approx(_ref_auroc(scores[keep], labels[keep]))


def test_auroc_by_shot_group_empty_group_and_no_unknowns():
    got = M.auroc_by_shot_group([0.9, 0.1], [0, -1], [50, 30])  # both medium
    assert got == {'many': None, 'medium': 1.0, 'few': None}
    assert M.auroc_by_shot_group([0.9, 0.1], [0, 1], [500, 5]) == {'many': None, 'medium': None, 'few': None}


def test_fpr_at_tpr_rejects_bad_tpr():
    with pytest.raises(ValueError, match='tpr'):
        M.fpr_at_tpr([0.1, 0.2], [0, -1], tpr=1.5)
