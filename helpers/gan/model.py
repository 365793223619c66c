"""The fully-connected GAN of the course brief (MNIST / FashionMNIST): the two networks, the
baseline recipe's training step and recipe, and an improved recipe beside it. Notebooks 01 and 02
share this code."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..losses import bce_discriminator_loss, bce_generator_loss
from ..training import ema_update

IMAGE_SHAPE = (1, 28, 28)
IMAGE_PIXELS = 28 * 28

StepFn = Callable[[Tensor, Tensor], dict[str, Tensor]]  # (real images, noise z) -> values to log


class Generator(nn.Module):
    """z -> fully-connected layers, BatchNorm + LeakyReLU(0.2) -> 784 values, tanh -> 1x28x28."""

    def __init__(self, latent_dim: int = 100,
                 hidden: Sequence[int] = (128, 256, 512, 1024)) -> None:
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


def gan_train_step(G: nn.Module, D: nn.Module, opt_g: Optimizer, opt_d: Optimizer, real: Tensor,
               z: Tensor) -> dict[str, Tensor]:
    """One iteration of the baseline recipe: a G step on the fakes G(z) labelled real, then a D
    step on d_loss = (real_loss + fake_loss) / 2 with the fakes detached. Returns what to log."""
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
class Recipe:
    """One way to train the GAN: the two networks, their optimizers, the step that updates them,
    the generator that draws samples (G or a moving average of G), the settings checkpoints keep."""

    name: str
    G: Generator
    D: nn.Module
    opt_g: Optimizer
    opt_d: Optimizer
    step: StepFn
    sampler: nn.Module
    config: dict[str, Any]

    def state(self) -> dict[str, Any]:
        """The objects last.pt stores for this recipe."""
        state = {"G": self.G, "D": self.D, "opt_g": self.opt_g, "opt_d": self.opt_d}
        return state if self.sampler is self.G else {**state, "sampler": self.sampler}


def baseline_recipe(device: torch.device, latent_dim: int = 100,
                g_hidden: Sequence[int] = (128, 256, 512, 1024),
                d_hidden: Sequence[int] = (512, 256), lr: float = 2e-4,
                betas: tuple[float, float] = (0.5, 0.999)) -> Recipe:
    """The baseline recipe of the course brief: its generator and discriminator, BCE losses,
    Adam(lr, betas) for both."""
    G = Generator(latent_dim, g_hidden).to(device)
    D = Discriminator(d_hidden).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=betas)
    config = {"recipe": "baseline", "latent_dim": latent_dim, "g_hidden": list(g_hidden),
              "d_hidden": list(d_hidden), "lr": lr, "betas": list(betas)}
    step = partial(gan_train_step, G, D, opt_g, opt_d)
    return Recipe("baseline", G, D, opt_g, opt_d, step, G, config)


# --- the improved recipe --------------------------------------------------------------------------


def improved_step(G: nn.Module, D: nn.Module, opt_g: Optimizer, opt_d: Optimizer, G_ema: nn.Module,
                  decay: float, real: Tensor, z: Tensor) -> dict[str, Tensor]:
    """The baseline step, then the moving average of G's weights updated."""
    out = gan_train_step(G, D, opt_g, opt_d, real, z)
    ema_update(G_ema, G, decay)
    return out


def improved_recipe(device: torch.device, latent_dim: int = 100,
                    g_hidden: Sequence[int] = (128, 256, 512, 1024),
                    d_hidden: Sequence[int] = (512, 256), lr: float = 2e-4,
                    betas: tuple[float, float] = (0.0, 0.9), ema_decay: float = 0.99) -> Recipe:
    """The improved recipe: the baseline recipe with Adam(lr, betas) without momentum, and samples
    drawn from a moving average of G's weights."""
    base = baseline_recipe(device, latent_dim, g_hidden, d_hidden, lr, betas)
    G_ema = copy.deepcopy(base.G).requires_grad_(False)
    step = partial(improved_step, base.G, base.D, base.opt_g, base.opt_d, G_ema, ema_decay)
    config = {**base.config, "recipe": "improved", "ema_decay": ema_decay}
    return dataclasses.replace(base, name="improved", step=step, sampler=G_ema, config=config)
