"""Benchmark timm-oltr against the plain timm model it wraps (OLTR, Liu et al., CVPR 2019, arXiv:1904.05160).

One run measures, side by side and in the same process, and prints a table of ratios plus one JSON object:

    train step        wrapped / plain timm, forward + backward + SGD step        target <= 1.10
    eval throughput   wrapped / plain timm, no grad                              target >= 0.95
    head memory       MetaEmbeddingHead forward + backward, measured extra peak  target <= 3 (B*K + K*E) floats
    centroid init     init_centroids / plain eval pass over the same loader      target >= 0.9
    stage 2           epoch on cached backbone features / recomputing them       target <= 0.1
    scaling           head forward + backward time and memory over K             linear in K

Every time is the median of several repeats after warm-up, with min, max and interquartile range; the
variants of one figure run interleaved (alternating order), so a change of machine load hits them alike.
"wrapped (no attention)" is the same wrapper with `attention=False`: it separates the wrapper's own overhead
from the cost of the modulated attention, which is part of the method.

Peak memory is the extra memory beyond inputs and parameters (gradients and activations count): on CUDA from
`torch.cuda.max_memory_allocated`, on CPU from the peak resident set of a fresh subprocess (VmHWM after a
reset through /proc/self/clear_refs, glibc told to return freed blocks at once), or `ru_maxrss` elsewhere.

    python examples/benchmark.py            # full run, under 10 minutes on 2 CPU cores
    python examples/benchmark.py --quick    # smaller models and inputs, under a minute
    python examples/benchmark.py --device cuda --json results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import timm_oltr

TARGETS = {
    'train_step': 1.10,
    'eval_throughput': 0.95,
    'head_memory': 1.0,
    'centroid_init': 0.9,
    'stage2_frozen_backbone': 0.1,
}


@dataclass(frozen=True)
class Sizes:
    """What one benchmark mode runs."""

    models: tuple[tuple[str, int], ...]  # (timm name, image size)
    batch_size: int
    num_classes: int
    warmup: int
    repeats: int
    loader_batches: int  # batches in the centroid-init and stage-2 loaders
    head: tuple[int, int, int]  # (B, K, E) of the head memory figure
    scaling_k: tuple[int, ...]
    scaling_b: int
    scaling_e: int


SIZES = {
    'full': Sizes(
        models=(('resnet50', 224), ('vit_tiny_patch16_224', 224), ('convnext_atto', 224)),
        batch_size=8,
        num_classes=1000,
        warmup=1,
        repeats=7,
        loader_batches=4,
        head=(256, 10_000, 2048),
        scaling_k=(100, 1_000, 10_000, 50_000),
        scaling_b=256,
        scaling_e=512,
    ),
    'quick': Sizes(
        models=(('resnet18', 128), ('test_vit', 160), ('test_convnext', 160)),
        batch_size=8,
        num_classes=1000,
        warmup=1,
        repeats=3,
        loader_batches=4,
        head=(256, 10_000, 2048),
        scaling_k=(100, 1_000, 10_000),
        scaling_b=256,
        scaling_e=256,
    ),
    # for the test suite: every figure, tiny sizes
    'smoke': Sizes(
        models=(('test_resnet', 64), ('test_vit', 160)),
        batch_size=2,
        num_classes=10,
        warmup=1,
        repeats=1,
        loader_batches=2,
        head=(64, 1_000, 128),
        scaling_k=(100, 1_000),
        scaling_b=64,
        scaling_e=128,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='smaller models and inputs (under a minute on 2 cores)')
    parser.add_argument('--smoke', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--repeats', type=int, default=None, help='timed repeats per figure (default by mode)')
    parser.add_argument('--json', default=None, help='also write the JSON object to this file')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--memory-worker', default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function; one call of each per repeat, in alternating order."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else reversed(names):
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def spread(values: list[float]) -> dict[str, float]:
    """Median with min, max and interquartile range of repeated measurements."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method='inclusive') if len(ordered) > 1 else ordered * 3
    return {'median': statistics.median(ordered), 'min': ordered[0], 'max': ordered[-1], 'q1': q1, 'q3': q3}


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Spread of the per-repeat ratios num_i / den_i (pairs ran back to back)."""
    return spread([a / b for a, b in zip(num, den, strict=True)])


# ---------------------------------------------------------------------------------------------------------------------
# models


def plain_model(name: str, num_classes: int, device: torch.device, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes).to(device)


def wrapped_model(
    name: str, num_classes: int, img_size: int, device: torch.device, seed: int, **overrides
) -> timm_oltr.OLTRModel:
    """A wrapped model whose centroids are set from random features, so it can train."""
    model = timm_oltr.wrap(plain_model(name, num_classes, device, seed), img_size=img_size, **overrides)
    E = model.head_hidden_size
    model.head.set_centroids(torch.randn(num_classes, E, device=device), torch.ones(num_classes, dtype=torch.long))
    return model


def variants(name: str, sizes: Sizes, img_size: int, device: torch.device, seed: int) -> dict[str, torch.nn.Module]:
    K = sizes.num_classes
    return {
        'plain': plain_model(name, K, device, seed),
        'wrapped': wrapped_model(name, K, img_size, device, seed),
        'wrapped_no_attention': wrapped_model(name, K, img_size, device, seed, attention=False),
    }


def train_step_fn(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    """One SGD step: cross-entropy on timm logits, or OLTRLoss on forward_oltr for a wrapped model."""
    if isinstance(model, timm_oltr.OLTRModel):
        params = timm_oltr.param_groups(model, lr=0.01)
        criterion = timm_oltr.OLTRLoss()

        def loss_fn() -> torch.Tensor:
            return criterion(model.forward_oltr(images), targets, model)
    else:
        params = model.parameters()

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(model(images), targets)

    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    return step


def eval_fn(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(images)

    return run


# ---------------------------------------------------------------------------------------------------------------------
# figures


def bench_models(sizes: Sizes, device: torch.device, seed: int) -> tuple[dict, dict]:
    """Train step time and eval throughput of each model, wrapped against plain."""
    train, evaluation = {}, {}
    for name, img_size in sizes.models:
        models = variants(name, sizes, img_size, device, seed)
        images = torch.randn(sizes.batch_size, 3, img_size, img_size, device=device)
        targets = torch.randint(sizes.num_classes, (sizes.batch_size,), device=device)

        for model in models.values():
            model.train()
        steps = {key: train_step_fn(model, images, targets) for key, model in models.items()}
        times = time_interleaved(steps, warmup=sizes.warmup, repeats=sizes.repeats, device=device)
        train[name] = {
            'img_size': img_size,
            'batch_size': sizes.batch_size,
            **{f'{key}_s': spread(t) for key, t in times.items()},
            'ratio': paired_ratio(times['wrapped'], times['plain']),
            'ratio_no_attention': paired_ratio(times['wrapped_no_attention'], times['plain']),
        }

        for model in models.values():
            model.eval()
        runs = {key: eval_fn(model, images) for key, model in models.items()}
        times = time_interleaved(runs, warmup=sizes.warmup, repeats=sizes.repeats, device=device)
        B = sizes.batch_size
        evaluation[name] = {
            'img_size': img_size,
            'batch_size': B,
            **{f'{key}_images_per_s': spread([B / t for t in ts]) for key, ts in times.items()},
            'ratio': paired_ratio(times['plain'], times['wrapped']),
            'ratio_no_attention': paired_ratio(times['plain'], times['wrapped_no_attention']),
        }
        del models, steps, runs
        gc.collect()
    return train, evaluation


def image_loader(sizes: Sizes, img_size: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    N = sizes.batch_size * sizes.loader_batches
    images = torch.randn(N, 3, img_size, img_size, generator=generator)
    labels = torch.arange(N) % sizes.num_classes
    return DataLoader(TensorDataset(images, labels), batch_size=sizes.batch_size)


def bench_centroid_init(sizes: Sizes, device: torch.device, seed: int) -> dict:
    """timm_oltr.init_centroids over a loader against the plain model's eval pass over the same loader."""
    name, img_size = sizes.models[0]
    loader = image_loader(sizes, img_size, seed)
    plain = plain_model(name, sizes.num_classes, device, seed).eval()
    wrapped = wrapped_model(name, sizes.num_classes, img_size, device, seed)

    def plain_pass() -> None:
        with torch.no_grad():
            for images, _ in loader:
                plain(images.to(device))

    def init_pass() -> None:
        timm_oltr.init_centroids(wrapped, loader, device=device, missing='exclude', progress=False)

    times = time_interleaved(
        {'plain_eval': plain_pass, 'init_centroids': init_pass},
        warmup=sizes.warmup,
        repeats=sizes.repeats,
        device=device,
    )
    N = len(loader.dataset)
    return {
        'model': name,
        'img_size': img_size,
        'images': N,
        'plain_eval_images_per_s': spread([N / t for t in times['plain_eval']]),
        'init_centroids_images_per_s': spread([N / t for t in times['init_centroids']]),
        'ratio': paired_ratio(times['plain_eval'], times['init_centroids']),
    }


def bench_stage2(sizes: Sizes, device: torch.device, seed: int, **overrides) -> dict:
    """Stage-2 epoch with a frozen backbone: cached backbone features against recomputing the backbone."""
    name, img_size = sizes.models[0]
    loader = image_loader(sizes, img_size, seed)
    model = wrapped_model(name, sizes.num_classes, img_size, device, seed, **overrides)
    timm_oltr.freeze_backbone(model)
    optimizer = torch.optim.SGD(timm_oltr.param_groups(model, lr=0.01), momentum=0.9)
    criterion = timm_oltr.OLTRLoss()

    def cache() -> TensorDataset:
        feats, labels = [], []
        model.backbone.eval()
        with torch.no_grad():
            for images, targets in loader:
                feats.append(model.backbone.forward_features(images.to(device)))
                labels.append(targets)
        return TensorDataset(torch.cat(feats), torch.cat(labels))

    def epoch(batches: DataLoader, forward: Callable[[torch.Tensor], timm_oltr.OLTROutput]) -> None:
        model.train()
        for inputs, targets in batches:
            loss = criterion(forward(inputs.to(device)), targets.to(device), model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    start = time.perf_counter()
    cached = DataLoader(cache(), batch_size=sizes.batch_size)
    _sync(device)
    cache_s = time.perf_counter() - start
    times = time_interleaved(
        {
            'recompute': lambda: epoch(loader, model.forward_oltr),
            'cached': lambda: epoch(cached, model.forward_oltr_from_backbone),
        },
        warmup=sizes.warmup,
        repeats=sizes.repeats,
        device=device,
    )
    return {
        'model': name,
        'img_size': img_size,
        'images': len(loader.dataset),
        'trainable': 'attention, neck, head' if model.attention is not None else 'neck, head',
        'cache_build_s': cache_s,
        'recompute_epoch_s': spread(times['recompute']),
        'cached_epoch_s': spread(times['cached']),
        'ratio': paired_ratio(times['cached'], times['recompute']),
    }


def head_step(B: int, K: int, E: int, device: torch.device) -> tuple[torch.nn.Module, Callable[[], None]]:
    """A MetaEmbeddingHead with set centroids and its forward + backward on random v_direct."""
    head = timm_oltr.MetaEmbeddingHead(E, K).to(device)
    head.set_centroids(torch.randn(K, E, device=device), torch.ones(K, dtype=torch.long, device=device))
    x = torch.randn(B, E, device=device, requires_grad=True)
    targets = torch.randint(K, (B,), device=device)

    def step() -> None:
        head.zero_grad(set_to_none=True)
        x.grad = None
        F.cross_entropy(head(x).logits, targets).backward()

    return head, step


def _status_bytes(key: str) -> int:
    with open('/proc/self/status') as f:
        return int(re.search(rf'^{key}:\s+(\d+) kB', f.read(), re.MULTILINE).group(1)) * 1024


def measure_head_memory(B: int, K: int, E: int, device: torch.device) -> tuple[int, str]:
    """Extra peak bytes of one head forward + backward beyond inputs and parameters, and how they were read."""
    head, step = head_step(B, K, E, device)
    step()  # warm-up: library workspaces; then drop gradients so the measured step allocates them again
    head.zero_grad(set_to_none=True)
    gc.collect()

    if device.type == 'cuda':
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base, 'torch.cuda.max_memory_allocated'
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current resident set
        base = _status_bytes('VmRSS')
        step()
        return _status_bytes('VmHWM') - base, 'peak RSS (VmHWM) of a fresh process'
    except OSError:
        scale = 1 if sys.platform == 'darwin' else 1024
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - base, 'ru_maxrss of a fresh process'


def head_memory(configs: list[tuple[int, int, int]], device: torch.device) -> list[tuple[int, str]]:
    """Measured extra peak bytes per (B, K, E); on CPU in a fresh subprocess, so the peak is this head's own."""
    if device.type == 'cuda':
        results = [measure_head_memory(*config, device) for config in configs]
        torch.cuda.empty_cache()
        return results
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536', 'MALLOC_TRIM_THRESHOLD_': '0'}
    command = [sys.executable, os.path.abspath(__file__), '--memory-worker', json.dumps(configs)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return [tuple(result) for result in json.loads(done.stdout.strip().splitlines()[-1])]


def bench_head_memory(sizes: Sizes, extra: int, method: str) -> dict:
    B, K, E = sizes.head
    official = B * K * E * 4
    target = 3 * (B * K + K * E) * 4
    return {
        'B': B,
        'K': K,
        'E': E,
        'method': method,
        'extra_peak_bytes': extra,
        'official_difference_bytes': official,
        'target_bytes': target,
        'ratio_to_official': extra / official,
        'ratio': extra / target,
    }


def bench_scaling(sizes: Sizes, device: torch.device, memory: list[tuple[int, str]]) -> dict:
    B, E = sizes.scaling_b, sizes.scaling_e
    configs = [(B, K, E) for K in sizes.scaling_k]
    points = []
    for (_, K, _), (extra, _) in zip(configs, memory, strict=True):
        _, step = head_step(B, K, E, device)
        times = time_interleaved({'head': step}, warmup=sizes.warmup, repeats=sizes.repeats, device=device)['head']
        median = statistics.median(times)
        points.append(
            {
                'K': K,
                'time_s': spread(times),
                'extra_peak_bytes': extra,
                'time_per_class_us': median / K * 1e6,
                'bytes_per_class': extra / K,
            }
        )
        gc.collect()
    # per point, time / K relative to the largest K: 1.0 everywhere means exactly linear, > 1 a fixed cost
    last = points[-1]
    for point in points:
        point['time_per_class_vs_largest'] = point['time_per_class_us'] / last['time_per_class_us']
        point['bytes_per_class_vs_largest'] = point['bytes_per_class'] / max(last['bytes_per_class'], 1.0)
    return {'B': B, 'E': E, 'points': points}


# ---------------------------------------------------------------------------------------------------------------------
# report


def machine(device: torch.device) -> dict:
    info = {
        'device': device.type,
        'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor(),
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'timm_oltr': timm_oltr.__version__,
        'python': platform.python_version(),
    }
    if hasattr(os, 'getloadavg'):
        info['load_avg_start'] = list(os.getloadavg())
    return info


def _row(figure: str, case: str, ratio: dict, target: float, lower_is_better: bool) -> str:
    met = ratio['median'] <= target if lower_is_better else ratio['median'] >= target
    sign = '<=' if lower_is_better else '>='
    span = f'[{ratio["min"]:.3f}, {ratio["max"]:.3f}]'
    return f'{figure:<24} {case:<34} {ratio["median"]:>7.3f} {span:>17} {sign} {target:<5} {"yes" if met else "NO"}'


def table(result: dict) -> str:
    lines = [
        f'{"figure":<24} {"case":<34} {"median":>7} {"[min, max]":>17} target met',
        '-' * 100,
    ]
    for name, entry in result['train_step'].items():
        lines.append(_row('train step w/p', name, entry['ratio'], TARGETS['train_step'], True))
        lines.append(_row('', '  without attention', entry['ratio_no_attention'], TARGETS['train_step'], True))
    for name, entry in result['eval_throughput'].items():
        lines.append(_row('eval throughput w/p', name, entry['ratio'], TARGETS['eval_throughput'], False))
        lines.append(_row('', '  without attention', entry['ratio_no_attention'], TARGETS['eval_throughput'], False))
    entry = result['centroid_init']
    lines.append(_row('centroid init / eval', entry['model'], entry['ratio'], TARGETS['centroid_init'], False))
    for entry in result['stage2_frozen_backbone'].values():
        case = f'{entry["model"]}, trains {entry["trainable"]}'
        lines.append(_row('stage 2 cached/recomp', case, entry['ratio'], TARGETS['stage2_frozen_backbone'], True))
    memory = result['head_memory']
    lines += [
        '-' * 100,
        f'head memory B={memory["B"]} K={memory["K"]} E={memory["E"]}: extra peak '
        f'{memory["extra_peak_bytes"] / 2**20:.1f} MiB = {memory["ratio"]:.3f} x target 3(BK+KE) floats '
        f'({memory["target_bytes"] / 2**20:.1f} MiB), {memory["ratio_to_official"]:.2e} x the official B*K*E '
        f'difference tensor ({memory["official_difference_bytes"] / 2**30:.1f} GiB); {memory["method"]}',
        f'scaling B={result["scaling"]["B"]} E={result["scaling"]["E"]}:',
    ]
    for point in result['scaling']['points']:
        lines.append(
            f'  K={point["K"]:>6}: {point["time_s"]["median"] * 1e3:9.1f} ms '
            f'[{point["time_s"]["min"] * 1e3:.1f}, {point["time_s"]["max"] * 1e3:.1f}]  '
            f'time/K {point["time_per_class_us"]:8.3f} us ({point["time_per_class_vs_largest"]:.2f} x largest K)  '
            f'extra peak {point["extra_peak_bytes"] / 2**20:8.1f} MiB '
            f'({point["bytes_per_class_vs_largest"]:.2f} x largest K per class)'
        )
    meta = result['machine']
    load = f'load {meta.get("load_avg_start")} -> {meta.get("load_avg_end")}' if 'load_avg_start' in meta else ''
    lines.append(
        f'{meta["device"]} ({meta["device_name"]}), {meta["cpu_count"]} CPUs, {meta["torch_threads"]} torch threads, '
        f'torch {meta["torch"]}, timm {meta["timm"]}; {load}; {meta["elapsed_s"]:.0f} s'
    )
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> dict:
    mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
    sizes = SIZES[mode]
    if args.repeats is not None:
        sizes = Sizes(**{**asdict(sizes), 'repeats': args.repeats})
    device = torch.device(args.device)
    start = time.perf_counter()
    result = {'mode': mode, 'machine': machine(device), 'sizes': asdict(sizes), 'targets': TARGETS}

    result['train_step'], result['eval_throughput'] = bench_models(sizes, device, args.seed)
    result['centroid_init'] = bench_centroid_init(sizes, device, args.seed)
    result['stage2_frozen_backbone'] = {
        'attention': bench_stage2(sizes, device, args.seed),
        'head_only': bench_stage2(sizes, device, args.seed, attention=False),
    }
    # one subprocess measures every head's memory on CPU: the head figure first, then the scaling points
    memory = head_memory([sizes.head] + [(sizes.scaling_b, K, sizes.scaling_e) for K in sizes.scaling_k], device)
    result['head_memory'] = bench_head_memory(sizes, *memory[0])
    result['scaling'] = bench_scaling(sizes, device, memory[1:])

    if hasattr(os, 'getloadavg'):
        result['machine']['load_avg_end'] = list(os.getloadavg())
    result['machine']['elapsed_s'] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_worker is not None:
        configs = [tuple(config) for config in json.loads(args.memory_worker)]
        print(json.dumps([measure_head_memory(*config, torch.device('cpu')) for config in configs]))
        return 0
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device is available; use --device cpu.')
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f'--repeats must be at least 1, got {args.repeats}.')

    # NOTE: the loaders hold a few random images, so most classes are expected to get no centroid
    library_logger = logging.getLogger('timm_oltr')
    level = library_logger.level
    library_logger.setLevel(logging.ERROR)
    try:
        torch.manual_seed(args.seed)
        result = run(args)
    finally:
        library_logger.setLevel(level)
    print(table(result))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        tmp = f'{args.json}.tmp'
        with open(tmp, 'w') as f:
            f.write(text + '\n')
        os.replace(tmp, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
