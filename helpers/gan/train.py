"""The GAN's resumable training loop: its knobs, shuffled batches, an epoch of steps, the scores and
checkpoints after each epoch."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..training import History, TrainingRun, load_checkpoint, save_checkpoint
from .cuda_graph import choose_step
from .evaluate import sample
from .model import Recipe, StepFn


@dataclass
class GanPlan:
    """The training loop's knobs (from the parameters cell): length, batch, logging, scoring."""

    epochs: int
    iterations_per_epoch: int
    batch_size: int
    seed: int
    log_every: int
    snapshot_steps: Sequence[int]
    fixed_noise: Tensor
    quality: Callable[[nn.Module], dict[str, float]]
    time_limit_s: float = math.inf


def batches(images: Tensor, batch_size: int, count: int,
            generator: torch.Generator) -> list[Tensor]:
    """`count` shuffled batches: passes over `images`, each in a new random order with its last
    incomplete batch dropped; a small dataset is passed over several times."""
    per_pass = len(images) // batch_size
    if per_pass < 1:
        raise ValueError(f"{len(images)} images make no batch of {batch_size}; "
                         "use more images or a smaller batch")
    passes = -(-count // per_pass)
    order = torch.cat([torch.randperm(len(images), generator=generator)[:per_pass * batch_size]
                       for _ in range(passes)])
    return [images[order[i * batch_size:(i + 1) * batch_size]] for i in range(count)]


def train_epoch(step: StepFn, recipe: Recipe, real_batches: list[Tensor], run: TrainingRun,
                plan: GanPlan) -> float:
    """One epoch: a step per batch with fresh noise; losses stay on the device and are logged every
    plan.log_every iterations; snapshots at plan.snapshot_steps. Returns the mean generator loss."""
    g_loss_sum = torch.zeros((), device=real_batches[0].device)
    progress = tqdm(real_batches, desc=f"{recipe.name}: epoch {run.epoch + 1}/{plan.epochs}",
                    leave=False)
    for real in progress:
        z = torch.randn(len(real), recipe.G.latent_dim, device=real.device)
        out = step(real, z)
        g_loss_sum += out["loss/generator"]
        run.step += 1
        if run.step % plan.log_every == 0:
            run.history.log(run.step, **out)
        if run.step in plan.snapshot_steps:
            run.snapshots[run.step] = sample(recipe.sampler, plan.fixed_noise).cpu()
    run.stopwatch.count(len(real_batches), sum(len(real) for real in real_batches))
    return g_loss_sum.item() / len(real_batches)


def end_epoch(sampler: nn.Module, run: TrainingRun, g_loss: float, scores: dict[str, float],
              folder: Path) -> None:
    """Record the epoch's mean G loss and sample quality in run.records; save the sampling G when
    either is the best so far."""
    record, kept = {"epoch": run.epoch, "step": run.step, "g_loss": g_loss, **scores}, run.records
    kept["epochs"].append(record)
    run.history.log(run.step, **{"epoch/generator_loss": g_loss, "epoch/fd": scores["fd"]})
    if not kept["best_by_g_loss"] or g_loss < kept["best_by_g_loss"]["g_loss"]:
        kept["best_by_g_loss"] = record
        save_checkpoint(folder / "best_by_g_loss.pt", {"G": sampler}, step=run.step, extra=record)
    if not kept["best_by_quality"] or scores["fd"] < kept["best_by_quality"]["fd"]:
        kept["best_by_quality"] = record
        save_checkpoint(folder / "best_by_fd.pt", {"G": sampler}, step=run.step, extra=record)


def train_gan(recipe: Recipe, images: Tensor, plan: GanPlan, folder: Path) -> TrainingRun:
    """Train `recipe` for plan.epochs, resuming from folder/last.pt; score and checkpoint after
    every epoch. run.records keeps every epoch's scores and the best epoch by each criterion."""
    run = TrainingRun(History(folder / "tensorboard"),
                      records={"epochs": [], "best_by_g_loss": {}, "best_by_quality": {}})
    state = {**recipe.state(), "run": run}
    config = {**recipe.config, "train_images": len(images), "batch_size": plan.batch_size,
              "seed": plan.seed, "iterations_per_epoch": plan.iterations_per_epoch}
    if (folder / "last.pt").exists():
        load_checkpoint(folder / "last.pt", state, config=config)
        done = run.epoch >= plan.epochs
        print(f"{recipe.name}: {'reusing the finished run' if done else 'resuming'} in "
              f"{folder / 'last.pt'} (epoch {run.epoch} of {plan.epochs})")
    step = choose_step(recipe, plan.batch_size, images.device) if run.epoch < plan.epochs else None
    started = time.perf_counter()
    while run.epoch < plan.epochs and time.perf_counter() - started < plan.time_limit_s:
        recipe.G.train(), recipe.D.train()
        shuffle = torch.Generator().manual_seed(1_000_003 * plan.seed + run.epoch)  # same on resume
        real_batches = batches(images, plan.batch_size, plan.iterations_per_epoch, shuffle)
        with run.stopwatch:
            g_loss = train_epoch(step, recipe, real_batches, run, plan)
        run.epoch += 1
        end_epoch(recipe.sampler, run, g_loss, plan.quality(recipe.sampler), folder)
        save_checkpoint(folder / "last.pt", state, run.step, config)
    run.snapshots[run.step] = sample(recipe.sampler, plan.fixed_noise).cpu()
    run.history.flush()
    return run
