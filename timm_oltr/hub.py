"""Hugging Face Hub I/O for OLTR models: safetensors weights, a timm-style config.json and a model card.

OLTR, Liu et al., CVPR 2019, https://arxiv.org/abs/1904.05160

A checkpoint folder holds three files:

    model.safetensors   the full state dict (backbone, attention, neck, head with centroids and class counts)
    config.json         timm's layout (architecture, num_classes, num_features, label_names, model_args,
                        pretrained_cfg) plus an `oltr` section (OLTRConfig, class counts, shot rule, image size,
                        the versions that wrote it)
    README.md           model card with YAML metadata and, when a report is given, the metrics table

`from_pretrained` rebuilds the backbone from `architecture` and `model_args` with random weights (nothing is
downloaded that the checkpoint overwrites), wraps it with the stored OLTR config, and loads the weights strictly.
Nothing is ever unpickled: weights come from safetensors, or from a `pytorch_model.bin` through
`torch.load(weights_only=True)`.

Every file is written to a temporary file in the target folder and moved into place with `os.replace`, so a killed
process leaves either the old file or the new one, never half a file. The files get the permissions any new file
gets (0o666 less the umask), so a checkpoint on a shared machine is as readable as the rest of the run.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub import errors as hf_errors
from torch import nn

from .config import OLTRConfig
from .model import OLTRModel

__all__ = [
    'CARD_NAME',
    'CONFIG_NAME',
    'METRICS_NAME',
    'WEIGHTS_NAME',
    'from_pretrained',
    'model_card',
    'push_to_hub',
    'save_pretrained',
]

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = 'model.safetensors'
PICKLE_WEIGHTS_NAME = 'pytorch_model.bin'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
METRICS_NAME = 'metrics.json'

FORMAT_VERSION = 1
_OLTR_KEYS = ('format_version', 'config', 'class_counts', 'shot_rule', 'img_size', 'versions')
_SHOT_RULES = ('strict', 'inclusive')
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
# pretrained_cfg fields that timm keeps as tuples; JSON turns them into lists
_TUPLE_CFG_KEYS = ('input_size', 'test_input_size', 'min_input_size', 'mean', 'std', 'pool_size', 'test_pool_size')
_REPO_ID = re.compile(r'^[\w.-]+/[\w.-]+$')
_CARD_TAGS = ['image-classification', 'timm', 'oltr', 'long-tail', 'open-set']
_PAPER = 'https://arxiv.org/abs/1904.05160'


# ---------------------------------------------------------------------------------------------------------------------
# save


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    report: Any = None,
    model_card: bool = True,
    safe_serialization: bool | str = True,
    shot_rule: str | None = None,
    repo_id: str | None = None,
    license: str = 'apache-2.0',
    datasets: str | list[str] | None = None,
) -> str:
    """Write an OLTR checkpoint folder: `model.safetensors`, `config.json` and a `README.md` model card.

    Args:
        model: an `OLTRModel`, possibly wrapped by DDP (`.module`) or `torch.compile` (`._orig_mod`).
        save_directory: folder to write into; created if missing. Other files in it are left alone.
        report: evaluation results for the model card: a dict (e.g. the content of a `metrics.json`) or an object
            with `to_dict()`. Without it, a `metrics.json` already in `save_directory` is used if present.
        model_card: write README.md.
        safe_serialization: True writes `model.safetensors` (the default, the only format `push_to_hub` uploads);
            False writes `pytorch_model.bin` (a plain state dict, loadable with `weights_only=True`); 'both' both.
        shot_rule: shot-group convention of the reported metrics, 'strict' (many > 100, few < 20) or 'inclusive'
            (many >= 100, few <= 20); defaults to the report's own convention.
        repo_id: Hub repo id shown in the card's loading snippet.
        license: license id for the card's metadata.
        datasets: dataset id(s) for the card's metadata.

    Returns:
        The folder's path.

    Raises:
        TypeError: if `model` is not an `OLTRModel` or `save_directory` is not a path.
        FileExistsError: if `save_directory`, or a folder above it, is an existing file.
        ValueError: on an unknown `safe_serialization` or `shot_rule`.
    """
    model = _unwrap(model)
    if safe_serialization not in (True, False, 'both'):
        raise ValueError(f"safe_serialization={safe_serialization!r} must be True, False or 'both'.")
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(
            f'save_directory must be a folder path (str or os.PathLike), got {save_directory!r} '
            f'({type(save_directory).__name__}).'
        )
    folder = Path(save_directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise FileExistsError(
            f'save_directory={os.fspath(save_directory)!r} cannot be used as a folder: it or a folder above it is an '
            f'existing file. save_pretrained writes a folder ({WEIGHTS_NAME}, {CONFIG_NAME}, {CARD_NAME}); pass the '
            'path of a new or existing folder.'
        ) from e

    if report is None and (folder / METRICS_NAME).is_file():
        report = _read_json(folder / METRICS_NAME)
        _logger.info('Model card metrics taken from %s.', folder / METRICS_NAME)
    report = _report_dict(report)
    if shot_rule is None and report is not None:
        shot_rule = _report_convention(report, 'shot_rule')
    if shot_rule is not None and shot_rule not in _SHOT_RULES:
        raise ValueError(f'shot_rule={shot_rule!r} must be one of {_SHOT_RULES} or None.')

    config = model_config(model, shot_rule=shot_rule)
    state_dict = _state_dict_for_save(model)

    # write every file to a temp name first, then move them into place: config last, so that a folder whose
    # config.json is new also has new weights
    pending: list[tuple[str, Path]] = []
    try:
        if safe_serialization in (True, 'both'):
            write = functools.partial(safetensors.torch.save_file, state_dict, metadata={'format': 'pt'})
            pending.append((_write_temp(folder, WEIGHTS_NAME, write), folder / WEIGHTS_NAME))
        if safe_serialization in (False, 'both'):
            write = functools.partial(torch.save, state_dict)
            pending.append((_write_temp(folder, PICKLE_WEIGHTS_NAME, write), folder / PICKLE_WEIGHTS_NAME))
        if model_card:
            card = _model_card(config, report, repo_id=repo_id, license=license, datasets=datasets)
            pending.append((_write_temp(folder, CARD_NAME, _text_writer(str(card))), folder / CARD_NAME))
        text = json.dumps(config, indent=2) + '\n'
        pending.append((_write_temp(folder, CONFIG_NAME, _text_writer(text)), folder / CONFIG_NAME))
    except BaseException:
        for tmp, _ in pending:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, final in pending:
        os.replace(tmp, final)

    _logger.info('Saved %s (%s) to %s.', type(model).__name__, model.architecture, folder)
    return str(folder)


def model_config(model: nn.Module, *, shot_rule: str | None = None) -> dict[str, Any]:
    """The `config.json` content of a model (timm's layout plus an `oltr` section)."""
    model = _unwrap(model)
    architecture = model.architecture
    if not timm.is_model(architecture):
        raise ValueError(
            f'The backbone architecture {architecture!r} is not a registered timm model, so the checkpoint could not '
            'be rebuilt; create the backbone with timm.create_model(<registered name>, ...) before wrapping it.'
        )
    pretrained_cfg = _jsonable(model.pretrained_cfg, 'pretrained_cfg')
    input_size = list(pretrained_cfg.get('input_size') or ())
    config: dict[str, Any] = {
        'architecture': architecture,
        'num_classes': int(model.num_classes),
        'num_features': int(model.num_features),
        'head_hidden_size': int(model.head_hidden_size),
    }
    if model.label_names is not None:
        config['label_names'] = list(model.label_names)
    config['model_args'] = _jsonable(model.backbone_args, 'model_args')
    config['pretrained_cfg'] = pretrained_cfg
    config['oltr'] = {
        'format_version': FORMAT_VERSION,
        'config': model.config.to_dict(),
        'class_counts': model.head.class_counts.tolist(),
        'shot_rule': shot_rule,
        'img_size': input_size[1:] if len(input_size) == 3 else None,
        'versions': _versions(),
    }
    return config


def _unwrap(model: Any) -> OLTRModel:
    for _ in range(4):  # DDP(compile(model)), compile(DDP(model)), ...
        inner = getattr(model, 'module', None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, '_orig_mod', None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    if not isinstance(model, OLTRModel):
        raise TypeError(f'model must be an OLTRModel (from timm_oltr.wrap), got {type(model).__name__}.')
    return model


def _state_dict_for_save(model: OLTRModel) -> dict[str, torch.Tensor]:
    """Canonical keys, contiguous CPU tensors, no two tensors sharing storage (safetensors refuses those)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = (tensor.untyped_storage().data_ptr(), str(tensor.device))
        if storage in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), str(tensor.device)))
        out[_strip_prefixes(name)] = tensor
    return out


def _jsonable(value: Any, where: str) -> Any:
    """Tuples -> lists, recursively; anything JSON cannot hold raises ValueError naming the key."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f'{where}.{k}') for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f'{where}[{i}]') for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f'{where}={value!r} cannot be stored in config.json (not a finite number).')
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(
        f'{where}={value!r} ({type(value).__name__}) cannot be stored in config.json; create the backbone with '
        'JSON-serialisable arguments (strings, numbers, lists) so the checkpoint can rebuild it.'
    )


def _versions() -> dict[str, str]:
    from . import __version__

    return {'timm_oltr': __version__, 'timm': timm.__version__, 'torch': torch.__version__.split('+')[0]}


def _temp_path(folder: Path, name: str) -> str:
    """A new empty file in `folder` with the mode `open(path, 'w')` would give it (0o666 less the umask).

    NOTE: not `tempfile.mkstemp`, whose files are 0o600: `os.replace` keeps the mode, so the checkpoint would be
    unreadable to other users of a shared machine.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0)
    for _ in range(100):
        tmp = folder / f'.{name}.{secrets.token_hex(8)}.tmp'
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(tmp)
    raise FileExistsError(f'could not create a temporary file for {name} in {folder}: every name tried exists.')


def _write_temp(folder: Path, name: str, write: Callable[[str], None]) -> str:
    """Write the file `name` to a new temporary file in `folder` with `write(path)`, fsync it, return its path.

    The file keeps the mode it was created with (0o666 less the umask) whatever `write` does; on any error it is
    removed again.
    """
    tmp = _temp_path(folder, name)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        write(tmp)
        # NOTE: safetensors replaces the file with one of its own, created 0o600; give it the normal mode back
        os.chmod(tmp, mode)
        _fsync(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _text_writer(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, 'w', encoding='utf-8', newline='\n') as f:
            f.write(text)

    return write


def _fsync(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------------------
# model card


def model_card(
    model: nn.Module,
    report: Any = None,
    *,
    shot_rule: str | None = None,
    repo_id: str | None = None,
    license: str = 'apache-2.0',
    datasets: str | list[str] | None = None,
) -> ModelCard:
    """The README.md model card of a model: YAML metadata, what it is, how to load it, the metrics table.

    Args:
        model: an `OLTRModel`.
        report: evaluation results, a dict or an object with `to_dict()`; see `save_pretrained`.
        shot_rule: shot-group convention of the metrics ('strict' or 'inclusive').
        repo_id: Hub repo id shown in the loading snippet.
        license: license id for the metadata.
        datasets: dataset id(s) for the metadata.
    """
    report = _report_dict(report)
    return _model_card(
        model_config(model, shot_rule=shot_rule), report, repo_id=repo_id, license=license, datasets=datasets
    )


def _model_card(
    config: dict[str, Any],
    report: dict[str, Any] | None,
    *,
    repo_id: str | None,
    license: str,
    datasets: str | list[str] | None,
) -> ModelCard:
    oltr = config['oltr']
    oltr_cfg = oltr['config']
    rows = _metric_rows(report) if report is not None else []

    card_data = ModelCardData(
        library_name='timm-oltr',
        license=license,
        tags=list(_CARD_TAGS),
        pipeline_tag='image-classification',
        datasets=[datasets] if isinstance(datasets, str) else datasets,
        metrics=['accuracy', 'f1', 'roc_auc'] if rows else None,
    )
    name = repo_id.split('/')[-1] if repo_id else f'{config["architecture"]}-oltr'
    where = repo_id or 'path/to/this/folder'
    known = oltr['class_counts']
    lines = [
        f'# {name}',
        '',
        f'An Open Long-Tailed Recognition model ([OLTR]({_PAPER}), Liu et al., CVPR 2019) built on the timm backbone '
        f'`{config["architecture"]}`: {config["num_classes"]} known classes, a dynamic meta-embedding head on '
        f'{config["head_hidden_size"]}-d features with class centroids (visual memory), '
        + ('modulated attention on the last feature map, ' if oltr_cfg['attention'] else '')
        + 'and open-set rejection of images far from every known class.',
        '',
        f'Open-set decision: score `{oltr_cfg["open_set_score"]}` (higher = more likely known); a sample scoring '
        f'below `{oltr_cfg["open_set_threshold"]}` is rejected as unknown.',
        '',
        '## Usage',
        '',
        '```python',
        'import timm, timm_oltr',
        '',
        f"model = timm_oltr.from_pretrained('{'hf-hub:' + repo_id if repo_id else where}')  # eval mode",
        'data_config = timm.data.resolve_model_data_config(model)',
        'transform = timm.data.create_transform(**data_config, is_training=False)',
        'out = model.forward_oltr(transform(image).unsqueeze(0))  # logits, reachability, ...',
        '```',
        '',
        'The backbone is built from `config.json` with random weights and every tensor, centroids included, '
        'comes from `model.safetensors`.',
    ]
    if rows:
        lines += ['', '## Evaluation', ''] + _metrics_table(rows, report, oltr['shot_rule'])
    if sum(1 for c in known if c > 0):
        lines += [
            '',
            '## Training data',
            '',
            f'{sum(known)} training images over {sum(1 for c in known if c > 0)} of {len(known)} classes '
            f'(per class: max {max(known)}, min {min(known)}).',
        ]
    lines += [
        '',
        '## Files',
        '',
        f'- `{WEIGHTS_NAME}`: the state dict.',
        f'- `{CONFIG_NAME}`: timm-style config (`architecture`, `model_args`, `pretrained_cfg`, ...) and the `oltr` '
        'section (method config, class counts, shot rule, versions).',
        '',
        '## Citation',
        '',
        '```bibtex',
        '@inproceedings{liu2019large,',
        '  title={Large-Scale Long-Tailed Recognition in an Open World},',
        '  author={Liu, Ziwei and Miao, Zhongqi and Zhan, Xiaohang and Wang, Jiayun and Gong, Boqing and Yu, '
        'Stella X.},',
        '  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},',
        '  year={2019}',
        '}',
        '```',
        '',
    ]
    return ModelCard(f'---\n{card_data.to_yaml()}\n---\n\n' + '\n'.join(lines))


_COLUMNS = (
    ('top1', 'Top-1'),
    ('many', 'Many'),
    ('medium', 'Medium'),
    ('few', 'Few'),
    ('f_measure', 'Open-set F'),
    ('auroc', 'AUROC'),
    ('fpr95', 'FPR@95'),
)
# sections of a side-by-side metrics.json (examples/finetune.py), one table row each
_SECTIONS = (('plain', 'plain timm model'), ('oltr', 'OLTR'))


def _report_dict(report: Any) -> dict[str, Any] | None:
    """An `OLTRReport`, its `to_dict()`, or a side-by-side metrics.json {'plain': report, 'oltr': report}."""
    if report is None:
        return None
    if hasattr(report, 'to_dict'):
        report = report.to_dict()
    if not isinstance(report, Mapping):
        raise TypeError(f'report must be a dict or have to_dict(), got {type(report).__name__}.')
    report = dict(report)
    if 'closed_set' not in report and not any(isinstance(report.get(key), Mapping) for key, _ in _SECTIONS):
        raise ValueError(
            "report must be an OLTRReport (or its to_dict()) or a metrics.json with 'plain'/'oltr' reports; "
            f'got keys {sorted(report)[:10]}.'
        )
    return report


def _sections(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if 'closed_set' in report:
        return [('OLTR', report)]
    return [(label, report[key]) for key, label in _SECTIONS if isinstance(report.get(key), Mapping)]


def _metric_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, float | None]]]:
    """One row of headline figures per model in the report."""
    rows = []
    for name, section in _sections(report):
        closed, open_set = section.get('closed_set') or {}, section.get('open_set') or {}
        groups = closed.get('groups') or {}
        row = {
            'top1': closed.get('top1'),
            **{group: (groups.get(group) or {}).get('accuracy') for group in ('many', 'medium', 'few')},
            'f_measure': (open_set.get('f_measure') or {}).get('f'),
            'auroc': open_set.get('auroc'),
            'fpr95': open_set.get('fpr_at_95_tpr'),
        }
        rows.append((name, row))
    return rows


def _report_convention(report: dict[str, Any], name: str) -> Any:
    """A convention (split, shot rule, ...) of the report's OLTR section."""
    section = _sections(report)[-1][1] if _sections(report) else {}
    return section.get(name, (section.get('conventions') or {}).get(name))


def _metrics_table(rows: list[tuple[str, dict]], report: dict[str, Any], shot_rule: str | None) -> list[str]:
    present = {key for _, row in rows for key, value in row.items() if value is not None}
    if present & {'many', 'medium', 'few'}:
        present |= {'many', 'medium', 'few'}  # an empty group shows as '-'
    columns = [(key, title) for key, title in _COLUMNS if key in present]
    lines = [
        '| Model | ' + ' | '.join(title for _, title in columns) + ' |',
        '|---|' + '---:|' * len(columns),
    ]
    for name, row in rows:
        lines.append(f'| {name} | ' + ' | '.join(_percent(row[key]) for key, _ in columns) + ' |')
    split = _report_convention(report, 'split')
    bounds = {
        'strict': 'many > 100, few < 20 training images',
        'inclusive': 'many >= 100, few <= 20 training images',
    }.get(shot_rule, 'many / medium / few by training images per class')
    notes = [
        'Figures in %. Many / Medium / Few: macro accuracy per shot group (' + bounds + '). Open-set F at the '
        'stored threshold; AUROC and FPR@95 (false-positive rate on unknown images at 95% of known images '
        'accepted) are threshold-free.'
    ]
    lines += ['', *notes]
    if isinstance(split, str):
        lines += ['', f'Evaluated on the `{split}` split.']
    return lines


def _percent(value: float | None) -> str:
    if value is None:
        return '-'
    return f'{100 * value:.1f}' if abs(value) <= 1 else f'{value:.1f}'


# ---------------------------------------------------------------------------------------------------------------------
# load


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    device: str | torch.device | None = None,
    strict: bool = True,
) -> OLTRModel:
    """Load an OLTR checkpoint from a local folder or the Hugging Face Hub.

    Args:
        name_or_path: a folder written by `save_pretrained` (or `local-dir:<folder>`), a Hub repo id `user/repo`,
            or `hf-hub:user/repo[@revision]`. An existing folder wins over a repo id of the same name.
        revision: Hub branch, tag or commit.
        cache_dir: Hub cache folder (default: HF_HUB_CACHE).
        token: Hub token for private repos (default: the logged-in one).
        local_files_only: use the Hub cache only (also what HF_HUB_OFFLINE=1 does).
        device: where to put the model (default CPU).
        strict: every tensor of the model must be in the file and nothing else; with False, missing and extra
            keys are logged instead. Mis-shaped tensors are an error either way.

    Returns:
        The model in eval mode, in the dtype the weights were saved in.

    Raises:
        TypeError: if `name_or_path` is not a str or os.PathLike.
        FileNotFoundError: if the folder, repo, revision or a checkpoint file does not exist or cannot be reached.
        ValueError: if the files are not a valid checkpoint or do not match each other.
    """
    folder, source = _resolve(name_or_path, revision, cache_dir, token, local_files_only)
    config = _read_json(folder / CONFIG_NAME)
    model = _build(config, source)

    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        state_dict = _load_safetensors(weights)
    elif (folder / PICKLE_WEIGHTS_NAME).is_file():
        state_dict = _load_torch(folder / PICKLE_WEIGHTS_NAME)
    else:
        raise FileNotFoundError(f'{source} has {CONFIG_NAME} but no {WEIGHTS_NAME}.')
    _load_state_dict(model, state_dict, source, strict=strict)
    _check_class_counts(model, config, source)

    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.float32:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def _resolve(
    name_or_path: str | os.PathLike,
    revision: str | None,
    cache_dir: Any,
    token: Any,
    local_files_only: bool,
) -> tuple[Path, str]:
    """A local folder holding the checkpoint files (the Hub cache's snapshot folder for a repo id)."""
    name = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    if not isinstance(name, str):
        raise TypeError(
            f'name_or_path must be a str or os.PathLike, got {name_or_path!r} ({type(name_or_path).__name__}); pass '
            "a folder written by save_pretrained, a Hub repo id 'user/repo' or 'hf-hub:user/repo[@revision]'."
        )
    if name.startswith('local-dir:'):
        name = name[len('local-dir:') :]
        if not os.path.isdir(name):
            raise FileNotFoundError(f'local-dir:{name}: no such folder.')
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, CONFIG_NAME)):
            raise FileNotFoundError(f'{name} has no {CONFIG_NAME}; is it a folder written by save_pretrained?')
        return Path(name), name

    repo_id = name[len('hf-hub:') :] if name.startswith('hf-hub:') else name
    if '@' in repo_id:
        repo_id, at_revision = repo_id.split('@', 1)
        if revision is not None and revision != at_revision:
            raise ValueError(f'{name!r} names revision {at_revision!r} but revision={revision!r} was passed.')
        revision = at_revision
    if not _REPO_ID.match(repo_id):
        raise FileNotFoundError(
            f'name_or_path={name!r} is neither an existing folder nor a Hub repo id (user/repo or hf-hub:user/repo).'
        )
    source = f'hf-hub:{repo_id}' + (f'@{revision}' if revision else '')
    kwargs = dict(
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        library_name='timm_oltr',
        library_version=_versions()['timm_oltr'],
    )
    config_path = _download(repo_id, CONFIG_NAME, source, **kwargs)
    try:
        _download(repo_id, WEIGHTS_NAME, source, **kwargs)
    except FileNotFoundError as e:
        try:
            _download(repo_id, PICKLE_WEIGHTS_NAME, source, **kwargs)
        except FileNotFoundError:
            raise e from None
    return Path(config_path).parent, source


def _download(repo_id: str, filename: str, source: str, **kwargs: Any) -> str:
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except hf_errors.LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f'{filename} of {source} is not in the local Hugging Face cache and the Hub cannot be reached '
            '(HF_HUB_OFFLINE=1, local_files_only=True or no network); download it once while online or pass a '
            'local folder.'
        ) from e
    except hf_errors.RevisionNotFoundError as e:
        raise FileNotFoundError(f'{source}: revision {kwargs.get("revision")!r} does not exist.') from e
    except hf_errors.RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f'{source}: repository not found, or private/gated without access. Check the repo id; for a private repo '
            'log in with `hf auth login`, set HF_TOKEN or pass token=.'
        ) from e
    except hf_errors.EntryNotFoundError as e:
        raise FileNotFoundError(f'{source} has no {filename}; is it a timm_oltr checkpoint?') from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON: {e}.') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path} must hold a JSON object, got {type(data).__name__}.')
    return data


def _build(config: dict[str, Any], source: str) -> OLTRModel:
    """The model `config.json` describes, with random weights."""
    where = f'{source}/{CONFIG_NAME}'
    missing = [k for k in ('architecture', 'num_classes', 'oltr') if k not in config]
    if missing:
        raise ValueError(f'{where} lacks {missing}; it was not written by timm_oltr.save_pretrained.')
    oltr = config['oltr']
    if not isinstance(oltr, dict):
        raise ValueError(f"{where}: 'oltr' must be an object, got {type(oltr).__name__}.")
    written_by = (oltr.get('versions') or {}).get('timm_oltr', 'unknown')
    unknown = sorted(set(oltr) - set(_OLTR_KEYS))
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {unknown} in the 'oltr' section (known: {list(_OLTR_KEYS)}); it was written "
            f'by timm_oltr {written_by}, upgrade timm_oltr to read it.'
        )
    if int(oltr.get('format_version', 1)) > FORMAT_VERSION:
        raise ValueError(
            f'{where}: format_version {oltr["format_version"]} is newer than this timm_oltr reads ({FORMAT_VERSION}); '
            f'it was written by timm_oltr {written_by}, upgrade timm_oltr.'
        )
    try:
        oltr_config = OLTRConfig.from_dict(dict(oltr.get('config') or {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid 'oltr.config' (written by timm_oltr {written_by}): {e}") from e

    architecture = config['architecture']
    if not timm.is_model(architecture):
        raise ValueError(f'{where}: architecture {architecture!r} is not a timm model in timm {timm.__version__}.')
    model_args = dict(config.get('model_args') or {})
    model_args.pop('num_classes', None)
    # random init: every backbone weight is overwritten by the checkpoint
    img_size = oltr.get('img_size')
    try:
        backbone = timm.create_model(architecture, pretrained=False, **model_args)
        model = OLTRModel(
            backbone,
            int(config['num_classes']),
            config=oltr_config,
            img_size=tuple(img_size) if img_size else None,
            label_names=_label_names(config.get('label_names'), where),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f'{where}: cannot build the model it describes ({architecture}): {e}') from e
    saved_cfg = config.get('pretrained_cfg')
    if isinstance(saved_cfg, dict):
        cfg = {k: tuple(v) if k in _TUPLE_CFG_KEYS and isinstance(v, list) else v for k, v in saved_cfg.items()}
        model.pretrained_cfg = cfg
        model.default_cfg = cfg
    return model


def _label_names(value: Any, where: str) -> list[str] | None:
    if isinstance(value, dict):  # timm also writes {index: name}
        try:
            return [value[k] for k in sorted(value, key=int)]
        except ValueError as e:
            raise ValueError(f'{where}: label_names keys must be class indices, got {sorted(value)[:5]}.') from e
    return value


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with open(path, 'rb') as f:
        magic = f.read(2)
    try:
        return safetensors.torch.load_file(str(path), device='cpu')
    except safetensors.SafetensorError as e:
        hint = (
            'it is a torch.save (pickle) file renamed to .safetensors, which is never loaded because unpickling can '
            'run arbitrary code; re-save the model with timm_oltr.save_pretrained'
            if magic in (b'PK', b'\x80\x02')
            else 'the file is truncated or corrupted'
        )
        raise ValueError(f'{path} is not a valid safetensors file ({e}): {hint}.') from e


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
        raise ValueError(f'{path} cannot be loaded with torch.load(weights_only=True): {e}') from e
    if isinstance(state_dict, dict) and isinstance(state_dict.get('state_dict'), dict):
        state_dict = state_dict['state_dict']
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f'{path} does not hold a state dict of tensors.')
    return state_dict


def _strip_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _load_state_dict(model: OLTRModel, state_dict: dict[str, torch.Tensor], source: str, *, strict: bool) -> None:
    state_dict = {_strip_prefixes(k): v for k, v in state_dict.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f'{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}'
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f'shape mismatch for {_head(mismatched)}')
    if missing:
        problems.append(f'missing keys {_head(missing)}')
    if unexpected:
        problems.append(f'unexpected keys {_head(unexpected)}')
    if mismatched or (strict and problems):
        raise ValueError(
            f'The weights of {source} do not match the model its {CONFIG_NAME} describes '
            f'({model.architecture}, {model.num_classes} classes): ' + '; '.join(problems) + '.'
        )
    if problems:
        _logger.warning('Loading %s with strict=False: %s.', source, '; '.join(problems))
    model.load_state_dict(state_dict, strict=strict)


def _head(items: list[str], n: int = 8) -> str:
    return ', '.join(items[:n]) + (f' and {len(items) - n} more' if len(items) > n else '')


def _check_class_counts(model: OLTRModel, config: dict[str, Any], source: str) -> None:
    counts = config['oltr'].get('class_counts')
    if counts is not None and model.head.class_counts.tolist() != list(counts):
        raise ValueError(
            f'{source}: oltr.class_counts in {CONFIG_NAME} disagree with head.class_counts in the weights; the two '
            'files come from different saves. Re-save the model with save_pretrained.'
        )


# ---------------------------------------------------------------------------------------------------------------------
# push


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    report: Any = None,
    **save_kwargs: Any,
) -> str:
    """Save the model into a temporary folder and upload it to a Hub model repo, creating the repo if needed.

    The upload is exactly `model.safetensors`, `config.json` and `README.md`. Pushing an unchanged model again
    makes no new commit and is not an error.

    Args:
        model: an `OLTRModel`.
        repo_id: `user/repo` or `org/repo` (an `hf-hub:` prefix is accepted).
        private: visibility of a newly created repo (None: the Hub's default); an existing repo keeps its own.
        token: Hub token with write access (default: the logged-in one or HF_TOKEN).
        commit_message: defaults to 'Upload OLTR model (<architecture>, <K> classes)'.
        revision: branch to push to; created from main if missing.
        report: evaluation results for the model card, as in `save_pretrained`.
        **save_kwargs: further `save_pretrained` options (`shot_rule`, `license`, `datasets`).

    Returns:
        The URL of the commit (of the latest commit if nothing changed).

    Raises:
        PermissionError: the token is missing or invalid (HTTP 401) or may not write to the repo (HTTP 403).
        FileNotFoundError: the namespace or repo does not exist or is not visible (HTTP 404).
    """
    model = _unwrap(model)
    repo_id = repo_id[len('hf-hub:') :] if isinstance(repo_id, str) and repo_id.startswith('hf-hub:') else repo_id
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise ValueError(f'repo_id={repo_id!r} must be "user/repo" or "org/repo".')
    commit_message = commit_message or f'Upload OLTR model ({model.architecture}, {model.num_classes} classes)'
    api = HfApi(token=token, library_name='timm_oltr', library_version=_versions()['timm_oltr'])

    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model').repo_id
        if revision is not None and revision != 'main':
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type='model')
        with tempfile.TemporaryDirectory(prefix='timm-oltr-push-') as folder:
            save_pretrained(model, folder, report=report, repo_id=repo_id, safe_serialization=True, **save_kwargs)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type='model',
                revision=revision,
                commit_message=commit_message,
                allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, CARD_NAME],
            )
    except (hf_errors.HfHubHTTPError, hf_errors.OfflineModeIsEnabled) as e:
        clear = _push_error(e, repo_id, revision)
        if clear is e:
            raise
        raise clear from e
    _logger.info('Pushed %s to %s.', model.architecture, repo_id)
    return str(getattr(commit, 'commit_url', None) or f'{api.endpoint}/{repo_id}')


def _push_error(error: Exception, repo_id: str, revision: str | None) -> Exception:
    """One line saying what to fix, for the errors a push commonly meets."""
    if isinstance(error, hf_errors.OfflineModeIsEnabled):
        return ConnectionError(f'Cannot push {repo_id}: HF_HUB_OFFLINE is set; unset it to reach the Hub.')
    response = getattr(error, 'response', None)
    status = getattr(response, 'status_code', None)
    namespace = repo_id.split('/')[0]
    if status == 401:
        return PermissionError(
            f'Cannot push {repo_id}: the Hub rejected the token (missing, invalid or expired; HTTP 401). Run '
            '`hf auth login`, set HF_TOKEN, or pass token= with a token that has write access.'
        )
    if status == 403:
        return PermissionError(
            f'Cannot push {repo_id}: the token may not write to namespace {namespace!r} (HTTP 403). Use a token with '
            'write scope (a fine-grained token needs write access to this repo or organisation), or push to your '
            'own namespace.'
        )
    if status == 404 or isinstance(error, hf_errors.RepositoryNotFoundError):
        branch = f' and that branch {revision!r} can be created' if revision else ''
        return FileNotFoundError(
            f'Cannot push {repo_id}: repo not found (HTTP 404). Check that {namespace!r} is your user name or an '
            f'organisation you belong to, the repo name is right{branch}.'
        )
    return error
