"""Images from a pipeline (a prompt x seed grid) and the UNet's noise prediction for one fixed input."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn


def pipeline_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                    size: int) -> Tensor:
    """Images in [0, 1] of shape (len(prompts) * len(seeds), 3, size, size): prompt-major, one generator per seed."""
    images = []
    for prompt in prompts:
        for seed in seeds:
            generator = torch.Generator(device=pipe.device).manual_seed(seed)
            out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                       generator=generator, output_type="pt")
            images.append(out.images.float().cpu())
    return torch.cat(images)


@torch.no_grad()
def predict_noise(unet: nn.Module, probe: tuple[Tensor, Tensor, Tensor],
                  autocast: Callable[[], AbstractContextManager] = nullcontext) -> Tensor:
    """The UNet's prediction for one fixed input (noisy latents z_t, timesteps t, text states c) under
    `autocast` (the training step's), fp32 on the CPU."""
    latents, timesteps, text_states = probe
    with autocast():
        return unet(latents, timesteps, text_states, return_dict=False)[0].float().cpu()
