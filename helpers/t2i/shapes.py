"""The captioned shapes set of notebook 04 (offline, CPU-sized): one filled shape on white with four attributes
(colour, shape, size, position), five captions per image, and a split of held-out attribute combinations."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

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


def real_images_per_combination(combinations: Sequence[tuple], n: int, image_size: int, seed: int) -> Tensor:
    """(combinations, n, 3, H, W) rendered shapes in [-1, 1]: the real spread a caption allows."""
    rng = random.Random(seed)
    images = np.stack([[render_shape(c, image_size, rng) for _ in range(n)] for c in combinations])
    return torch.from_numpy(images).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
