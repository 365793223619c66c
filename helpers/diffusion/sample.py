"""Sampling: DDPM's ancestral steps, DDIM's deterministic shortcut, and classifier-free guidance."""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .schedule import NoiseSchedule, predict_x0

EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> predicted noise


def guided_eps(model: nn.Module, cond: Mapping[str, Tensor], null: Mapping[str, Tensor],
               w: float) -> EpsFn:
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_cond + w (eps_cond - eps_uncond).
    w = 0 is the conditional model alone; the two predictions share one batch when w != 0."""
    def eps(x: Tensor, t: Tensor) -> Tensor:
        if w == 0:
            return model(x, t, **cond)
        both = {k: torch.cat([cond[k], null[k]]) for k in cond}
        eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), **both).float().chunk(2)
        return eps_cond + w * (eps_cond - eps_uncond)
    return eps


@torch.no_grad()
def ddpm_sample(eps_fn: EpsFn, schedule: NoiseSchedule, x_T: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
    """DDPM's ancestral sampler, T steps of
    x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma_t z,
    with sigma_t^2 = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t), no noise at the last step."""
    x = x_T
    for step in reversed(range(schedule.steps)):
        t = torch.full((len(x),), step, dtype=torch.long, device=x.device)
        eps = eps_fn(x, t).float()
        beta, alpha, alpha_bar = (schedule.at(v, t, x) for v in
                                  (schedule.betas, schedule.alphas, schedule.alpha_bars))
        mean = (x - beta / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt()
        if step == 0:
            return mean
        alpha_bar_prev = schedule.at(schedule.alpha_bars, t - 1, x)
        sigma = (beta * (1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt()
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x = mean + sigma * noise
    return x


def ddim_timesteps(total: int, steps: int) -> list[int]:
    """`steps` timesteps spread evenly from T - 1 down to 0 (both ends included)."""
    if not 1 <= steps <= total:
        raise ValueError(f"DDIM needs between 1 and {total} steps, got {steps}")
    return torch.linspace(total - 1, 0, steps).round().long().tolist()


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, schedule: NoiseSchedule, x_T: Tensor, steps: int, eta: float = 0.0,
                generator: torch.Generator | None = None, trajectory: list[Tensor] | None = None,
                clip: float | None = None) -> Tensor:
    """DDIM (Song et al. 2021) on a subsequence of timesteps: x_prev = sqrt(alpha_bar_prev) x0_hat
    + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z. eta = 0 is deterministic. `clip` bounds
    x0_hat (pixels live in [-1, 1]). `trajectory` collects x0_hat at every step."""
    x = x_T
    times = ddim_timesteps(schedule.steps, steps)
    for i, step in enumerate(times):
        t = torch.full((len(x),), step, dtype=torch.long, device=x.device)
        eps = eps_fn(x, t).float()
        x0 = predict_x0(schedule, x, t, eps)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (x - schedule.at(schedule.alpha_bars, t, x).sqrt() * x0) / (
                1 - schedule.at(schedule.alpha_bars, t, x)).sqrt()
        if trajectory is not None:
            trajectory.append(x0.detach().cpu())
        if i == len(times) - 1:
            return x0
        alpha_bar = schedule.at(schedule.alpha_bars, t, x)
        alpha_bar_prev = schedule.at(schedule.alpha_bars, torch.full_like(t, times[i + 1]), x)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)
                       * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
    return x

