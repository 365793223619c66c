"""Oxford-102 Flowers with Reed et al.'s captions (notebook 04, full mode): the downloads (Google Drive for the
captions, Oxford's Visual Geometry Group for the images), the class-disjoint split and the dataset."""
from __future__ import annotations

import os
import random
import shutil
import tarfile
import urllib.error
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from ..downloads import (TIMEOUT_S, DownloadError, download_drive_file, drive_download_urls, fetch_first,
                         file_digest, unpack_archive)

FLOWERS_CAPTIONS_DRIVE = {"id": "0B0ywwgffWnLLcms2WWJQRFNSWXM", "resourcekey": "0-Av8zFbeDDvNcF1sSjDR32w"}
FLOWERS_CAPTIONS_ENV = "T2I_FLOWERS_CAPTIONS"  # a local archive or folder, or the URL of a copy of the archive
SHAPES_INSTEAD = "or set T2I_DATASET=shapes to train on the built-in shapes dataset (no download)"
FLOWERS_CAPTIONS_HELP = (
    "download Reed et al.'s cvpr2016_flowers.tar.gz by hand from "
    "https://drive.google.com/file/d/0B0ywwgffWnLLcms2WWJQRFNSWXM/view?resourcekey=0-Av8zFbeDDvNcF1sSjDR32w "
    f"(linked from github.com/reedscot/icml2016), then set {FLOWERS_CAPTIONS_ENV} to the archive (or to the folder "
    f"that holds text_c10) and run again; {SHAPES_INSTEAD}")
FLOWERS102_SOURCES = ["https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"]  # the Visual Geometry Group, Oxford
FLOWERS102_FILES = {  # file -> md5, the sums torchvision's Flowers102 checks
    "102flowers.tgz": "52808999861908f626f3c1f4e79d11fa",
    "imagelabels.mat": "e0620be6f572b9609742df49c70aed4d",
    "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c",
}


def unpack_captions_archive(archive: Path, target: Path) -> None:
    """Unpack the captions archive into `target` (helpers.downloads.unpack_archive)."""
    unpack_archive(archive, target, FLOWERS_CAPTIONS_HELP)


def download_flowers_captions(root: str | os.PathLike, urls: Sequence[str] | None = None,
                              timeout: float = TIMEOUT_S) -> Path:
    """Reed et al.'s flower captions (text_c10) in root/flowers-captions: from ${FLOWERS_CAPTIONS_ENV} (a folder,
    archive or URL) or else from Google Drive (`urls`: where to try, default drive_download_urls); the folder."""
    target = Path(root) / "flowers-captions"
    given = os.environ.get(FLOWERS_CAPTIONS_ENV, "")
    local = bool(given) and not given.startswith(("http://", "https://"))
    if local and any(Path(given).rglob("text_c10")):
        return Path(given)
    if any(target.rglob("text_c10")):
        return target
    archive, errors = (Path(given) if local else None), []
    if archive is not None and not archive.is_file():
        raise FileNotFoundError(f"{FLOWERS_CAPTIONS_ENV}='{given}' is neither a file nor a folder with text_c10; "
                                f"{FLOWERS_CAPTIONS_HELP}")
    for url in ([] if archive else [given] if given else urls or drive_download_urls(**FLOWERS_CAPTIONS_DRIVE)):
        try:
            archive = download_drive_file(url, target / "captions-archive", timeout)
            break
        except (urllib.error.URLError, OSError, ValueError) as err:
            errors.append(f"{url.split('?')[0]}: {getattr(err, 'reason', err)}")
            print(f"flowers captions: '{url.split('?')[0]}' failed ({errors[-1]})")
    if archive is None:
        raise DownloadError(f"the flowers captions could not be downloaded from any of their {len(errors)} sources "
                            f"within {timeout:g} s each ({'; '.join(errors)}); {FLOWERS_CAPTIONS_HELP}")
    unpack_captions_archive(archive, target)
    if not any(target.rglob("text_c10")):
        raise RuntimeError(f"'{archive}' holds no text_c10 folder, so it is not Reed et al.'s flowers captions; "
                           f"{FLOWERS_CAPTIONS_HELP}")
    return target


def download_flowers102(root: str | os.PathLike, sources: Sequence[str] = FLOWERS102_SOURCES,
                        timeout: float = TIMEOUT_S) -> Path:
    """Oxford-102 Flowers (images, labels, official splits) in root/flowers-102, where torchvision's Flowers102
    reads it: each file from the first of `sources` (folder URLs) that answers, through helpers.downloads
    (timeout, User-Agent), its md5 checked; the image archive unpacked to jpg/. Files already there are kept."""
    folder = Path(root) / "flowers-102"
    for name, md5 in FLOWERS102_FILES.items():
        path = folder / name
        if (name.endswith(".tgz") and (folder / "jpg").is_dir()) or (path.is_file() and file_digest(path, "md5") == md5):
            continue
        try:
            fetch_first([source + name for source in sources], path, f"Oxford-102 Flowers {name}", timeout)
        except DownloadError as err:
            raise DownloadError(f"{err}\n(the folder torchvision reads: '{folder}'); {SHAPES_INSTEAD}") from err
        if file_digest(path, "md5") != md5:
            path.unlink()
            raise DownloadError(f"Oxford-102 Flowers {name} arrived damaged (md5 {md5} expected); run the cell "
                                f"again, or download it yourself from {sources[0]}{name} to '{path}'; "
                                f"{SHAPES_INSTEAD}")
        if name.endswith(".tgz"):
            unpacking = folder / "unpacking"
            shutil.rmtree(unpacking, ignore_errors=True)
            with tarfile.open(path) as tar:
                tar.extractall(unpacking, filter="data")
            os.replace(unpacking / "jpg", folder / "jpg")  # whole, or not at all (an interrupted unpack)
            shutil.rmtree(unpacking)
            path.unlink()
    return folder


def load_flowers_captions(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Captions per image stem ('image_00001' -> 10 sentences) from the text_c10/class_XXXXX/image_XXXXX.txt files."""
    text_dirs = list(Path(folder).rglob("text_c10"))
    if not text_dirs:
        raise FileNotFoundError(f"no text_c10 folder under '{folder}'; run download_flowers_captions first")
    captions = {}
    for path in sorted(text_dirs[0].glob("class_*/image_*.txt")):
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        captions[path.stem] = [line for line in lines if line]
    if not captions:
        raise FileNotFoundError(f"'{text_dirs[0]}' holds no class_*/image_*.txt caption files")
    return captions


def flowers_class_split(folder: str | os.PathLike, n_test: int = 20, seed: int = 0) -> tuple[list[int], list[int]]:
    """Class-disjoint split (0-based labels): Reed's trainvalclasses/testclasses lists if present, else a seeded 82/20."""
    lists = {name: next(Path(folder).rglob(f"{name}.txt"), None) for name in ("trainvalclasses", "testclasses")}
    if all(lists.values()):
        def read(path: Path) -> list[int]:
            return sorted(int(line.strip().split("_")[-1]) - 1 for line in path.read_text().splitlines() if line.strip())
        return read(lists["trainvalclasses"]), read(lists["testclasses"])
    classes = list(range(102))
    random.Random(seed).shuffle(classes)
    return sorted(classes[n_test:]), sorted(classes[:n_test])


class FlowersWithCaptions(torch.utils.data.Dataset):
    """Oxford-102 images (torchvision Flowers102, all three official splits) of some classes, with Reed's captions.

    The images are decoded once, resized (shorter side) and centre-cropped to `load_size` and kept in memory as uint8;
    items are random `image_size` crops + flips of them (the paper's 76 -> 64) when `train`, centre crops otherwise.
    """

    def __init__(self, root: str | os.PathLike, classes: Sequence[int], captions: dict[str, list[str]],
                 image_size: int = 64, train: bool = True, load_size: int | None = None) -> None:
        from torchvision import datasets
        from torchvision.transforms import v2

        keep = set(classes)
        self.files, self.labels = [], []
        download_flowers102(root)
        for split in ("train", "val", "test"):
            ds = datasets.Flowers102(root, split=split, download=False)
            for file, label in zip(ds._image_files, ds._labels):
                if label in keep and Path(file).stem in captions:
                    self.files.append(Path(file))
                    self.labels.append(int(label))
        if not self.files:
            raise RuntimeError("no Flowers102 image of these classes matched a caption file; check the caption folder")
        load_size = load_size or image_size * 76 // 64
        resize = v2.Compose([v2.Resize(load_size), v2.CenterCrop(load_size)])
        self.images = torch.stack([v2.functional.pil_to_tensor(resize(Image.open(f).convert("RGB"))) for f in self.files])
        self.captions = sorted({c for f in self.files for c in captions[f.stem]})
        index = {c: i for i, c in enumerate(self.captions)}
        self.caption_ids = [[index[c] for c in captions[f.stem]] for f in self.files]
        self.caption_groups = torch.zeros(len(self.captions), dtype=torch.long)
        for ids, label in zip(self.caption_ids, self.labels):
            self.caption_groups[ids] = label
        self.groups = torch.tensor(self.labels)
        self.class_labels, self.class_counts = self.groups[:, None], (102,)  # the species, for D's classifier
        self.transform = (v2.Compose([v2.RandomCrop(image_size), v2.RandomHorizontalFlip()]) if train
                          else v2.CenterCrop(image_size))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        """(image in [-1, 1], a random caption id of it, its class)."""
        image = self.transform(self.images[i]).float() / 127.5 - 1
        return image, random.choice(self.caption_ids[i]), self.labels[i]

    def image_batch(self, idx: Tensor) -> Tensor:
        """Crops (random when training) of the images at indices `idx`, in [-1, 1]."""
        return torch.stack([self.transform(self.images[i]) for i in idx.tolist()]).float() / 127.5 - 1
