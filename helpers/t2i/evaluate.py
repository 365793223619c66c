"""Evaluation of notebook 04: images from text with G in eval mode, images per caption over seeded noise, the
spread across noise, caption accuracy against matching and shuffled captions, mean and spread over seeds."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .classifier import AttributeClassifier, attribute_accuracy
from .model import Generator


@torch.no_grad()
def images_from_text(G: Generator, z: Tensor, text: Tensor) -> Tensor:
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
    images = images_from_text(G, z, text.repeat_interleave(n_noise, dim=0))
    return images.view(len(text), n_noise, *images.shape[1:])


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
        fakes = images_from_text(G, seeded_noise(len(text), G.z_dim, seed, text.device), text)
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


def derangement(n: int, generator: torch.Generator) -> Tensor:
    """A random permutation of range(n) that moves every index (the 'shuffled captions' baseline)."""
    if n < 2:
        raise ValueError("shuffling needs at least two captions")
    while True:
        perm = torch.randperm(n, generator=generator)
        if (perm != torch.arange(n)).all():
            return perm
