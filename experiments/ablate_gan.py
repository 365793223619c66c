"""The measurements behind notebook 01/02's improved recipe: train the baseline recipe's fully-connected GAN with one set
of changes and print the FD (the notebooks' classifier-feature FD on 2,000 samples, lower is better) every
2,000 iterations, of G itself and of moving averages of G's weights.

    OMP_NUM_THREADS=1 python experiments/ablate_gan.py FashionMNIST 8000 baseline ttur+mbstd+adam09
    python experiments/ablate_gan.py --list        # the variants

Each variant starts from the same seed and sees the same batches; the moving averages never feed back into
training, so one run scores every averaging rate at once. One run of 8,000 iterations takes 5-15 min on one
CPU thread. The notebooks' modules do the work: helpers.gan's generator, recipe, batches and epoch loop
(train_epoch), helpers.training's moving average (ema_update) and run record. What a variant changes is here:
its discriminator and its losses, written with logits (BCE with logits equals the baseline's BCE on sigmoid
outputs), in a step that keeps the order of the baseline's gan_train_step.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from helpers import data, metrics
from helpers.environment import data_dir
from helpers.gan.evaluate import gan_samples
from helpers.gan.model import IMAGE_PIXELS, Generator, Recipe
from helpers.gan.train import GanPlan, batches, train_epoch
from helpers.training import TrainingRun, ema_update

# name -> changes to the baseline recipe
VARIANTS = {
    "baseline": {},
    "sn": {"spectral_norm": True}, "ttur": {"ttur": True}, "hinge": {"loss": "hinge"},
    "smooth": {"smooth": 0.9}, "dropout": {"dropout": 0.3},
    "dropout+ttur": {"dropout": 0.3, "ttur": True},
    "dropout+ttur+hinge": {"dropout": 0.3, "ttur": True, "loss": "hinge"},
    "dropout+ttur+hinge+mbstd": {"dropout": 0.3, "ttur": True, "loss": "hinge", "mbstd": True},
    "dropout+ttur+hinge+adam09": {"dropout": 0.3, "ttur": True, "loss": "hinge", "betas": (0.0, 0.9)},
    "ttur+hinge": {"ttur": True, "loss": "hinge"},
    "ttur+hinge+mbstd+adam09": {"ttur": True, "loss": "hinge", "mbstd": True, "betas": (0.0, 0.9)},
    "ttur+mbstd+adam09": {"ttur": True, "mbstd": True, "betas": (0.0, 0.9)},
    "ttur+mbstd": {"ttur": True, "mbstd": True},
    "ttur+adam09": {"ttur": True, "betas": (0.0, 0.9)},
    "mbstd+adam09": {"mbstd": True, "betas": (0.0, 0.9)},
    "mbstd": {"mbstd": True},
    "adam09": {"betas": (0.0, 0.9)},  # the notebooks' improved recipe, sampled from ema0.99
}
AVERAGES = {"ema0.99": 0.99, "ema0.999": 0.999}  # decay of each moving average scored beside G
BATCH_SIZE, ITERATIONS_PER_EPOCH, SCORE_EVERY = 64, 937, 2_000  # an epoch: 60,000 images once


class MinibatchStd(nn.Module):
    """Appends one feature to every row: the batch's standard deviation, averaged over features
    (Karras et al. 2018)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N, F + 1)."""
        return torch.cat([h, h.std(dim=0).mean().expand(len(h), 1)], dim=1)


def discriminator(spectral_norm: bool = False, dropout: float = 0.0, mbstd: bool = False) -> nn.Module:
    """The baseline's 784-512-256-1 discriminator without its sigmoid (the losses take logits), with options."""
    wrap = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
    layers: list[nn.Module] = []
    width = IMAGE_PIXELS
    for out in (512, 256):
        layers += [wrap(nn.Linear(width, out)), nn.LeakyReLU(0.2)] + ([nn.Dropout(dropout)] if dropout else [])
        width = out
    if mbstd:
        layers.append(MinibatchStd())
    layers.append(wrap(nn.Linear(width + mbstd, 1)))
    return nn.Sequential(nn.Flatten(), *layers)


def generator_loss(d_fake: torch.Tensor, loss: str) -> torch.Tensor:
    """The baseline's non-saturating BCE, or the hinge loss's -mean(D(G(z)))."""
    return -d_fake.mean() if loss == "hinge" else F.softplus(-d_fake).mean()


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, loss: str, smooth: float) -> torch.Tensor:
    """The baseline's (real_loss + fake_loss) / 2 in BCE (the real label `smooth`, 1 for the baseline), or hinge."""
    if loss == "hinge":
        return (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()) / 2
    return (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, smooth))
            + F.softplus(d_fake).mean()) / 2


def variant_step(G: nn.Module, D: nn.Module, opt_g: Optimizer, opt_d: Optimizer,
                 averages: dict[str, nn.Module], loss: str, smooth: float, real: torch.Tensor,
                 z: torch.Tensor) -> dict[str, torch.Tensor]:
    """One iteration in the baseline's order: a G step on the fakes, a D step on the real images and the
    detached fakes, then every moving average of G updated (helpers.training.ema_update)."""
    fake = G(z)
    g_loss = generator_loss(D(fake), loss)
    opt_g.zero_grad()
    g_loss.backward()
    opt_g.step()
    d_loss = discriminator_loss(D(real), D(fake.detach()), loss, smooth)
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    for key, decay in AVERAGES.items():
        ema_update(averages[key], G, decay)
    return {"loss/generator": g_loss.detach(), "loss/discriminator": d_loss.detach()}


def variant_recipe(name: str) -> tuple[Recipe, dict[str, nn.Module]]:
    """The baseline's generator and a variant discriminator, their optimizers and the variant's step, as a
    helpers.gan Recipe; and the moving averages of G that the step updates."""
    options = VARIANTS[name]
    torch.manual_seed(0)
    G = Generator()
    D = discriminator(options.get("spectral_norm", False), options.get("dropout", 0.0),
                      options.get("mbstd", False))
    averages = {key: copy.deepcopy(G).requires_grad_(False) for key in AVERAGES}
    lr_g, lr_d = (1e-4, 4e-4) if options.get("ttur") else (2e-4, 2e-4)
    betas = options.get("betas", (0.5, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr_d, betas=betas)
    step = partial(variant_step, G, D, opt_g, opt_d, averages, options.get("loss", "bce"),
                   options.get("smooth", 1.0))
    return Recipe(name, G, D, opt_g, opt_d, step, G, {"variant": name, **options}), averages


def run(name: str, images: torch.Tensor, score: metrics.SampleQuality, iterations: int,
        every: int = SCORE_EVERY, samples: int = 2_000) -> list[dict]:
    """Train one variant for `iterations` with helpers.gan's epoch loop (an epoch's batches cut where
    a score is due); FD and coverage of `samples` images of G and of each average every `every`
    iterations and at the end."""
    recipe, averages = variant_recipe(name)
    plan = GanPlan(-(-iterations // ITERATIONS_PER_EPOCH), ITERATIONS_PER_EPOCH, BATCH_SIZE, 0,
                   log_every=100, snapshot_steps=(), fixed_noise=torch.zeros(0),
                   quality=lambda G: score(gan_samples(G, samples, torch.device("cpu"), seed=1)))
    record, rows, started = TrainingRun(), [], time.perf_counter()
    while record.step < iterations:
        epoch = batches(images, BATCH_SIZE, ITERATIONS_PER_EPOCH,
                        torch.Generator().manual_seed(record.epoch))
        while epoch and record.step < iterations:
            due = min(every - record.step % every, iterations - record.step)  # steps to the next score
            piece, epoch = epoch[:due], epoch[due:]
            train_epoch(recipe.step, recipe, piece, record, plan)
            if record.step % every == 0 or record.step == iterations:
                row = {"step": record.step,
                       "it_per_s": round(record.step / (time.perf_counter() - started), 1)}
                for key, model in {"G": recipe.G, **averages}.items():
                    quality = plan.quality(model)
                    row[key] = {"fd": round(quality["fd"], 1),
                                "coverage_nats": round(quality["coverage_nats"], 3)}
                rows.append(row)
                print(name, json.dumps(row), flush=True)
        record.epoch += 1
    return rows


def main(argv: list[str]) -> int:
    """Command line (see the module docstring)."""
    if not argv or argv[0] == "--list" or len(argv) < 3:
        print(__doc__ + "\nvariants: " + ", ".join(VARIANTS))
        return 0 if argv and argv[0] == "--list" else 2
    dataset, iterations, names = argv[0], int(argv[1]), argv[2:]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        return 2
    root = data_dir()
    train_images, train_labels = data.images_and_labels(data.load_mnist_like(dataset, root, train=True))
    test_images, test_labels = data.images_and_labels(data.load_mnist_like(dataset, root, train=False))
    classifier, _ = metrics.train_classifier(train_images, train_labels, test_images, test_labels,
                                             cache=root / dataset / f"classifier-{len(train_images)}-3ep.pt",
                                             epochs=3, seed=0)
    score = metrics.SampleQuality(classifier, test_images, torch.device("cpu"))
    for name in names:
        run(name, train_images, score, iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
