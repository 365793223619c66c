"""Stable Diffusion + LoRA/QLoRA for notebook 06: tiny offline components, captioned images, the LoRA adapter, the
training step and loop (taught as cells), adapter files, the gradient-checkpointing decision and QLoRA.

The tiny shapes are the ones diffusers' own tests use; the SD 1.5 UNet config below is the real
`stable-diffusion-v1-5/stable-diffusion-v1-5` `unet/config.json` (the entries that decide its shapes).
"""
from __future__ import annotations

import gc
import json
import math
import os
import random
import re
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm.auto import tqdm

from .clip import TINY_CLIP_TEXT_CONFIG, write_tiny_tokenizer
from .environment import GpuChoices
from .losses import diffusion_snr, noise_prediction_loss
from .training import History, Stopwatch, checkpoints_like, load_checkpoint, save_checkpoint

TINY_MODEL_ID = "tiny-random-sd"  # not a Hub id: build tiny random components from configs (offline stand-in)
STAND_IN_NOTE = ("tiny randomly initialised UNet, VAE, CLIP text encoder and tokenizer built from configs "
                 "(offline stand-in): the images are noise-like and not meaningful")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LORA_WEIGHT_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights writes

SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64], "layers_per_block": 2, "sample_size": 32, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32, "norm_num_groups": 32,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "sample_size": 64,
}
TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}

# Measured by the review session on an H100 (issue 11; device details and date unknown): the SD 1.5-sized UNet with
# random weights, 512 px (64 x 64 latents), rank-4 LoRA, fp16 autocast, batch 2 x accumulation 2, UNet step only.
# (variant, gradient checkpointing) -> (optimizer steps/s, peak GPU memory in GB); None: not measured.
REVIEW_H100: dict[tuple[str, bool], tuple[float | None, float]] = {
    ("LoRA", True): (1.54, 2.26), ("LoRA", False): (3.29, 3.96),
    ("QLoRA", True): (1.22, 2.01), ("QLoRA", False): (None, 4.17),
}
REVIEW_UNET_WEIGHTS_GB = {"LoRA": 1.64, "QLoRA": 1.25}  # the same session: fp16 and 4-bit NF4 UNet weights
HEADROOM_GB = 1.5  # beyond the UNet step: VAE encoding of the batch at 512 px, allocator fragmentation
# A Colab T4 has 15 GB; CUDA's own context and SD 1.5's fp16 pipeline (2.1 GB) leave about 13 GB free
T4_FREE_GB = 13.0


class ModelLoadError(RuntimeError):
    """A Stable Diffusion checkpoint could not be loaded."""


class MissingCaptionError(ValueError):
    """Training images were found without a caption."""


class QLoRAUnavailableError(RuntimeError):
    """4-bit QLoRA was asked for where bitsandbytes cannot run (no CUDA GPU or no bitsandbytes)."""


# --- tiny offline components ---------------------------------------------------------------------


def build_tiny_components(folder: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Tiny random UNet, VAE, CLIP text encoder, a local tokenizer and a DDIM scheduler (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT_CONFIG))
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(folder) / "tokenizer-files"),
                                              model_max_length=TINY_CLIP_TEXT_CONFIG["max_position_embeddings"])
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": DDIMScheduler(**TINY_SCHEDULER_CONFIG)}


def save_tiny_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random StableDiffusionPipeline to `folder` (loadable like a Hub checkpoint) and return it."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    pipe = StableDiffusionPipeline(**build_tiny_components(folder, seed), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def resolve_model_id(model_id: str, work_dir: str | os.PathLike) -> str:
    """`model_id` itself, or for TINY_MODEL_ID the folder of a freshly written tiny pipeline."""
    return str(save_tiny_pipeline(Path(work_dir) / TINY_MODEL_ID)) if model_id == TINY_MODEL_ID else model_id


def hub_variant(model_id: str, dtype: torch.dtype) -> str | None:
    """'fp16' (the half-size weight files) for a Hub id loaded in half precision; None for fp32 or a local folder."""
    return "fp16" if dtype in (torch.float16, torch.bfloat16) and not Path(model_id).is_dir() else None


def load_pipeline(model_id: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A StableDiffusionPipeline (no safety checker) from a Hub id or a local folder, the fp16 weight files when
    loading in half precision; a ModelLoadError that says what to do otherwise."""
    from diffusers import StableDiffusionPipeline

    try:
        # `torch_dtype` works on every diffusers version (the newest prefer `dtype`)
        pipe = StableDiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype, variant=hub_variant(model_id, dtype),
                                                       safety_checker=None, requires_safety_checker=False)
    except Exception as err:
        raise ModelLoadError(
            f"could not load the Stable Diffusion model {model_id!r} ({type(err).__name__}: {str(err)[:300]}). "
            "Check the id on https://huggingface.co (e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5'), your internet "
            "connection and, for gated models, `huggingface-cli login`; or pass a local folder that holds model_index.json"
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass(frozen=True)
class MixedPrecision:
    """How the training step computes: `autocast()` is the context of its forward pass; `scaler` is the fp16
    loss scaler when the step must apply it itself (None when accelerate does, or in fp32)."""

    autocast: Callable[[], AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    description: str


def mixed_precision(accelerator: Any, choices: GpuChoices) -> MixedPrecision:
    """The step's precision from the GPU choices. Where accelerate runs them (CUDA), its autocast and loss
    scaler; where accelerate refuses (it turns fp16 off on a CPU, as in the T4 emulation), the same built
    here from `choices`: torch.autocast in fp16 and an enabled torch.amp.GradScaler."""
    if choices.amp_dtype is None:
        return MixedPrecision(nullcontext, None, "fp32 (no autocast, no loss scaling)")
    dtype = str(choices.amp_dtype).removeprefix("torch.")
    if accelerator.native_amp:
        scaling = ", loss scaling by accelerate's GradScaler" if accelerator.scaler is not None else ""
        return MixedPrecision(accelerator.autocast, None, f"{dtype} autocast by accelerate{scaling}")
    scaler = choices.grad_scaler()
    return MixedPrecision(choices.autocast, scaler if scaler.is_enabled() else None,
                          f"{dtype} autocast and an enabled GradScaler built here: accelerate turns "
                          f"{choices.mixed_precision} mixed precision off on {choices.device.type}")


# --- LoRA ----------------------------------------------------------------------------------------


# The attention projections diffusers' LoRA script adapts: query, key, value and output projection
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_config(rank: int, alpha: float, target_modules: Sequence[str] = LORA_TARGET_MODULES):
    """The peft LoraConfig of diffusers' LoRA script: Gaussian A, zero B, on `target_modules`."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                      target_modules=list(target_modules))


def add_lora(unet: nn.Module, rank: int, alpha: float,
             target_modules: Sequence[str] = LORA_TARGET_MODULES) -> nn.Module:
    """Freeze the UNet, attach a LoRA adapter (`unet.add_adapter`), keep its weights in fp32."""
    from diffusers.training_utils import cast_training_params

    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, target_modules))
    cast_training_params(unet, dtype=torch.float32)  # fp16 weights would lose Adam's small updates
    return unet


def lora_parameter_count(unet_config: Mapping[str, Any], rank: int,
                         target_modules: Sequence[str] = LORA_TARGET_MODULES) -> tuple[int, int]:
    """(LoRA parameters, UNet parameters) from a UNet config alone: the model is built on the meta device (no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        base = sum(p.numel() for p in unet.parameters())
        unet.add_adapter(lora_config(rank, rank, target_modules))
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n), base


def save_lora(unet: nn.Module, folder: str | os.PathLike, adapter: str = "default",
              alpha: float | None = None) -> Path:
    """Save only the LoRA weights, in fp32, with the adapter's config (rank, alpha, targets) as
    metadata, to folder/pytorch_lora_weights.safetensors; return the file. With `alpha`: the same
    update written with that alpha, each B multiplied by (the adapter's alpha) / alpha, so that
    (alpha / r) B A is unchanged and only a reload that reads alpha reproduces the model."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter))
    weights = {name: w.detach().float().cpu().contiguous() for name, w in weights.items()}
    metadata = unet.peft_config[adapter].to_dict()  # without lora_alpha, a reload uses alpha = r
    if alpha is not None:
        factor = metadata["lora_alpha"] / alpha
        weights = {name: w * factor if "lora_B" in name or "lora.up" in name else w
                   for name, w in weights.items()}
        metadata["lora_alpha"] = alpha
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=weights,
                                              safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    return Path(folder) / LORA_WEIGHT_FILE


def load_lora(pipe: Any, folder: str | os.PathLike, adapter: str) -> None:
    """Load an adapter written by `save_lora` into the pipeline's UNet under the name `adapter`.
    The file is named: without it diffusers 0.39 (Colab's) fails when HF_HUB_OFFLINE=1."""
    pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_FILE, adapter_name=adapter)


def safetensors_layout(path: str | os.PathLike) -> tuple[int, int]:
    """(header bytes, tensor data bytes) of a .safetensors file: an 8-byte length, a JSON header, then the data."""
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_length))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + header_length, max(ends, default=0)


def lora_weights(unet: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Copies of every LoRA tensor of a peft-adapted UNet by parameter name (adapter name removed), on the CPU in
    fp32, after rounding to `dtype` when given (to compare with an adapter loaded in that precision)."""
    return {re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", n): p.detach().to(dtype or p.dtype).float().cpu().clone()
            for n, p in unet.named_parameters() if "lora_" in n}


class LoraParameters(nn.Module):
    """A view of a UNet's trainable (LoRA) parameters as one small module, so a checkpoint holds only them."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.params = nn.ParameterDict({n.replace(".", "/"): p for n, p in unet.named_parameters() if p.requires_grad})


def parameter_fingerprints(module: nn.Module) -> dict[str, str]:
    """A SHA-1 of every parameter's bytes by name (peft's `.base_layer` removed), to show later what changed."""
    import hashlib

    def digest(p: Tensor) -> str:
        return hashlib.sha1(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()

    return {name.replace(".base_layer", ""): digest(p) for name, p in module.named_parameters()}


# --- the training step ---------------------------------------------------------------------------


@torch.no_grad()
def encode_batch(pipe: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """A batch {'pixel_values', 'caption'} through the frozen encoders: latents z_0 = s * E(x)
    (a sample of the VAE's Gaussian) and the CLIP text states c of the captions."""
    vae, device = pipe.vae, pipe.vae.device
    pixels = batch["pixel_values"].to(device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
    ids = pipe.tokenizer(list(batch["caption"]), padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return latents, pipe.text_encoder(ids.to(device))[0]


def diffusion_loss(unet: nn.Module, latents: Tensor, text_states: Tensor, noise_scheduler: Any,
                   snr_gamma: float | None = None) -> Tensor:
    """Draw noise eps and a timestep t per image, noise z_0 to z_t, let the UNet predict eps (or v
    for a v-prediction model) from (z_t, t, c), score it (min-SNR weighted if `snr_gamma`)."""
    kind = noise_scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {kind!r}: use an 'epsilon' or 'v_prediction' model")
    noise = torch.randn_like(latents)
    steps = noise_scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (len(latents),), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)  # sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
    target = noise if kind == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, text_states, return_dict=False)[0]
    snr = diffusion_snr(noise_scheduler.alphas_cumprod, t) if snr_gamma is not None else None
    return noise_prediction_loss(pred, target, snr, snr_gamma, kind)


def lora_training_step(unet: nn.Module, optimizer: torch.optim.Optimizer,
                       micro_batches: Sequence[tuple[Tensor, Tensor]], noise_scheduler: Any,
                       accelerator: Any, precision: MixedPrecision,
                       snr_gamma: float | None = None, max_grad_norm: float = 1.0) -> float:
    """One optimizer step on gradients accumulated over micro-batches of (latents, text states):
    each loss divided by their number, then backward (the gradients add up); then clip the gradient
    norm and step. Returns the step's loss (the mean over the micro-batches)."""
    scaler = precision.scaler  # fp16 loss scaling done here; None: by accelerate, or not needed
    total = torch.zeros((), device=accelerator.device)
    for latents, text_states in micro_batches:
        with precision.autocast():  # fp16 on a T4, bf16 on newer GPUs, a no-op in fp32
            loss = diffusion_loss(unet, latents, text_states, noise_scheduler, snr_gamma)
        loss = loss / len(micro_batches)
        accelerator.backward(loss if scaler is None else scaler.scale(loss))  # no underflow
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradients, for clipping
    accelerator.clip_grad_norm_([p for p in unet.parameters() if p.requires_grad], max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skips the step if a gradient overflowed
        scaler.update()  # then lowers the scale; raises it after many good steps
    optimizer.zero_grad(set_to_none=True)
    return total.item()


# --- the training loop ---------------------------------------------------------------------------


def micro_batch(dataset: Dataset, index: int, batch_size: int, seed: int, process: int = 0,
                processes: int = 1) -> dict[str, Any]:
    """Micro-batch number `index` for one process: a seeded permutation per epoch (a resumed run sees the same
    batches), the global batch of batch_size * processes images shared out between the processes."""
    indices = batch_indices(index, batch_size * processes, len(dataset), seed)[process::processes]
    items = [dataset[i] for i in indices]
    return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "caption": [item["caption"] for item in items]}


@dataclass
class LoraPlan:
    """The knobs of the LoRA training loop, set from the parameters cell."""

    steps: int  # optimizer steps in all
    batch_size: int  # images per micro-batch (per GPU)
    grad_accum: int  # micro-batches per optimizer step
    seed: int  # fixes the batch order of every epoch
    snr_gamma: float | None  # min-SNR gamma; None: plain MSE
    max_grad_norm: float
    folder: Path  # checkpoints go to folder/step-000100.pt, ...
    checkpoint_every: int
    keep_last: int  # older checkpoints are deleted
    sample_every: int  # steps between sample snapshots
    config: dict  # what a checkpoint must match to be resumed
    time_limit_s: float = math.inf  # stop, with a checkpoint, after this much time


class Snapshots(dict):
    """Sample images (uint8) by training step; a checkpoint saves them through state_dict()."""

    def state_dict(self) -> dict[int, Tensor]:
        """The snapshots as a plain dict."""
        return dict(self)

    def load_state_dict(self, state: Mapping[int, Tensor]) -> None:
        """Replace the snapshots by saved ones."""
        self.clear()
        self.update(state)


@dataclass
class LoraRun:
    """What the loop keeps besides the weights: loss history, timing and sample snapshots."""

    history: History
    stopwatch: Stopwatch = field(default_factory=Stopwatch)
    snapshots: Snapshots = field(default_factory=Snapshots)


def training_state(unet: nn.Module, optimizer: Any, run: LoraRun, accelerator: Any,
                   precision: MixedPrecision) -> dict[str, Any]:
    """What a checkpoint stores, each object through its own state_dict: the LoRA weights only (a
    view of the UNet's trainable parameters), AdamW, the run's history, stopwatch and snapshots,
    and the fp16 loss scaler."""
    state = {"lora": LoraParameters(accelerator.unwrap_model(unet)), "adamw": optimizer,
             "history": run.history, "stopwatch": run.stopwatch, "snapshots": run.snapshots}
    scaler = precision.scaler or accelerator.scaler
    if scaler is not None:
        state["scaler"] = scaler
    return state


def lora_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints train_lora wrote to `folder` (step-000100.pt, ...), oldest first."""
    return checkpoints_like(Path(folder) / "step-000000.pt")


def step_batches(pipe: Any, dataset: Dataset, step: int, plan: LoraPlan,
                 accelerator: Any) -> list[tuple[Tensor, Tensor]]:
    """The encoded micro-batches of optimizer step `step` for this process."""
    return [encode_batch(pipe, micro_batch(dataset, step * plan.grad_accum + i, plan.batch_size,
                                           plan.seed, accelerator.process_index,
                                           accelerator.num_processes))
            for i in range(plan.grad_accum)]


def train_lora(unet: nn.Module, optimizer: Any, dataset: Dataset, pipe: Any, noise_scheduler: Any,
               accelerator: Any, precision: MixedPrecision, run: LoraRun, plan: LoraPlan,
               sample: Callable[[], Tensor]) -> int:
    """Train until plan.steps optimizer steps (or plan.time_limit_s), resuming from the newest
    checkpoint in plan.folder (and saying so); log, snapshot and checkpoint on schedule; return the
    step reached."""
    state = training_state(unet, optimizer, run, accelerator, precision)
    step = 0
    for newest in lora_checkpoints(plan.folder)[-1:]:  # resume when there is a checkpoint
        step = load_checkpoint(newest, state, plan.config, map_location=accelerator.device)["step"]
        print(f"reusing the finished run in {plan.folder}: {newest.name} reached step {step} of "
              f"{plan.steps}, so nothing is trained again" if step >= plan.steps else
              f"resuming from {newest} at step {step} of {plan.steps}")
    started, done = time.perf_counter(), step >= plan.steps
    bar = tqdm(total=plan.steps, initial=step, desc="LoRA training", unit="step")
    unet.train()
    while not done:
        with run.stopwatch:
            micro_batches = step_batches(pipe, dataset, step, plan, accelerator)
            loss = lora_training_step(unet, optimizer, micro_batches, noise_scheduler, accelerator,
                                      precision, plan.snr_gamma, plan.max_grad_norm)
        step += 1
        run.stopwatch.count(1, plan.batch_size * plan.grad_accum * accelerator.num_processes)
        run.history.log(step, loss=loss)
        bar.update()
        done = step >= plan.steps or time.perf_counter() - started >= plan.time_limit_s
        if step % plan.sample_every == 0 or done:
            run.snapshots[step] = sample()
        if (step % plan.checkpoint_every == 0 or done) and accelerator.is_main_process:
            save_checkpoint(plan.folder / f"step-{step:06d}.pt", state, step, plan.config,
                            keep_last=plan.keep_last)
    bar.close()
    unet.eval()
    run.history.flush()
    return step


# --- GPU memory: gradient checkpointing only when it is needed ------------------------------------


def training_memory_gb(batch_size: int, latent_side: int, checkpointing: bool, quantized: bool = False) -> float:
    """GPU memory of an SD 1.5 UNet training step beyond its weights, in GB: the review session's H100 peak minus
    the weights, at batch 2 and 64 x 64 latents, scaled by batch x latent area (activations grow with both)."""
    kind = "QLoRA" if quantized else "LoRA"
    measured = REVIEW_H100[(kind, checkpointing)][1] - REVIEW_UNET_WEIGHTS_GB[kind]
    return measured * batch_size / 2 * (latent_side / 64) ** 2


def free_gpu_memory_gb(device: torch.device) -> float:
    """Free memory of a CUDA device in GB, after handing PyTorch's cached but unused blocks back to the GPU
    (without `empty_cache`, memory freed by deleted tensors still counts as used)."""
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0] / 1e9


def decide_gradient_checkpointing(choices: GpuChoices, free_gb: float | None,
                                  need_gb: float) -> tuple[bool, str]:
    """Whether to recompute activations in the backward pass (slower, less memory): only on the GPU path,
    and only when the step's need without it (`need_gb`, headroom included) exceeds `free_gb`; and why."""
    if not choices.gpu_path or free_gb is None:
        return False, f"{choices.device.type}: no GPU memory to save, so no gradient checkpointing (it only costs time)"
    use = need_gb > free_gb
    (slow, _), (fast, _) = REVIEW_H100[("LoRA", True)], REVIEW_H100[("LoRA", False)]
    verdict = ("on: it would not fit without" if use else f"off: it fits without, and checkpointing would "
               f"cost speed ({slow} vs {fast} steps/s on an H100, review session)")
    return use, (f"the step needs about {need_gb:.1f} GB without gradient checkpointing (derived from an H100 "
                 f"measurement), {free_gb:.1f} GB of GPU memory is free: checkpointing {verdict}")


def choose_gradient_checkpointing(choices: GpuChoices, batch_size: int, latent_side: int,
                                  quantized: bool = False) -> tuple[bool, str]:
    """The gradient-checkpointing decision with this GPU's free memory (a CUDA query). In the T4 emulation,
    where no CUDA memory can be queried, the decision a T4 with T4_FREE_GB free would take."""
    need = training_memory_gb(batch_size, latent_side, False, quantized) + HEADROOM_GB
    free = None
    if choices.cuda:
        free = free_gpu_memory_gb(choices.device)
    elif choices.gpu_path:
        choices.skip("torch.cuda.mem_get_info (free GPU memory)",
                     f"the decision of a T4 with {T4_FREE_GB:.0f} GB free")
        free = T4_FREE_GB
    return decide_gradient_checkpointing(choices, free, need)


# --- QLoRA ---------------------------------------------------------------------------------------


def qlora_unavailable_reason() -> str | None:
    """Why 4-bit QLoRA cannot run here (no CUDA GPU, no bitsandbytes), or None when it can."""
    if not torch.cuda.is_available():
        return ("QLoRA needs a CUDA GPU: bitsandbytes' 4-bit kernels run only on CUDA (diffusers raises "
                "'No GPU found' otherwise). Run this notebook on a GPU runtime (Colab: Runtime > Change runtime type > T4)")
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        return ("QLoRA needs bitsandbytes (notebook 06 installs it where a CUDA GPU is present): "
                "`pip install bitsandbytes`, then restart the runtime and run the notebook again")
    return None


def load_unet_4bit(model_id: str, compute_dtype: torch.dtype = torch.float16):
    """The UNet of `model_id` with its Linear layers quantised to 4-bit NF4 (bitsandbytes); refuses clearly without CUDA."""
    reason = qlora_unavailable_reason()
    if reason is not None:
        raise QLoRAUnavailableError(reason)
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    try:
        return UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", quantization_config=config,
                                                    torch_dtype=compute_dtype,
                                                    variant=hub_variant(model_id, compute_dtype))
    except Exception as err:
        raise ModelLoadError(f"could not load the UNet of {model_id!r} in 4-bit ({type(err).__name__}: {err})") from err


def load_unet(model_id: str, dtype: torch.dtype, device: str | torch.device):
    """The UNet of `model_id` alone in `dtype` (not quantised): QLoRA's stand-in where bitsandbytes cannot run."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dtype,
                                                variant=hub_variant(model_id, dtype)).to(device)


# --- captioned images ----------------------------------------------------------------------------


def image_transform(resolution: int, random_flip: bool = False) -> transforms.Compose:
    """Any size -> shorter side resized to `resolution`, centre-cropped square, optionally flipped, in [-1, 1]."""
    steps = [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
             transforms.CenterCrop(resolution)]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])


def check_captions(captions: Sequence[str | None], source: str, names: Sequence[str] | None = None) -> list[str]:
    """The captions stripped, or a MissingCaptionError naming the images that have none."""
    missing = [(names[i] if names else f"row {i}") for i, c in enumerate(captions) if c is None or not str(c).strip()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingCaptionError(
            f"{len(missing)} of {len(captions)} images in {source} have no caption: {shown}. Give every image a caption: "
            "a text file of the same name (cat.png -> cat.txt) or a line {\"file_name\": \"cat.png\", \"text\": \"...\"} "
            "in metadata.jsonl; or remove the uncaptioned images"
        )
    return [str(c).strip() for c in captions]


def read_image_folder(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Image paths and captions of a folder: captions from metadata.jsonl, else from same-name .txt files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' not found; create it with images and their captions")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'; put your training images there")
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
        by_name = {row.get("file_name"): row.get("text") for row in rows}
        captions = [by_name.get(p.name) for p in images]
    else:
        captions = [p.with_suffix(".txt").read_text() if p.with_suffix(".txt").is_file() else None for p in images]
    return images, check_captions(captions, f"'{folder}'", [p.name for p in images])


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, read from its header."""
    with Image.open(path) as image:
        return image.size


class CaptionedImages(Dataset):
    """Images (paths or PIL images, any size and mode) with captions, as {'pixel_values', 'caption'} at one resolution."""

    def __init__(self, images: Sequence[Any], captions: Sequence[str], resolution: int, random_flip: bool = False,
                 source: str = "the dataset") -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions in {source}; give one caption per image")
        names = [Path(p).name for p in images] if isinstance(images, (list, tuple)) and all(
            isinstance(p, (str, Path)) for p in images) else None
        self.captions = check_captions(captions, source, names)
        self.images = images
        self.transform = image_transform(resolution, random_flip)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, resolution: int, random_flip: bool = False) -> "CaptionedImages":
        """A folder of images with captions (metadata.jsonl or same-name .txt files)."""
        images, captions = read_image_folder(folder)
        return cls(images, captions, resolution, random_flip, source=f"'{folder}'")

    @classmethod
    def from_hub(cls, name: str, resolution: int, random_flip: bool = False, split: str = "train",
                 image_column: str = "image", caption_column: str = "text") -> "CaptionedImages":
        """A Hub image/caption dataset such as 'lambdalabs/naruto-blip-captions' (needs `datasets`)."""
        try:
            from datasets import load_dataset
        except ImportError as err:
            raise ImportError("Hub datasets need `pip install datasets` (Colab has it)") from err
        rows = load_dataset(name, split=split)
        for column in (image_column, caption_column):
            if column not in rows.column_names:
                raise KeyError(f"dataset {name!r} has no column {column!r} (it has {rows.column_names})")
        captions = list(rows[caption_column])
        return cls(_Column(rows, image_column), captions, resolution, random_flip, source=f"dataset {name!r}")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        return {"pixel_values": self.transform(image.convert("RGB")), "caption": self.captions[index]}


class _Column:
    """One column of a Hub dataset, indexed lazily (images are decoded only when used)."""

    def __init__(self, rows: Any, column: str) -> None:
        self.rows, self.column = rows, column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[int(index)][self.column]


def batch_indices(step: int, batch_size: int, length: int, seed: int = 0) -> list[int]:
    """The dataset indices of batch number `step`: a new seeded permutation each epoch, so resume is exact."""
    per_epoch = max(1, length // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[position * batch_size:(position + 1) * batch_size]


SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}


def make_shape_images(folder: str | os.PathLike, count: int = 8, seed: int = 0) -> Path:
    """Write `count` captioned images of coloured shapes, of mixed sizes, into `folder` (a tiny training set)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [(64, 64), (96, 64), (64, 112), (80, 80)]
    for i in range(count):
        colour, background = rng.sample(sorted(SHAPE_COLOURS), 2)
        shape = rng.choice(["circle", "square"])
        width, height = sizes[i % len(sizes)]
        image = Image.new("RGB", (width, height), SHAPE_COLOURS[background])
        half = min(width, height) // 4
        box = [width // 2 - half, height // 2 - half, width // 2 + half, height // 2 + half]
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=SHAPE_COLOURS[colour])
        image.save(folder / f"shape_{i:02d}.png")
        (folder / f"shape_{i:02d}.txt").write_text(f"a {colour} {shape} on a {background} background\n")
    return folder


# --- generation and CLIP -------------------------------------------------------------------------


def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
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
