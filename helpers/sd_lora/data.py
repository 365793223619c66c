"""Captioned images: captions from a folder or a Hub dataset, images resized and cropped to one resolution, the
seeded batch order, and a tiny generated set of coloured shapes."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision import transforms

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class MissingCaptionError(ValueError):
    """Training images were found without a caption."""


def image_transform(resolution: int, random_flip: bool = False) -> transforms.Compose:
    """Any size -> shorter side resized to `resolution`, centre-cropped square, optionally flipped, in [-1, 1]."""
    steps = [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
             transforms.CenterCrop(resolution)]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])


def check_captions(captions: Sequence[str | None], source: str, names: Sequence[str] | None = None) -> list[str]:
    """The captions stripped, or a MissingCaptionError naming the images that have none."""
    missing = [(names[i] if names else f"row {i}") for i, c in enumerate(captions) if c is None or not str(c).strip()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingCaptionError(
            f"{len(missing)} of {len(captions)} images in {source} have no caption: {shown}. Give every image a caption: "
            "a text file of the same name (cat.png -> cat.txt) or a line {\"file_name\": \"cat.png\", \"text\": \"...\"} "
            "in metadata.jsonl; or remove the uncaptioned images"
        )
    return [str(c).strip() for c in captions]


def read_image_folder(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Image paths and captions of a folder: captions from metadata.jsonl, else from same-name .txt files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' not found; create it with images and their captions")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'; put your training images there")
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
        by_name = {row.get("file_name"): row.get("text") for row in rows}
        captions = [by_name.get(p.name) for p in images]
    else:
        captions = [p.with_suffix(".txt").read_text() if p.with_suffix(".txt").is_file() else None for p in images]
    return images, check_captions(captions, f"'{folder}'", [p.name for p in images])


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, read from its header."""
    with Image.open(path) as image:
        return image.size


class CaptionedImages(Dataset):
    """Images (paths or PIL images, any size and mode) with captions, as {'pixel_values', 'caption'} at one resolution."""

    def __init__(self, images: Sequence[Any], captions: Sequence[str], resolution: int, random_flip: bool = False,
                 source: str = "the dataset") -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions in {source}; give one caption per image")
        names = [Path(p).name for p in images] if isinstance(images, (list, tuple)) and all(
            isinstance(p, (str, Path)) for p in images) else None
        self.captions = check_captions(captions, source, names)
        self.images = images
        self.transform = image_transform(resolution, random_flip)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, resolution: int, random_flip: bool = False) -> "CaptionedImages":
        """A folder of images with captions (metadata.jsonl or same-name .txt files)."""
        images, captions = read_image_folder(folder)
        return cls(images, captions, resolution, random_flip, source=f"'{folder}'")

    @classmethod
    def from_hub(cls, name: str, resolution: int, random_flip: bool = False, split: str = "train",
                 image_column: str = "image", caption_column: str = "text") -> "CaptionedImages":
        """A Hub image/caption dataset such as 'lambdalabs/naruto-blip-captions' (needs `datasets`)."""
        try:
            from datasets import load_dataset
        except ImportError as err:
            raise ImportError("Hub datasets need `pip install datasets` (Colab has it)") from err
        rows = load_dataset(name, split=split)
        for column in (image_column, caption_column):
            if column not in rows.column_names:
                raise KeyError(f"dataset {name!r} has no column {column!r} (it has {rows.column_names})")
        captions = list(rows[caption_column])
        return cls(_Column(rows, image_column), captions, resolution, random_flip, source=f"dataset {name!r}")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        return {"pixel_values": self.transform(image.convert("RGB")), "caption": self.captions[index]}


class _Column:
    """One column of a Hub dataset, indexed lazily (images are decoded only when used)."""

    def __init__(self, rows: Any, column: str) -> None:
        self.rows, self.column = rows, column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[int(index)][self.column]


def batch_indices(step: int, batch_size: int, length: int, seed: int = 0) -> list[int]:
    """The dataset indices of batch number `step`: a new seeded permutation each epoch, so resume is exact."""
    per_epoch = max(1, length // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[position * batch_size:(position + 1) * batch_size]


def micro_batch(dataset: Dataset, index: int, batch_size: int, seed: int, process: int = 0,
                processes: int = 1) -> dict[str, Any]:
    """Micro-batch number `index` for one process: a seeded permutation per epoch (a resumed run sees the same
    batches), the global batch of batch_size * processes images shared out between the processes."""
    indices = batch_indices(index, batch_size * processes, len(dataset), seed)[process::processes]
    items = [dataset[i] for i in indices]
    return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "caption": [item["caption"] for item in items]}
SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}


def make_shape_images(folder: str | os.PathLike, count: int = 8, seed: int = 0) -> Path:
    """Write `count` captioned images of coloured shapes, of mixed sizes, into `folder` (a tiny training set)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [(64, 64), (96, 64), (64, 112), (80, 80)]
    for i in range(count):
        colour, background = rng.sample(sorted(SHAPE_COLOURS), 2)
        shape = rng.choice(["circle", "square"])
        width, height = sizes[i % len(sizes)]
        image = Image.new("RGB", (width, height), SHAPE_COLOURS[background])
        half = min(width, height) // 4
        box = [width // 2 - half, height // 2 - half, width // 2 + half, height // 2 + half]
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=SHAPE_COLOURS[colour])
        image.save(folder / f"shape_{i:02d}.png")
        (folder / f"shape_{i:02d}.txt").write_text(f"a {colour} {shape} on a {background} background\n")
    return folder
