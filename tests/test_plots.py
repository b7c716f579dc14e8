"""The three report figures render to PNG without a display."""

import sys

import numpy as np
import pytest

from timm_oltr import plots
from timm_oltr.evaluation import compute_report

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _report(with_unknown: bool = True, with_counts: bool = True):
    rng = np.random.default_rng(0)
    K, n = 12, 240
    labels = rng.integers(0, K, n)
    if with_unknown:
        labels[:60] = -1
    logits = rng.normal(size=(n, K))
    known = labels >= 0
    logits[np.flatnonzero(known), labels[known]] += 2.5
    counts = np.round(np.logspace(0, 3, K)).astype(int) if with_counts else None
    counts = None if counts is None else np.r_[0, counts[1:]]  # one class without training samples
    return compute_report(logits, labels, train_counts=counts, split='val')


@pytest.mark.parametrize('name', ['per_class_accuracy', 'open_set_roc', 'f_measure_curve'])
def test_renders_png(name, tmp_path):
    pytest.importorskip('matplotlib')
    from matplotlib.figure import Figure

    path = tmp_path / 'sub' / f'{name}.png'
    fig = getattr(plots, name)(_report(), path)
    assert isinstance(fig, Figure)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_returns_figure_without_path_and_overwrites(tmp_path):
    pytest.importorskip('matplotlib')
    fig = plots.f_measure_curve(_report(with_unknown=False))
    assert fig.axes and fig.axes[0].get_lines()

    path = tmp_path / 'roc.png'
    path.write_bytes(b'old')
    plots.open_set_roc(_report(), str(path))
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_per_class_accuracy_marks_group_bounds():
    pytest.importorskip('matplotlib')
    report = _report()
    ax = plots.per_class_accuracy(report).axes[0]
    assert ax.get_xscale() == 'log'
    vertical = {line.get_xdata()[0] for line in ax.get_lines()}
    assert {report.few, report.many} <= vertical
    assert "'val'" in ax.get_title()


def test_undefined_inputs_raise():
    pytest.importorskip('matplotlib')
    with pytest.raises(ValueError, match='train_counts'):
        plots.per_class_accuracy(_report(with_counts=False))
    with pytest.raises(ValueError, match='no unknown samples'):
        plots.open_set_roc(_report(with_unknown=False))


def test_missing_matplotlib_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name == 'matplotlib' or name.startswith('matplotlib.'):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(ImportError, match=r'timm-oltr\[plots\]'):
        plots.f_measure_curve(_report())
