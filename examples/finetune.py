#!/usr/bin/env python3
"""Two-stage OLTR fine-tuning of a timm model on open long-tailed data, with the plain model side by side.

    stage 1  plain fine-tune of the timm model: instance sampling, cross-entropy
    stage 2  wrap the stage-1 model (its classifier seeds the hallucinator), set the centroids to the class means
             of the training set (eval transform), then fine-tune with the class-aware sampler, cross-entropy +
             the discriminative centroid loss, and the centroids in their own parameter group
    then     pick each stage's best epoch on validation, choose the open-set threshold on validation data, and
             evaluate both models on the test set plus the open set

Outputs (under --output): metrics.json (both models side by side), plots, the OLTR model (model/: safetensors,
config.json, model card), the stage-1 model (stage1/), args.json and train.log. An interrupted run resumes
from its last complete epoch with --resume.

    python examples/finetune.py                                  # Fashion-MNIST-LT, tf_efficientnet_lite0
    python examples/finetune.py --model convnext_atto --data-dir ./my_images --img-size 160 --epochs 10 10
    python examples/finetune.py --train-list train.txt --val-list val.txt --test-list test.txt \\
        --open-list open.txt --data-root /data/imagenet                   # ImageNet-LT-style list files
    torchrun --nproc-per-node 2 examples/finetune.py ...               # the same script, DDP
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset
from tqdm import tqdm

import timm_oltr
from timm_oltr import data as oltr_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_weights import pretrained_backbone  # noqa: E402

_logger = logging.getLogger('finetune')

DEFAULT_MODEL = 'tf_efficientnet_lite0'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group('model')
    group.add_argument('--model', default=DEFAULT_MODEL, help='timm model name (default: %(default)s)')
    weights = group.add_mutually_exclusive_group()
    weights.add_argument(
        '--pretrained',
        action='store_true',
        default=None,
        help="timm's pretrained weights (Hub or cache); default: offline weights where bundled, else random",
    )
    weights.add_argument('--no-pretrained', dest='pretrained', action='store_false', help='random initialisation')
    weights.add_argument('--pretrained-file', help='local .safetensors / .pth weights for the backbone')
    group.add_argument('--img-size', type=int, default=None, help='input size (default: 96 on Fashion-MNIST)')
    group.add_argument('--neck-dim', type=int, default=None, help='Linear+ReLU neck width before the head')

    group = parser.add_argument_group('data (default: Fashion-MNIST-LT)')
    group.add_argument('--data-dir', help='ImageFolder tree: train/<class>/, val/, test/, open/, open_val/')
    group.add_argument('--train-list', help='list file "relative/path.jpg label" (ImageNet-LT style)')
    group.add_argument('--val-list')
    group.add_argument('--test-list')
    group.add_argument('--open-list', help='open-set test list (labels -1)')
    group.add_argument('--open-val-list', help='open-set validation list (labels -1), for the threshold')
    group.add_argument('--data-root', help='folder the list files are relative to')
    group.add_argument('--fmnist-root', help='folder with the Fashion-MNIST IDX files (default: Debian path)')
    group.add_argument('--max-per-class', type=int, default=500, help='Fashion-MNIST-LT head class size')
    group.add_argument('--imbalance-ratio', type=float, default=100.0, help='Fashion-MNIST-LT head / tail')
    group.add_argument('--test-per-class', type=int, default=300, help='Fashion-MNIST-LT test images per class')

    group = parser.add_argument_group('training')
    group.add_argument('--epochs', type=int, nargs=2, default=[7, 6], metavar=('STAGE1', 'STAGE2'))
    group.add_argument('--batch-size', type=int, default=64)
    group.add_argument('--lr', type=float, nargs=2, default=[0.02, 0.005], metavar=('STAGE1', 'STAGE2'))
    group.add_argument('--head-lr', type=float, default=0.05, help='stage-2 lr of the meta-embedding head')
    group.add_argument('--centroid-lr', type=float, default=0.01, help='stage-2 lr of the centroids (official 0.01)')
    group.add_argument('--centroid-weight', type=float, default=0.01, help='centroid loss weight (official 0.01)')
    group.add_argument('--weight-decay', type=float, default=5e-4)
    group.add_argument('--samples-per-class', type=int, default=4, help='class-aware sampler (official 4)')
    group.add_argument(
        '--freeze-backbone',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='stage 2 trains attention, neck and head on backbone features cached once (the Places-LT recipe; '
        'no augmentation, fast); --no-freeze-backbone fine-tunes everything (the ImageNet-LT recipe)',
    )
    group.add_argument('--seed', type=int, default=0)

    group = parser.add_argument_group('run')
    group.add_argument('--output', default=None, help='run folder (default: runs/<model>-<data>)')
    group.add_argument('--resume', action='store_true', help='continue the run in --output from its last epoch')
    group.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    group.add_argument('--amp', action='store_true', help='autocast: bf16 on CPU, fp16 on GPU (see --amp-dtype)')
    group.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], default=None)
    group.add_argument('--channels-last', action='store_true')
    group.add_argument('--workers', type=int, default=2)
    group.add_argument('--max-steps', type=int, default=None, help='cap on steps per epoch (smoke tests)')
    group.add_argument('--no-progress', dest='progress', action='store_false')
    group.add_argument('--push-to-hub', metavar='REPO_ID', help='push the OLTR model when done')
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# setup


class Run:
    """Process-wide facts of one run: device, distributed rank, autocast, output folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.distributed = self.world_size > 1
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        if args.device is None:
            args.device = f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'
        self.device = torch.device(args.device)
        if self.distributed:
            dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo')
        self.rank = dist.get_rank() if self.distributed else 0
        self.is_main = self.rank == 0
        if self.device.type == 'cuda':
            torch.cuda.set_device(self.device)

        amp_dtype = args.amp_dtype or ('float16' if self.device.type == 'cuda' else 'bfloat16')
        self.amp_dtype = getattr(torch, amp_dtype) if args.amp else None
        self.scaler = torch.amp.GradScaler('cuda') if self.amp_dtype == torch.float16 else None
        self.output = Path(args.output)
        self.progress = args.progress and self.is_main

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


def setup_logging(run: Run) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run.is_main:
        run.output.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run.output / 'train.log'))
    logging.basicConfig(
        level=logging.INFO if run.is_main else logging.WARNING,
        format='%(asctime)s %(levelname)s %(name)s: %(message)s',
        datefmt='%H:%M:%S',
        handlers=handlers,
        force=True,
    )


def default_output(args: argparse.Namespace) -> str:
    source = 'fmnist-lt' if args.data_source == 'fashion-mnist' else args.data_source
    return str(Path('runs') / f'{args.model}-{source}')


def check_args(args: argparse.Namespace) -> None:
    """Catch bad arguments before any work, with one line saying what to do."""
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=5)
        raise ValueError(f'unknown timm model {args.model!r}; similar names: {close or "none"}.')
    if args.data_dir and args.train_list:
        raise ValueError('give either --data-dir or --train-list, not both.')
    if args.train_list and not (args.val_list or args.test_list):
        raise ValueError('--train-list needs --val-list and/or --test-list to evaluate on.')
    for name in ('train_list', 'val_list', 'test_list', 'open_list', 'open_val_list', 'pretrained_file'):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            raise ValueError(f'--{name.replace("_", "-")} {path!r} is not a file.')
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise ValueError(f'--data-dir {args.data_dir!r} is not a folder.')
    if min(args.epochs) < 0 or args.epochs[1] < 1:
        raise ValueError(f'--epochs {args.epochs}: stage 1 needs >= 0 epochs and stage 2 >= 1.')
    if args.batch_size < 2:
        raise ValueError(f'--batch-size {args.batch_size} must be at least 2 (BatchNorm needs two samples).')
    if args.img_size is not None and args.img_size < 16:
        raise ValueError(f'--img-size {args.img_size} is too small; use 16 or more.')
    for option, value in (('--lr', args.lr[0]), ('--lr', args.lr[1]), ('--head-lr', args.head_lr)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f'{option} {value} must be a positive number.')
    for option in ('centroid_lr', 'centroid_weight', 'weight_decay', 'imbalance_ratio'):
        value = getattr(args, option)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f'--{option.replace("_", "-")} {value} must be a non-negative number.')
    for option, minimum in (('samples_per_class', 1), ('workers', 0), ('seed', 0), ('max_steps', 1), ('neck_dim', 1)):
        value = getattr(args, option)
        if value is not None and value < minimum:
            raise ValueError(f'--{option.replace("_", "-")} {value} must be at least {minimum}.')
    if args.amp_dtype is not None and not args.amp:
        raise ValueError('--amp-dtype only applies with --amp; add --amp.')
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f'--device {args.device!r} is not a device: {e}') from None
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f'--device {args.device}: no CUDA device is available here; use --device cpu.')
    args.data_source = 'folder' if args.data_dir else 'lists' if args.train_list else 'fashion-mnist'
    if args.img_size is None and args.data_source == 'fashion-mnist':
        args.img_size = 96  # the 28 px photos upsampled: enough for an ImageNet backbone, fast on a CPU


@torch.no_grad()
def check_input_size(model: nn.Module, img_size: int | None) -> None:
    """Fail before any training if the model cannot take images of --img-size."""
    if img_size is None:
        return
    in_chans = model.pretrained_cfg.get('input_size', (3,))[0]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, in_chans, img_size, img_size))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(f'{type(model).__name__} cannot take --img-size {img_size}: {e}') from None
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------------
# data


def build_data(args: argparse.Namespace, model: nn.Module) -> oltr_data.OpenLongTailData:
    """The run's datasets, with transforms from the model's data config at --img-size."""
    train_tf = oltr_data.create_transforms(model, img_size=args.img_size, is_training=True)
    eval_tf = oltr_data.create_transforms(model, img_size=args.img_size, is_training=False)
    if args.data_source == 'folder':
        return oltr_data.image_folder_splits(args.data_dir, transform_train=train_tf, transform_eval=eval_tf)
    if args.data_source == 'lists':
        return list_file_data(args, train_tf, eval_tf)
    return oltr_data.fashion_mnist_lt(
        args.fmnist_root,
        max_per_class=args.max_per_class,
        imbalance_ratio=args.imbalance_ratio,
        test_per_class=args.test_per_class,
        seed=args.seed,
        transform_train=train_tf,
        transform_eval=eval_tf,
    )


def list_file_data(args: argparse.Namespace, train_tf: Any, eval_tf: Any) -> oltr_data.OpenLongTailData:
    root = args.data_root or '.'

    def dataset(path: str | None, transform: Any) -> oltr_data.ImageListDataset | None:
        return oltr_data.ImageListDataset(root, path, transform=transform) if path else None

    train = dataset(args.train_list, train_tf)
    num_classes = int(max(train.targets)) + 1
    return oltr_data.OpenLongTailData(
        train=train,
        train_eval=dataset(args.train_list, eval_tf),
        val=dataset(args.val_list, eval_tf),
        test=dataset(args.test_list, eval_tf),
        open=dataset(args.open_list, eval_tf),
        open_val=dataset(args.open_val_list, eval_tf),
        class_names=[str(i) for i in range(num_classes)],
        train_counts=oltr_data.class_counts(train, num_classes),
    )


def loader(dataset: Any, args: argparse.Namespace, *, sampler: Any = None, shuffle: bool = False, **kw) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        shuffle=shuffle and sampler is None,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        **kw,
    )


def rank_shard(dataset: Any, run: Run) -> Any:
    """This rank's disjoint share of a dataset (no padding, so sums over ranks count each image once)."""
    if not run.distributed:
        return dataset
    return Subset(dataset, range(run.rank, len(dataset), run.world_size))


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints: every write goes to a temporary file first, so a kill never leaves a broken one


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its files private; checkpoints here are shared like the rest
    os.replace(tmp, path)


def atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(obj, indent=2) + '\n')
    os.replace(tmp, path)


def atomic_folder(path: Path, write: Any) -> None:
    """Write a folder through `write(tmp_folder)` and swap it in place."""
    tmp, old = path.with_name(f'.{path.name}.tmp'), path.with_name(f'.{path.name}.old')
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# training


def steps_per_epoch(batches: DataLoader, args: argparse.Namespace) -> int:
    """Training steps per epoch; a loader too small for one full batch is an error, not a silent no-op."""
    if len(batches) == 0:
        size = len(batches.sampler) if batches.sampler is not None else len(batches.dataset)
        raise ValueError(
            f'{size} training samples per epoch and rank make no full batch of {args.batch_size}; lower --batch-size.'
        )
    return len(batches) if args.max_steps is None else min(len(batches), args.max_steps)


def make_optimizer(groups: list[dict], total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.SGD(groups, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    )
    return optimizer, scheduler


def train_epoch(
    step_fn: Any,
    batches: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: Run,
    *,
    desc: str,
    max_steps: int | None,
) -> dict[str, float]:
    """One epoch; `step_fn(images, targets)` returns (loss, logits)."""
    total = len(batches) if max_steps is None else min(len(batches), max_steps)
    seen = correct = 0
    loss_sum = 0.0
    bar = tqdm(batches, total=total, desc=desc, disable=not run.progress, leave=False, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        if step >= total:
            break
        images, targets = images.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        with run.autocast():
            loss, logits = step_fn(images, targets)
        optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if not torch.isfinite(loss):
            raise RuntimeError(f'{desc}: the loss became {loss.item()} at step {step}; lower the learning rate.')
        seen += len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        loss_sum += loss.item() * len(targets)
        bar.set_postfix(loss=f'{loss_sum / seen:.3f}', acc=f'{correct / seen:.3f}')
    return {'loss': loss_sum / max(seen, 1), 'train_acc': correct / max(seen, 1)}


def val_accuracy(logits_fn: Any, model: nn.Module, val_loader: DataLoader, run: Run, num_classes: int) -> float:
    """Mean per-class accuracy on the validation set: rank 0 computes it, every rank gets it."""
    score = [0.0]
    if run.is_main:
        predictions, labels = [], []
        was_training = model.training
        model.eval()
        with torch.no_grad(), run.autocast():
            for inputs, targets in val_loader:
                predictions.append(logits_fn(inputs.to(run.device)).argmax(1).cpu())
                labels.append(torch.as_tensor(targets))
        model.train(was_training)
        accuracy = timm_oltr.metrics.macro_accuracy(torch.cat(predictions), torch.cat(labels), num_classes)
        score[0] = accuracy or 0.0
    if run.distributed:
        dist.broadcast_object_list(score, src=0)
    return score[0]


class StageState:
    """Epoch bookkeeping of one stage: resume point and the best validation epoch's weights."""

    def __init__(self, name: str, run: Run) -> None:
        self.name = name
        self.run = run
        self.path = run.output / f'{name}_last.pt'
        self.best_path = run.output / f'{name}_best.safetensors'
        self.epoch = 0
        self.best = -1.0
        self.best_epoch = -1
        self.history: list[dict] = []

    def resume(self, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
        if not self.path.exists():
            return
        state = torch.load(self.path, map_location='cpu', weights_only=True)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        self.epoch, self.best, self.best_epoch = state['epoch'], state['best'], state['best_epoch']
        self.history = json.loads(state['history'])
        _logger.info(
            '%s: resumed after epoch %d (best val %.4f at epoch %d)', self.name, self.epoch, self.best, self.best_epoch
        )

    def end_epoch(self, model: nn.Module, optimizer: Any, scheduler: Any, record: dict) -> None:
        self.epoch += 1
        record = {'epoch': self.epoch, **record}
        self.history.append(record)
        improved = record['val_macro'] > self.best
        if improved:
            self.best, self.best_epoch = record['val_macro'], self.epoch
        if self.run.is_main:
            if improved:  # NOTE: a copy of the weights and centroids of this epoch, never a live reference
                atomic_safetensors(model.state_dict(), self.best_path)
            state = {
                'model': model.state_dict(),
                'optimizer': optimizer.state_dict(),
                'scheduler': scheduler.state_dict(),
                'epoch': self.epoch,
                'best': self.best,
                'best_epoch': self.best_epoch,
                'history': json.dumps(self.history),
            }
            atomic_torch_save(state, self.path)
        _logger.info(
            '%s epoch %d: loss %.4f, train acc %.4f, val macro acc %.4f%s',
            self.name,
            self.epoch,
            record['loss'],
            record['train_acc'],
            record['val_macro'],
            ' (best)' if improved else '',
        )
        self.run.barrier()

    def load_best(self, model: nn.Module) -> None:
        if self.best_path.exists():
            model.load_state_dict(load_file(str(self.best_path), device=str(self.run.device)))
            _logger.info('%s: best epoch %d (val macro acc %.4f)', self.name, self.best_epoch, self.best)


def run_stage1(args: argparse.Namespace, run: Run, model: nn.Module, data: Any, val_loader: DataLoader) -> StageState:
    """Plain fine-tune: instance-balanced sampling, cross-entropy."""
    stage = StageState('stage1', run)
    epochs = args.epochs[0]
    sampler = DistributedSampler(data.train, seed=args.seed, drop_last=True) if run.distributed else None
    batches = loader(data.train, args, sampler=sampler, shuffle=True, drop_last=True)
    steps = steps_per_epoch(batches, args)
    groups = [{'params': [p for p in model.parameters() if p.requires_grad], 'lr': args.lr[0]}]
    optimizer, scheduler = make_optimizer([{**g, 'weight_decay': args.weight_decay} for g in groups], epochs * steps)
    stage.resume(model, optimizer, scheduler)
    trained = DistributedDataParallel(model) if run.distributed else model

    def step_fn(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = trained(images)
        return F.cross_entropy(logits.float(), targets), logits

    while stage.epoch < epochs:
        if sampler is not None:
            sampler.set_epoch(stage.epoch)
        model.train()
        record = train_epoch(
            step_fn, batches, optimizer, scheduler, run, desc=f'stage 1 epoch {stage.epoch + 1}', max_steps=steps
        )
        val_macro = val_accuracy(model, model, val_loader, run, data.num_classes)
        stage.end_epoch(model, optimizer, scheduler, {**record, 'val_macro': val_macro})
    stage.load_best(model)
    return stage


def cached_backbone_features(model: timm_oltr.OLTRModel, dataset: Any, args: argparse.Namespace, run: Run) -> Any:
    """The backbone's feature maps of every image of `dataset`, computed once in eval mode."""
    feats, labels = [], []
    model.backbone.eval()
    batches = loader(dataset, args)
    with torch.no_grad(), run.autocast():
        for images, targets in tqdm(batches, desc='caching features', disable=not run.progress, leave=False):
            feats.append(model.backbone.forward_features(images.to(run.device)).float().cpu())
            labels.append(torch.as_tensor(targets))
    return TensorDataset(torch.cat(feats), torch.cat(labels))


def run_stage2(
    args: argparse.Namespace, run: Run, model: timm_oltr.OLTRModel, data: Any, val_loader: DataLoader
) -> StageState:
    """OLTR fine-tune: centroids from the training set, class-aware sampling, CE + centroid loss.

    With --freeze-backbone the backbone's feature maps of the training and validation images are computed
    once (eval transform) and only attention, neck and head train on them.
    """
    stage = StageState('stage2', run)
    epochs = args.epochs[1]
    inputs = 'images'
    train_set, labels, centroid_set = data.train, data.train.targets, rank_shard(data.train_eval, run)
    if args.freeze_backbone:
        timm_oltr.freeze_backbone(model)
        inputs = 'backbone_features'
        train_set = cached_backbone_features(model, data.train_eval, args, run)
        labels, centroid_set = train_set.tensors[1], rank_shard(train_set, run)
        val_loader = loader(cached_backbone_features(model, val_loader.dataset, args, run), args)

    sampler = timm_oltr.ClassAwareSampler(labels, samples_per_class=args.samples_per_class, seed=args.seed)
    batches = loader(train_set, args, sampler=sampler, drop_last=True)
    steps = steps_per_epoch(batches, args)
    groups = timm_oltr.param_groups(
        model, lr=args.head_lr, backbone_lr=args.lr[1], centroid_lr=args.centroid_lr, weight_decay=args.weight_decay
    )
    optimizer, scheduler = make_optimizer(groups, epochs * steps)
    stage.resume(model, optimizer, scheduler)
    if stage.epoch == 0:  # the memory: class means of v_direct before any OLTR training
        timm_oltr.init_centroids(
            model, loader(centroid_set, args), device=run.device, inputs=inputs, progress=run.progress
        )
    criterion = timm_oltr.OLTRLoss(centroid_weight=args.centroid_weight)
    forward = OLTRForward(model, from_backbone=args.freeze_backbone)
    # NOTE: DDP syncs gradients only for calls through its own forward, hence the small adapter module
    trained = DistributedDataParallel(forward) if run.distributed else forward

    def step_fn(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = trained(inputs)
        return criterion(out, targets, model), out.logits

    while stage.epoch < epochs:
        sampler.set_epoch(stage.epoch)
        model.train()
        record = train_epoch(
            step_fn, batches, optimizer, scheduler, run, desc=f'stage 2 epoch {stage.epoch + 1}', max_steps=steps
        )
        val_macro = val_accuracy(lambda x: forward(x).logits, model, val_loader, run, data.num_classes)
        stage.end_epoch(model, optimizer, scheduler, {**record, 'val_macro': val_macro})
    stage.load_best(model)
    return stage


class OLTRForward(nn.Module):
    """`forward_oltr` as a module's forward (images, or cached backbone features), for DDP."""

    def __init__(self, model: timm_oltr.OLTRModel, *, from_backbone: bool) -> None:
        super().__init__()
        self.module = model
        self.from_backbone = from_backbone

    def forward(self, inputs: torch.Tensor) -> timm_oltr.OLTROutput:
        if self.from_backbone:
            return self.module.forward_oltr_from_backbone(inputs)
        return self.module.forward_oltr(inputs)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation and outputs


def _group(report: dict, name: str) -> float | None:
    return ((report['closed_set']['groups'] or {}).get(name) or {}).get('accuracy')


SUMMARY_ROWS = [
    ('many-shot acc', lambda r: _group(r, 'many')),
    ('medium-shot acc', lambda r: _group(r, 'medium')),
    ('few-shot acc', lambda r: _group(r, 'few')),
    ('overall acc (micro)', lambda r: r['closed_set']['top1']),
    ('overall acc (macro)', lambda r: r['closed_set']['macro']),
    ('open-set F (corrected)', lambda r: (r['open_set']['f_measure'] or {}).get('f')),
    ('AUROC known vs unknown', lambda r: r['open_set']['auroc']),
    ('FPR at 95% TPR', lambda r: r['open_set']['fpr_at_95_tpr']),
]


def summary_table(reports: dict[str, dict]) -> str:
    names = list(reports)
    lines = [f'{"":24}' + ''.join(f'{n:>10}' for n in names)]
    for label, get in SUMMARY_ROWS:
        cells = []
        for name in names:
            value = get(reports[name])
            cells.append(f'{value:>10.4f}' if isinstance(value, (int, float)) else f'{"-":>10}')
        lines.append(f'{label:24}' + ''.join(cells))
    return '\n'.join(lines)


def evaluate_model(model: nn.Module, data: Any, args: argparse.Namespace, run: Run, name: str) -> Any:
    """Threshold on validation (knowns + open_val), then the test split plus the open set."""
    eval_loader = loader(data.test if data.test is not None else data.val, args)
    open_loader = loader(data.open, args) if data.open is not None else None
    score = threshold = None
    if data.val is not None:
        # score and threshold from validation data: knowns plus, where available, open validation images
        open_val = loader(data.open_val, args) if data.open_val is not None else None
        score, threshold, aurocs = timm_oltr.calibrate_threshold(
            model,
            loader(data.val, args),
            open_loader=open_val,
            score='auto' if open_val is not None else None,
            device=run.device,
            progress=run.progress,
        )
        _logger.info('%s: open-set score %r, threshold %.4g (validation AUROC %s)', name, score, threshold, aurocs)
    report = timm_oltr.evaluate(
        model,
        eval_loader,
        train_counts=data.train_counts,
        open_loader=open_loader,
        split='test' if data.test is not None else 'val',
        device=run.device,
        autocast_dtype=run.amp_dtype,
        score=score,
        threshold=threshold,
        progress=run.progress,
    )
    _logger.info('%s model on %s:\n%s', name, report.split, report)
    return report


def write_plots(report: Any, output: Path) -> list[str]:
    """The report's figures as PNG files; a figure the data cannot support (no unknowns, say) is skipped."""
    from timm_oltr import plots

    written = []
    for fn in (plots.per_class_accuracy, plots.open_set_roc, plots.f_measure_curve):
        path = output / f'{fn.__name__}.png'
        try:
            fn(report, path=path)
            written.append(path.name)
        except (ImportError, ValueError) as e:
            _logger.warning('plot %s skipped: %s', fn.__name__, e)
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    args.output = args.output or default_output(args)
    output = Path(args.output)
    if output.exists() and (output / 'metrics.json').exists() and not args.resume:
        raise ValueError(f'{output} holds a finished run; pass another --output, or --resume to re-evaluate it.')
    if output.exists() and (output / 'stage1_last.pt').exists() and not args.resume:
        raise ValueError(f'{output} holds an unfinished run; pass --resume to continue it or another --output.')
    run = Run(args)
    setup_logging(run)
    start = time.time()
    torch.manual_seed(args.seed + run.rank)
    if run.is_main:
        atomic_json(vars(args), output / 'args.json')
    _logger.info('run folder %s, device %s, world size %d', output, run.device, run.world_size)

    # stage 1: the plain timm model
    model = pretrained_backbone(args.model, pretrained=args.pretrained, pretrained_file=args.pretrained_file)
    check_input_size(model, args.img_size)
    data = build_data(args, model)
    _logger.info('data: %s', json.dumps(data.to_dict()['sizes']))
    _logger.info('train counts per class: %s', data.train_counts.tolist())
    num_classes = data.num_classes
    model.reset_classifier(num_classes)
    model.to(run.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    val_loader = loader(data.val if data.val is not None else data.test, args)
    if args.epochs[0] == 0:
        _logger.warning('--epochs 0 ...: no stage-1 training; the plain model is the initial %s', args.model)
    stage1 = run_stage1(args, run, model, data, val_loader)

    reports = {}
    if run.is_main:
        reports['plain'] = evaluate_model(model, data, args, run, 'plain')

        def write_stage1(folder: Path) -> None:
            # safetensors stores contiguous tensors only: save a channels-last model in the default layout
            model.to(memory_format=torch.contiguous_format)
            timm.models.save_for_hf(
                model, folder, safe_serialization=True, model_config={'label_names': data.class_names}
            )
            if args.channels_last:
                model.to(memory_format=torch.channels_last)

        atomic_folder(output / 'stage1', write_stage1)
    run.barrier()

    # stage 2: OLTR on top of the stage-1 model
    model = timm_oltr.wrap(
        model, num_classes, img_size=args.img_size, label_names=data.class_names, neck_dim=args.neck_dim
    )
    stage2 = run_stage2(args, run, model, data, val_loader)

    if run.is_main:
        reports['oltr'] = evaluate_model(model, data, args, run, 'oltr')
        plots = write_plots(reports['oltr'], output)
        metrics = {
            'plain': reports['plain'].to_dict(),
            'oltr': reports['oltr'].to_dict(),
            'history': {'stage1': stage1.history, 'stage2': stage2.history},
            'best_epoch': {'stage1': stage1.best_epoch, 'stage2': stage2.best_epoch},
            'data': data.to_dict(),
            'args': vars(args),
            'plots': plots,
            'machine': {'platform': platform.platform(), 'device': str(run.device), 'threads': torch.get_num_threads()},
            'versions': {'timm_oltr': timm_oltr.__version__, 'timm': timm.__version__, 'torch': torch.__version__},
            'wall_time_s': round(time.time() - start, 1),
        }
        atomic_json(metrics, output / 'metrics.json')
        atomic_folder(output / 'model', lambda folder: model.save_pretrained(folder, report=metrics))
        # the finished run keeps the best weights in stage1/ and model/; the resume files go
        for name in ('stage1_last.pt', 'stage2_last.pt', 'stage1_best.safetensors', 'stage2_best.safetensors'):
            (output / name).unlink(missing_ok=True)
        latest = output.parent / 'latest'
        if output.parent == Path('runs') or latest.is_symlink():
            tmp = output.parent / '.latest.tmp'
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(output.name)
            os.replace(tmp, latest)
        print(
            f'\nresults on {reports["oltr"].split} (+ open set), best epochs {stage1.best_epoch} / {stage2.best_epoch}'
        )
        print(summary_table({'plain': metrics['plain'], 'oltr': metrics['oltr']}))
        print(
            f'\nwrote {output}/metrics.json, model/, stage1/ and {len(plots)} plots in {metrics["wall_time_s"]:.0f} s'
        )
        if args.push_to_hub:
            url = model.push_to_hub(args.push_to_hub, report=metrics)
            print(f'pushed to {url}')
    run.close()
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted; continue with --resume', file=sys.stderr)
        sys.exit(130)
