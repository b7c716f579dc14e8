"""Smoke test of examples/benchmark.py: every figure is reported with finite values (no timing is asserted)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    'oltr_benchmark', Path(__file__).parents[1] / 'examples' / 'benchmark.py'
)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = benchmark  # dataclasses look their module up there
_spec.loader.exec_module(benchmark)

SPREAD = {'median', 'min', 'max', 'q1', 'q3'}
TRAIN = {'img_size', 'batch_size', 'plain_s', 'wrapped_s', 'wrapped_no_attention_s', 'ratio', 'ratio_no_attention'}
EVAL = {
    'img_size',
    'batch_size',
    'plain_images_per_s',
    'wrapped_images_per_s',
    'wrapped_no_attention_images_per_s',
    'ratio',
    'ratio_no_attention',
}
CENTROID_INIT = {'model', 'img_size', 'images', 'plain_eval_images_per_s', 'init_centroids_images_per_s', 'ratio'}
STAGE2 = {'model', 'img_size', 'images', 'trainable', 'cache_build_s', 'recompute_epoch_s', 'cached_epoch_s', 'ratio'}
HEAD_MEMORY = {
    'B',
    'K',
    'E',
    'method',
    'extra_peak_bytes',
    'official_difference_bytes',
    'target_bytes',
    'ratio_to_official',
    'ratio',
}
SCALING_POINT = {
    'K',
    'time_s',
    'extra_peak_bytes',
    'time_per_class_us',
    'bytes_per_class',
    'time_per_class_vs_largest',
    'bytes_per_class_vs_largest',
}


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.fixture(scope='module')
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp('benchmark') / 'result.json'
    assert benchmark.main(['--smoke', '--device', 'cpu', '--json', str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.slow
def test_benchmark_reports_every_figure(result):
    assert set(result) >= {
        'mode',
        'machine',
        'sizes',
        'targets',
        'train_step',
        'eval_throughput',
        'centroid_init',
        'stage2_frozen_backbone',
        'head_memory',
        'scaling',
    }
    models = [name for name, _ in benchmark.SIZES['smoke'].models]
    assert list(result['train_step']) == models
    assert list(result['eval_throughput']) == models
    for name in models:
        assert set(result['train_step'][name]) == TRAIN
        assert set(result['eval_throughput'][name]) == EVAL
        assert set(result['train_step'][name]['ratio']) == SPREAD
    assert set(result['centroid_init']) == CENTROID_INIT
    assert set(result['stage2_frozen_backbone']) == {'attention', 'head_only'}
    for entry in result['stage2_frozen_backbone'].values():
        assert set(entry) == STAGE2
    assert set(result['head_memory']) == HEAD_MEMORY
    assert result['head_memory']['extra_peak_bytes'] > 0
    points = result['scaling']['points']
    assert [point['K'] for point in points] == list(benchmark.SIZES['smoke'].scaling_k)
    assert all(set(point) == SCALING_POINT for point in points)

    values = list(_numbers(result))
    assert values and all(math.isfinite(v) for v in values)
    assert all(v > 0 for v in _numbers({k: result[k] for k in ('train_step', 'eval_throughput', 'centroid_init')}))


@pytest.mark.slow
def test_benchmark_prints_table(result):
    text = benchmark.table(result)
    assert 'train step w/p' in text and 'head memory' in text and 'scaling' in text
    assert text.count('\n') >= len(result['train_step']) * 4


def test_benchmark_rejects_bad_repeats():
    with pytest.raises(SystemExit, match='--repeats'):
        benchmark.main(['--smoke', '--device', 'cpu', '--repeats', '0'])
