"""Loss functions of the collection, each written as its formula (see the notebooks for the LaTeX).

Sections: GAN losses (BCE, LSGAN) for 01/02 and later notebooks; further sections follow per notebook.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# --- GAN losses: binary cross-entropy (seed 003) ------------------------------------------------


def bce_discriminator_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Seed 003: d_loss = (real_loss + fake_loss) / 2, with D's outputs as probabilities in (0, 1).

    real_loss = BCE(D(x), 1) = -mean(log D(x))
    fake_loss = BCE(D(G(z)), 0) = -mean(log(1 - D(G(z))))
    """
    real_loss = F.binary_cross_entropy(d_real, torch.ones_like(d_real))
    fake_loss = F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake))
    return (real_loss + fake_loss) / 2


def bce_generator_loss(d_fake: Tensor) -> Tensor:
    """Seed 003: g_loss = BCE(D(G(z)), 1) = -mean(log D(G(z))): the fakes labelled real (the
    non-saturating loss)."""
    return F.binary_cross_entropy(d_fake, torch.ones_like(d_fake))


# --- GAN losses: least squares (LSGAN, Mao et al. 2017; pix2pixHD: taught in notebook 05) --------


def _as_list(predictions: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [predictions] if torch.is_tensor(predictions) else list(predictions)


def lsgan_discriminator_loss(pred_real: Tensor | Sequence[Tensor],
                             pred_fake: Tensor | Sequence[Tensor]) -> Tensor:
    """L_D = 0.5 * sum_scales mean((D(x) - 1)^2) + 0.5 * sum_scales mean(D(G(z))^2).

    Accepts one prediction map or a list of them (one per discriminator scale), summed over
    scales as in pix2pixHD.
    """
    real = sum(F.mse_loss(p, torch.ones_like(p)) for p in _as_list(pred_real))
    fake = sum(F.mse_loss(p, torch.zeros_like(p)) for p in _as_list(pred_fake))
    return 0.5 * (real + fake)


def lsgan_generator_loss(pred_fake: Tensor | Sequence[Tensor]) -> Tensor:
    """L_G = sum_scales mean((D(G(z)) - 1)^2), as in the official pix2pixHD code (no 1/2)."""
    return sum(F.mse_loss(p, torch.ones_like(p)) for p in _as_list(pred_fake))




# --- Text-to-image GAN: GAN-CLS and GAN-INT (Reed et al. 2016; notebook 04) -------------------------------------


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
    """Seed's MSE term: mean over channels and positions of (batch mean of D's features on fakes
    - batch mean on reals)^2; the real side is detached."""
    return F.mse_loss(fake_features.mean(dim=0), real_features.detach().mean(dim=0))


def l1_image_loss(fake: Tensor, real: Tensor) -> Tensor:
    """Seed's L1 term: mean |G(z, t) - x| to the real image x of the same caption."""
    return F.l1_loss(fake, real.detach())


def mode_seeking_loss(fake_1: Tensor, fake_2: Tensor, z_1: Tensor, z_2: Tensor,
                      cap: float | None = None, eps: float = 1e-5) -> Tensor:
    """Mode seeking (Mao et al. 2019): 1 / (r + eps), r = mean|G(z1, t) - G(z2, t)| / mean|z1 - z2|,
    small when two noise vectors give images far apart for the same text. With `cap`, r counts only
    up to cap (no push beyond the variety of the real images)."""
    ratio = (fake_1 - fake_2).abs().mean() / (z_1 - z_2).abs().mean()
    return 1 / (ratio.clamp(max=cap) + eps) if cap is not None else 1 / (ratio + eps)
