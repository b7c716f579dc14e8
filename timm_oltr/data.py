"""Long-tailed and open-set data for Open Long-Tailed Recognition.

OLTR (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World", CVPR 2019, arXiv:1904.05160) trains on
a long-tailed subset of the known classes and tests on a balanced test set of those classes plus images of
classes never seen in training (the open set, labelled -1). This module builds such splits reproducibly and
loads the usual sources:

* `long_tail_split` picks a long-tailed subset (exponential or Pareto profile) from any label array and records
  the per-class counts, the seed and a short hash of the counts for reports.
* `open_set_split` holds classes out of training and remaps known labels to ``0..K-1``.
* `fashion_mnist_lt` builds Fashion-MNIST-LT (7 known classes, 3 open, imbalance 100) from the standard IDX files.
* `ImageListDataset` reads ImageNet-LT / Places-LT list files; `image_folder_splits` reads ImageFolder trees.
* `create_transforms` builds timm transforms from a model's data config at any input size.

Every dataset here exposes ``targets`` (labels, -1 for open samples) so samplers and `class_counts` can read the
labels without decoding images. Images are always converted to 3-channel RGB PIL images before the transform.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    'FASHION_MNIST_CLASSES',
    'ArrayImageDataset',
    'FileImageDataset',
    'ImageListDataset',
    'LongTailSplit',
    'OpenLongTailData',
    'OpenSetSplit',
    'class_counts',
    'create_transforms',
    'fashion_mnist_lt',
    'image_folder_splits',
    'long_tail_split',
    'open_set_split',
    'read_idx',
]

_logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Any]

FASHION_MNIST_CLASSES = (
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
)
_FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_MNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned-byte IDX files: labels (1-d), images (3-d)
_PROFILES = ('exp', 'pareto')


# ---------------------------------------------------------------------------------------------------------------------
# Long-tailed and open-set splits


@dataclass(frozen=True, eq=False)
class LongTailSplit:
    """A reproducible long-tailed subset of a labelled pool.

    Attributes:
        indices: (N,) sorted int64 positions into the label array the split was drawn from.
        counts: (K,) int64 number of images taken per class, in the order of `classes`.
        classes: (K,) int64 class ids in the order they were given (not the rank order of the profile).
        counts_hash: 8 hex digits of SHA-256 over ``class:count`` pairs; equal hashes mean equal per-class counts.
        seed: seed of the numpy Generator that chose the class ranks and the images.
        profile: 'exp' or 'pareto'.
        imbalance_ratio: largest count over smallest count before flooring.
        max_per_class: count of the head class.
    """

    indices: np.ndarray
    counts: np.ndarray
    classes: np.ndarray
    counts_hash: str
    seed: int
    profile: str
    imbalance_ratio: float
    max_per_class: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python summary for run reports (everything except the indices)."""
        return {
            'classes': self.classes.tolist(),
            'counts': self.counts.tolist(),
            'counts_hash': self.counts_hash,
            'num_samples': int(self.indices.size),
            'seed': self.seed,
            'profile': self.profile,
            'imbalance_ratio': self.imbalance_ratio,
            'max_per_class': self.max_per_class,
        }


def _profile_counts(num_classes: int, max_per_class: int, imbalance_ratio: float, profile: str) -> np.ndarray:
    """Per-rank counts, rank 0 being the head class."""
    rank = np.arange(num_classes, dtype=np.float64)
    if num_classes == 1:
        decay = np.ones(1)
    elif profile == 'exp':
        decay = imbalance_ratio ** (-rank / (num_classes - 1))
    else:
        decay = (rank + 1) ** (-math.log(imbalance_ratio) / math.log(num_classes))
    # NOTE: the relative guard keeps exact products (1000 * 100 ** -0.5 = 100) from flooring to 99 through rounding
    return np.floor(max_per_class * decay * (1 + 1e-9)).astype(np.int64)


def _counts_hash(classes: np.ndarray, counts: np.ndarray) -> str:
    text = ','.join(f'{c}:{n}' for c, n in zip(classes.tolist(), counts.tolist(), strict=True))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def long_tail_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    known_classes: Sequence[int],
    imbalance_ratio: float = 100.0,
    max_per_class: int,
    seed: int = 0,
    profile: str = 'exp',
    shuffle_classes: bool = True,
) -> LongTailSplit:
    """Pick a long-tailed subset of `known_classes` from a labelled pool.

    The class of rank i (0 = head) gets ``n_i`` images, K = len(known_classes):

    * ``'exp'`` (CIFAR-LT, Cao et al. 2019; the usual LT benchmark profile):
      ``n_i = floor(max_per_class * imbalance_ratio ** (-i / (K - 1)))``.
    * ``'pareto'`` (power law, the rank-frequency curve of a Pareto distribution as used for ImageNet-LT):
      ``n_i = floor(max_per_class * (i + 1) ** (-log(imbalance_ratio) / log(K)))``.

    Both give ``max_per_class`` to the head and ``max_per_class / imbalance_ratio`` to the tail. With
    ``shuffle_classes=True`` the ranks go to the classes in a seeded random order; with False the first class
    in `known_classes` is the head and the last the tail. Images within a class are drawn without replacement by
    the same ``numpy.random.default_rng(seed)``, so a seed fixes the whole split.

    Args:
        labels: (N,) integer labels of the pool; labels outside `known_classes` (e.g. -1) are never picked.
        known_classes: class ids to sample, distinct.
        imbalance_ratio: head count over tail count, >= 1. 100 in Fashion-MNIST-LT and CIFAR-100-LT.
        max_per_class: head-class count, >= 1.
        seed: numpy Generator seed.
        profile: 'exp' or 'pareto'.
        shuffle_classes: assign ranks in a seeded random order instead of the given order.

    Returns:
        The split; ``split.indices`` index into `labels`, ``split.counts[j]`` belongs to ``known_classes[j]``.

    Raises:
        ValueError: on an unknown profile, bad ratio or counts, repeated classes, a profile that gives some class
            zero images, or a class with fewer images in the pool than its rank asks for.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    classes = np.asarray(known_classes, dtype=np.int64).reshape(-1)
    if profile not in _PROFILES:
        raise ValueError(f'profile={profile!r} is not supported; expected one of {_PROFILES}.')
    if not imbalance_ratio >= 1:
        raise ValueError(f'imbalance_ratio={imbalance_ratio} must be >= 1 (head count over tail count).')
    if max_per_class < 1:
        raise ValueError(f'max_per_class={max_per_class} must be >= 1.')
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'labels must be a 1-d integer array, got shape {labels.shape} and dtype {labels.dtype}.')
    if classes.size == 0 or np.unique(classes).size != classes.size:
        raise ValueError(f'known_classes={classes.tolist()} must be a non-empty list of distinct class ids.')

    K = classes.size
    rank_counts = _profile_counts(K, max_per_class, imbalance_ratio, profile)
    if rank_counts[-1] < 1:
        raise ValueError(
            f'max_per_class={max_per_class} with imbalance_ratio={imbalance_ratio} ({profile} profile) gives the '
            f'tail classes no images (counts {rank_counts.tolist()}); raise max_per_class or lower the ratio.'
        )

    rng = np.random.default_rng(seed)
    rank_of_class = rng.permutation(K) if shuffle_classes else np.arange(K)
    counts = rank_counts[rank_of_class]
    picked = []
    for class_id, count in zip(classes.tolist(), counts.tolist(), strict=True):
        pool = np.flatnonzero(labels == class_id)
        if pool.size < count:
            raise ValueError(
                f'class {class_id} has {pool.size} images but the {profile} profile asks for {count} '
                f'(all counts: {dict(zip(classes.tolist(), counts.tolist(), strict=True))}); '
                f'lower max_per_class={max_per_class} or use a larger pool.'
            )
        picked.append(rng.choice(pool, size=count, replace=False))

    return LongTailSplit(
        indices=np.sort(np.concatenate(picked)).astype(np.int64),
        counts=counts,
        classes=classes,
        counts_hash=_counts_hash(classes, counts),
        seed=seed,
        profile=profile,
        imbalance_ratio=float(imbalance_ratio),
        max_per_class=max_per_class,
    )


@dataclass(frozen=True)
class OpenSetSplit:
    """Known / open partition of a label space with known labels remapped to ``0..K-1``.

    Attributes:
        known_classes: original ids of the K known classes; position j is the new label j.
        open_classes: original ids held out of training entirely; their images are labelled -1.
        class_names: names of the known classes in new-label order, or None.
        open_class_names: names of the open classes, or None.
    """

    known_classes: tuple[int, ...]
    open_classes: tuple[int, ...]
    class_names: tuple[str, ...] | None = None
    open_class_names: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        """K, the number of known classes."""
        return len(self.known_classes)

    def remap(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Map original labels to new ones: known class j -> j, open classes -> -1.

        Args:
            labels: (N,) original class ids.

        Returns:
            (N,) int64 new labels.

        Raises:
            ValueError: if a label is neither known nor open.
        """
        labels = np.asarray(labels, dtype=np.int64)
        lookup = {c: j for j, c in enumerate(self.known_classes)} | {c: -1 for c in self.open_classes}
        unknown = sorted(set(np.unique(labels).tolist()) - lookup.keys())
        if unknown:
            raise ValueError(
                f'labels contain class ids {unknown} that are neither known {list(self.known_classes)} '
                f'nor open {list(self.open_classes)}.'
            )
        return np.array([lookup[c] for c in labels.tolist()], dtype=np.int64)


def open_set_split(
    class_ids: Sequence[int],
    *,
    known_classes: int | Sequence[int],
    class_names: Sequence[str] | None = None,
) -> OpenSetSplit:
    """Split a label space into known classes (trained on) and open classes (only seen at test time, as -1).

    Args:
        class_ids: every class id of the dataset, e.g. ``range(10)``.
        known_classes: an int K takes the first K ids of `class_ids` (deterministic, so every seed shares one
            open set); a sequence names the known ids explicitly, in the order that defines the new labels.
        class_names: names for all of `class_ids`, in the same order, or None.

    Returns:
        The split; every id not known is open.

    Raises:
        ValueError: if K is out of range, a known id is not in `class_ids`, or ids repeat.
    """
    class_ids = [int(c) for c in class_ids]
    if len(set(class_ids)) != len(class_ids):
        raise ValueError(f'class_ids={class_ids} contains repeated ids.')
    if class_names is not None and len(class_names) != len(class_ids):
        raise ValueError(f'class_names has {len(class_names)} entries for {len(class_ids)} class_ids.')
    if isinstance(known_classes, int):
        if not 1 <= known_classes <= len(class_ids):
            raise ValueError(f'known_classes={known_classes} must be between 1 and {len(class_ids)}.')
        known = class_ids[:known_classes]
    else:
        known = [int(c) for c in known_classes]
        missing = sorted(set(known) - set(class_ids))
        if missing or not known or len(set(known)) != len(known):
            raise ValueError(
                f'known_classes={known} must be distinct ids taken from class_ids={class_ids} (not found: {missing}).'
            )
    open_ = [c for c in class_ids if c not in known]

    names = None
    open_names = None
    if class_names is not None:
        name_of = dict(zip(class_ids, class_names, strict=True))
        names = tuple(name_of[c] for c in known)
        open_names = tuple(name_of[c] for c in open_)
    return OpenSetSplit(tuple(known), tuple(open_), names, open_names)


# ---------------------------------------------------------------------------------------------------------------------
# Datasets


class _ToRGB:
    """Convert any PIL image (L, P, RGBA, ...) to 3-channel RGB; a class so DataLoader workers can pickle it."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == 'RGB' else img.convert('RGB')

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array (Fashion-MNIST and other IDX data).

    Args:
        images: (N, H, W) grayscale or (N, H, W, 3) RGB uint8 array.
        targets: (N,) int labels, -1 for open samples.
        transform: applied to the RGB PIL image; None returns the PIL image.

    Attributes:
        targets: (N,) int64 labels.
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int] | np.ndarray, transform: Transform | None = None):
        targets = np.asarray(targets, dtype=np.int64)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(targets):
            raise ValueError(
                f'images must be a uint8 (N, H, W) or (N, H, W, 3) array matching {len(targets)} targets, '
                f'got dtype {images.dtype} and shape {images.shape}.'
            )
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index]).convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


class FileImageDataset(Dataset):
    """Images read from disk, one ``(path, label)`` pair per sample.

    Args:
        samples: ``(path, label)`` pairs; label -1 marks an open sample.
        transform: applied to the RGB PIL image; None returns the PIL image.

    Attributes:
        samples: the ``(path, label)`` pairs.
        targets: (N,) int64 labels.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Transform | None = None):
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.targets = np.array([label for _, label in self.samples], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, label


class ImageListDataset(FileImageDataset):
    """ImageNet-LT / Places-LT style list file: one ``relative/path.jpg label`` per line.

    Paths are relative to `root` and may contain spaces (the label is the last field). Label -1 marks an open
    sample. Blank lines are skipped. All files are checked for existence at construction, so a wrong `root`
    fails at once instead of in the middle of an epoch; pass ``check_files=False`` to skip the check on slow
    file systems.

    Args:
        root: folder the paths are relative to.
        list_file: the list file.
        transform: applied to the RGB PIL image.
        check_files: check that every listed image exists.

    Raises:
        ValueError: a malformed line (named by file, 1-based line number and content) or a label below -1.
        FileNotFoundError: the list file is missing, or listed images are (count and the first few paths).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        list_file: str | os.PathLike,
        transform: Transform | None = None,
        *,
        check_files: bool = True,
    ):
        self.root = Path(root)
        self.list_file = Path(list_file)
        samples = []
        with open(self.list_file, encoding='utf-8') as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                fields = line.strip().rsplit(maxsplit=1)
                try:
                    label = int(fields[1]) if len(fields) == 2 else None
                except ValueError:
                    label = None
                if label is None or label < -1:
                    raise ValueError(
                        f'{self.list_file}:{line_no}: expected "relative/path.jpg label" with an integer '
                        f'label >= -1, got {line.rstrip()!r}.'
                    )
                samples.append((str(self.root / fields[0]), label))

        if check_files:
            missing = [path for path, _ in samples if not os.path.isfile(path)]
            if missing:
                raise FileNotFoundError(
                    f'{len(missing)} of {len(samples)} images listed in {self.list_file} are missing under '
                    f'root={str(self.root)!r}, e.g. {missing[:3]}; check root.'
                )
        super().__init__(samples, transform)


def class_counts(dataset: Dataset | Sequence[int] | np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Training images per class, counted from ``dataset.targets`` without loading images.

    Open samples (label -1) are not counted. A class with no images gets 0, never a missing entry.

    Args:
        dataset: a dataset with a ``targets`` attribute, or the labels themselves.
        num_classes: K.

    Returns:
        (K,) int64 counts.

    Raises:
        ValueError: if a label is >= K or below -1.
    """
    targets = getattr(dataset, 'targets', dataset)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
    bad = targets[(targets >= num_classes) | (targets < -1)]
    if bad.numel():
        raise ValueError(f'labels must lie in [0, {num_classes}) or be -1 (open), got {sorted(set(bad.tolist()))}.')
    return torch.bincount(targets[targets >= 0], minlength=num_classes)


@dataclass(eq=False)
class OpenLongTailData:
    """The datasets of one open long-tailed benchmark.

    Attributes:
        train: long-tailed training set with the training transform.
        train_eval: the same images with the eval transform (for centroid initialisation and train accuracy).
        val: known-class validation set (model selection), or None.
        test: balanced known-class test set, or None.
        open: open-set test images, all labelled -1, or None.
        open_val: open-set images for choosing the rejection threshold, disjoint from `open`, or None.
        class_names: names of the K known classes, in label order.
        train_counts: (K,) int64 training images per class.
        split: how the long-tailed subset was drawn (seed, profile, counts hash), or None for fixed file lists.
        open_class_names: names of the held-out classes, when known.
    """

    train: Dataset
    train_eval: Dataset
    val: Dataset | None
    test: Dataset | None
    open: Dataset | None
    open_val: Dataset | None
    class_names: list[str]
    train_counts: torch.Tensor
    split: LongTailSplit | None = None
    open_class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """K, the number of known classes."""
        return len(self.class_names)

    @property
    def counts_hash(self) -> str | None:
        """Short hash of the per-class training counts (None for fixed file lists)."""
        return None if self.split is None else self.split.counts_hash

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python summary for run reports: sizes per split, class names, counts and the split record."""
        datasets = {name: getattr(self, name) for name in ('train', 'val', 'test', 'open', 'open_val')}
        return {
            'class_names': list(self.class_names),
            'open_class_names': list(self.open_class_names),
            'train_counts': self.train_counts.tolist(),
            'sizes': {name: len(dataset) for name, dataset in datasets.items() if dataset is not None},
            'split': None if self.split is None else self.split.to_dict(),
        }


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST-LT


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an unsigned-byte IDX file (the MNIST format), gzipped or not.

    Args:
        path: file path; a ``.gz`` suffix is decompressed.

    Returns:
        (N,) uint8 labels or (N, rows, cols) uint8 images, read-only.

    Raises:
        ValueError: a wrong magic number or a size that does not match the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        data = f.read()

    magic = int.from_bytes(data[:4], 'big') if len(data) >= 4 else None
    ndim = None if magic is None else magic & 0xFF
    if ndim not in _IDX_MAGIC or magic != _IDX_MAGIC[ndim]:
        expected = ' or '.join(f'0x{m:08x}' for m in _IDX_MAGIC.values())
        raise ValueError(f'{path} is not an unsigned-byte IDX file: magic {magic!r}, expected {expected}.')
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
    if len(data) != header + math.prod(shape):
        raise ValueError(f'{path}: header says shape {shape} but the file holds {len(data) - header} data bytes.')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_fashion_mnist(root: str | os.PathLike | None) -> dict[str, Path]:
    # NOTE: an explicit root is the only place looked at; silently reading other files would hide a typo
    if root is not None:
        candidates = [Path(root), Path(root) / 'FashionMNIST' / 'raw']
    else:
        candidates = [Path(_FASHION_MNIST_DEBIAN_DIR)]

    for folder in candidates:
        found = {}
        for key, name in _FASHION_MNIST_FILES.items():
            for path in (folder / name, folder / f'{name}.gz'):
                if path.is_file():
                    found[key] = path
                    break
        if len(found) == len(_FASHION_MNIST_FILES):
            _logger.info('Reading Fashion-MNIST from %s', folder)
            return found

    where = ', '.join(str(c) for c in candidates)
    raise FileNotFoundError(
        f'Fashion-MNIST IDX files ({", ".join(_FASHION_MNIST_FILES.values())}, optionally .gz) were not found in '
        f'{where}. Get them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs to '
        f'{_FASHION_MNIST_DEBIAN_DIR}) or `torchvision.datasets.FashionMNIST(root, download=True)` and pass '
        f'that root.'
    )


@lru_cache(maxsize=1)
def _load_fashion_mnist(files: tuple[tuple[str, Path], ...]) -> dict[str, np.ndarray]:
    # NOTE: read_idx returns read-only arrays, so sharing the cached arrays between calls is safe
    arrays = {key: read_idx(path) for key, path in files}
    for split in ('train', 'test'):
        images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
        if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(
                f'Fashion-MNIST {split} files do not match: images {images.shape}, labels {labels.shape} '
                f'with max label {labels.max()}; expected (N, 28, 28) images, N labels in 0..9.'
            )
    return arrays


def _take_per_class(labels: np.ndarray, classes: Sequence[int], count: int | None, rng: np.random.Generator):
    """Indices of `count` random images of each class (all of them for None), sorted."""
    picked = []
    for class_id in classes:
        pool = np.flatnonzero(labels == class_id)
        if count is not None and pool.size < count:
            raise ValueError(f'class {class_id} has {pool.size} images, fewer than the {count} requested.')
        picked.append(pool if count is None else rng.choice(pool, size=count, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.empty(0, dtype=np.int64)


def fashion_mnist_lt(
    root: str | os.PathLike | None = None,
    *,
    known_classes: int | Sequence[int] = 7,
    imbalance_ratio: float = 100.0,
    max_per_class: int = 500,
    val_per_class: int = 50,
    test_per_class: int | None = None,
    profile: str = 'exp',
    seed: int = 0,
    transform_train: Transform | None = None,
    transform_eval: Transform | None = None,
) -> OpenLongTailData:
    """Fashion-MNIST-LT: a long-tailed, open-set benchmark of real 28x28 product photos (Xiao et al., 2017).

    Known classes are ``known_classes`` (an int K takes the first K of the 10 ids: T-shirt/top, Trouser, Pullover,
    Dress, Coat, Sandal, Shirt for K = 7); the rest (Sneaker, Bag, Ankle boot) form the open set and never reach
    training. The splits are disjoint by construction:

    * val: `val_per_class` images per known class from the official train set, drawn first;
    * train: a `long_tail_split` of the remaining official train images (ranks shuffled by `seed`);
    * test: the official test images of the known classes (1,000 each, or `test_per_class`), balanced;
    * open: the official test images of the open classes (same per-class count as test), labelled -1;
    * open_val: `val_per_class` official train images per open class, labelled -1, for threshold choice.

    With the defaults (exp profile, ratio 100, head 500) the train counts are 500, 232, 107, 50, 23, 10, 5
    (927 images): 3 many-shot, 2 medium-shot and 2 few-shot classes under both the strict (>100 / <20) and the
    inclusive (>=100 / <=20) rule, since no count sits on a boundary. Which class gets which count depends on
    `seed`; the counts hash records it. `max_per_class` is the size knob: runtime scales with it.

    Files are looked up in `root`, then ``root/FashionMNIST/raw`` (torchvision's layout); without a root, in
    the Debian package's ``/usr/share/datasets/fashion-mnist``. Each of the four IDX files may be gzipped.

    Args:
        root: folder with the IDX files, or None to use the Debian path.
        known_classes: K (first K ids) or explicit ids; the new label j is the j-th known id.
        imbalance_ratio: head count over tail count.
        max_per_class: head-class training count (at most 6000 - val_per_class).
        val_per_class: validation images per class, for known and open classes alike.
        test_per_class: test (and open) images per class, None for all 1,000.
        profile: 'exp' or 'pareto', see `long_tail_split`.
        seed: fixes the validation draw, the class ranks and the training images.
        transform_train: transform of the training set; None returns RGB PIL images.
        transform_eval: transform of every other set.

    Returns:
        The datasets, class names, train counts and split record.

    Raises:
        FileNotFoundError: the IDX files are nowhere to be found (the message says how to get them).
        ValueError: bad split arguments, or corrupt IDX files.

    Example:
        >>> data = fashion_mnist_lt(transform_train=train_tf, transform_eval=eval_tf)  # doctest: +SKIP
        >>> data.train_counts, data.counts_hash  # doctest: +SKIP
    """
    files = _find_fashion_mnist(root)
    arrays = _load_fashion_mnist(tuple(sorted(files.items())))
    splits = open_set_split(
        range(len(FASHION_MNIST_CLASSES)), known_classes=known_classes, class_names=FASHION_MNIST_CLASSES
    )
    train_labels, test_labels = arrays['train_labels'], arrays['test_labels']
    if val_per_class < 0 or (test_per_class is not None and test_per_class < 1):
        raise ValueError(f'val_per_class={val_per_class} must be >= 0 and test_per_class={test_per_class} >= 1.')

    # validation first, so the long-tailed draw only sees the rest of the official train set
    rng = np.random.default_rng(seed)
    val_idx = _take_per_class(train_labels, splits.known_classes, val_per_class, rng)
    open_val_idx = _take_per_class(train_labels, splits.open_classes, val_per_class, rng)
    pool = np.setdiff1d(np.flatnonzero(np.isin(train_labels, splits.known_classes)), val_idx)
    split = long_tail_split(
        train_labels[pool],
        known_classes=splits.known_classes,
        imbalance_ratio=imbalance_ratio,
        max_per_class=max_per_class,
        seed=seed,
        profile=profile,
    )
    split = replace(split, indices=pool[split.indices])

    test_idx = _take_per_class(test_labels, splits.known_classes, test_per_class, rng)
    open_idx = _take_per_class(test_labels, splits.open_classes, test_per_class, rng)

    def subset(split_name: str, indices: np.ndarray, transform: Transform | None) -> ArrayImageDataset:
        images, labels = arrays[f'{split_name}_images'], arrays[f'{split_name}_labels']
        return ArrayImageDataset(images[indices], splits.remap(labels[indices]), transform)

    train = subset('train', split.indices, transform_train)
    return OpenLongTailData(
        train=train,
        train_eval=ArrayImageDataset(train.images, train.targets, transform_eval),
        val=subset('train', val_idx, transform_eval),
        test=subset('test', test_idx, transform_eval),
        open=subset('test', open_idx, transform_eval) if splits.open_classes else None,
        open_val=subset('train', open_val_idx, transform_eval) if splits.open_classes and val_per_class else None,
        class_names=list(splits.class_names),
        train_counts=class_counts(train, splits.num_classes),
        split=split,
        open_class_names=list(splits.open_class_names),
    )


# ---------------------------------------------------------------------------------------------------------------------
# ImageFolder trees


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith('.'))


def _image_files(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.rglob('*')) if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]


def image_folder_splits(
    root: str | os.PathLike,
    *,
    transform_train: Transform | None = None,
    transform_eval: Transform | None = None,
) -> OpenLongTailData:
    """Open long-tailed datasets from an ImageFolder-style tree.

    Layout (only ``train/`` is required)::

        root/train/<class>/<image>      long-tailed training images; the sorted class folder names define
                                        the labels 0..K-1
        root/val/<class>/<image>        known-class validation images
        root/test/<class>/<image>       known-class test images
        root/open/**/<image>            open-set test images of unseen classes, any sub-folders, all labelled -1
        root/open_val/**/<image>        open-set images for choosing the rejection threshold, labelled -1

    Images are files with torchvision's image extensions (.jpg, .png, ...). ``val/`` and ``test/`` may
    leave out classes but may not add any: a class folder absent from ``train/`` would have no label.

    Args:
        root: the tree's root folder.
        transform_train: transform of the training set.
        transform_eval: transform of every other set.

    Returns:
        The datasets (missing folders give None), class names and train counts; ``split`` is None.

    Raises:
        FileNotFoundError: ``root/train`` is missing, or a class folder or ``open/`` holds no images.
        ValueError: ``val/`` or ``test/`` contains classes that ``train/`` does not.
    """
    root = Path(root)
    if not (root / 'train').is_dir():
        raise FileNotFoundError(f'{root / "train"} does not exist; expected root/train/<class>/<image> under {root}.')
    class_names = _class_folders(root / 'train')
    class_to_idx = {name: j for j, name in enumerate(class_names)}

    def labelled(split_name: str) -> list[tuple[str, int]] | None:
        folder = root / split_name
        if not folder.is_dir():
            return None
        extra = sorted(set(_class_folders(folder)) - class_to_idx.keys())
        if extra:
            raise ValueError(f'{folder} has class folders {extra} that {root / "train"} lacks; they have no label.')
        samples = []
        for name in _class_folders(folder):
            files = _image_files(folder / name)
            if not files:
                raise FileNotFoundError(f'{folder / name} holds no image files.')
            samples += [(path, class_to_idx[name]) for path in files]
        return samples

    def unlabelled(split_name: str) -> list[tuple[str, int]] | None:
        folder = root / split_name
        if not folder.is_dir():
            return None
        files = _image_files(folder)
        if not files:
            raise FileNotFoundError(f'{folder} exists but holds no image files.')
        return [(path, -1) for path in files]

    def dataset(samples: list[tuple[str, int]] | None, transform: Transform | None) -> FileImageDataset | None:
        return None if samples is None else FileImageDataset(samples, transform)

    train_samples = labelled('train')
    train = FileImageDataset(train_samples, transform_train)
    return OpenLongTailData(
        train=train,
        train_eval=FileImageDataset(train_samples, transform_eval),
        val=dataset(labelled('val'), transform_eval),
        test=dataset(labelled('test'), transform_eval),
        open=dataset(unlabelled('open'), transform_eval),
        open_val=dataset(unlabelled('open_val'), transform_eval),
        class_names=class_names,
        train_counts=class_counts(train, len(class_names)),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Transforms


def create_transforms(
    model: nn.Module,
    *,
    img_size: int | tuple[int, int] | None = None,
    is_training: bool,
    **kwargs: Any,
) -> Callable[[Image.Image], torch.Tensor]:
    """timm transform from the model's data config, at any input size, for images of any mode.

    Resolves mean, std, interpolation and crop from ``timm.data.resolve_model_data_config(model)`` (works for
    timm models and for OLTR wrappers, which carry the backbone's ``pretrained_cfg``), overrides the input size,
    and prepends a conversion to RGB so grayscale (Fashion-MNIST) or RGBA images give 3 channels.

    Args:
        model: a timm model or anything with a timm ``pretrained_cfg``.
        img_size: output side (int) or (H, W); None keeps the model's default (224 for most ImageNet models).
        is_training: random-resized-crop, flip and colour-jitter augmentation if True, resize + center crop if False.
        **kwargs: passed to ``timm.data.create_transform`` (e.g. ``auto_augment``, ``hflip``).

    Returns:
        A callable mapping a PIL image to a (3, H, W) float tensor.
    """
    config = timm.data.resolve_model_data_config(model)
    if img_size is not None:
        H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
        config['input_size'] = (3, int(H), int(W))
    transform = timm.data.create_transform(**config, is_training=is_training, **kwargs)
    steps = transform.transforms if isinstance(transform, transforms.Compose) else [transform]
    return transforms.Compose([_ToRGB(), *steps])
