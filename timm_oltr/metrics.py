"""Metrics for open long-tailed recognition: shot groups, closed-set and open-set figures, thresholds.

The evaluation protocol of OLTR (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World",
CVPR 2019, arXiv:1904.05160), with the corrections later work settled on:

* shot groups from *training* counts, with strict bounds (many > 100, few < 20; the later
  literature's, the default) or inclusive bounds (many >= 100, few <= 20; the official code's since
  Aug 2019);
* an empty group reports ``None`` and its class count, never NaN;
* the open-set F-measure with the corrected definition (a rejected known sample is a false positive)
  by default, and the paper's definition (rejected knowns counted nowhere) behind
  ``definition='paper'``;
* threshold-free open-set metrics: AUROC, AUPR-in, AUPR-out, FPR at 95% TPR and OSCR (Dhamija et
  al., "Reducing Network Agnostophobia", NeurIPS 2018), computed with scikit-learn where it has
  them.

Conventions, the same in every function here:

* ``labels``: integers, known classes in ``[0, K)``, unknown (open-set) samples ``-1``.
* ``predictions``: integers, a class index, or ``-1`` for a rejected sample.
* open-set ``scores``: **higher = more likely known**. A sample is accepted iff
  ``score >= threshold``. The paper's score is the max softmax probability with threshold 0.1.
* Known samples are the positive class of AUROC, AUPR-in and FPR at 95% TPR; AUPR-out makes the
  unknown samples positive and negates the scores.
* A figure that is undefined for the data (no unknown samples, no known samples, an empty group) is
  ``None``; :func:`undefined_reason` says why. No function here returns NaN, except the per-class
  accuracy of a class that has no test samples in :func:`per_class_accuracy`'s raw array.

Every function accepts torch tensors, numpy arrays or lists, and computes in numpy float64.

Shape letters: N samples, K known classes, T thresholds.
"""

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    'SHOT_GROUPS',
    'FMeasure',
    'GroupAccuracy',
    'ThresholdSweep',
    'accuracy',
    'apply_threshold',
    'aupr_in',
    'aupr_out',
    'auroc',
    'auroc_by_shot_group',
    'choose_threshold',
    'f_measure',
    'fpr_at_tpr',
    'macro_accuracy',
    'open_set_scores',
    'oscr',
    'per_class_accuracy',
    'rejection_rate',
    'shot_group_accuracy',
    'shot_group_masks',
    'shot_groups',
    'threshold_sweep',
    'topk_accuracy',
    'undefined_reason',
]

_logger = logging.getLogger(__name__)

ShotRule = Literal['strict', 'inclusive']
FDefinition = Literal['corrected', 'paper']
ScoreKind = Literal['msp', 'max_logit', 'energy', 'reachability']

SHOT_GROUPS = ('many', 'medium', 'few')
_SHOT_RULES = ('strict', 'inclusive')
_F_DEFINITIONS = ('corrected', 'paper')
_SCORE_KINDS = ('msp', 'max_logit', 'energy', 'reachability')


class GroupAccuracy(NamedTuple):
    """Macro accuracy of one shot group.

    Attributes:
        accuracy: macro accuracy (the paper's group figure): mean per-class accuracy over the
            group's classes that have test samples; None if there are none (an empty group, or no
            test samples for any of its classes).
        micro: per-sample accuracy over the group's samples; None if there are none.
        num_classes: number of classes in the group (by training count).
        num_samples: number of evaluated samples whose label is in the group.
    """

    accuracy: float | None
    micro: float | None
    num_classes: int
    num_samples: int


class FMeasure(NamedTuple):
    """The open-set F-measure and its parts.

    Attributes:
        f: ``2 P R / (P + R)``, 0.0 where P + R is 0.
        precision: ``TP / (TP + FP)``, 0.0 where undefined.
        recall: ``TP / (TP + FN)``, 0.0 where undefined.
        tp: known samples predicted as their class.
        fp: known samples predicted wrongly; rejected knowns included under ``'corrected'``,
            excluded under ``'paper'``.
        fn: unknown samples accepted as some known class.
        tn: unknown samples rejected (used by neither definition; reported for completeness).
        definition: ``'corrected'`` or ``'paper'``.
    """

    f: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int
    tn: int
    definition: str


class ThresholdSweep(NamedTuple):
    """Open-set figures at each of T thresholds (arrays of shape (T,)).

    Attributes:
        thresholds: the thresholds, ascending; a sample is accepted iff ``score >= threshold``.
        f: F-measure (see ``definition``).
        precision: precision of the F-measure.
        recall: recall of the F-measure.
        tp: true positives.
        fp: false positives.
        fn: false negatives.
        known_acceptance: fraction of known samples accepted (the TPR); NaN-free, 0 when there are
            no knowns.
        accuracy: accuracy on known samples after thresholding (a rejected known counts as wrong).
        rejection_rate: fraction of unknown samples rejected, or None when there are no unknown
            samples.
        definition: the F-measure definition, ``'corrected'`` or ``'paper'``.
    """

    thresholds: np.ndarray
    f: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    known_acceptance: np.ndarray
    accuracy: np.ndarray
    rejection_rate: np.ndarray | None
    definition: str


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # numpy has no bfloat16
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:
        raise TypeError(f'{name}: expected a torch tensor, numpy array or sequence, got {type(x).__name__}') from e


def _as_int_1d(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f'{name}: expected shape (N,), got {tuple(arr.shape)}')
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise TypeError(f'{name}: expected integer class indices, got dtype {arr.dtype}')
    return arr.astype(np.int64)


def _as_float_1d(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x, name).astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f'{name}: expected shape (N,), got {tuple(arr.shape)}')
    if not np.all(np.isfinite(arr)):
        bad = arr[~np.isfinite(arr)][0]
        raise ValueError(f'{name}: expected finite scores, got {bad}; check the model output for overflow')
    return arr


def _as_logits(x: Any, name: str = 'logits') -> np.ndarray:
    arr = _to_numpy(x, name).astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(f'{name}: expected shape (N, K), got {tuple(arr.shape)}')
    return arr


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f'expected arrays of the same length N, got {lengths}')


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f'{name}: expected one of {list(choices)}, got {value!r}')


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


# --- shot groups ---------------------------------------------------------------------------------------------


def shot_groups(
    train_counts: Any,
    *,
    many: int = 100,
    few: int = 20,
    rule: ShotRule = 'strict',
) -> np.ndarray:
    """Shot group of each class from its number of training samples.

    Args:
        train_counts: (K,) training samples per class.
        many: many-shot bound (the paper's 100).
        few: few-shot bound (the paper's 20).
        rule: ``'strict'`` (default, the later literature's): many if count > many, few if count <
            few. ``'inclusive'`` (the official code's since Aug 2019): many if count >= many, few if
            count <= few. Medium otherwise. A count exactly on a bound is medium under strict and
            many/few under inclusive.

    Returns:
        (K,) array of str, each ``'many'``, ``'medium'`` or ``'few'``.

    Raises:
        ValueError: negative counts, ``few >= many``, or an unknown rule.
    """
    _check_choice('rule', rule, _SHOT_RULES)
    counts = _as_int_1d(train_counts, 'train_counts')
    if counts.size and counts.min() < 0:
        raise ValueError(f'train_counts: expected non-negative counts, got {counts.min()}')
    if not few < many:
        raise ValueError(f'few ({few}) must be smaller than many ({many})')

    if rule == 'strict':
        is_many, is_few = counts > many, counts < few
    else:
        is_many, is_few = counts >= many, counts <= few
    groups = np.full(counts.shape, 'medium', dtype='<U6')
    groups[is_many] = 'many'
    groups[is_few] = 'few'
    return groups


def shot_group_masks(
    train_counts: Any,
    *,
    many: int = 100,
    few: int = 20,
    rule: ShotRule = 'strict',
) -> dict[str, np.ndarray]:
    """Boolean class masks of the shot groups; see :func:`shot_groups` for the rules.

    Returns:
        ``{'many': (K,) bool, 'medium': (K,) bool, 'few': (K,) bool}``; the masks partition the
        classes.
    """
    groups = shot_groups(train_counts, many=many, few=few, rule=rule)
    return {name: groups == name for name in SHOT_GROUPS}


# --- closed set ----------------------------------------------------------------------------------------------


def topk_accuracy(logits: Any, labels: Any, k: int = 1) -> float | None:
    """Top-k accuracy over the known samples (labels >= 0); unknown samples are ignored.

    Ties are broken towards the lower class index, as ``argmax`` does.

    Args:
        logits: (N, K) scores of the K known classes.
        labels: (N,) class indices, -1 for unknown samples.
        k: how many of the highest-scoring classes count as a hit.

    Returns:
        The fraction of known samples whose class is among the top k, or None if there are no known
        samples.

    Raises:
        ValueError: if ``k`` is not in ``[1, K]`` or the shapes disagree.
    """
    scores = _as_logits(logits)
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(logits=scores, labels=targets)
    K = scores.shape[1]
    if not 1 <= k <= K:
        raise ValueError(f'k: expected 1 <= k <= K = {K}, got {k}')

    known = targets >= 0
    if not known.any():
        return None
    top = _topk_indices(scores[known], k)
    return float((top == targets[known, None]).any(axis=1).mean())


def _topk_indices(logits: np.ndarray, k: int) -> np.ndarray:
    # stable sort of the negated scores: among equal scores the lower index comes first, like argmax
    return np.argsort(-logits, axis=1, kind='stable')[:, :k]


def accuracy(predictions: Any, labels: Any) -> float | None:
    """Micro (per-sample) accuracy over the known samples; a rejected known (prediction -1) counts as wrong.

    Args:
        predictions: (N,) predicted class, -1 for rejected.
        labels: (N,) class indices, -1 for unknown samples (ignored).

    Returns:
        The accuracy, or None if there are no known samples.
    """
    preds = _as_int_1d(predictions, 'predictions')
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(predictions=preds, labels=targets)
    known = targets >= 0
    if not known.any():
        return None
    return float((preds[known] == targets[known]).mean())


def per_class_accuracy(predictions: Any, labels: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of each known class; unknown samples are ignored, rejected knowns count as wrong.

    Args:
        predictions: (N,) predicted class, -1 for rejected.
        labels: (N,) class indices in ``[0, num_classes)``, -1 for unknown samples.
        num_classes: K.

    Returns:
        ``(accuracy, counts)``: (K,) float64 accuracy, NaN for a class with no samples (the only NaN
        this module produces; aggregates skip such classes), and (K,) int64 number of samples per
        class.

    Raises:
        ValueError: a label outside ``[-1, num_classes)``.
    """
    hits, counts = _per_class_hits(predictions, labels, num_classes)
    acc = np.full(num_classes, np.nan)
    np.divide(hits, counts, out=acc, where=counts > 0)
    return acc, counts


def _per_class_hits(predictions: Any, labels: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    preds = _as_int_1d(predictions, 'predictions')
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(predictions=preds, labels=targets)
    _check_label_range(targets, num_classes, allow_unknown=True)

    known = targets >= 0
    counts = np.bincount(targets[known], minlength=num_classes).astype(np.int64)
    hits = np.bincount(targets[known], weights=preds[known] == targets[known], minlength=num_classes)
    return hits.astype(np.int64), counts


def _check_label_range(labels: np.ndarray, num_classes: int, *, allow_unknown: bool) -> None:
    low = -1 if allow_unknown else 0
    bad = labels[(labels < low) | (labels >= num_classes)]
    if bad.size:
        unknown_hint = ', -1 for unknown samples' if allow_unknown else ''
        raise ValueError(f'labels: expected class indices in [0, {num_classes}){unknown_hint}, got {bad[0]}')


def macro_accuracy(predictions: Any, labels: Any, num_classes: int) -> float | None:
    """Mean per-class accuracy over the classes that have samples.

    Returns:
        The macro accuracy, or None if no class has a sample.
    """
    acc, counts = per_class_accuracy(predictions, labels, num_classes)
    return float(acc[counts > 0].mean()) if (counts > 0).any() else None


def shot_group_accuracy(
    predictions: Any,
    labels: Any,
    train_counts: Any,
    *,
    many: int = 100,
    few: int = 20,
    rule: ShotRule = 'strict',
) -> dict[str, GroupAccuracy]:
    """Macro accuracy per shot group (many / medium / few), grouped by training count.

    Pass thresholded predictions (with -1) and known labels to get the paper's "open-set setting"
    accuracies, where a rejected known counts as wrong.

    Args:
        predictions: (N,) predicted class, -1 for rejected.
        labels: (N,) class indices, -1 for unknown samples (ignored).
        train_counts: (K,) training samples per class.
        many: many-shot bound.
        few: few-shot bound.
        rule: ``'strict'`` or ``'inclusive'``; see :func:`shot_groups`.

    Returns:
        ``{'many': GroupAccuracy, 'medium': ..., 'few': ...}``; an empty group has accuracy None and
        ``num_classes`` 0.
    """
    masks = shot_group_masks(train_counts, many=many, few=few, rule=rule)
    hits, counts = _per_class_hits(predictions, labels, len(masks['many']))
    acc = np.divide(hits, np.maximum(counts, 1))

    result = {}
    for name, mask in masks.items():
        evaluated = mask & (counts > 0)
        num_samples = int(counts[mask].sum())
        macro = float(acc[evaluated].mean()) if evaluated.any() else None
        micro = float(hits[mask].sum() / num_samples) if num_samples else None
        result[name] = GroupAccuracy(macro, micro, int(mask.sum()), num_samples)
    return result


# --- open set, at a threshold --------------------------------------------------------------------------------


def open_set_scores(
    logits: Any = None,
    kind: ScoreKind = 'msp',
    *,
    reachability: Any = None,
    min_distance: Any = None,
) -> np.ndarray:
    """Per-sample open-set score, with one sign convention: higher = more likely known.

    Kinds:

    * ``'msp'``: max softmax probability (the paper's score; its threshold is 0.1).
    * ``'max_logit'``: the largest logit.
    * ``'energy'``: ``logsumexp(logits)``, the negative free energy of Liu et al. (NeurIPS 2020) at
      T = 1.
    * ``'reachability'``: the OLTR model's reachability (B,) (reachability scale / distance to the
      nearest centroid, so higher = nearer a centroid); if only ``min_distance`` is given, its
      negation.

    Args:
        logits: (N, K) logits; not needed for ``'reachability'``.
        kind: the score.
        reachability: (N,) reachability, for ``kind='reachability'``.
        min_distance: (N,) distance to the nearest centroid, for ``kind='reachability'``.

    Returns:
        (N,) float64 scores.

    Raises:
        ValueError: an unknown kind, or a missing input for the kind.
    """
    _check_choice('kind', kind, _SCORE_KINDS)
    if kind == 'reachability':
        if reachability is not None:
            return _as_float_1d(reachability, 'reachability')
        if min_distance is not None:
            return -_as_float_1d(min_distance, 'min_distance')
        raise ValueError(
            "kind='reachability' needs reachability or min_distance (an OLTR model's forward_oltr gives both); "
            'a plain classifier supports msp, max_logit and energy'
        )
    if logits is None:
        raise ValueError(f'logits: required for kind={kind!r}')

    x = _as_logits(logits)
    top = x.max(axis=1)
    lse = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
    if kind == 'msp':
        return np.exp(top - lse)
    if kind == 'max_logit':
        return top
    return lse


def apply_threshold(predictions: Any, scores: Any, threshold: float) -> np.ndarray:
    """Reject (set to -1) every prediction whose score is below the threshold.

    Args:
        predictions: (N,) predicted class (for example the argmax of the logits).
        scores: (N,) open-set scores, higher = more likely known.
        threshold: a sample is accepted iff ``score >= threshold`` (the paper rejects
            ``max p < 0.1``).

    Returns:
        (N,) int64 predictions with -1 for rejected samples.
    """
    preds = _as_int_1d(predictions, 'predictions')
    s = _as_float_1d(scores, 'scores')
    _check_same_length(predictions=preds, scores=s)
    return np.where(s >= threshold, preds, -1)


def _f_counts(preds: np.ndarray, targets: np.ndarray, definition: str) -> tuple[int, int, int, int]:
    known = targets >= 0
    unknown = ~known
    tp = int((known & (preds == targets)).sum())
    wrong = known & (preds != targets)
    fp = int(wrong.sum()) if definition == 'corrected' else int((wrong & (preds != -1)).sum())
    fn = int((unknown & (preds != -1)).sum())
    tn = int((unknown & (preds == -1)).sum())
    return tp, fp, fn, tn


def f_measure(predictions: Any, labels: Any, *, definition: FDefinition = 'corrected') -> FMeasure:
    """The OLTR open-set F-measure of thresholded predictions.

    ``TP`` = known samples predicted as their class; ``FN`` = unknown samples accepted as a known
    class; ``FP`` = known samples predicted wrongly, *including* rejected knowns under
    ``'corrected'`` (the official code since Jan 2020) and *excluding* them under ``'paper'`` (the
    definition behind the paper's numbers, which rises with the threshold because rejecting removes
    errors). ``P = TP / (TP + FP)``, ``R = TP / (TP + FN)``, ``F = 2 P R / (P + R)``; each is 0.0
    where its denominator is 0. True negatives (rejected unknowns) enter neither definition. Unlike a
    binary F1 the figure depends on the ratio of unknown to known samples.

    Args:
        predictions: (N,) thresholded predictions, -1 for rejected.
        labels: (N,) class indices, -1 for unknown samples.
        definition: ``'corrected'`` (default) or ``'paper'``.

    Returns:
        The F-measure with its precision, recall and counts.
    """
    _check_choice('definition', definition, _F_DEFINITIONS)
    preds = _as_int_1d(predictions, 'predictions')
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(predictions=preds, labels=targets)

    tp, fp, fn, tn = _f_counts(preds, targets, definition)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f = _ratio(2 * precision * recall, precision + recall)
    return FMeasure(f, precision, recall, tp, fp, fn, tn, definition)


def rejection_rate(predictions: Any, labels: Any) -> float | None:
    """Fraction of unknown samples that were rejected (the official code's "open-set accuracy").

    Args:
        predictions: (N,) thresholded predictions, -1 for rejected.
        labels: (N,) class indices, -1 for unknown samples.

    Returns:
        The fraction, or None if there are no unknown samples.
    """
    preds = _as_int_1d(predictions, 'predictions')
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(predictions=preds, labels=targets)
    unknown = targets < 0
    if not unknown.any():
        return None
    return float((preds[unknown] == -1).mean())


def threshold_sweep(
    scores: Any,
    predictions: Any,
    labels: Any,
    thresholds: Any = None,
    *,
    num_thresholds: int = 101,
    definition: FDefinition = 'corrected',
) -> ThresholdSweep:
    """Open-set F-measure, precision, recall, acceptance and rejection rates over a range of thresholds.

    Args:
        scores: (N,) open-set scores, higher = more likely known.
        predictions: (N,) predictions before thresholding (the argmax of the logits).
        labels: (N,) class indices, -1 for unknown samples.
        thresholds: (T,) thresholds; default ``num_thresholds`` evenly spaced from the lowest to the
            highest score. Sorted ascending.
        num_thresholds: T when ``thresholds`` is None.
        definition: F-measure definition, ``'corrected'`` or ``'paper'``.

    Returns:
        A :class:`ThresholdSweep` of (T,) arrays.
    """
    _check_choice('definition', definition, _F_DEFINITIONS)
    s = _as_float_1d(scores, 'scores')
    preds = _as_int_1d(predictions, 'predictions')
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(scores=s, predictions=preds, labels=targets)
    if thresholds is None:
        if num_thresholds < 1:
            raise ValueError(f'num_thresholds: expected >= 1, got {num_thresholds}')
        low, high = (s.min(), s.max()) if s.size else (0.0, 1.0)
        ts = np.linspace(low, high, num_thresholds)
    else:
        ts = np.sort(_as_float_1d(np.atleast_1d(_to_numpy(thresholds, 'thresholds')), 'thresholds'))

    known = targets >= 0
    unknown = ~known
    correct = known & (preds == targets)
    num_known, num_unknown = int(known.sum()), int(unknown.sum())

    def accepted(mask: np.ndarray) -> np.ndarray:
        # number of samples in mask with score >= t, for every threshold t; O((N + T) log N)
        ranked = np.sort(s[mask])
        return len(ranked) - np.searchsorted(ranked, ts, side='left')

    tp = accepted(correct)
    fn = accepted(unknown)
    if definition == 'corrected':
        fp = num_known - tp  # every known that is not a TP: misclassified or rejected
    else:
        fp = accepted(known & (preds != targets))
    precision = np.array([_ratio(a, a + b) for a, b in zip(tp, fp, strict=True)])
    recall = np.array([_ratio(a, a + b) for a, b in zip(tp, fn, strict=True)])
    f = np.array([_ratio(2 * p * r, p + r) for p, r in zip(precision, recall, strict=True)])

    return ThresholdSweep(
        thresholds=ts,
        f=f,
        precision=precision,
        recall=recall,
        tp=tp.astype(np.int64),
        fp=fp.astype(np.int64),
        fn=fn.astype(np.int64),
        known_acceptance=accepted(known) / max(num_known, 1),
        accuracy=tp / max(num_known, 1),
        rejection_rate=1.0 - fn / num_unknown if num_unknown else None,
        definition=definition,
    )


def choose_threshold(
    scores: Any,
    labels: Any,
    predictions: Any = None,
    *,
    method: Literal['auto', 'tpr', 'f_measure'] = 'auto',
    target_tpr: float = 0.95,
    definition: FDefinition = 'corrected',
) -> float:
    """Choose an open-set threshold on validation data.

    * ``'tpr'``: the largest threshold that still accepts at least ``target_tpr`` of the known
      samples (needs no unknown samples).
    * ``'f_measure'``: the threshold (one of the observed scores) that maximises the F-measure; ties
      go to the lowest such threshold, so as few samples as possible are rejected. Needs unknown
      samples and the predictions.
    * ``'auto'``: ``'f_measure'`` when ``labels`` contain unknown samples (-1), ``'tpr'`` otherwise.

    Store the result in the model's config (``open_set_threshold``) with the score kind it was
    chosen for, so a reloaded model makes the same decisions.

    Args:
        scores: (N,) validation open-set scores, higher = more likely known.
        labels: (N,) class indices, -1 for unknown (open validation) samples.
        predictions: (N,) predictions before thresholding; required for ``'f_measure'``.
        method: ``'auto'``, ``'tpr'`` or ``'f_measure'``.
        target_tpr: fraction of known samples to keep accepted, in (0, 1], for ``'tpr'``.
        definition: F-measure definition for ``'f_measure'``.

    Returns:
        The threshold; a sample is accepted iff ``score >= threshold``.

    Raises:
        ValueError: no known samples, ``target_tpr`` outside (0, 1], or ``'f_measure'`` without
            unknown samples or predictions.
    """
    _check_choice('method', method, ('auto', 'tpr', 'f_measure'))
    s = _as_float_1d(scores, 'scores')
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(scores=s, labels=targets)
    known = targets >= 0
    if not known.any():
        raise ValueError('labels: choosing a threshold needs known samples (labels >= 0), got only -1')
    has_unknown = bool((~known).any())
    if method == 'auto':
        method = 'f_measure' if has_unknown else 'tpr'

    if method == 'tpr':
        if not 0.0 < target_tpr <= 1.0:
            raise ValueError(f'target_tpr: expected a fraction in (0, 1], got {target_tpr}')
        ranked = np.sort(s[known])[::-1]
        keep = max(1, math.ceil(target_tpr * len(ranked) - 1e-9))
        return float(ranked[keep - 1])

    if not has_unknown:
        raise ValueError("method='f_measure' needs unknown validation samples (label -1); use method='tpr'")
    if predictions is None:
        raise ValueError("predictions: required for method='f_measure' (the argmax of the validation logits)")
    sweep = threshold_sweep(s, predictions, targets, np.unique(s), definition=definition)
    return float(sweep.thresholds[int(np.argmax(sweep.f))])


# --- open set, threshold-free --------------------------------------------------------------------------------


def undefined_reason(labels: Any) -> str | None:
    """Why the threshold-free open-set metrics are undefined for these labels, or None if they are defined.

    AUROC, AUPR-in/out, FPR at 95% TPR and OSCR compare known (label >= 0) with unknown (label -1)
    samples, so they need at least one of each.
    """
    targets = _as_int_1d(labels, 'labels')
    num_unknown = int((targets < 0).sum())
    if targets.size == 0:
        return 'no samples'
    if num_unknown == 0:
        return 'no unknown samples (label -1): pass open-set data to compare known with unknown'
    if num_unknown == targets.size:
        return 'no known samples: every label is -1'
    return None


def _binary(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray] | None:
    s = _as_float_1d(scores, 'scores')
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(scores=s, labels=targets)
    reason = undefined_reason(targets)
    if reason is not None:
        _logger.debug('threshold-free open-set metric undefined: %s', reason)
        return None
    return s, (targets >= 0).astype(np.int64)


def auroc(scores: Any, labels: Any) -> float | None:
    """Area under the ROC curve of known (positive) vs unknown samples, scores higher = known.

    Args:
        scores: (N,) open-set scores.
        labels: (N,) class indices, -1 for unknown samples.

    Returns:
        The AUROC (0.5 = chance, 1.0 = every known scores above every unknown), or None without both
        known and unknown samples (see :func:`undefined_reason`).
    """
    data = _binary(scores, labels)
    if data is None:
        return None
    s, is_known = data
    return float(roc_auc_score(is_known, s))


def aupr_in(scores: Any, labels: Any) -> float | None:
    """Average precision with the *known* samples as the positive class, scores higher = known.

    Returns:
        The AUPR-in, or None without both known and unknown samples.
    """
    data = _binary(scores, labels)
    if data is None:
        return None
    s, is_known = data
    return float(average_precision_score(is_known, s))


def aupr_out(scores: Any, labels: Any) -> float | None:
    """Average precision with the *unknown* samples as the positive class, ranked by the negated scores.

    Returns:
        The AUPR-out, or None without both known and unknown samples.
    """
    data = _binary(scores, labels)
    if data is None:
        return None
    s, is_known = data
    return float(average_precision_score(1 - is_known, -s))


def fpr_at_tpr(scores: Any, labels: Any, tpr: float = 0.95) -> float | None:
    """Fraction of unknown samples accepted at the highest threshold that accepts ``tpr`` of the knowns.

    Args:
        scores: (N,) open-set scores, higher = more likely known.
        labels: (N,) class indices, -1 for unknown samples.
        tpr: the true positive rate (knowns accepted) to reach, in (0, 1]; 0.95 is the usual FPR@95.

    Returns:
        The false positive rate, or None without both known and unknown samples.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f'tpr: expected a fraction in (0, 1], got {tpr}')
    data = _binary(scores, labels)
    if data is None:
        return None
    s, is_known = data
    fpr_curve, tpr_curve, _ = roc_curve(is_known, s, drop_intermediate=False)
    index = int(np.searchsorted(tpr_curve, tpr - 1e-12, side='left'))
    return float(fpr_curve[min(index, len(fpr_curve) - 1)])


def oscr(scores: Any, predictions: Any, labels: Any) -> float | None:
    """Open-set classification rate: area under the curve of CCR against FPR as the threshold falls.

    ``CCR(t)`` = fraction of known samples that are accepted (``score >= t``) *and* correctly
    classified; ``FPR(t)`` = fraction of unknown samples accepted. The curve runs from (0, 0) to
    (1, closed-set accuracy) and is integrated with the trapezoid rule, tied scores forming one step.
    With every known sample correct it equals the AUROC.

    Args:
        scores: (N,) open-set scores, higher = more likely known.
        predictions: (N,) predictions before thresholding.
        labels: (N,) class indices, -1 for unknown samples.

    Returns:
        The OSCR in [0, 1], or None without both known and unknown samples.
    """
    data = _binary(scores, labels)
    if data is None:
        return None
    s, is_known = data
    preds = _as_int_1d(predictions, 'predictions')
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(scores=s, predictions=preds)

    correct = ((preds == targets) & (targets >= 0)).astype(np.float64)
    # the ROC machinery with weights: positives = correct knowns, negatives = unknowns, wrong knowns ignored
    order = np.argsort(-s, kind='stable')
    s_sorted = s[order]
    last_of_tie = np.r_[np.diff(s_sorted) != 0, True]
    ccr = np.cumsum(correct[order])[last_of_tie] / is_known.sum()
    fpr = np.cumsum(1 - is_known[order])[last_of_tie] / (1 - is_known).sum()
    ccr, fpr = np.r_[0.0, ccr], np.r_[0.0, fpr]
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))  # trapezoid rule


def auroc_by_shot_group(
    scores: Any,
    labels: Any,
    train_counts: Any,
    *,
    many: int = 100,
    few: int = 20,
    rule: ShotRule = 'strict',
) -> dict[str, float | None]:
    """AUROC of the known samples of each shot group against all unknown samples.

    A low few-shot AUROC means tail classes are the ones taken for unknown.

    Args:
        scores: (N,) open-set scores, higher = more likely known.
        labels: (N,) class indices, -1 for unknown samples.
        train_counts: (K,) training samples per class.
        many: many-shot bound.
        few: few-shot bound.
        rule: ``'strict'`` or ``'inclusive'``; see :func:`shot_groups`.

    Returns:
        ``{'many': auroc, 'medium': ..., 'few': ...}``, None for a group without known samples or
        when there are no unknown samples.
    """
    s = _as_float_1d(scores, 'scores')
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(scores=s, labels=targets)
    groups = shot_groups(train_counts, many=many, few=few, rule=rule)
    _check_label_range(targets, len(groups), allow_unknown=True)

    unknown = targets < 0
    result: dict[str, float | None] = {}
    for name in SHOT_GROUPS:
        in_group = np.zeros_like(unknown)
        in_group[~unknown] = groups[targets[~unknown]] == name
        keep = in_group | unknown
        result[name] = auroc(s[keep], targets[keep])
    return result
