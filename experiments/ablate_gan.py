"""The measurements behind notebook 01/02's improved recipe: train the seed's fully-connected GAN with one set
of changes and print the FD (the notebooks' classifier-feature FD on 2,000 samples, lower is better) every
2,000 iterations, of G itself and of moving averages of G's weights.

    OMP_NUM_THREADS=1 python experiments/ablate_gan.py FashionMNIST 8000 seed ttur+mbstd+adam09
    python experiments/ablate_gan.py --list        # the variants

Each variant starts from the same seed and sees the same batches; the moving averages never feed back into
training, so one run scores every averaging rate at once. One run of 8,000 iterations takes 5-15 min on one
CPU thread. The losses are written with logits (BCE with logits equals the seed's BCE on sigmoid outputs).
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from helpers import data, metrics  # noqa: E402
from helpers.environment import data_dir  # noqa: E402
from helpers.mnist_gan import IMAGE_PIXELS, Generator, batches, generate  # noqa: E402

# name -> changes to the seed's recipe
VARIANTS = {
    "seed": {},
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


class MinibatchStd(nn.Module):
    """Appends one feature to every row: the batch's standard deviation, averaged over features
    (Karras et al. 2018)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N, F + 1)."""
        return torch.cat([h, h.std(dim=0).mean().expand(len(h), 1)], dim=1)


def discriminator(spectral_norm: bool = False, dropout: float = 0.0, mbstd: bool = False) -> nn.Module:
    """The seed's 784-512-256-1 discriminator without its sigmoid (the losses take logits), with options."""
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
    """The seed's non-saturating BCE, or the hinge loss's -mean(D(G(z)))."""
    return -d_fake.mean() if loss == "hinge" else F.softplus(-d_fake).mean()


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, loss: str, smooth: float) -> torch.Tensor:
    """The seed's (real_loss + fake_loss) / 2 in BCE (the real label `smooth`, 1 for the seed), or hinge."""
    if loss == "hinge":
        return (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()) / 2
    return (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, smooth))
            + F.softplus(d_fake).mean()) / 2


@torch.no_grad()
def update_average(average: nn.Module, model: nn.Module, decay: float) -> None:
    """The notebooks' EMA: weights averaged, batch-norm statistics averaged too."""
    for mine, theirs in zip(average.parameters(), model.parameters()):
        mine.lerp_(theirs, 1 - decay)
    for mine, theirs in zip(average.buffers(), model.buffers()):
        mine.lerp_(theirs, 1 - decay) if theirs.dtype.is_floating_point else mine.copy_(theirs)


def run(name: str, images: torch.Tensor, score: metrics.SampleQuality, iterations: int) -> list[dict]:
    """Train one variant for `iterations`; FD and coverage of G and of each average every 2,000."""
    options = VARIANTS[name]
    torch.manual_seed(0)
    G = Generator()
    D = discriminator(options.get("spectral_norm", False), options.get("dropout", 0.0), options.get("mbstd", False))
    averages = {key: copy.deepcopy(G).requires_grad_(False) for key in AVERAGES}
    lr_g, lr_d = (1e-4, 4e-4) if options.get("ttur") else (2e-4, 2e-4)
    betas = options.get("betas", (0.5, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr_d, betas=betas)
    rows, step, epoch, started = [], 0, 0, time.perf_counter()
    while step < iterations:
        for real in batches(images, 64, 937, torch.Generator().manual_seed(epoch)):
            fake = G(torch.randn(64, 100))
            g_loss = generator_loss(D(fake), options.get("loss", "bce"))
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
            d_loss = discriminator_loss(D(real), D(fake.detach()), options.get("loss", "bce"),
                                        options.get("smooth", 1.0))
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            for key, decay in AVERAGES.items():
                update_average(averages[key], G, decay)
            step += 1
            if step % 2000 == 0 or step == iterations:
                row = {"step": step, "it_per_s": round(step / (time.perf_counter() - started), 1)}
                for key, model in {"G": G, **averages}.items():
                    quality = score(generate(model, 2000, torch.device("cpu"), seed=1))
                    row[key] = {"fd": round(quality["fd"], 1), "coverage_nats": round(quality["coverage_nats"], 3)}
                rows.append(row)
                print(name, json.dumps(row), flush=True)
            if step >= iterations:
                break
        epoch += 1
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
