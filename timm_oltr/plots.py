"""Figures for an open long-tailed recognition report (OLTR, Liu et al., CVPR 2019, arXiv:1904.05160).

* :func:`per_class_accuracy`: accuracy of each class against its training count (log x), with the
  shot-group boundaries, the paper's view of the long tail;
* :func:`open_set_roc`: ROC of known (positive) against unknown samples;
* :func:`f_measure_curve`: open-set F-measure, precision and recall against the threshold.

Each takes an :class:`timm_oltr.evaluation.OLTRReport`, returns a matplotlib ``Figure`` and, given a
path, writes a PNG atomically. matplotlib is an optional dependency
(``pip install 'timm-oltr[plots]'``), imported only when a figure is made; figures are drawn with
the Agg canvas directly, so no display, no pyplot state and no change of the global backend are
involved.
"""

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import roc_curve

from .evaluation import OLTRReport
from .metrics import threshold_sweep

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ['f_measure_curve', 'open_set_roc', 'per_class_accuracy']

_logger = logging.getLogger(__name__)

_GROUP_COLORS = {'many': 'tab:blue', 'medium': 'tab:orange', 'few': 'tab:red'}


def _new_figure(figsize: tuple[float, float] = (6.4, 4.2)) -> 'Figure':
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("timm_oltr.plots needs matplotlib; install it with: pip install 'timm-oltr[plots]'") from e
    fig = Figure(figsize=figsize, layout='constrained')
    FigureCanvasAgg(fig)  # attaches itself to the figure
    return fig


def _save(fig: 'Figure', path: str | os.PathLike | None) -> None:
    """Write a PNG atomically: to a temporary file in the same folder, then rename over ``path``."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: not tempfile.mkstemp, whose 0600 mode would survive the rename; open() honours the umask
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        with open(tmp, 'wb') as f:
            fig.savefig(f, format='png', dpi=120)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _logger.info('wrote %s', path)


def per_class_accuracy(report: OLTRReport, path: str | os.PathLike | None = None) -> 'Figure':
    """Closed-set accuracy of each class against its training count (log x), coloured by shot group.

    Dashed lines mark the group bounds (``report.many``, ``report.few``, under
    ``report.shot_rule``); each group's macro accuracy is drawn as a horizontal segment. Classes
    with no test samples are left out, and so are classes with no training samples (no place on a
    log axis).

    Args:
        report: an evaluation report with training counts.
        path: where to write a PNG; None writes nothing.

    Returns:
        The figure.

    Raises:
        ValueError: the report has no training counts.
        ImportError: matplotlib is missing.
    """
    if report.train_counts is None:
        raise ValueError(
            'report: has no train_counts; pass train_counts to evaluate() (or an OLTR model with recorded counts)'
        )
    fig = _new_figure()
    ax = fig.add_subplot()

    counts = np.asarray(report.train_counts)
    acc = np.asarray(report.per_class_accuracy)
    groups = report.class_groups
    shown = (report.per_class_count > 0) & (counts > 0)
    for name, color in _GROUP_COLORS.items():
        mask = shown & (groups == name)
        group = report.groups[name] if report.groups is not None else None
        label = f'{name} ({int((groups == name).sum())} classes)'
        ax.scatter(counts[mask], 100 * acc[mask], s=12, color=color, alpha=0.7, label=label)
        if group is not None and group.accuracy is not None and mask.any():
            lo, hi = counts[mask].min(), counts[mask].max()
            ax.hlines(100 * group.accuracy, lo, hi, colors=color, linewidth=2)
    for bound in (report.few, report.many):
        ax.axvline(bound, color='gray', linestyle='--', linewidth=1)

    ax.set_xscale('log')
    ax.set_ylim(-2, 102)
    ax.set_xlabel('training samples per class (log)')
    ax.set_ylabel('test accuracy (%)')
    rule = 'many > {}, few < {}' if report.shot_rule == 'strict' else 'many >= {}, few <= {}'
    ax.set_title(f"Per-class accuracy, split '{report.split}' ({rule.format(report.many, report.few)})")
    ax.legend(loc='lower right', fontsize='small')
    _save(fig, path)
    return fig


def open_set_roc(report: OLTRReport, path: str | os.PathLike | None = None) -> 'Figure':
    """ROC curve of known (positive) against unknown samples on the report's open-set scores.

    Args:
        report: an evaluation report with both known and unknown samples.
        path: where to write a PNG; None writes nothing.

    Returns:
        The figure.

    Raises:
        ValueError: the ROC is undefined (no unknown or no known samples).
        ImportError: matplotlib is missing.
    """
    if report.auroc is None:
        reason = report.undefined.get('auroc', 'undefined')
        raise ValueError(f'report: the open-set ROC is undefined: {reason}')
    fig = _new_figure((5.0, 4.6))
    ax = fig.add_subplot()

    is_known = (np.asarray(report.labels) >= 0).astype(np.int64)
    fpr, tpr, _ = roc_curve(is_known, report.scores)
    ax.plot(fpr, tpr, color='tab:blue', label=f'{report.score} (AUROC {100 * report.auroc:.2f}%)')
    ax.plot([0, 1], [0, 1], color='gray', linestyle=':', linewidth=1)
    if report.fpr_at_95_tpr is not None:
        ax.plot([report.fpr_at_95_tpr], [0.95], 'o', color='tab:red', label='95% TPR')

    ax.set_xlabel('unknown samples accepted (FPR)')
    ax.set_ylabel('known samples accepted (TPR)')
    ax.set_title(f"Open-set ROC, split '{report.split}'")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc='lower right', fontsize='small')
    _save(fig, path)
    return fig


def f_measure_curve(report: OLTRReport, path: str | os.PathLike | None = None) -> 'Figure':
    """Open-set F-measure, precision and recall against the threshold, with the report's threshold marked.

    Both F-measure definitions are drawn: the corrected one (rejected knowns are false positives)
    and the paper's, which rises with the threshold because rejecting removes errors.

    Args:
        report: an evaluation report.
        path: where to write a PNG; None writes nothing.

    Returns:
        The figure.

    Raises:
        ImportError: matplotlib is missing.
    """
    fig = _new_figure()
    ax = fig.add_subplot()

    ts = report.sweep.thresholds
    sweeps = {
        d: threshold_sweep(report.scores, report.predictions, report.labels, ts, definition=d)
        for d in ('corrected', 'paper')
    }
    ax.plot(ts, sweeps['corrected'].f, color='tab:blue', linewidth=2, label='F (corrected)')
    ax.plot(ts, sweeps['paper'].f, color='tab:blue', linestyle='--', label='F (paper)')
    ax.plot(ts, sweeps['corrected'].precision, color='tab:green', label='precision (corrected)')
    ax.plot(ts, sweeps['corrected'].recall, color='tab:purple', label='recall')
    if report.sweep.rejection_rate is not None:
        ax.plot(ts, report.sweep.rejection_rate, color='tab:red', linestyle=':', label='unknowns rejected')
    ax.axvline(report.threshold, color='gray', linestyle='--', linewidth=1)

    ax.set_xlabel(f"threshold on '{report.score}' (accept if score >= threshold)")
    ax.set_ylabel('fraction')
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Open-set F-measure vs threshold, split '{report.split}'")
    ax.legend(loc='best', fontsize='small')
    _save(fig, path)
    return fig
