"""sparse_diffusion.data: the image loaders (Fashion-MNIST, image folders) on small fixture files and
the installed data set, and the dataset specs. Stroke data: test_stroke_data.py."""
import gzip
import os
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_diffusion.data import (
    DatasetFormatError,
    DatasetNotFoundError,
    FashionMNIST,
    ImageFolder,
    fashion_mnist_arrays,
    get_dataset,
)
from sparse_diffusion.data.images import FASHION_MNIST_DIR


# --------------------------------------------------------------------------- Fashion-MNIST
def write_idx(path, magic, dims, payload):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{len(dims)}I", magic, *dims) + np.asarray(payload, np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", 0x803, (n, 28, 28), rng.integers(0, 256, n * 784))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", 0x801, (n,), np.arange(n) % 10)
    return tmp_path


def test_idx_pair_loads(idx_dir):
    images, labels = fashion_mnist_arrays(str(idx_dir), "train")
    assert images.shape == (7, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == list(range(7)) and labels.dtype == np.int64
    ds = get_dataset("fashion-mnist", split="test", data_dir=str(idx_dir))
    assert (len(ds), ds.kind, ds.channels, ds.num_classes, ds.name) == (3, "image", 1, 10, "fashion-mnist-test-28")
    image, label = ds[2]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label.dtype == torch.int64
    assert torch.equal(image[0], torch.from_numpy(fashion_mnist_arrays(str(idx_dir), "test")[0][2]).float() / 127.5 - 1)
    big = FashionMNIST("train", image_size=40, data_dir=str(idx_dir), limit=5)
    assert len(big) == 5 and big[0][0].shape == (1, 40, 40) and big.name == "fashion-mnist-train-40-first5"
    assert big.images.min() >= -1 and big.images.max() <= 1


def test_idx_errors_name_the_file(idx_dir):
    bad = idx_dir / "train-images-idx3-ubyte.gz"
    write_idx(bad, 0x801, (7, 28, 28), np.zeros(7 * 784))
    with pytest.raises(DatasetFormatError, match=re.escape(str(bad)) + ".*magic"):
        fashion_mnist_arrays(str(idx_dir), "train")
    write_idx(bad, 0x803, (7, 28, 28), np.zeros(6 * 784))  # one image short
    with pytest.raises(DatasetFormatError, match=re.escape(str(bad)) + ".*truncated"):
        fashion_mnist_arrays(str(idx_dir), "train")
    write_idx(bad, 0x803, (7, 28, 28), np.zeros(7 * 784))
    bad.write_bytes(bad.read_bytes()[:-20])  # the gzip stream itself cut short
    with pytest.raises(DatasetFormatError, match=re.escape(str(bad))):
        fashion_mnist_arrays(str(idx_dir), "train")
    write_idx(bad, 0x803, (7, 27, 28), np.zeros(7 * 27 * 28))
    with pytest.raises(DatasetFormatError, match="item shape"):
        fashion_mnist_arrays(str(idx_dir), "train")


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert str(tmp_path) in str(e.value) and "--data-dir" in str(e.value)
    assert "sudo apt-get install -y dataset-fashion-mnist" in str(e.value)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    train, test = get_dataset("fashion-mnist"), get_dataset("fashion-mnist", split="test")
    assert (len(train), len(test), train.num_classes, train.name) == (60000, 10000, 10, "fashion-mnist-train-28")
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    image, label = train[0]
    assert image.shape == (1, 28, 28) and label.dim() == 0 and 0 <= int(label) < 10
    assert train.images.min() == -1 and train.images.max() == 1


# --------------------------------------------------------------------------- image folder
@pytest.fixture
def png_dir(tmp_path):
    root = tmp_path / "imgs"
    for cls, n in (("cat", 12), ("dog", 8)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = np.zeros((10, 30, 3), np.uint8)
            pixels[:, 10:20] = 255  # white centre square, black sides that the crop removes
            Image.fromarray(pixels).save(root / cls / f"{i:02d}.png")
    (root / "dog" / "zz_corrupt.png").write_bytes(b"\x89PNG not really")
    return root


def test_image_folder_classes_split_and_crop(png_dir):
    train = get_dataset(f"images:{png_dir}", image_size=16)
    test = ImageFolder(str(png_dir), "test", image_size=16)
    assert (len(train), len(test)) == (19, 2)  # 21 files, indices 0 and 20 go to test
    assert (train.kind, train.channels, train.image_size, train.num_classes) == ("image", 3, 16, 2)
    assert os.path.basename(test.files[1]) == "zz_corrupt.png"  # file 20 of the sorted 21
    image, label = train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label.dtype == torch.int64
    assert torch.allclose(image, torch.ones(3, 16, 16))  # only the white centre survives the crop
    assert train.labels.tolist() == [0] * 11 + [1] * 8
    assert train.name.startswith("images-imgs-") and train.name.endswith("-train-16")
    with pytest.raises(DatasetFormatError, match="zz_corrupt.png"):
        test[1]


def test_image_folder_without_classes_and_empty(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "flat" / "a.jpg")
    Image.new("L", (9, 5), 0).save(tmp_path / "flat" / "b.bmp")
    ds = get_dataset(f"images:{tmp_path / 'flat'}", split="train", data_dir="/ignored")
    assert ds.num_classes is None and len(ds) == 1
    image, label = ds[0]
    assert int(label) == -1 and image.shape == (3, 64, 64) and image.min() >= -1 and image.max() <= 1
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="empty"):
        get_dataset(f"images:{tmp_path / 'empty'}")
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        get_dataset(f"images:{tmp_path / 'nowhere'}")


def test_image_folder_too_small_for_a_test_split_says_so(tmp_path):
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    for split in ("train", "test"):  # both: a split must never come out empty, nor the other one
        with pytest.raises(ValueError) as e:
            get_dataset(f"images:{tmp_path / 'one'}", split=split)
        message = str(e.value)
        assert "\n" not in message and f"images:{tmp_path / 'one'} holds 1 image;" in message
        assert "at least 2" in message


# --------------------------------------------------------------------------- specs
@pytest.mark.parametrize("spec", ["mnist", "images", "images:", "fashion-mnist:x", "kanjivg:/tmp", "svg:a"])
def test_unknown_spec_lists_the_valid_forms(spec):
    with pytest.raises(ValueError, match="fashion-mnist, kanjivg, images:PATH, quickdraw:PATH, vmnist:PATH"):
        get_dataset(spec)
