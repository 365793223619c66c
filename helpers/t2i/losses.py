"""Losses of notebook 04, each written as its formula: GAN-CLS's matching-aware discriminator loss and its
generator loss, GAN-INT's interpolated captions, the optional terms (feature matching, L1, mode seeking) and
TAC-GAN's auxiliary class loss."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .model import Discriminator


def gan_cls_discriminator_loss(real_right: Tensor, real_wrong: Tensor,
                               fake_right: Tensor) -> Tensor:
    """Matching-aware D loss on logits: BCE(s_r, 1) + 1/2 [BCE(s_w, 0) + BCE(s_f, 0)], with
    s_r = D(real image, right text), s_w = D(real image, wrong text), s_f = D(G(z, text), text)."""
    real = F.binary_cross_entropy_with_logits(real_right, torch.ones_like(real_right))
    wrong = F.binary_cross_entropy_with_logits(real_wrong, torch.zeros_like(real_wrong))
    fake = F.binary_cross_entropy_with_logits(fake_right, torch.zeros_like(fake_right))
    return real + 0.5 * (wrong + fake)


def gan_cls_generator_loss(fake_right: Tensor) -> Tensor:
    """Non-saturating G loss on logits: BCE(D(G(z, t), t), 1), the fakes labelled real."""
    return F.binary_cross_entropy_with_logits(fake_right, torch.ones_like(fake_right))


def interpolate_embeddings(t1: Tensor, t2: Tensor, beta: float = 0.5) -> Tensor:
    """GAN-INT: beta * t1 + (1 - beta) * t2, between two captions' embeddings (paper: 0.5)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta}; GAN-INT interpolates, so use 0 <= beta <= 1 (paper: 0.5)")
    if t1.shape != t2.shape:
        raise ValueError(f"embeddings of shapes {tuple(t1.shape)} and {tuple(t2.shape)} "
                         "cannot be interpolated")
    return beta * t1 + (1 - beta) * t2


def feature_matching_mse(fake_features: Tensor, real_features: Tensor) -> Tensor:
    """The course brief's feature-matching term: mean over channels and positions of (batch mean
    of D's features on fakes - batch mean on reals)^2; the real side is detached."""
    return F.mse_loss(fake_features.mean(dim=0), real_features.detach().mean(dim=0))


def l1_image_loss(fake: Tensor, real: Tensor) -> Tensor:
    """The course brief's L1 term: mean |G(z, t) - x| to the real image x of the same caption."""
    return F.l1_loss(fake, real.detach())


def mode_seeking_loss(fake_1: Tensor, fake_2: Tensor, z_1: Tensor, z_2: Tensor,
                      cap: float | None = None, eps: float = 1e-5) -> Tensor:
    """Mode seeking (Mao et al. 2019): 1 / (r + eps), r = mean|G(z1, t) - G(z2, t)| / mean|z1 - z2|,
    small when two noise vectors give images far apart for the same text. With `cap`, r counts only
    up to cap (no push beyond the variety of the real images)."""
    ratio = (fake_1 - fake_2).abs().mean() / (z_1 - z_2).abs().mean()
    return 1 / (ratio.clamp(max=cap) + eps) if cap is not None else 1 / (ratio + eps)


def auxiliary_class_loss(D: Discriminator, features: Tensor, labels: Tensor) -> Tensor:
    """TAC-GAN's term: cross-entropy of D's class heads on image features (B, C, 4, 4) against the
    labels (B, K), summed over the K heads."""
    flat = features.flatten(1)
    return sum(F.cross_entropy(head(flat).float(), labels[:, k])
               for k, head in enumerate(D.class_heads))
