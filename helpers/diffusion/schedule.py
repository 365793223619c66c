"""The forward process of a diffusion model: noise schedules and q(x_t | x_0)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def linear_betas(steps: int, start: float = 1e-4, end: float = 0.02) -> Tensor:
    """DDPM's schedule (Ho et al. 2020): beta_t rises linearly from `start` to `end` (float64)."""
    return torch.linspace(start, end, steps, dtype=torch.float64)


def cosine_betas(steps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021): alpha_bar(t) = f(t) / f(0) with
    f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), and beta_t = 1 - alpha_bar_t / alpha_bar_{t-1},
    capped at max_beta."""
    x = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((x + offset) / (1 + offset) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


class NoiseSchedule:
    """beta_t, alpha_t = 1 - beta_t and alpha_bar_t = prod_{s <= t} alpha_s for t = 0 .. T-1
    (float32 copies of float64 products)."""

    def __init__(self, kind: str = "cosine", steps: int = 1000) -> None:
        makers = {"linear": linear_betas, "cosine": cosine_betas}
        if kind not in makers:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {sorted(makers)}")
        self.kind, self.steps = kind, steps
        betas = makers[kind](steps)
        self.betas = betas.float()
        self.alphas = (1 - betas).float()
        self.alpha_bars = torch.cumprod(1 - betas, 0).float()

    def at(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """values[t], shaped (B, 1, 1, ...) to broadcast against `like`, on its device and dtype."""
        picked = values.to(like.device)[t.to(like.device)]
        return picked.reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps: a draw of q(x_t | x_0), one step."""
    alpha_bar = schedule.at(schedule.alpha_bars, t, x0)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def predict_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """The x_0 that x_t and a noise estimate imply:
    (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    alpha_bar = schedule.at(schedule.alpha_bars, t, x_t)
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
