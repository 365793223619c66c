"""`make bench` case for notebook 06: the LoRA training step of helpers.sd_lora.train (noise, timestep, UNet forward,
min-SNR loss, backward over GRAD_ACCUM micro-batches, gradient clipping, AdamW), side by side in its variants.

On a GPU: the SD 1.5-sized UNet built from its config (random weights, no download), 512 px (64 x 64 latents),
rank-4 LoRA, batch 2 x accumulation 2: notebook 06's full-mode step without the frozen encoders (the latents and
text states are random tensors of their shapes, as in the H100 measurement of experiments/RESULTS.md, section 06).
The baseline is the straightforward fp32 eager LoRA step; then the notebook's mixed precision (fp16 on a T4, bf16
from compute capability 8) without and with gradient checkpointing; then QLoRA (4-bit NF4 base weights) without and
with, when bitsandbytes and CUDA are present (otherwise those rows say why not).
On a CPU (reduced): the tiny UNet of smoke mode, 32 px, batch 1 x 2, fp32 without and with checkpointing.

`full_mode_tflop()` counts the FLOPs of the notebook's full-mode work on the meta device and `t4_estimate()` turns
them and the measured H100 rate (memory.H100_MEASURED) into the T4 run-time estimate derived in
experiments/RESULTS.md, section 06 (the notebook's ⏱ line quotes its total; printed here).
"""
from __future__ import annotations

import gc
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from helpers.environment import GpuChoices, gpu_choices
from helpers.sd_lora import lora, memory, pipeline, train
from helpers.training import time_per_step

RANK = 4
SNR_GAMMA = 5.0
# SD 1.5's noise schedule (its scheduler/scheduler_config.json, the entries DDPMScheduler uses)
SD15_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000}
# SD 1.5's VAE (vae/config.json) and CLIP ViT-L/14 text encoder (text_encoder/config.json), for the FLOP count
SD15_VAE_CONFIG = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
                   "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
                   "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "norm_num_groups": 32}
SD15_TEXT_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "vocab_size": 49408, "max_position_embeddings": 77}
# Published specifications (NVIDIA data sheets): H100 SXM5 and T4, fp16
H100_TO_T4 = {"memory bandwidth (3.35 vs 0.32 TB/s)": 3.35 / 0.32,
              "tensor-core peak (989 vs 65 TFLOP/s)": 989 / 65}
# Notebook 06's full mode: 300 training steps, 25 re-trained by the resume check, 37 generated images of 25
# steps, 2 + 10 QLoRA steps (at 1.22 / 1.54 of LoRA's speed: the H100 ratio with checkpointing, H100_MEASURED)
FULL_MODE_WORK = {"train_steps": 300, "resume_check_steps": 25, "images": 37, "qlora_steps": 12}
QLORA_SLOWDOWN = memory.H100_MEASURED[("LoRA", True)][0] / memory.H100_MEASURED[("QLoRA", True)][0]  # 1.54 / 1.22


def count_tflop(fn: Callable[[], Any]) -> float:
    """TFLOP that `fn` runs, counted by torch.utils.flop_counter (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def full_mode_tflop(batch: int = 2, grad_accum: int = 2, side: int = 64, steps: int = 25) -> dict[str, float]:
    """FLOPs of notebook 06's full mode on the meta device (shapes only, no weights): one training step
    (UNet forward + LoRA backward, VAE encoding, text encoder) and one generated image."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = lora.add_lora(UNet2DConditionModel.from_config(pipeline.SD15_UNET_CONFIG), RANK, RANK)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
        latents, t = torch.randn(batch, 4, side, side), torch.zeros(batch, dtype=torch.long)
        states, ids = torch.randn(batch, 77, 768), torch.zeros(batch, 77, dtype=torch.long)
        image = torch.randn(1, 3, side * 8, side * 8)
    unet_step = count_tflop(lambda: unet(latents, t, states).sample.sum().backward())
    with torch.no_grad():
        unet_forward = count_tflop(lambda: unet(latents[:2], t[:2], states[:2]))  # guidance: 2 rows
        encode = count_tflop(lambda: vae.encode(image))
        decode = count_tflop(lambda: vae.decode(latents[:1]))
        text_pass = count_tflop(lambda: text(ids))
    step_tflop = grad_accum * (unet_step + batch * encode + text_pass)
    return {"train_step": step_tflop, "train_step_unet": grad_accum * unet_step,
            "image": steps * unet_forward + decode + text_pass}


def t4_estimate(tflop: dict[str, float],
                h100_steps_per_s: float = memory.H100_MEASURED[("LoRA", False)][0]) -> dict[str, tuple[float, float]]:
    """Seconds on a T4 (lower, upper): the measured H100 rate of the UNet step, slowed by the share of
    the step's FLOPs outside the UNet and by the published H100/T4 ratios (bandwidth: lower, tensor peak: upper)."""
    h100_rate = tflop["train_step_unet"] * h100_steps_per_s  # TFLOP/s the H100 reached on this step
    t4_rates = sorted((h100_rate / ratio for ratio in H100_TO_T4.values()), reverse=True)
    work = FULL_MODE_WORK
    total = {"train_step": tflop["train_step"], "training": work["train_steps"] * tflop["train_step"],
             "rest": (work["resume_check_steps"] + work["qlora_steps"] * QLORA_SLOWDOWN) * tflop["train_step"]
             + work["images"] * tflop["image"]}
    return {name: (value / t4_rates[0], value / t4_rates[1]) for name, value in total.items()}


def _step(unet: Any, accelerator: Any, precision: Any, micro_batches: list,
          scheduler: Any) -> Callable[[], float]:
    """One optimizer step of the notebook's lora_training_step on fixed micro-batches."""
    optimizer = accelerator.prepare(torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad],
                                                      lr=1e-4, weight_decay=1e-2))
    unet.train()
    return lambda: train.lora_training_step(unet, optimizer, micro_batches, scheduler, accelerator,
                                              precision, SNR_GAMMA, 1.0)


def _accelerator(mixed_precision: str, device: torch.device) -> Any:
    """A fresh Accelerator (accelerate keeps one global state: reset it between variants)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


def _random_unet(config: dict, device: torch.device, dtype: torch.dtype) -> Any:
    """A UNet with seeded random weights from `config` (no download)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config).to(device, dtype)


def _row(variant: str, baseline: bool, config: dict, timing: dict | None, note: str) -> dict:
    nothing = {"ms_per_step": None, "it_per_s": None, "peak_memory_mb": None}
    return {"notebook": "06", "variant": variant, "baseline": baseline, "config": config,
            **(timing or nothing), "note": note}


def variants(device: torch.device, reduced: bool) -> list[tuple[str, str, bool, bool]]:
    """(name, mixed precision, gradient checkpointing, 4-bit base weights) of each timed variant; the first
    is the baseline. Reduced (CPU): fp32 only, as the notebook runs there."""
    half = "no" if reduced else gpu_choices(device).mixed_precision
    label = "fp32" if half == "no" else half
    rows = [("LoRA fp32 eager", "no", False, False)] + ([] if reduced else [(f"LoRA {label}", half, False, False)])
    return rows + [(f"LoRA {label} + gradient checkpointing", half, True, False),
                   (f"QLoRA NF4 {label}", half, False, True),
                   (f"QLoRA NF4 {label} + gradient checkpointing", half, True, True)]


def run(device: torch.device, reduced: bool) -> list[dict]:
    """Time the LoRA step in its variants on `device`; reduced: the tiny smoke-mode UNet (CPU)."""
    from diffusers import DDPMScheduler

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    flops = full_mode_tflop()
    estimate = t4_estimate(flops)
    print(f"  06 full-mode FLOPs: {flops['train_step']:.2f} TFLOP per training step "
          f"({flops['train_step_unet']:.2f} in the UNet), {flops['image']:.1f} TFLOP per generated image")
    print("  06 T4 estimate: {:.1f}-{:.1f} s per training step; training {:.1f}-{:.1f} min; the rest {:.1f}-{:.1f} "
          "min".format(*estimate["train_step"], *(s / 60 for s in estimate["training"] + estimate["rest"])))
    config = pipeline.TINY_UNET_CONFIG if reduced else pipeline.SD15_UNET_CONFIG
    batch, side, width = (1, 16, 32) if reduced else (2, 64, 768)
    shape = {"unet": "tiny" if reduced else "SD 1.5", "latents": f"{batch}x4x{side}x{side}", "grad_accum": 2,
             "rank": RANK}
    rows, weights_dir = [], None
    qlora_reason = pipeline.qlora_unavailable_reason()
    with tempfile.TemporaryDirectory() as tmp:
        for variant, precision, checkpointing, quantized in variants(device, reduced):
            row_config = {**shape, "precision": precision, "checkpointing": checkpointing}
            if quantized and qlora_reason:
                rows.append(_row(variant, False, row_config, None, f"unavailable: {qlora_reason}"))
                continue
            if quantized and weights_dir is None:  # 4-bit loading starts from saved weights
                weights_dir = Path(tmp) / "random-unet"
                _random_unet(config, device, torch.float16).save_pretrained(weights_dir / "unet")
            accelerator = _accelerator(precision, device)
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[precision]
            unet = (pipeline.load_unet_4bit(str(weights_dir), compute_dtype=dtype) if quantized
                    else _random_unet(config, device, dtype))
            unet = lora.add_lora(unet, RANK, RANK)
            if checkpointing:
                unet.enable_gradient_checkpointing()
            gen = torch.Generator().manual_seed(0)
            micro = [(torch.randn(batch, 4, side, side, generator=gen).to(device, dtype),
                      torch.randn(batch, 77, width, generator=gen).to(device, dtype)) for _ in range(2)]
            choices = gpu_choices(device) if precision != "no" else GpuChoices(device, None, device.type == "cuda",
                                                                                 False)
            precision_of_step = train.mixed_precision(accelerator, choices)
            step = _step(unet, accelerator, precision_of_step, micro, DDPMScheduler(**SD15_SCHEDULE))
            timing = time_per_step(step, device, iterations=5 if reduced else 10, warmup=1 if reduced else 3)
            loss = step()
            note = "the plain step a student would write" if precision == "no" and not checkpointing else ""
            rows.append(_row(variant, precision == "no" and not checkpointing, row_config, timing,
                             note if math.isfinite(loss) else f"non-finite loss {loss}"))
            del unet, step, micro
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
