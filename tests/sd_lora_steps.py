"""Shared by the sd_lora test files: a fresh CPU Accelerator, the tiny pipeline's scheduler, and a few LoRA steps
through the notebook's training step."""
from contextlib import nullcontext

import torch

from helpers.sd_lora import train as sd_train

FP32 = sd_train.MixedPrecision(nullcontext, None, "fp32")


def accelerator(mixed_precision="no"):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one global state
    return Accelerator(mixed_precision=mixed_precision, cpu=True)


def scheduler(model):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(model, subfolder="scheduler")


def train_steps(unet, model, steps=2, lr=1e-2):
    """A few LoRA steps on random latents and text states (the UNet's input sizes), through the notebook's step."""
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        micro_batches = [(torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)) for _ in range(2)]
        sd_train.lora_training_step(unet, optimizer, micro_batches, scheduler(model), accelerator(), FP32, 5.0)
    return optimizer
