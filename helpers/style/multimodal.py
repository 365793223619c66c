"""Multi-modal style transfer by deep feature perturbation (DFP, Wang et al. CVPR 2020): the whitening-colouring
transform (WCT, Li et al. 2017) with a random orthogonal matrix, and DFP's feature targets per layer."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..vgg import VGG19Features
from .model import STYLE_LAYERS, features_by_name


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A random orthogonal n x n matrix Z (Z Z^T = I): the left singular vectors of a Gaussian."""
    u, _, _ = torch.linalg.svd(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return u


def covariance_eigen(features: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Mean m, eigenvectors E, eigenvalues D of the covariance of features (N, M); D > eps max D."""
    mean = features.mean(dim=1, keepdim=True)
    centred = features - mean
    values, vectors = torch.linalg.eigh(centred @ centred.T / features.shape[1])
    keep = values > eps * values.max().clamp_min(1e-30)
    return mean, vectors[:, keep], values[keep]


def feature_covariance(features: Tensor) -> Tensor:
    """Covariance (N x N, float64) of a feature map (1, N, H, W) over its positions."""
    flat = features.flatten(2)[0].double()
    centred = flat - flat.mean(dim=1, keepdim=True)
    return centred @ centred.T / flat.shape[1]


def whitening_colouring(content: Tensor, style: Tensor,
                        z: Tensor | Callable[[int], Tensor] | None = None) -> Tensor:
    """Whitening-colouring transform of content features (1, N, H, W) to the style's statistics:
    E_s D_s^1/2 [Z] E_s^T f^ + m_s, with f^ = E_c D_c^-1/2 E_c^T (f_c - m_c) the whitened content.

    `z`: DFP's random orthogonal k x k matrix, k the rank of the style covariance (or a function of
    k giving one); None: plain WCT (Li et al. 2017).
    """
    _, n, h, w = content.shape
    fc, fs = content.reshape(n, h * w).double(), style.reshape(n, -1).double()
    mc, ec, dc = covariance_eigen(fc)
    ms, es, ds = covariance_eigen(fs)
    whitened = ec @ torch.diag(dc.rsqrt()) @ ec.T @ (fc - mc)
    if callable(z):
        z = z(es.shape[1])
    middle = torch.diag(ds.sqrt()) if z is None else torch.diag(ds.sqrt()) @ z.to(fc)
    coloured = es @ middle @ es.T @ whitened + ms
    return coloured.reshape(1, n, h, w).to(content.dtype)


def dfp_target(content: Tensor, style: Tensor, z: Tensor | Callable[[int], Tensor],
               lam: float = 0.6, alpha: float = 0.6) -> Tensor:
    """DFP's feature target: alpha [lam WCT_Z + (1 - lam) WCT] + (1 - alpha) f_c.

    lam: diversity strength, alpha: stylisation strength (both 0.6 in the DFP paper and code).
    """
    for name, value in (("lam", lam), ("alpha", alpha)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"DFP's {name} blends two feature maps, so it must lie in [0, 1], "
                             f"got {value}")

    def blended(k: int) -> Tensor:  # one WCT with lam Z + (1 - lam) I = lam WCT_Z + (1 - lam) WCT
        z_k = z(k) if callable(z) else z
        return lam * z_k + (1 - lam) * torch.eye(k, dtype=z_k.dtype, device=z_k.device)

    return alpha * whitening_colouring(content, style, blended) + (1 - alpha) * content


def dfp_targets(vgg: VGG19Features, content: Tensor, style: Tensor,
                layers: Sequence[str] = STYLE_LAYERS, seed: int = 0, lam: float = 0.6,
                alpha: float = 0.6) -> list[Tensor]:
    """One DFP target per layer for one draw of random orthogonal matrices (new seed, new draw)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fc, fs = features_by_name(vgg, content), features_by_name(vgg, style)
    return [dfp_target(fc[name], fs[name], lambda k: random_orthogonal(k, generator), lam, alpha)
            for name in layers]
