"""Evaluation of open long-tailed recognition: one pass over the data, one report.

Implements the protocol of OLTR (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World",
CVPR 2019, arXiv:1904.05160): closed-set accuracy overall and per shot group (many / medium / few by
training count), the same accuracies in the open-set setting (after thresholding, a rejected known
counts as wrong), the open-set F-measure (corrected definition by default), the rejection rate of
unknown samples, and the threshold-free open-set metrics (AUROC, AUPR-in/out, FPR at 95% TPR, OSCR).
The metric functions and their conventions live in :mod:`timm_oltr.metrics`; scores are always
higher = more likely known.

:func:`evaluate` runs an OLTR model or any plain timm classifier; :func:`compute_report` builds the
same report from logits (and labels) collected elsewhere; :func:`calibrate_threshold` chooses the
open-set threshold on validation data and stores it in an OLTR model's config.

Shape letters: N samples, B batch, K known classes.
"""

import contextlib
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .metrics import (
    SHOT_GROUPS,
    FDefinition,
    FMeasure,
    GroupAccuracy,
    ShotRule,
    ThresholdSweep,
    _as_float_1d,
    _as_int_1d,
    _as_logits,
    _check_choice,
    _check_label_range,
    _check_same_length,
    _topk_indices,
    accuracy,
    apply_threshold,
    aupr_in,
    aupr_out,
    auroc,
    auroc_by_shot_group,
    choose_threshold,
    f_measure,
    fpr_at_tpr,
    macro_accuracy,
    open_set_scores,
    oscr,
    per_class_accuracy,
    rejection_rate,
    shot_group_accuracy,
    shot_groups,
    threshold_sweep,
    undefined_reason,
)

__all__ = ['OLTRReport', 'calibrate_threshold', 'compute_report', 'evaluate']

_logger = logging.getLogger(__name__)

_PAPER_SCORE = 'msp'
_PAPER_THRESHOLD = 0.1
_LOGIT_SCORES = ('msp', 'max_logit', 'energy')
_THRESHOLD_FREE = ('auroc', 'aupr_in', 'aupr_out', 'fpr_at_95_tpr', 'oscr')


@dataclass
class OLTRReport:
    """Every figure of one evaluation, the conventions behind them, and the raw arrays for plots.

    Fractions are in [0, 1]; an undefined figure is None (never NaN), with the reason in
    ``undefined`` for the threshold-free metrics.

    Attributes:
        split: name of the evaluated split (``'val'``, ``'test'``, ...).
        num_classes: K.
        num_known: number of known samples (label >= 0).
        num_unknown: number of unknown samples (label -1).
        score: open-set score kind (``'msp'``, ``'max_logit'``, ``'energy'``, ``'reachability'``, or
            the name given with custom scores); higher = more likely known.
        threshold: open-set threshold; a sample is accepted iff ``score >= threshold``.
        f_definition: ``'corrected'`` (rejected knowns are false positives) or ``'paper'``.
        shot_rule: ``'strict'`` (many > ``many``, few < ``few``) or ``'inclusive'`` (>=, <=).
        many: many-shot bound on the training count.
        few: few-shot bound on the training count.
        top1: closed-set top-1 accuracy over known samples (micro).
        top5: closed-set top-5 accuracy, None when K < 5.
        macro: closed-set mean per-class accuracy.
        groups: closed-set accuracy per shot group, None without training counts.
        open_top1: top-1 accuracy of known samples after thresholding (the paper's open-set
            "overall").
        open_macro: mean per-class accuracy after thresholding.
        open_groups: per shot group after thresholding, None without training counts.
        f_measure: the open-set F-measure with P, R, TP, FP, FN, TN.
        rejection_rate: fraction of unknown samples rejected, None without unknown samples.
        auroc: AUROC, known samples positive.
        aupr_in: average precision, known samples positive.
        aupr_out: average precision, unknown samples positive, scores negated.
        fpr_at_95_tpr: fraction of unknown samples accepted when 95% of the known are.
        oscr: open-set classification rate (area under correct-classification rate vs FPR).
        auroc_by_group: AUROC of each shot group's known samples against all unknown samples.
        undefined: threshold-free metric name -> why it is None.
        per_class_accuracy: (K,) closed-set accuracy per class, NaN for a class without test samples
            (None in ``to_dict``).
        per_class_count: (K,) test samples per class.
        train_counts: (K,) training samples per class, or None.
        sweep: open-set figures over a range of thresholds.
        scores: (N,) open-set scores (raw; in ``to_dict`` only with ``include_arrays=True``).
        labels: (N,) labels, -1 for unknown samples (raw).
        predictions: (N,) argmax predictions before thresholding (raw).
    """

    split: str
    num_classes: int
    num_known: int
    num_unknown: int
    score: str
    threshold: float
    f_definition: str
    shot_rule: str
    many: int
    few: int
    top1: float | None
    top5: float | None
    macro: float | None
    groups: dict[str, GroupAccuracy] | None
    open_top1: float | None
    open_macro: float | None
    open_groups: dict[str, GroupAccuracy] | None
    f_measure: FMeasure
    rejection_rate: float | None
    auroc: float | None
    aupr_in: float | None
    aupr_out: float | None
    fpr_at_95_tpr: float | None
    oscr: float | None
    auroc_by_group: dict[str, float | None] | None
    undefined: dict[str, str]
    per_class_accuracy: np.ndarray = field(repr=False)
    per_class_count: np.ndarray = field(repr=False)
    train_counts: np.ndarray | None = field(repr=False)
    sweep: ThresholdSweep = field(repr=False)
    scores: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    predictions: np.ndarray = field(repr=False)

    @property
    def class_groups(self) -> np.ndarray | None:
        """(K,) shot group of each class (``'many'``, ``'medium'``, ``'few'``), or None without train counts."""
        if self.train_counts is None:
            return None
        return shot_groups(self.train_counts, many=self.many, few=self.few, rule=self.shot_rule)

    def to_dict(self, include_arrays: bool = False) -> dict[str, Any]:
        """JSON-ready nested dict: plain Python numbers, lists and None (never NaN or numpy types).

        Args:
            include_arrays: also include the raw (N,) ``scores``, ``labels`` and ``predictions``.
        """
        groups = self.class_groups
        d = {
            'split': self.split,
            'num_classes': self.num_classes,
            'num_known': self.num_known,
            'num_unknown': self.num_unknown,
            'conventions': {
                'shot_rule': self.shot_rule,
                'many': self.many,
                'few': self.few,
                'score': self.score,
                'score_sign': 'higher = more likely known',
                'threshold': self.threshold,
                'accept': 'score >= threshold',
                'f_definition': self.f_definition,
            },
            'closed_set': {'top1': self.top1, 'top5': self.top5, 'macro': self.macro, 'groups': self.groups},
            'open_set': {
                'top1': self.open_top1,
                'macro': self.open_macro,
                'groups': self.open_groups,
                'f_measure': self.f_measure,
                'rejection_rate': self.rejection_rate,
                'auroc': self.auroc,
                'aupr_in': self.aupr_in,
                'aupr_out': self.aupr_out,
                'fpr_at_95_tpr': self.fpr_at_95_tpr,
                'oscr': self.oscr,
                'auroc_by_group': self.auroc_by_group,
                'undefined': self.undefined,
            },
            'per_class': {
                'accuracy': self.per_class_accuracy,
                'num_test_samples': self.per_class_count,
                'train_counts': self.train_counts,
                'group': groups,
            },
            'sweep': self.sweep,
        }
        if include_arrays:
            d['arrays'] = {'scores': self.scores, 'labels': self.labels, 'predictions': self.predictions}
        return _jsonable(d)

    def __str__(self) -> str:
        return _format_report(self)


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple) and hasattr(x, '_asdict'):  # NamedTuple
        return {k: _jsonable(v) for k, v in x._asdict().items()}
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _pct(x: float | None, width: int = 9) -> str:
    return f'{"-" if x is None else f"{100 * x:.2f}":>{width}}'


def _format_report(r: OLTRReport) -> str:
    bounds = ('>', '<') if r.shot_rule == 'strict' else ('>=', '<=')
    lines = [
        f"OLTR evaluation, split '{r.split}': {r.num_classes} classes, "
        f'{r.num_known} known + {r.num_unknown} unknown samples',
        f'shot groups: {r.shot_rule} (many {bounds[0]} {r.many}, few {bounds[1]} {r.few} training samples); '
        f"open set: score '{r.score}' (higher = known), accept score >= {r.threshold:.4g}, "
        f'F-measure {r.f_definition}',
        '',
        f'{"accuracy (%)":<24}' + ''.join(f'{name:>9}' for name in (*SHOT_GROUPS, 'overall')),
    ]
    if r.groups is not None:
        lines.append(
            f'{"classes":<24}' + ''.join(f'{r.groups[g].num_classes:>9}' for g in SHOT_GROUPS) + f'{r.num_classes:>9}'
        )

    def row(title: str, groups: dict[str, GroupAccuracy] | None, attr: str, overall: float | None) -> str:
        cells = [getattr(groups[g], attr) if groups is not None else None for g in SHOT_GROUPS]
        return f'{title:<24}' + ''.join(_pct(c) for c in cells) + _pct(overall)

    lines += [
        row('closed-set macro', r.groups, 'accuracy', r.macro),
        row('closed-set micro', r.groups, 'micro', r.top1),
        row('open-set macro', r.open_groups, 'accuracy', r.open_macro),
        row('open-set micro', r.open_groups, 'micro', r.open_top1),
        f'{"closed-set top-5":<24}' + ' ' * 27 + _pct(r.top5),
        '',
    ]
    fm = r.f_measure
    lines.append(
        f'open set (%): F {_pct(fm.f, 0)}  P {_pct(fm.precision, 0)}  R {_pct(fm.recall, 0)}  '
        f'TP {fm.tp}  FP {fm.fp}  FN {fm.fn}  TN {fm.tn}  rejection rate {_pct(r.rejection_rate, 0)}'
    )
    lines.append(
        f'threshold-free (%): AUROC {_pct(r.auroc, 0)}  AUPR-in {_pct(r.aupr_in, 0)}  '
        f'AUPR-out {_pct(r.aupr_out, 0)}  FPR@95TPR {_pct(r.fpr_at_95_tpr, 0)}  OSCR {_pct(r.oscr, 0)}'
    )
    if r.auroc_by_group is not None:
        lines.append(
            'AUROC by shot group (%): ' + '  '.join(f'{g} {_pct(r.auroc_by_group[g], 0)}' for g in SHOT_GROUPS)
        )
    reasons = sorted(set(r.undefined.values()))
    if reasons:
        lines.append('threshold-free metrics undefined: ' + '; '.join(reasons))
    return '\n'.join(lines)


def _resolve_threshold(score: str, threshold: float | None, default_score: str, default_threshold: float) -> float:
    if threshold is None:
        if score != default_score:
            raise ValueError(
                f'threshold: required for score={score!r}; the default threshold {default_threshold} applies to '
                f'{default_score!r}. Choose one on validation data with timm_oltr.choose_threshold.'
            )
        threshold = default_threshold
    if not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise ValueError(f'threshold: expected a finite number, got {threshold!r}')
    return float(threshold)


def _sweep_thresholds(scores: np.ndarray, score: str) -> np.ndarray:
    if score == 'msp':
        return np.linspace(0.0, 1.0, 101)
    if scores.size == 0:
        return np.zeros(1)
    return np.linspace(scores.min(), scores.max(), 101)


def _build_report(
    predictions: np.ndarray,
    top5: np.ndarray | None,
    scores: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    score: str,
    threshold: float,
    train_counts: Any,
    split: str,
    shot_rule: ShotRule,
    many: int,
    few: int,
    f_definition: FDefinition,
) -> OLTRReport:
    _check_choice('shot_rule', shot_rule, ('strict', 'inclusive'))
    _check_choice('f_definition', f_definition, ('corrected', 'paper'))
    if not isinstance(split, str) or not split:
        raise ValueError(f"split: expected a non-empty name such as 'val' or 'test', got {split!r}")
    _check_same_length(predictions=predictions, scores=scores, labels=labels)
    _check_label_range(labels, num_classes, allow_unknown=True)
    counts = None
    if train_counts is not None:
        counts = _as_int_1d(train_counts, 'train_counts')
        if len(counts) != num_classes:
            raise ValueError(f'train_counts: expected {num_classes} counts (one per class), got {len(counts)}')

    known = labels >= 0
    thresholded = apply_threshold(predictions, scores, threshold)
    group_kw = {'many': many, 'few': few, 'rule': shot_rule}

    def groups_of(preds: np.ndarray) -> dict[str, GroupAccuracy] | None:
        return None if counts is None else shot_group_accuracy(preds, labels, counts, **group_kw)

    top5_acc = None
    if top5 is not None and known.any():
        top5_acc = float((top5[known] == labels[known, None]).any(axis=1).mean())
    acc, per_class_count = per_class_accuracy(predictions, labels, num_classes)

    reason = undefined_reason(labels)
    undefined = {name: reason for name in _THRESHOLD_FREE} if reason is not None else {}
    return OLTRReport(
        split=split,
        num_classes=num_classes,
        num_known=int(known.sum()),
        num_unknown=int((~known).sum()),
        score=score,
        threshold=threshold,
        f_definition=f_definition,
        shot_rule=shot_rule,
        many=many,
        few=few,
        top1=accuracy(predictions, labels),
        top5=top5_acc,
        macro=macro_accuracy(predictions, labels, num_classes),
        groups=groups_of(predictions),
        open_top1=accuracy(thresholded, labels),
        open_macro=macro_accuracy(thresholded, labels, num_classes),
        open_groups=groups_of(thresholded),
        f_measure=f_measure(thresholded, labels, definition=f_definition),
        rejection_rate=rejection_rate(thresholded, labels),
        auroc=auroc(scores, labels),
        aupr_in=aupr_in(scores, labels),
        aupr_out=aupr_out(scores, labels),
        fpr_at_95_tpr=fpr_at_tpr(scores, labels, 0.95),
        oscr=oscr(scores, predictions, labels),
        auroc_by_group=None if counts is None else auroc_by_shot_group(scores, labels, counts, **group_kw),
        undefined=undefined,
        per_class_accuracy=acc,
        per_class_count=per_class_count,
        train_counts=counts,
        sweep=threshold_sweep(scores, predictions, labels, _sweep_thresholds(scores, score), definition=f_definition),
        scores=scores,
        labels=labels,
        predictions=predictions,
    )


def compute_report(
    logits: Any,
    labels: Any,
    *,
    scores: Any = None,
    score: str = 'msp',
    reachability: Any = None,
    min_distance: Any = None,
    threshold: float | None = None,
    train_counts: Any = None,
    split: str = 'test',
    shot_rule: ShotRule = 'strict',
    many: int = 100,
    few: int = 20,
    f_definition: FDefinition = 'corrected',
) -> OLTRReport:
    """Build an :class:`OLTRReport` from outputs collected elsewhere (no model needed).

    Args:
        logits: (N, K) logits of known and unknown samples.
        labels: (N,) class indices in ``[0, K)``, -1 for unknown samples.
        scores: (N,) open-set scores, higher = more likely known; computed from the inputs by
            :func:`timm_oltr.metrics.open_set_scores` with kind ``score`` when None.
        score: score kind (``'msp'``, ``'max_logit'``, ``'energy'``, ``'reachability'``); with
            custom ``scores`` any name, recorded in the report.
        reachability: (N,) reachability, for ``score='reachability'``.
        min_distance: (N,) nearest-centroid distance, for ``score='reachability'``.
        threshold: open-set threshold (accept iff ``score >= threshold``); defaults to the paper's
            0.1 only for ``score='msp'``.
        train_counts: (K,) training samples per class, for the shot groups; None skips them.
        split: name of the evaluated split, recorded in the report.
        shot_rule: ``'strict'`` (default) or ``'inclusive'``; see
            :func:`timm_oltr.metrics.shot_groups`.
        many: many-shot bound.
        few: few-shot bound.
        f_definition: ``'corrected'`` (default) or ``'paper'``.

    Returns:
        The report.

    Raises:
        ValueError: mismatched shapes, labels outside ``[-1, K)``, or a missing threshold for a
            non-msp score.
    """
    x = _as_logits(logits)
    targets = _as_int_1d(labels, 'labels')
    _check_same_length(logits=x, labels=targets)
    if scores is None:
        s = open_set_scores(x, score, reachability=reachability, min_distance=min_distance)
    else:
        s = _as_float_1d(scores, 'scores')
    threshold = _resolve_threshold(score, threshold, _PAPER_SCORE, _PAPER_THRESHOLD)
    K = x.shape[1]

    return _build_report(
        x.argmax(axis=1),
        _topk_indices(x, 5) if K >= 5 else None,
        s,
        targets,
        K,
        score=score,
        threshold=threshold,
        train_counts=train_counts,
        split=split,
        shot_rule=shot_rule,
        many=many,
        few=few,
        f_definition=f_definition,
    )


def _unpack(batch: Any, known: bool) -> tuple[torch.Tensor, Any]:
    """(images, labels) from a tuple/list batch or a dict with 'image' and 'label'; labels None if absent."""
    if isinstance(batch, torch.Tensor):
        if known:
            raise TypeError('loader: a batch is a bare tensor; known samples need (images, labels) batches')
        return batch, None
    if isinstance(batch, Mapping):
        if 'image' not in batch or (known and 'label' not in batch):
            raise TypeError(f"loader: dict batches need 'image' and 'label' keys, got {sorted(batch)}")
        return batch['image'], batch.get('label')
    if isinstance(batch, list | tuple) and len(batch) >= (2 if known else 1):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise TypeError(
        f"loader: expected (images, labels) batches or dicts with 'image'/'label' keys, got {type(batch).__name__}"
    )


def _labels_of(labels: Any, batch_size: int, num_classes: int) -> np.ndarray:
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    if y.ndim != 1 or y.shape[0] != batch_size or y.is_floating_point() or y.is_complex():
        raise ValueError(
            f'labels: expected integer class indices of shape ({batch_size},), got {y.dtype} {tuple(y.shape)}; '
            'soft targets are for training only'
        )
    y = y.cpu().numpy().astype(np.int64)
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.size:
        raise ValueError(
            f'labels: known samples need class indices in [0, {num_classes}), got {bad[0]}; '
            'pass unknown (open-set) samples through open_loader'
        )
    return y


def _model_defaults(module: nn.Module, is_oltr: bool) -> tuple[str, float]:
    config = getattr(module, 'config', None) if is_oltr else None
    if config is None:
        return _PAPER_SCORE, _PAPER_THRESHOLD
    return config.open_set_score, config.open_set_threshold


def _model_train_counts(module: nn.Module) -> torch.Tensor | None:
    head = getattr(module, 'head', None)
    counts = getattr(head, 'class_counts', None)
    initialized = getattr(head, 'initialized', None)
    if counts is None or initialized is None or not bool(initialized) or int(counts.sum()) == 0:
        return None
    return counts


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    train_counts: Any = None,
    open_loader: Iterable | None = None,
    split: str = 'test',
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    threshold: float | None = None,
    score: str | None = None,
    shot_rule: ShotRule = 'strict',
    many: int = 100,
    few: int = 20,
    f_definition: FDefinition = 'corrected',
    progress: bool = True,
) -> OLTRReport:
    """Evaluate a model on known (and optionally unknown) data in one pass, without gradients.

    Works for an OLTR model (anything with ``forward_oltr``; DDP-wrapped models are unwrapped) and
    for a plain timm classifier, whose logits give the ``'msp'``, ``'max_logit'`` and ``'energy'``
    scores. The model is put in eval mode and every submodule's mode is restored afterwards.

    Example:
        >>> report = timm_oltr.evaluate(model, test_loader, open_loader=open_loader)
        >>> print(report)
        >>> json.dumps(report.to_dict())

    Args:
        model: an OLTR model or a timm classifier returning (B, K) logits.
        loader: known samples; batches ``(images, labels, ...)`` or dicts with ``'image'`` and
            ``'label'``. Labels must be in ``[0, K)``.
        train_counts: (K,) training samples per class for the shot groups; default the OLTR head's
            recorded ``class_counts`` when its centroids were initialised, else no shot groups.
        open_loader: unknown samples (their labels, if any, are ignored and set to -1).
        split: name of the evaluated split, recorded in the report.
        device: where to run; default the device of the model's parameters.
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); metrics are computed in float64 either way.
        threshold: open-set threshold (accept iff ``score >= threshold``); default the OLTR config's
            ``open_set_threshold`` (0.1 for a plain model) when ``score`` is the configured kind.
        score: open-set score kind; default the OLTR config's ``open_set_score`` (``'msp'`` for a
            plain model).
        shot_rule: ``'strict'`` (default) or ``'inclusive'``; see
            :func:`timm_oltr.metrics.shot_groups`.
        many: many-shot bound.
        few: few-shot bound.
        f_definition: ``'corrected'`` (default) or ``'paper'``.
        progress: show a progress bar.

    Returns:
        The report.

    Raises:
        ValueError: labels outside ``[0, K)``, an empty loader, ``score='reachability'`` on a plain
            model, or a missing threshold for a score other than the configured one.
        TypeError: batches of an unsupported form, or a model that does not return a logits tensor.
    """
    module = getattr(model, 'module', model)
    is_oltr = callable(getattr(module, 'forward_oltr', None))
    default_score, default_threshold = _model_defaults(module, is_oltr)
    score = default_score if score is None else score
    if score == 'reachability' and not is_oltr:
        raise ValueError(
            "score: 'reachability' needs an OLTR model (one with forward_oltr); a plain classifier supports "
            f'{list(_LOGIT_SCORES)}'
        )
    _check_choice('score', score, (*_LOGIT_SCORES, 'reachability'))
    threshold = _resolve_threshold(score, threshold, default_score, default_threshold)
    if train_counts is None and is_oltr:
        train_counts = _model_train_counts(module)
    predictions, top5, scores, labels, num_classes = _collect(
        module,
        loader,
        open_loader,
        (score,),
        is_oltr=is_oltr,
        device=device,
        autocast_dtype=autocast_dtype,
        split=split,
        progress=progress,
    )
    if isinstance(train_counts, torch.Tensor):
        train_counts = train_counts.cpu()
    return _build_report(
        predictions,
        top5,
        scores[score],
        labels,
        num_classes,
        score=score,
        threshold=threshold,
        train_counts=train_counts,
        split=split,
        shot_rule=shot_rule,
        many=many,
        few=few,
        f_definition=f_definition,
    )


@torch.no_grad()
def _collect(
    module: nn.Module,
    loader: Iterable,
    open_loader: Iterable | None,
    kinds: tuple[str, ...],
    *,
    is_oltr: bool,
    device: torch.device | str | None,
    autocast_dtype: torch.dtype | None,
    split: str,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray], np.ndarray, int]:
    """One pass in eval mode: predictions, top-5, open-set scores of each kind, labels (-1 unknown), K."""
    if device is None:
        device = next(iter(module.parameters()), torch.empty(0)).device
    device = torch.device(device)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    outputs: dict[str, list[np.ndarray]] = {'predictions': [], 'top5': [], 'labels': []}
    scores: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}
    num_classes = None
    try:
        for data, known in ((loader, True), (open_loader, False)):
            if data is None:
                continue
            desc = f'{split}' if known else f'{split} (open set)'
            for batch in tqdm(data, desc=desc, unit='batch', disable=not progress, leave=False):
                images, labels = _unpack(batch, known)
                logits, reachability, min_distance = _forward(
                    module, images.to(device, non_blocking=True), is_oltr, autocast_dtype
                )
                B, K = logits.shape
                if num_classes is None:
                    num_classes = K
                elif K != num_classes:
                    raise ValueError(f'model: logits width changed between batches, {num_classes} then {K}')

                y = _labels_of(labels, B, K) if known else np.full(B, -1, dtype=np.int64)
                x = logits.numpy().astype(np.float64)
                outputs['predictions'].append(x.argmax(axis=1))
                outputs['top5'].append(_topk_indices(x, 5) if K >= 5 else np.zeros((B, 0), dtype=np.int64))
                for kind in kinds:
                    scores[kind].append(open_set_scores(x, kind, reachability=reachability, min_distance=min_distance))
                outputs['labels'].append(y)
    finally:
        for m, mode in modes.items():
            m.training = mode

    if num_classes is None:
        raise ValueError('loader: yielded no batches; nothing to evaluate')
    top5 = np.concatenate(outputs['top5']) if num_classes >= 5 else None
    return (
        np.concatenate(outputs['predictions']),
        top5,
        {kind: np.concatenate(values) for kind, values in scores.items()},
        np.concatenate(outputs['labels']),
        num_classes,
    )


def _forward(
    module: nn.Module, images: torch.Tensor, is_oltr: bool, autocast_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(B, K) float32 CPU logits, and (B,) reachability and min distance for an OLTR model."""
    if autocast_dtype is None:
        ctx = contextlib.nullcontext()
    else:
        ctx = torch.autocast(device_type=images.device.type, dtype=autocast_dtype)
    reachability = min_distance = None
    with ctx:
        if is_oltr:
            out = module.forward_oltr(images)
            logits, reachability, min_distance = out.logits, out.reachability, out.min_distance
        else:
            logits = module(images)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f'model: expected (B, K) logits from the forward pass, got {got}')
    if reachability is not None:
        reachability = reachability.float().cpu()
    if min_distance is not None:
        min_distance = min_distance.float().cpu()
    return logits.float().cpu(), reachability, min_distance


class Calibration(NamedTuple):
    """Open-set score kind and threshold chosen on validation data."""

    score: str
    threshold: float
    aurocs: dict[str, float]


def calibrate_threshold(
    model: nn.Module,
    loader: Iterable,
    *,
    open_loader: Iterable | None = None,
    score: str | None = None,
    method: Literal['auto', 'tpr', 'f_measure'] = 'auto',
    target_tpr: float = 0.95,
    f_definition: FDefinition = 'corrected',
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Calibration:
    """Choose the open-set score and threshold on validation data and store them in the OLTR model's config.

    Runs :func:`evaluate` on the validation split and picks the threshold with
    :func:`timm_oltr.metrics.choose_threshold`: the best F-measure when ``open_loader`` gives
    unknown samples, else the threshold that keeps ``target_tpr`` of the known samples. The model's
    config then holds the score kind and threshold (``open_set_score``, ``open_set_threshold``), so
    a saved and reloaded model makes
    the same decisions. A plain timm model has no config: the threshold is only returned.

    Args:
        model: an OLTR model (or a plain timm classifier).
        loader: known validation samples.
        open_loader: unknown validation samples, optional.
        score: score kind; default the config's (``'msp'`` for a plain model). ``'auto'`` picks, among the
            scores the model supports, the one with the best AUROC on the validation data (needs
            ``open_loader``); for OLTR models that is often ``'reachability'``.
        method: ``'auto'``, ``'tpr'`` or ``'f_measure'``; see
            :func:`timm_oltr.metrics.choose_threshold`.
        target_tpr: fraction of known samples to keep accepted for ``'tpr'``.
        f_definition: F-measure definition for ``'f_measure'``.
        device: where to run.
        autocast_dtype: autocast dtype for the forward pass.
        progress: show a progress bar.

    Returns:
        ``Calibration(score, threshold, aurocs)``: the score kind, the threshold, and the validation AUROC of
        each score kind compared (only with ``score='auto'``).
    """
    module = getattr(model, 'module', model)
    is_oltr = callable(getattr(module, 'forward_oltr', None))
    available = (*_LOGIT_SCORES, 'reachability') if is_oltr else _LOGIT_SCORES
    if score is None:
        score = _model_defaults(module, is_oltr)[0]
    elif score != 'auto':
        _check_choice('score', score, available)
    kinds = available if score == 'auto' else (score,)
    predictions, _, scores, labels, _ = _collect(
        module,
        loader,
        open_loader,
        kinds,
        is_oltr=is_oltr,
        device=device,
        autocast_dtype=autocast_dtype,
        split='val',
        progress=progress,
    )
    aurocs = {}
    if score == 'auto':
        if not (labels < 0).any():
            raise ValueError("score='auto' picks the score by validation AUROC and needs open_loader (unknowns).")
        aurocs = {kind: auroc(scores[kind], labels) or 0.0 for kind in kinds}
        score = max(aurocs, key=aurocs.get)
        _logger.info('open-set score %r chosen by validation AUROC: %s', score, _fmt_aurocs(aurocs))
    threshold = choose_threshold(
        scores[score],
        labels,
        predictions,
        method=method,
        target_tpr=target_tpr,
        definition=f_definition,
    )

    config = getattr(module, 'config', None) if is_oltr else None
    if config is not None:
        module.config = config.replace(open_set_score=score, open_set_threshold=threshold)
        _logger.info('open-set threshold set to %.6g on %r scores', threshold, score)
    return Calibration(score, threshold, aurocs)


def _fmt_aurocs(aurocs: Mapping[str, float]) -> str:
    return ', '.join(f'{kind} {value:.4f}' for kind, value in aurocs.items())
