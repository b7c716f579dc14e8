import gzip
import math
import struct

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from timm_oltr import data as oltr_data
from timm_oltr.data import (
    FASHION_MNIST_CLASSES,
    ImageListDataset,
    class_counts,
    create_transforms,
    fashion_mnist_lt,
    image_folder_splits,
    long_tail_split,
    open_set_split,
    read_idx,
)


def expected_counts(max_per_class, ratio, K, profile):
    """Head-to-tail counts, written as a plain loop over ranks."""
    counts = []
    for rank in range(K):
        if profile == 'exp':
            value = max_per_class * (1.0 / ratio) ** (rank / (K - 1))
        else:
            value = max_per_class / (rank + 1) ** (math.log(ratio) / math.log(K))
        counts.append(int(value + 1e-6))
    return counts


def balanced_labels(num_classes=10, per_class=600, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


# ---------------------------------------------------------------------------------------------------------------------
# long_tail_split


@pytest.mark.parametrize('profile', ['exp', 'pareto'])
@pytest.mark.parametrize('K, max_per_class, ratio', [(7, 500, 100), (10, 600, 10), (5, 1000, 100)])
def test_split_counts_follow_profile(profile, K, max_per_class, ratio):
    labels = balanced_labels(num_classes=K + 2, per_class=1000)
    split = long_tail_split(
        labels, known_classes=range(K), imbalance_ratio=ratio, max_per_class=max_per_class, seed=3, profile=profile
    )

    expected = expected_counts(max_per_class, ratio, K, profile)
    assert sorted(split.counts.tolist(), reverse=True) == expected
    assert expected[0] == max_per_class
    assert expected[-1] == int(max_per_class / ratio)
    for class_id, count in zip(split.classes.tolist(), split.counts.tolist(), strict=True):
        assert (labels[split.indices] == class_id).sum() == count
    assert np.all(np.diff(split.indices) > 0)


def test_split_given_order_puts_head_first():
    split = long_tail_split(
        balanced_labels(), known_classes=[4, 2, 9], imbalance_ratio=10, max_per_class=100, shuffle_classes=False
    )
    assert split.classes.tolist() == [4, 2, 9]
    assert split.counts.tolist() == [100, 31, 10]


def test_exact_boundary_counts_do_not_round_down():
    split = long_tail_split(
        balanced_labels(per_class=1000), known_classes=range(7), max_per_class=1000, shuffle_classes=False
    )
    assert split.counts.tolist() == [1000, 464, 215, 100, 46, 21, 10]


def test_split_is_reproducible_by_seed():
    labels = balanced_labels()
    kwargs = dict(known_classes=range(7), imbalance_ratio=100, max_per_class=500)
    a, b = long_tail_split(labels, seed=0, **kwargs), long_tail_split(labels, seed=0, **kwargs)
    c = long_tail_split(labels, seed=1, **kwargs)

    assert a.counts_hash == b.counts_hash and len(a.counts_hash) == 8
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.counts.tolist() != c.counts.tolist()
    assert a.counts_hash != c.counts_hash
    assert not np.array_equal(a.indices, c.indices)
    assert a.to_dict()['seed'] == 0 and c.to_dict()['counts'] == c.counts.tolist()


def test_split_ignores_labels_outside_known_classes():
    labels = balanced_labels()
    labels[:100] = -1
    split = long_tail_split(labels, known_classes=[0, 1], imbalance_ratio=2, max_per_class=500)
    assert np.isin(labels[split.indices], [0, 1]).all()


def test_split_errors():
    labels = balanced_labels(per_class=50)
    with pytest.raises(ValueError, match=r'class \d has 50 images but the exp profile asks for 100'):
        long_tail_split(labels, known_classes=range(3), max_per_class=100, imbalance_ratio=2)
    with pytest.raises(ValueError, match="profile='zipf'"):
        long_tail_split(labels, known_classes=range(3), max_per_class=10, profile='zipf')
    with pytest.raises(ValueError, match='no images'):
        long_tail_split(labels, known_classes=range(3), max_per_class=10, imbalance_ratio=100)
    with pytest.raises(ValueError, match='distinct'):
        long_tail_split(labels, known_classes=[1, 1], max_per_class=10, imbalance_ratio=2)
    with pytest.raises(ValueError, match='imbalance_ratio=0.5'):
        long_tail_split(labels, known_classes=[1, 2], max_per_class=10, imbalance_ratio=0.5)
    with pytest.raises(ValueError, match='1-d integer'):
        long_tail_split(labels.astype(np.float32), known_classes=[1, 2], max_per_class=10, imbalance_ratio=2)


def test_single_class_split():
    split = long_tail_split(balanced_labels(), known_classes=[3], max_per_class=7)
    assert split.counts.tolist() == [7]


# ---------------------------------------------------------------------------------------------------------------------
# open-set split and class counts


def test_open_set_split_remaps_known_and_marks_open():
    splits = open_set_split(range(5), known_classes=[3, 0, 4], class_names=list('abcde'))
    assert splits.open_classes == (1, 2)
    assert splits.class_names == ('d', 'a', 'e') and splits.open_class_names == ('b', 'c')
    assert splits.remap([0, 1, 2, 3, 4]).tolist() == [1, -1, -1, 0, 2]
    assert open_set_split(range(10), known_classes=7).known_classes == tuple(range(7))
    with pytest.raises(ValueError, match=r'class ids \[7\]'):
        splits.remap([0, 7])
    with pytest.raises(ValueError, match='not found: \\[9\\]'):
        open_set_split(range(5), known_classes=[9])
    with pytest.raises(ValueError, match='known_classes=6'):
        open_set_split(range(5), known_classes=6)


def test_class_counts_keeps_empty_classes_and_skips_open():
    counts = class_counts(np.array([0, 0, 2, 4, -1, -1]), num_classes=5)
    assert counts.dtype == torch.long
    assert counts.tolist() == [2, 0, 1, 0, 1]
    with pytest.raises(ValueError, match=r'\[5\]'):
        class_counts([0, 5], num_classes=5)


# ---------------------------------------------------------------------------------------------------------------------
# IDX files and Fashion-MNIST-LT


def write_idx(path, array):
    header = struct.pack('>I', 0x0800 + array.ndim) + b''.join(struct.pack('>I', n) for n in array.shape)
    opener = gzip.open if str(path).endswith('.gz') else open
    with opener(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(folder, train_per_class=600, test_per_class=30):
    """IDX files whose images encode their own index in the first two pixels, so splits can be traced back."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class, gz in (('train', train_per_class, True), ('t10k', test_per_class, False)):
        labels = balanced_labels(per_class=per_class, seed=len(name))
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(len(labels)) // 256, np.arange(len(labels)) % 256
        suffix = '.gz' if gz else ''
        write_idx(folder / f'{name}-images-idx3-ubyte{suffix}', images)
        write_idx(folder / f'{name}-labels-idx1-ubyte{suffix}', labels)
    return folder


def source_index(dataset):
    return dataset.images[:, 0, 0].astype(np.int64) * 256 + dataset.images[:, 0, 1]


def test_read_idx_round_trip_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / 'a.gz', images)
    np.testing.assert_array_equal(read_idx(tmp_path / 'a.gz'), images)

    (tmp_path / 'bad').write_bytes(b'\x00\x00\x09\x03' + bytes(12))
    with pytest.raises(ValueError, match='magic'):
        read_idx(tmp_path / 'bad')
    (tmp_path / 'short').write_bytes(struct.pack('>IIII', 0x0803, 2, 3, 4) + bytes(5))
    with pytest.raises(ValueError, match=r'shape \(2, 3, 4\)'):
        read_idx(tmp_path / 'short')


def test_fashion_mnist_lt_splits_are_disjoint(tmp_path):
    root = write_fake_fashion_mnist(tmp_path / 'FashionMNIST' / 'raw')
    data = fashion_mnist_lt(tmp_path, max_per_class=300, val_per_class=20, test_per_class=10, seed=5)

    known, open_ = list(range(7)), [7, 8, 9]
    train_labels = read_idx(root / 'train-labels-idx1-ubyte.gz')
    train_ids = source_index(data.train)
    val_ids, open_val_ids = source_index(data.val), source_index(data.open_val)
    assert len(set(train_ids) | set(val_ids) | set(open_val_ids)) == len(train_ids) + len(val_ids) + len(open_val_ids)
    assert np.isin(train_labels[train_ids], known).all()
    assert np.isin(train_labels[open_val_ids], open_).all()
    test_ids, open_ids = source_index(data.test), source_index(data.open)
    assert not set(test_ids) & set(open_ids)

    assert data.train.targets.min() == 0 and data.train.targets.max() == 6
    assert (data.open.targets == -1).all() and (data.open_val.targets == -1).all()
    assert np.bincount(data.test.targets).tolist() == [10] * 7 and len(data.open) == 30
    assert data.train_counts.tolist() == data.split.counts.tolist()
    assert sorted(data.train_counts.tolist(), reverse=True) == expected_counts(300, 100, 7, 'exp')
    assert data.class_names == list(FASHION_MNIST_CLASSES[:7])
    assert data.to_dict()['sizes']['val'] == 140


def test_fashion_mnist_lt_without_open_classes(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    data = fashion_mnist_lt(tmp_path, known_classes=10, imbalance_ratio=10, max_per_class=100, profile='pareto')
    assert data.open is None and data.open_val is None and data.open_class_names == []
    assert sorted(data.train_counts.tolist(), reverse=True) == expected_counts(100, 10, 10, 'pareto')


def test_fashion_mnist_lt_missing_files_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(oltr_data, '_FASHION_MNIST_DEBIAN_DIR', str(tmp_path / 'nowhere'))
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist') as info:
        fashion_mnist_lt(tmp_path)
    assert 'download=True' in str(info.value)


def test_fashion_mnist_lt_explicit_root_is_not_replaced_by_another_copy(tmp_path, monkeypatch):
    write_fake_fashion_mnist(tmp_path / 'elsewhere')  # files that a fallback could silently pick up
    monkeypatch.setattr(oltr_data, '_FASHION_MNIST_DEBIAN_DIR', str(tmp_path / 'elsewhere'))
    with pytest.raises(FileNotFoundError, match='typo'):
        fashion_mnist_lt(tmp_path / 'typo')


@pytest.fixture(scope='module')
def real_fashion_mnist(fashion_mnist_files):
    return fashion_mnist_lt()


@pytest.mark.parametrize('rule, many_min, few_max', [('strict', 101, 19), ('inclusive', 100, 20)])
def test_fashion_mnist_lt_defaults_fill_every_shot_group(real_fashion_mnist, rule, many_min, few_max):
    counts = real_fashion_mnist.train_counts
    many, few = counts >= many_min, counts <= few_max
    assert (many.sum(), (~many & ~few).sum(), few.sum()) == (3, 2, 2)
    assert sorted(counts.tolist()) == [5, 10, 23, 50, 107, 232, 500]


def test_fashion_mnist_lt_defaults_real_images(real_fashion_mnist):
    data = real_fashion_mnist
    sizes = {'train': 927, 'val': 350, 'test': 7000, 'open': 3000, 'open_val': 150}
    assert data.to_dict()['sizes'] == sizes
    img, label = data.train[0]
    assert img.mode == 'RGB' and img.size == (28, 28) and 0 <= label < 7
    assert data.counts_hash == fashion_mnist_lt().counts_hash
    assert data.counts_hash != fashion_mnist_lt(seed=1).counts_hash


# ---------------------------------------------------------------------------------------------------------------------
# list files and ImageFolder trees


def save_image(path, mode='L', size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=128 if mode == 'L' else (10, 20, 30)).save(path)


def test_image_list_dataset(tmp_path):
    save_image(tmp_path / 'a' / 'x 1.jpg')
    save_image(tmp_path / 'b' / 'y.png', mode='RGB')
    (tmp_path / 'list.txt').write_text('a/x 1.jpg 3\n\nb/y.png -1\n')

    dataset = ImageListDataset(tmp_path, tmp_path / 'list.txt')
    assert dataset.targets.tolist() == [3, -1]
    img, label = dataset[0]
    assert img.mode == 'RGB' and label == 3


@pytest.mark.parametrize('bad_line', ['a/x.jpg', 'a/x.jpg cat', 'a/x.jpg -2'])
def test_image_list_rejects_bad_line_with_its_number(tmp_path, bad_line):
    (tmp_path / 'list.txt').write_text(f'a/x.jpg 0\n\n{bad_line}\n')
    with pytest.raises(ValueError, match=f'list.txt:3: .*{bad_line!r}'):
        ImageListDataset(tmp_path, tmp_path / 'list.txt', check_files=False)


def test_image_list_reports_missing_files(tmp_path):
    (tmp_path / 'list.txt').write_text('a/x.jpg 0\nb/y.jpg 1\n')
    with pytest.raises(FileNotFoundError, match='2 of 2 images'):
        ImageListDataset(tmp_path, tmp_path / 'list.txt')
    assert len(ImageListDataset(tmp_path, tmp_path / 'list.txt', check_files=False)) == 2


def test_image_folder_splits(tmp_path):
    for split, classes in (('train', 'abc'), ('val', 'ac'), ('test', 'abc')):
        for name in classes:
            for i in range(2 if split != 'train' or name != 'a' else 3):
                save_image(tmp_path / split / name / f'{i}.png')
    save_image(tmp_path / 'open' / 'dogs' / '0.jpg')
    save_image(tmp_path / 'open' / '1.jpg')
    (tmp_path / 'open' / 'notes.txt').write_text('not an image')

    data = image_folder_splits(tmp_path, transform_eval=lambda img: np.asarray(img))
    assert data.class_names == ['a', 'b', 'c']
    assert data.train_counts.tolist() == [3, 2, 2]
    assert data.val.targets.tolist() == [0, 0, 2, 2]
    assert data.open.targets.tolist() == [-1, -1] and data.open_val is None
    img, label = data.test[0]
    assert img.shape == (10, 12, 3) and label == 0
    assert data.split is None and data.counts_hash is None
    assert data.to_dict()['sizes'] == {'train': 7, 'val': 4, 'test': 6, 'open': 2}


def test_image_folder_rejects_unknown_eval_class(tmp_path):
    save_image(tmp_path / 'train' / 'a' / '0.png')
    save_image(tmp_path / 'test' / 'zebra' / '0.png')
    with pytest.raises(ValueError, match=r"\['zebra'\]"):
        image_folder_splits(tmp_path)
    with pytest.raises(FileNotFoundError, match='train'):
        image_folder_splits(tmp_path / 'test')


# ---------------------------------------------------------------------------------------------------------------------
# transforms


@pytest.mark.parametrize('img_size, expected', [(None, (160, 160)), (40, (40, 40)), ((32, 48), (32, 48))])
@pytest.mark.parametrize('is_training', [False, True])
def test_create_transforms_any_size_grayscale_to_rgb(img_size, expected, is_training):
    model = timm.create_model('test_efficientnet', pretrained=False)  # default input 160 x 160
    transform = create_transforms(model, img_size=img_size, is_training=is_training)
    x = transform(Image.new('L', (28, 28), color=200))
    assert x.shape == (3, *expected) and x.dtype == torch.float32
    config = timm.data.resolve_model_data_config(model)
    pixels = x * torch.tensor(config['std']).view(3, 1, 1) + torch.tensor(config['mean']).view(3, 1, 1)
    torch.testing.assert_close(pixels[0], pixels[2])  # gray in, three equal channels out
