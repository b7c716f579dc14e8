"""The example scripts end to end on real Fashion-MNIST-LT with a tiny timm model: run, resume, DDP, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import timm_oltr
from timm_oltr import data as oltr_data

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'
TINY = [
    '--model', 'test_resnet', '--no-pretrained', '--img-size', '32', '--batch-size', '16',
    '--max-per-class', '60', '--imbalance-ratio', '10', '--test-per-class', '12',
    '--workers', '0', '--no-progress',
]  # fmt: skip


@pytest.fixture(autouse=True)
def _needs_data(fashion_mnist_files):
    pass


def _script(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, str(EXAMPLES / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kwargs)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, fashion_mnist_files):
    output = tmp_path_factory.mktemp('runs') / 'tiny'
    result = _script('finetune.py', *TINY, '--epochs', '1', '2', '--max-steps', '3', '--output', str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_finetune_writes_every_output(finished_run):
    output, result = finished_run
    metrics = json.loads((output / 'metrics.json').read_text())
    for model in ('plain', 'oltr'):
        report = metrics[model]
        assert report['split'] == 'test'
        assert set(report['closed_set']['groups']) == {'many', 'medium', 'few'}
        for key in ('f_measure', 'auroc', 'fpr_at_95_tpr', 'aupr_in', 'aupr_out', 'oscr'):
            assert key in report['open_set'], key
        assert report['conventions']['shot_rule'] == 'strict'
    assert (
        metrics['data']['split']['counts_hash']
        == oltr_data.fashion_mnist_lt(max_per_class=60, imbalance_ratio=10, test_per_class=12).counts_hash
    )
    assert [r['epoch'] for r in metrics['history']['stage2']] == [1, 2]
    assert (output / 'stage1' / 'model.safetensors').is_file()
    for name in ('model.safetensors', 'config.json', 'README.md'):
        assert (output / 'model' / name).is_file(), name
    card = (output / 'model' / 'README.md').read_text()
    top1 = {name: f'{100 * metrics[name]["closed_set"]["top1"]:.1f}' for name in ('plain', 'oltr')}
    assert f'| plain timm model | {top1["plain"]} |' in card and f'| OLTR | {top1["oltr"]} |' in card
    for name in metrics['plots']:
        assert (output / name).stat().st_size > 1000
    assert not list(output.glob('.*.tmp')) and not list(output.glob('stage?_*'))
    umask = os.umask(0)
    os.umask(umask)
    for path in (output / 'model').iterdir():  # as shareable as any file the user writes, not private
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    assert 'few-shot acc' in result.stdout and 'AUROC' in result.stdout


def test_saved_model_reloads_with_the_same_metrics(finished_run):
    output, _ = finished_run
    metrics = json.loads((output / 'metrics.json').read_text())
    model = timm_oltr.from_pretrained(output / 'model')
    assert model.config.open_set_score == metrics['oltr']['conventions']['score']
    assert model.config.open_set_threshold == pytest.approx(metrics['oltr']['conventions']['threshold'])

    report_path = output / 'reeval.json'
    result = _script('evaluate.py', str(output), '--no-progress', '--json', str(report_path))
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads(report_path.read_text())
    assert again['closed_set'] == metrics['oltr']['closed_set']
    assert again['open_set']['f_measure'] == metrics['oltr']['open_set']['f_measure']


def test_resume_continues_from_the_last_complete_epoch(tmp_path, monkeypatch):
    sys.path.insert(0, str(EXAMPLES))
    import finetune

    output = tmp_path / 'run'
    argv = [*TINY, '--epochs', '2', '1', '--max-steps', '2', '--channels-last', '--output', str(output)]
    real_end_epoch = finetune.StageState.end_epoch

    def interrupted(self, *args, **kwargs):
        real_end_epoch(self, *args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint was written

    monkeypatch.setattr(finetune.StageState, 'end_epoch', interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(argv)
    state = torch.load(output / 'stage1_last.pt', weights_only=True)
    assert state['epoch'] == 1
    first_epoch = json.loads(state['history'])[0]

    with pytest.raises(ValueError, match='--resume'):
        finetune.main(argv)  # an unfinished run is never overwritten silently
    monkeypatch.setattr(finetune.StageState, 'end_epoch', real_end_epoch)
    assert finetune.main([*argv, '--resume']) == 0
    history = json.loads((output / 'metrics.json').read_text())['history']['stage1']
    assert [r['epoch'] for r in history] == [1, 2]
    assert history[0] == first_epoch


@pytest.mark.skipif(shutil.which('torchrun') is None and not Path(sys.executable).with_name('torchrun').exists(),
                    reason='torchrun is not installed')  # fmt: skip
def test_two_rank_torchrun(tmp_path):
    torchrun = shutil.which('torchrun') or str(Path(sys.executable).with_name('torchrun'))
    output = tmp_path / 'ddp'
    cmd = [
        torchrun, '--standalone', '--nproc-per-node', '2', str(EXAMPLES / 'finetune.py'),
        *TINY, '--epochs', '1', '1', '--max-steps', '2', '--output', str(output),
    ]  # fmt: skip
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MASTER_ADDR': '127.0.0.1'}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output / 'metrics.json').read_text())
    assert metrics['oltr']['num_known'] > 0
    assert 'world size 2' in (output / 'train.log').read_text()


@pytest.mark.parametrize(
    'args,message',
    [
        (['--model', 'resnet_nope'], 'unknown timm model'),
        (['--model', 'test_vit', '--img-size', '100'], 'cannot take --img-size 100'),
        (['--fmnist-root', '/nonexistent'], 'apt-get install dataset-fashion-mnist'),
        (['--data-dir', '/nonexistent'], 'is not a folder'),
        (['--batch-size', '1'], 'at least 2'),
        (['--batch-size', '5000'], 'make no full batch of 5000'),
        (['--lr', '-1', '0.1'], '--lr -1.0 must be a positive number'),
        (['--max-steps', '0'], '--max-steps 0 must be at least 1'),
        (['--device', 'cuda:7'] if not torch.cuda.is_available() else ['--device', 'tpu'], '--device'),
    ],
)
def test_bad_arguments_end_with_one_clear_line(tmp_path, args, message):
    base = TINY[2:] if args[0] == '--model' else TINY  # the case brings its own model
    result = _script('finetune.py', *base, *args, '--output', str(tmp_path / 'bad'))
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


def test_evaluate_rejects_a_mismatched_class_count(finished_run, tmp_path):
    output, _ = finished_run
    result = _script('evaluate.py', str(output / 'model'), *TINY[2:], '--no-progress')  # 7 classes, matches
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / 'data'
    for split, classes in (('train', 'abc'), ('test', 'ab')):
        for name in classes:
            (folder / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new('RGB', (32, 32), color=(i * 90, 10, 10)).save(folder / split / name / f'{i}.png')
    result = _script('evaluate.py', str(output / 'model'), '--data-dir', str(folder), '--no-progress')
    assert result.returncode == 2
    assert 'known classes' in result.stderr and 'Traceback' not in result.stderr
