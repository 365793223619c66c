"""Pix2PixHD's generator loss (Wang et al. 2018; notebook 05): feature matching in the discriminators' layers, the
VGG19 perceptual loss, and their sum with the LSGAN term of helpers.losses."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

from ..losses import lsgan_generator_loss

PIX2PIXHD_VGG_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
PIX2PIXHD_VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


def feature_matching_loss(features_fake: Sequence[Sequence[Tensor]],
                          features_real: Sequence[Sequence[Tensor]],
                          lambda_feat: float = 10.0) -> Tensor:
    """L_FM = lambda_feat * sum_i sum_j (1/num_D) (4/(n_layers+1)) mean|D_i^j(fake) - D_i^j(real)|.

    features_*: one list per discriminator scale i of its block outputs; the last one (the
    prediction) is left out, the other n_layers + 1 are the layers j. Real features are detached:
    the loss trains G only.
    """
    if len(features_fake) != len(features_real) or not features_fake:
        raise ValueError(f"feature matching needs the same number of scales for fake and real, got "
                         f"{len(features_fake)} and {len(features_real)}")
    num_d = len(features_fake)
    loss = features_fake[0][0].new_zeros(())
    for fake_scale, real_scale in zip(features_fake, features_real):
        if len(fake_scale) != len(real_scale) or len(fake_scale) < 2:
            raise ValueError("each scale needs the same number (>= 2) of block outputs for fake "
                             f"and real, got {len(fake_scale)} and {len(real_scale)}")
        layer_weight = 4.0 / (len(fake_scale) - 1)  # len = n_layers + 2: 4 / (n_layers + 1)
        for fake, real in zip(fake_scale[:-1], real_scale[:-1]):
            loss = loss + layer_weight / num_d * F.l1_loss(fake, real.detach())
    return lambda_feat * loss


def vgg_loss(features_fake: Sequence[Tensor], features_real: Sequence[Tensor],
             weights: Sequence[float] = PIX2PIXHD_VGG_WEIGHTS, lambda_vgg: float = 10.0) -> Tensor:
    """L_VGG = lambda_vgg * sum_k w_k mean|VGG_k(fake) - VGG_k(real)|, w = 1/32, ..., 1/4, 1."""
    if not len(features_fake) == len(features_real) == len(weights):
        raise ValueError(f"VGG loss needs one weight per layer: got {len(features_fake)} fake, "
                         f"{len(features_real)} real feature maps and {len(weights)} weights")
    loss = features_fake[0].new_zeros(())
    for weight, fake, real in zip(weights, features_fake, features_real):
        loss = loss + weight * F.l1_loss(fake, real.detach())
    return lambda_vgg * loss


def pix2pixhd_generator_loss(d_fake: Sequence[Sequence[Tensor]], d_real: Sequence[Sequence[Tensor]],
                             vgg_fake: Sequence[Tensor] | None = None,
                             vgg_real: Sequence[Tensor] | None = None, lambda_feat: float = 10.0,
                             lambda_vgg: float = 10.0) -> dict[str, Tensor]:
    """L_G = L_GAN + lambda_feat * L_FM + lambda_vgg * L_VGG, each term returned too (lambda 0 or
    no VGG features: that term is 0). L_GAN is the LSGAN generator loss on each scale's prediction,
    summed over scales, without the course brief's 1/2 (as the official code). d_fake must come from
    D(G(x)) without detaching, d_real from D(real)."""
    gan = lsgan_generator_loss([scale[-1] for scale in d_fake])
    zero = gan.new_zeros(())
    fm = feature_matching_loss(d_fake, d_real, lambda_feat) if lambda_feat else zero
    use_vgg = lambda_vgg and vgg_fake is not None and vgg_real is not None
    vgg = vgg_loss(vgg_fake, vgg_real, lambda_vgg=lambda_vgg) if use_vgg else zero
    return {"gan": gan, "fm": fm, "vgg": vgg, "total": gan + fm + vgg}
