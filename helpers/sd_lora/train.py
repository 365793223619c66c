"""The LoRA training: the step's precision, the frozen encoders, the noising loss around the UNet, the step with
gradient accumulation, and the loop with checkpoints and resume (its record is a helpers.training.TrainingRun)."""
from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..environment import GpuChoices
from ..training import TrainingRun, checkpoints_like, load_checkpoint, save_checkpoint
from .data import micro_batch
from .lora import LoraParameters
from .losses import diffusion_snr, noise_prediction_loss


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


def unet_diffusion_loss(unet: nn.Module, latents: Tensor, text_states: Tensor, noise_scheduler: Any,
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
            loss = unet_diffusion_loss(unet, latents, text_states, noise_scheduler, snr_gamma)
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


@dataclass
class LoraPlan:
    """The knobs of the LoRA training loop, set from the settings cells."""

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


def training_state(unet: nn.Module, optimizer: Any, run: TrainingRun, accelerator: Any,
                   precision: MixedPrecision) -> dict[str, Any]:
    """What a checkpoint stores, each object through its own state_dict: the LoRA weights only (a
    view of the UNet's trainable parameters), AdamW, the run (its loss history, stopwatch, sample
    snapshots and step) and the fp16 loss scaler."""
    state = {"lora": LoraParameters(accelerator.unwrap_model(unet)), "adamw": optimizer, "run": run}
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
               accelerator: Any, precision: MixedPrecision, run: TrainingRun, plan: LoraPlan,
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
        run.step = step
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
