"""Pix2PixHD's data: label maps checked and encoded for the generator (one-hot classes, instance edges, RGB
sketches), the offline procedural toy streets, paired photo/label folders, and the CMP Facade Database."""
from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..downloads import TIMEOUT_S, DownloadError, fetch_file, unpack_archive

CMP_FACADES_PAGE = "https://cmp.felk.cvut.cz/~tylecr1/facade/"
CMP_FACADES_URL = CMP_FACADES_PAGE + "CMP_facade_DB_base.zip"
CMP_FACADES_CLASSES = ["(unused)", "background", "facade", "window", "door", "cornice", "sill", "balcony",
                       "blind", "deco", "molding", "pillar", "shop"]
PROCEDURAL_CLASSES = ["sky", "ground", "building", "window", "tree", "sun"]


# --- input checks and encoding --------------------------------------------------------------------------------------


def check_image_size(height: int, width: int, multiple: int = 32, what: str = "image", minimum: int = 0) -> None:
    """Raise a ValueError unless height and width are multiples of `multiple` and at least `minimum`."""
    if min(height, width) < minimum:
        raise ValueError(f"{what} size {height}x{width} is below the minimum {minimum}x{minimum}: the residual "
                         "blocks' reflection padding needs at least 2x2 pixels at the bottleneck; use larger images")
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        fix_h = max(multiple, round(height / multiple) * multiple)
        fix_w = max(multiple, round(width / multiple) * multiple)
        raise ValueError(
            f"{what} size {height}x{width} is not divisible by {multiple}: the generator halves it "
            f"{int(math.log2(multiple))} times and must come back to the same size; resize or crop to e.g. "
            f"{fix_h}x{fix_w}"
        )


def check_label_map(labels: Tensor, label_nc: int, what: str = "label map") -> Tensor:
    """Return `labels` as int64 (N, H, W) after checking every value lies in 0..label_nc-1."""
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 3:
        raise ValueError(f"{what} must have shape (N, H, W) or (N, 1, H, W) of class indices, "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError(f"{what} holds non-integer values; pass class indices, not an image or a one-hot map")
    labels = labels.long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= label_nc:
        bad = sorted(set(torch.unique(labels).tolist()) - set(range(label_nc)))[:5]
        raise ValueError(
            f"{what} has values {bad} outside 0..{label_nc - 1} (label_nc={label_nc}); set label_nc to at least "
            f"{high + 1}, or map those values (e.g. an 'ignore' value 255) to a valid class first"
        )
    return labels


def one_hot_labels(labels: Tensor, label_nc: int) -> Tensor:
    """(N, H, W) class indices -> (N, label_nc, H, W) one-hot float map."""
    labels = check_label_map(labels, label_nc)
    return F.one_hot(labels, label_nc).permute(0, 3, 1, 2).float()


def instance_edges(instances: Tensor) -> Tensor:
    """(N, H, W) instance ids -> (N, 1, H, W) map that is 1 where a pixel differs from a 4-neighbour, else 0."""
    if instances.dim() == 4 and instances.shape[1] == 1:
        instances = instances[:, 0]
    if instances.dim() != 3:
        raise ValueError(f"instance map must have shape (N, H, W) or (N, 1, H, W), got {tuple(instances.shape)}")
    edge = torch.zeros_like(instances, dtype=torch.bool)
    horizontal = instances[:, :, 1:] != instances[:, :, :-1]
    vertical = instances[:, 1:, :] != instances[:, :-1, :]
    edge[:, :, 1:] |= horizontal
    edge[:, :, :-1] |= horizontal
    edge[:, 1:, :] |= vertical
    edge[:, :-1, :] |= vertical
    return edge.unsqueeze(1).float()


def check_rgb_input(images: Tensor, what: str = "RGB input") -> Tensor:
    """Return `images` if they are float (N, 3, H, W) in [-1, 1] (a sketch or edge map fed directly), else raise."""
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{what} (label_nc=0) must be float images of shape (N, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}; pass class indices with label_nc > 0 for label maps")
    if images.min() < -1 or images.max() > 1:
        raise ValueError(f"{what} must lie in [-1, 1], got [{images.min():.2f}, {images.max():.2f}]; "
                         "map 0..255 pixels with x / 127.5 - 1")
    return images


def label_sketch(labels: Tensor, instances: Tensor | None = None) -> Tensor:
    """A sketch of a label map: black (-1) lines on white (1) where the class or the instance changes, (N, 3, H, W)."""
    edges = instance_edges(labels)
    if instances is not None:
        edges = torch.maximum(edges, instance_edges(instances))
    return (1 - 2 * edges).repeat(1, 3, 1, 1)


def encode_input(labels: Tensor, label_nc: int, instances: Tensor | None = None) -> Tensor:
    """Generator input: one-hot labels (+ the instance-edge channel when given); label_nc 0: RGB images as they are."""
    if label_nc == 0:
        return check_rgb_input(labels)
    one_hot = one_hot_labels(labels, label_nc)
    if instances is None:
        return one_hot
    if instances.shape[-2:] != one_hot.shape[-2:]:
        raise ValueError(f"instance map is {tuple(instances.shape[-2:])} but the label map is "
                         f"{tuple(one_hot.shape[-2:])}; both must have the same height and width")
    return torch.cat([one_hot, instance_edges(instances).to(one_hot)], dim=1)


def encode_pair_batch(batch: dict, size: int, label_nc: int, use_instance: bool,
                 device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """A data batch resized to `size` (maps: nearest, photos: area) and encoded: (G's input map, photo) on
    `device`. label_nc 0: the label map is drawn as an RGB sketch, which G gets as it is."""
    label, image, instance = batch["label"][:, None].float(), batch["image"], batch.get("instance")
    if label.shape[-1] != size:
        label = F.interpolate(label, size=(size, size), mode="nearest")
        image = F.interpolate(image, size=(size, size), mode="area")
        if instance is not None:
            instance = F.interpolate(instance[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    label = label[:, 0].long()
    if label_nc == 0:
        x = encode_input(label_sketch(label, instance), 0)
    else:
        x = encode_input(label, label_nc, instance if use_instance else None)
    return x.to(device), image.to(device)


def colorize_labels(labels: Tensor, label_nc: int) -> Tensor:
    """(N, H, W) class indices -> (N, 3, H, W) colours in [-1, 1] for figures (matplotlib's tab20 palette)."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"](np.arange(max(label_nc, 1)) % 20)[:, :3]
    palette = torch.tensor(colours, dtype=torch.float32) * 2 - 1
    return palette[check_label_map(labels.cpu(), label_nc)].permute(0, 3, 1, 2)


def input_channels(label_nc: int, use_instance: bool) -> int:
    """Channels of the encoded input: label_nc one-hot planes (+1 edge map); label_nc 0 means an RGB input."""
    return (label_nc if label_nc > 0 else 3) + int(use_instance)

# --- datasets -------------------------------------------------------------------------------------------------------


def _disc(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def procedural_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One label map, instance map and RGB image (H, W, 3 in [0, 1]) of a toy street: sky, ground, buildings, ..."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    horizon = rng.uniform(0.6, 0.8)
    label = np.where(yy < horizon, 0, 1).astype(np.int64)
    instance = label.copy()
    next_id = 2
    if rng.random() < 0.7:
        sun = _disc(yy, xx, rng.uniform(0.08, 0.2), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.09))
        label[sun], instance[sun] = 5, next_id
        next_id += 1
    for _ in range(rng.integers(1, 4)):
        left, width, top = rng.uniform(0, 0.7), rng.uniform(0.2, 0.4), rng.uniform(0.2, 0.45)
        body = (xx >= left) & (xx < left + width) & (yy >= top) & (yy < horizon)
        label[body], instance[body] = 2, next_id
        next_id += 1
        cell = 1 / 8
        windows = body & ((xx - left) % cell > cell * 0.45) & ((yy - top) % cell > cell * 0.45)
        windows &= (xx < left + width - cell * 0.3) & (yy < horizon - cell * 0.5)
        label[windows] = 3
    for _ in range(rng.integers(0, 3)):
        cy, cx, r = horizon - rng.uniform(0.05, 0.1), rng.uniform(0.05, 0.95), rng.uniform(0.06, 0.1)
        crown = _disc(yy, xx, cy, cx, r)
        label[crown], instance[crown] = 4, next_id
        next_id += 1
    palette = np.array([[0.45, 0.65, 0.95], [0.30, 0.55, 0.25], [0.70, 0.38, 0.28],
                        [0.15, 0.20, 0.35], [0.10, 0.40, 0.15], [1.00, 0.85, 0.25]], dtype=np.float32)
    image = palette[label]
    sky = label == 0
    image[sky] += (0.35 * (yy[sky] / horizon))[:, None]
    ground = label == 1
    image[ground] *= (1.2 - 0.5 * (yy[ground] - horizon) / (1 - horizon))[:, None]
    image[label == 4] *= (0.5 + 0.6 * (1 - yy[label == 4]))[:, None]
    edges = instance_edges(torch.from_numpy(instance)[None])[0, 0].numpy().astype(bool)
    image[edges & (label == 2)] *= 0.45
    return label, instance, np.clip(image, 0, 1)


class ProceduralLabelImages(Dataset):
    """Offline data a CPU model can learn: toy street label maps (6 classes, instance ids) -> rendered photos."""

    label_nc = len(PROCEDURAL_CLASSES)
    class_names = PROCEDURAL_CLASSES

    def __init__(self, count: int, size: int, seed: int = 0) -> None:
        check_image_size(size, size, 16, "procedural image")
        rng = np.random.default_rng(seed)
        scenes = [procedural_scene(rng, size) for _ in range(count)]
        self.labels = torch.from_numpy(np.stack([s[0] for s in scenes]))
        self.instances = torch.from_numpy(np.stack([s[1] for s in scenes]))
        self.images = torch.from_numpy(np.stack([s[2] for s in scenes])).permute(0, 3, 1, 2) * 2 - 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """{'label': (H, W) int64, 'instance': (H, W) int64, 'image': (3, H, W) in [-1, 1]}."""
        return {"label": self.labels[index], "instance": self.instances[index], "image": self.images[index]}


def _read_label(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label map '{path}' is a {img.mode} image; it must hold one class index per pixel "
                             "(mode L or P), not colours")
        return np.array(img, dtype=np.int64)


class PairedFolderDataset(Dataset):
    """Photos and label maps with the same file stem (e.g. cmp_b0001.jpg + cmp_b0001.png), resized to `size`."""

    def __init__(self, image_dir: str | os.PathLike, label_dir: str | os.PathLike, size: int, label_nc: int,
                 image_suffix: str = ".jpg", label_suffix: str = ".png", names: Sequence[str] | None = None) -> None:
        check_image_size(size, size, 32, "dataset IMAGE_SIZE")
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.size, self.label_nc = size, label_nc
        self.image_suffix, self.label_suffix = image_suffix, label_suffix
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"photo folder '{self.image_dir}' not found; download the data first "
                                    "(download_cmp_facades) or point it at your own paired folders")
        stems = sorted(p.stem for p in self.image_dir.glob(f"*{image_suffix}"))
        if names is not None:
            stems = [s for s in stems if s in set(names)]
        if not stems:
            raise FileNotFoundError(f"no '*{image_suffix}' photos in '{self.image_dir}'; check the folder and suffix")
        missing = [s + label_suffix for s in stems if not (self.label_dir / (s + label_suffix)).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} photo(s) in '{self.image_dir}' have no label map in '{self.label_dir}' "
                f"(e.g. {', '.join(missing[:3])}); every photo needs a label map with the same name, or remove it"
            )
        self.stems = stems

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """{'label': (size, size) int64, 'image': (3, size, size) in [-1, 1]}."""
        stem = self.stems[index]
        image_path = self.image_dir / (stem + self.image_suffix)
        label_path = self.label_dir / (stem + self.label_suffix)
        label = _read_label(label_path)
        with Image.open(image_path) as img:
            photo = img.convert("RGB")
        if photo.size != (label.shape[1], label.shape[0]):
            raise ValueError(f"photo '{image_path.name}' is {photo.size[0]}x{photo.size[1]} but its label map "
                             f"'{label_path.name}' is {label.shape[1]}x{label.shape[0]} (width x height); "
                             "a pair must have the same size")
        check_label_map(torch.from_numpy(label)[None], self.label_nc, f"label map '{label_path.name}'")
        label = np.array(Image.fromarray(label.astype(np.uint8)).resize((self.size, self.size), Image.NEAREST))
        photo = photo.resize((self.size, self.size), Image.BICUBIC)
        image = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        return {"label": torch.from_numpy(label.astype(np.int64)), "image": image}


def download_cmp_facades(root: str | os.PathLike, url: str = CMP_FACADES_URL,
                         timeout: float = TIMEOUT_S) -> Path:
    """Download and unpack the CMP Facade Database (base, 378 pairs, ~34 MB) once; return the folder of pairs.
    The download goes through helpers.downloads (timeout, the project's User-Agent). There is no second source
    in this format: the pix2pix mirror stores the labels as JPEG colour pictures, not class indices."""
    root = Path(root) / "cmp_facades"
    folder = root / "base"
    if folder.is_dir() and any(folder.glob("*.jpg")):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "CMP_facade_DB_base.zip"
    try:
        if not archive.is_file():
            fetch_file(url, archive, "the CMP Facade Database", timeout)
        unpack_archive(archive, root)
    except DownloadError as err:
        raise DownloadError(f"{err}; or run with SMOKE=1 or PIX2PIXHD_DATASET=procedural for the "
                            "offline toy streets") from err
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # not a zip, or a damaged one
        archive.unlink(missing_ok=True)
        raise RuntimeError(f"could not unpack the CMP facades '{archive}' ({err}); the file was deleted: run "
                           f"again to download it, or download it yourself from {CMP_FACADES_PAGE}") from err
    found = sorted({p.parent for p in root.rglob("*.jpg")})
    if not found:
        raise RuntimeError(f"'{archive}' unpacked but holds no .jpg photos; delete '{root}' and run again")
    return found[0]
