"""Loss functions of the collection, each written as its formula (see the notebooks for the LaTeX).

Sections: GAN losses (BCE, LSGAN) for 01/02 and later notebooks; further sections follow per notebook.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# --- GAN losses: binary cross-entropy (the course brief's baseline recipe) ---------------------


def bce_discriminator_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """The baseline recipe of the course brief: d_loss = (real_loss + fake_loss) / 2,
    with D's outputs as probabilities in (0, 1).

    real_loss = BCE(D(x), 1) = -mean(log D(x))
    fake_loss = BCE(D(G(z)), 0) = -mean(log(1 - D(G(z))))
    """
    real_loss = F.binary_cross_entropy(d_real, torch.ones_like(d_real))
    fake_loss = F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake))
    return (real_loss + fake_loss) / 2


def bce_generator_loss(d_fake: Tensor) -> Tensor:
    """The baseline recipe: g_loss = BCE(D(G(z)), 1) = -mean(log D(G(z))): the fakes labelled
    real (the non-saturating loss)."""
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
