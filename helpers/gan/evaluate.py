"""Drawing the GAN's samples, and the figures of its training: quality over iterations, loss against
quality."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn

from ..plotting import save_figure
from ..training import TrainingRun


@torch.no_grad()
def sample(G: nn.Module, z: Tensor) -> Tensor:
    """Images for the noise `z`, with G in eval mode (batch-norm running statistics), restoring
    its mode after."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


@torch.no_grad()
def gan_samples(G: nn.Module, n: int, device: torch.device, seed: int = 0,
                batch: int = 1000) -> Tensor:
    """`n` images from a seeded noise stream (the same seed gives the same images)."""
    rng = torch.Generator(device="cpu").manual_seed(seed)
    sizes = [min(batch, n - i) for i in range(0, n, batch)]
    noise = (torch.randn(size, G.latent_dim, generator=rng) for size in sizes)
    chunks = [sample(G, z.to(device)).cpu() for z in noise]
    return torch.cat(chunks)


def plot_fd_over_iterations(runs: dict[str, TrainingRun], title: str,
                            path: Path | None = None) -> plt.Figure:
    """FD after every epoch against iterations, a line per recipe (log scale); rings: the best."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, run in runs.items():
        epochs = run.records["epochs"]
        steps, fds = [e["step"] for e in epochs], [e["fd"] for e in epochs]
        line, = ax.plot(steps, fds, ".-", label=name)
        best = run.records["best_by_quality"]
        ax.plot(best["step"], best["fd"], "o", ms=10, mfc="none", color=line.get_color(),
                label=f"{name}: best FD {best['fd']:.1f} at iteration {best['step']:,}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("FD in classifier features (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)
    plt.show()
    return fig


def plot_loss_vs_fd(run: TrainingRun, title: str, path: Path | None = None) -> plt.Figure:
    """Per epoch, the mean generator loss beside the FD; dashed lines mark each criterion's best."""
    records = run.records
    epochs = [e["epoch"] for e in records["epochs"]]
    fig, ax_loss = plt.subplots(figsize=(8, 4))
    ax_loss.plot(epochs, [e["g_loss"] for e in records["epochs"]], "o-", color="tab:blue")
    ax_loss.set_xlabel("epoch")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_ylabel("mean generator loss", color="tab:blue")
    ax_fd = ax_loss.twinx()
    ax_fd.plot(epochs, [e["fd"] for e in records["epochs"]], "s-", color="tab:red")
    ax_fd.set_ylabel("FD in classifier features (lower is better)", color="tab:red")
    for best, color in ((records["best_by_g_loss"], "tab:blue"),
                        (records["best_by_quality"], "tab:red")):
        ax_loss.axvline(best["epoch"], color=color, ls="--", alpha=0.6)
    ax_loss.set_title(title)
    save_figure(fig, path)
    plt.show()
    return fig
