"""The fully-connected GAN of seed 003 (MNIST / FashionMNIST): models, one training step, the resumable loop.

Notebooks 01 and 02 share this code and differ only in the dataset and their text.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .losses import bce_discriminator_loss, bce_generator_loss
from .training import History, Stopwatch, load_checkpoint, save_checkpoint

IMAGE_SHAPE = (1, 28, 28)
IMAGE_PIXELS = 28 * 28


class Generator(nn.Module):
    """z -> fully-connected layers, BatchNorm + LeakyReLU(0.2) -> 784 values, tanh -> a 1x28x28 image."""

    def __init__(self, latent_dim: int = 100, hidden: Sequence[int] = (128, 256, 512, 1024)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim
        for i, out in enumerate(hidden):
            layers.append(nn.Linear(width, out))
            if i > 0:  # no batch norm right after the noise input (DCGAN/GAN practice)
                layers.append(nn.BatchNorm1d(out))
            layers.append(nn.LeakyReLU(0.2))
            width = out
        layers += [nn.Linear(width, IMAGE_PIXELS), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.latent_dim = latent_dim

    def forward(self, z: Tensor) -> Tensor:
        """(N, latent_dim) noise -> (N, 1, 28, 28) images in [-1, 1]."""
        return self.net(z).view(-1, *IMAGE_SHAPE)


class Discriminator(nn.Module):
    """Flattened 784-pixel image -> fully-connected layers, LeakyReLU(0.2) -> sigmoid P(real)."""

    def __init__(self, hidden: Sequence[int] = (512, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = IMAGE_PIXELS
        for out in hidden:
            layers += [nn.Linear(width, out), nn.LeakyReLU(0.2)]
            width = out
        layers += [nn.Linear(width, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 1, 28, 28) images -> (N, 1) probabilities in (0, 1)."""
        return self.net(images.flatten(1))


def train_step(G: Generator, D: Discriminator, opt_g: torch.optim.Optimizer,
               opt_d: torch.optim.Optimizer, real: Tensor) -> dict[str, Tensor]:
    """One iteration of seed 003: a G step on fakes labelled real, then a D step on
    d_loss = (real_loss + fake_loss) / 2 with the fakes detached."""
    z = torch.randn(real.size(0), G.latent_dim, device=real.device)
    fake = G(z)
    g_loss = bce_generator_loss(D(fake))
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()

    d_real, d_fake = D(real), D(fake.detach())
    d_loss = bce_discriminator_loss(d_real, d_fake)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    return {"loss/generator": g_loss.detach(), "loss/discriminator": d_loss.detach(),
            "D(x)/real": d_real.detach().mean(), "D(x)/fake": d_fake.detach().mean()}


@dataclass
class GanRun:
    """What the training loop keeps between epochs; saved in last.pt through state_dict()."""

    history: History
    stopwatch: Stopwatch = field(default_factory=Stopwatch)
    snapshots: dict[int, Tensor] = field(default_factory=dict)
    epoch_g_loss: list[float] = field(default_factory=list)
    epoch_quality: list[dict[str, float]] = field(default_factory=list)
    best_by_g_loss: dict = field(default_factory=dict)
    best_by_quality: dict = field(default_factory=dict)
    step: int = 0
    epoch: int = 0

    def state_dict(self) -> dict:
        """Everything above, as plain values (History and Stopwatch through their own state_dict)."""
        state = {k: v for k, v in vars(self).items() if k not in ("history", "stopwatch")}
        return {**state, "history": self.history.state_dict(), "stopwatch": self.stopwatch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved run."""
        state = dict(state)
        self.history.load_state_dict(state.pop("history"))
        self.stopwatch.load_state_dict(state.pop("stopwatch"))
        vars(self).update(state)


def batches(images: Tensor, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled batches of an in-memory dataset, the last incomplete one dropped (drop_last)."""
    order = torch.randperm(len(images), generator=generator)
    return [images[order[i:i + batch_size]] for i in range(0, len(images) - batch_size + 1, batch_size)]


def train_gan(G: Generator, D: Discriminator, opt_g: torch.optim.Optimizer,
              opt_d: torch.optim.Optimizer, images: Tensor, run: GanRun, epochs: int,
              batch_size: int, folder: Path, config: dict, fixed_noise: Tensor,
              snapshot_steps: Sequence[int], quality: Callable[[Generator], dict[str, float]],
              log_every: int = 50, time_limit_s: float = math.inf) -> GanRun:
    """Train until `epochs`, resuming from folder/last.pt; keep the best G by epoch G loss and by FD."""
    state = {"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d, "run": run}
    if (folder / "last.pt").exists():
        load_checkpoint(folder / "last.pt", state, config=config)
        print(f"resumed from {folder / 'last.pt'} at epoch {run.epoch}, iteration {run.step:,}")
    started = time.perf_counter()
    while run.epoch < epochs and time.perf_counter() - started < time_limit_s:
        G.train(), D.train()
        epoch_losses = []
        shuffle = torch.Generator().manual_seed(1_000_003 * config["seed"] + run.epoch)  # same on resume
        for real in tqdm(batches(images, batch_size, shuffle), desc=f"epoch {run.epoch + 1}/{epochs}",
                         leave=False):
            with run.stopwatch:
                out = train_step(G, D, opt_g, opt_d, real)
            run.stopwatch.count(1, len(real))
            run.step += 1
            epoch_losses.append(out["loss/generator"])
            if run.step % log_every == 0:
                run.history.log(run.step, **out)
            if run.step in snapshot_steps:
                run.snapshots[run.step] = sample(G, fixed_noise).cpu()
        run.epoch += 1
        end_epoch(G, run, torch.stack(epoch_losses).mean().item(), quality(G), folder)
        save_checkpoint(folder / "last.pt", state, run.step, config)
    run.snapshots[run.step] = sample(G, fixed_noise).cpu()
    run.history.flush()
    return run


def end_epoch(G: Generator, run: GanRun, g_loss: float, scores: dict[str, float], folder: Path) -> None:
    """Record the epoch's mean G loss and quality; save G when either is the best so far."""
    run.epoch_g_loss.append(g_loss)
    run.epoch_quality.append(scores)
    run.history.log(run.step, **{"epoch/generator_loss": g_loss, "epoch/fd": scores["fd"]})
    record = {"epoch": run.epoch, "step": run.step, "g_loss": g_loss, **scores}
    if not run.best_by_g_loss or g_loss < run.best_by_g_loss["g_loss"]:
        run.best_by_g_loss = record
        save_checkpoint(folder / "best_by_g_loss.pt", {"G": G}, step=run.step, extra=record)
    if not run.best_by_quality or scores["fd"] < run.best_by_quality["fd"]:
        run.best_by_quality = record
        save_checkpoint(folder / "best_by_fd.pt", {"G": G}, step=run.step, extra=record)


@torch.no_grad()
def sample(G: Generator, z: Tensor) -> Tensor:
    """Images for the noise `z`, with G in eval mode (batch-norm running statistics), restoring its mode after."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


@torch.no_grad()
def generate(G: Generator, n: int, device: torch.device, seed: int = 0, batch: int = 1000) -> Tensor:
    """`n` images from a seeded noise stream (the same seed gives the same images)."""
    rng = torch.Generator(device="cpu").manual_seed(seed)
    chunks = [sample(G, torch.randn(min(batch, n - i), G.latent_dim, generator=rng).to(device)).cpu()
              for i in range(0, n, batch)]
    return torch.cat(chunks)
