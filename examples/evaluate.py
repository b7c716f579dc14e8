#!/usr/bin/env python3
"""Evaluate a saved OLTR model on any split of its data and print the report.

    python examples/evaluate.py runs/latest                       # the run's test split + open set
    python examples/evaluate.py runs/latest --split val           # validation knowns + open validation images
    python examples/evaluate.py user/resnet50-oltr --data-dir ./my_images   # a Hub model on your own tree

A run folder (written by finetune.py) holds the model (model/) and the data options it was trained with
(args.json), so the same splits are rebuilt. For a Hub id or a bare model folder, pass the data options of
finetune.py (--data-dir, --train-list ..., Fashion-MNIST-LT by default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import finetune
import torch

import timm_oltr

SPLITS = {'test': ('test', 'open'), 'val': ('val', 'open_val'), 'train': ('train_eval', None)}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source', help='run folder, model folder, or Hub id (user/repo)')
    parser.add_argument('--split', choices=list(SPLITS), default='test')
    parser.add_argument('--score', choices=['msp', 'max_logit', 'energy', 'reachability'], default=None)
    parser.add_argument('--threshold', type=float, default=None, help="default: the model's stored threshold")
    parser.add_argument('--shot-rule', choices=['strict', 'inclusive'], default='strict')
    parser.add_argument('--json', dest='json_path', help='also write the report as JSON here')
    args, rest = parser.parse_known_args(argv)
    data_args = finetune.parse_args(rest)  # data, batch size, device, workers: same options as finetune.py
    return args, data_args


def load(source: str) -> tuple[timm_oltr.OLTRModel, dict]:
    """The model, and the run's saved finetune options (empty when the source is not a run folder)."""
    path = Path(source)
    run_args = {}
    if (path / 'args.json').is_file():
        run_args = json.loads((path / 'args.json').read_text())
        path = path / 'model'
    if not path.exists() and ('/' not in source or source.startswith(('.', '/'))):
        raise FileNotFoundError(f'{source!r} is neither a run folder, a model folder nor a Hub id (user/repo).')
    return timm_oltr.from_pretrained(str(path) if path.exists() else source), run_args


def main(argv: list[str] | None = None) -> int:
    args, data_args = parse_args(argv)
    model, run_args = load(args.source)
    defaults = vars(finetune.parse_args([]))
    explicit = {key for key, value in defaults.items() if getattr(data_args, key) != value}
    for key, value in run_args.items():
        if key not in explicit and hasattr(data_args, key):
            setattr(data_args, key, value)
    finetune.check_args(data_args)
    device = torch.device(data_args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model.to(device)

    data = finetune.build_data(data_args, model)
    if data.num_classes != model.num_classes:
        raise ValueError(
            f'the data has {data.num_classes} known classes but the model {model.num_classes}; '
            'pass the data options the model was trained with.'
        )
    known_name, open_name = SPLITS[args.split]
    known, unknown = getattr(data, known_name), getattr(data, open_name) if open_name else None
    if known is None:
        raise ValueError(f'the data has no {args.split!r} split.')
    report = timm_oltr.evaluate(
        model,
        finetune.loader(known, data_args),
        open_loader=finetune.loader(unknown, data_args) if unknown is not None else None,
        train_counts=data.train_counts,
        split=args.split,
        device=device,
        score=args.score,
        threshold=args.threshold,
        shot_rule=args.shot_rule,
        progress=data_args.progress,
    )
    print(report)
    if args.json_path:
        finetune.atomic_json(report.to_dict(), Path(args.json_path))
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
