"""Batches of notebook 04 from either dataset (shapes or flowers): images with a right and a wrong caption,
the images of one caption packed together, and how far apart the real images of one caption are."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .flowers import FlowersWithCaptions
    from .shapes import CaptionedImageSet


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


MEAN_Z_DISTANCE = 2 / math.sqrt(math.pi)  # E|z1 - z2| per component for z1, z2 ~ N(0, 1)


def same_caption_pixel_distance(data: CaptionedImageSet | FlowersWithCaptions, n_pairs: int,
                                generator: torch.Generator) -> float:
    """Mean |x_a - x_b| over pixels in [-1, 1] of `n_pairs` pairs of different real images of one group
    (attribute combination or class): how far apart the images that fit one caption are."""
    idx = torch.randint(len(data), (n_pairs,), generator=generator)
    mates = group_mates(data, idx, generator)
    return (data.image_batch(idx) - data.image_batch(mates)).abs().mean().item()
