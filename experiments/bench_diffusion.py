"""`make bench` case for notebook 07: one training step of the latent text model (`denoiser_train_step`).

Both sizes use the notebook's full-mode model (a 2-level U-Net of widths 32 and 64 on 4x7x7 latents, with
cross-attention to 16 tokens of 384 numbers, the MiniLM size) at batch 128. CPU (reduced: fewer timed
steps): the eager fp32 step, which is what the notebook runs there. GPU: the same step beside the notebook's
GPU path (the autocast dtype of gpu_choices, with a GradScaler for fp16, channels-last, fused Adam).
Random latents and token embeddings: the step's cost does not depend on their values.
"""
from __future__ import annotations

import torch

from helpers.diffusion.model import Denoiser
from helpers.diffusion.schedule import NoiseSchedule
from helpers.diffusion.train import DenoiserPlan, DenoiserRun, denoiser_train_step
from helpers.environment import GpuChoices, gpu_choices
from helpers.training import time_per_step

CONTEXT_DIM, TOKENS, BATCH_SIZE, WIDTHS = 384, 16, 128, (32, 64)


class RandomText:
    """Stands in for the caption table: random token embeddings, all tokens real."""

    def __init__(self, generator: torch.Generator) -> None:
        self.tokens = torch.randn(10, TOKENS, CONTEXT_DIM, generator=generator)

    def training_inputs(self, labels: torch.Tensor, generator: torch.Generator, p_uncond: float) -> dict:
        return {"context": self.tokens[labels], "context_mask": torch.ones(len(labels), TOKENS, dtype=torch.bool)}


def time_step(device: torch.device, choices: GpuChoices, iterations: int) -> dict:
    """ms per training step of the latent text model with these speed and precision choices."""
    generator = torch.Generator().manual_seed(0)
    memory = torch.channels_last if choices.channels_last else torch.preserve_format
    model = Denoiser(4, WIDTHS, context_dim=CONTEXT_DIM).to(device, memory_format=memory)
    run = DenoiserRun(model, DenoiserPlan(iterations, BATCH_SIZE), choices)
    latents = torch.randn(2_000, 4, 7, 7, generator=generator).to(device)
    labels, text = torch.randint(10, (2_000,), generator=generator), RandomText(generator)
    schedule = NoiseSchedule("cosine", 1000)
    step = lambda: denoiser_train_step(run, schedule, latents, labels, text)  # noqa: E731
    return time_per_step(step, device, iterations, 5)


def run(device: torch.device, reduced: bool) -> list[dict]:
    """Rows: eager fp32 (baseline) and, on CUDA, the notebook's GPU path."""
    iterations = 20 if reduced else 200
    config = {"widths": list(WIDTHS), "latent": [4, 7, 7], "tokens": TOKENS, "batch": BATCH_SIZE}
    plain = GpuChoices(device, None, device.type == "cuda", False)
    rows = [{"notebook": "07", "variant": "eager fp32 (the taught denoiser_train_step)", "baseline": True,
             "config": config, **time_step(device, plain, iterations),
             "note": "" if device.type == "cuda" else "CPU: the notebook runs this step"}]
    choices = gpu_choices(device)
    if device.type == "cuda":
        rows.append({"notebook": "07", "variant": f"{choices.describe()}", "baseline": False,
                     "config": config, **time_step(device, choices, iterations),
                     "note": "the notebook's GPU path"})
    else:
        rows[0]["note"] += "; the autocast path is for a GPU, not timed here"
    return rows
