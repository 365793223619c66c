"""Measuring stylisations: the objective's losses of a batch of images, and the diversity of a set of them
(mean pairwise distance in VGG features, in pixels, or by an LPIPS metric)."""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..vgg import VGG19Features
from .model import StyleObjective


def evaluate(objective: StyleObjective, images: Tensor) -> dict[str, float]:
    """The objective's losses of each image of a batch, averaged, as floats."""
    with torch.no_grad():
        values = [objective(x.unsqueeze(0)) for x in images]
    return {name: sum(float(v[name]) for v in values) / len(values) for name in values[0]}


def _pairs(count: int) -> list[tuple[int, int]]:
    pairs = list(itertools.combinations(range(count), 2))
    if not pairs:
        raise ValueError(f"diversity needs at least 2 images, got {count}")
    return pairs


def feature_diversity(images: Tensor, vgg: VGG19Features) -> float:
    """Mean over pairs of (1/L) sum_l mean_positions |phi_l(x_i) - phi_l(x_j)|^2, features unit-normalised per
    position.

    LPIPS without its learned weights: 0 for identical images, at most 4.
    """
    with torch.no_grad():
        feats = [F.normalize(f, dim=1, eps=1e-10) for f in vgg(images)]
    distances = [sum((f[i] - f[j]).square().sum(dim=0).mean() for f in feats) / len(feats)
                 for i, j in _pairs(len(images))]
    return float(sum(distances) / len(distances))


def lpips_diversity(images: Tensor, lpips: Callable[[Tensor, Tensor], Tensor]) -> float:
    """Mean over pairs of an LPIPS metric (e.g. torchmetrics' LearnedPerceptualImagePatchSimilarity), as in DFP."""
    with torch.no_grad():
        distances = [float(lpips(images[i:i + 1], images[j:j + 1])) for i, j in _pairs(len(images))]
    return sum(distances) / len(distances)


def pixel_diversity(images: Tensor) -> float:
    """Mean over pairs of the mean absolute RGB difference (images in [0, 1]), DFP's pixel distance."""
    distances = [(images[i] - images[j]).abs().mean() for i, j in _pairs(len(images))]
    return float(sum(distances) / len(distances))
