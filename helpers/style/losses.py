"""The losses of Gatys et al. (2016): Gram matrix, content, style and total-variation losses (notebook 03)."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


def gram_matrix(features: Tensor) -> Tensor:
    """G = F F^T / M for features (B, N, H, W) viewed as F (B, N, M), M = H*W positions: (B, N, N).

    Divided by the number of positions M only, so G_ij is the mean over positions of F_i * F_j and
    does not grow with the image size; the paper's unnormalised Gram is M times this.
    """
    if features.dim() != 4:
        raise ValueError(f"gram_matrix expects feature maps (B, N, H, W), "
                         f"got {tuple(features.shape)}")
    b, n, h, w = features.shape
    flat = features.reshape(b, n, h * w)
    return flat @ flat.transpose(1, 2) / (h * w)


def content_loss(features: Tensor, target: Tensor) -> Tensor:
    """L_content = mean (F - P)^2 over the N*M entries: the paper's 1/2 sum (F - P)^2 / (NM/2)."""
    return F.mse_loss(features, target.detach())


def style_layer_loss(features: Tensor, target_gram: Tensor) -> Tensor:
    """E_l = 1/4 mean of (G - A)^2 over the N*N entries.

    Equal to the paper's 1/(4 N^2 M^2) sum (G_hat - A_hat)^2 with G = G_hat / M.
    """
    gram = gram_matrix(features)
    return 0.25 * F.mse_loss(gram, target_gram.detach().expand_as(gram))


def style_loss(features: Sequence[Tensor], target_grams: Sequence[Tensor],
               weights: Sequence[float] | None = None) -> Tensor:
    """L_style = sum_l w_l E_l over the style layers; default w_l = 1/(number of layers)."""
    if len(features) != len(target_grams) or not features:
        raise ValueError(f"style_loss needs one target Gram per feature map, got {len(features)} "
                         f"feature maps and {len(target_grams)} Gram matrices")
    weights = [1.0 / len(features)] * len(features) if weights is None else list(weights)
    if len(weights) != len(features):
        raise ValueError(f"style_loss got {len(weights)} layer weights for {len(features)} layers")
    return sum(w * style_layer_loss(f, a) for w, f, a in zip(weights, features, target_grams))


def total_variation_loss(images: Tensor) -> Tensor:
    """TV = mean (x[i+1, j] - x[i, j])^2 + mean (x[i, j+1] - x[i, j])^2 over images (B, C, H, W)."""
    if images.dim() != 4 or images.shape[-1] < 2 or images.shape[-2] < 2:
        raise ValueError(f"total_variation_loss expects images (B, C, H, W) with H, W >= 2, "
                         f"got {tuple(images.shape)}")
    vertical = (images[..., 1:, :] - images[..., :-1, :]).square().mean()
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).square().mean()
    return vertical + horizontal
