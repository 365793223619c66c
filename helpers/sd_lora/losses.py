"""The diffusion losses of notebook 06: the signal-to-noise ratio of a timestep and the noise-prediction MSE with
optional min-SNR weighting."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def diffusion_snr(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio of DDPM timestep t: SNR(t) = alpha_bar_t / (1 - alpha_bar_t)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def noise_prediction_loss(pred: Tensor, target: Tensor, snr: Tensor | None = None,
                          gamma: float | None = None, prediction_type: str = "epsilon") -> Tensor:
    """L = mean_i w_i * mean((pred_i - target_i)^2) with w_i = 1, or min-SNR weighted (Hang et al.
    2023): w_i = min(SNR_i, gamma) / SNR_i, for v-prediction min(SNR_i, gamma) / (SNR_i + 1);
    snr[i] = SNR(t_i)."""
    per_item = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    if gamma is None:
        return per_item.mean()
    if snr is None:
        raise ValueError("min-SNR weighting needs the SNR of each item's timestep: "
                         "pass snr=diffusion_snr(...)")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; "
                         "use 'epsilon' or 'v_prediction'")
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    weight = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    return (weight * per_item).mean()
