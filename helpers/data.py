"""MNIST-like datasets through torchvision, scaled to [-1, 1], with checks of the files in DATA_DIR.

Offline, `tools/prepare_data.py` writes stand-ins in the same IDX format (tools/setup.sh runs it)."""
from __future__ import annotations

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
