"""Figures of the collection: loss curves, sample grids, samples over iterations, side-by-side panels, labelled tables."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from torch import Tensor
from torchvision.utils import make_grid

from .training import History


def to_display(images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Map a batch from `value_range` to [0, 1] floats on the CPU (for plotting and PNGs)."""
    lo, hi = value_range
    return ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)


def image_grid(images: Tensor, nrow: int = 8, value_range: tuple[float, float] = (-1.0, 1.0), padding: int = 2) -> Tensor:
    """A (C, H, W) grid in [0, 1] of a batch (N, C, H, W) or (N, H, W)."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W) or (N, H, W), got {tuple(images.shape)}")
    return make_grid(to_display(images, value_range), nrow=nrow, padding=padding, pad_value=1.0)


def _imshow(ax: plt.Axes, grid: Tensor) -> None:
    array = grid.permute(1, 2, 0).numpy()
    ax.imshow(array.squeeze(-1) if array.shape[-1] == 1 else array, cmap="gray" if array.shape[-1] == 1 else None,
              vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig: plt.Figure, path: str | os.PathLike | None) -> Path | None:
    """Save `fig` as PNG (creating folders) when `path` is given; return the path."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _finish(fig: plt.Figure, title: str, path: str | os.PathLike | None) -> plt.Figure:
    """Title, tight layout, PNG, inline display: the common end of every figure helper here."""
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.show()
    return fig


def show_grid(images: Tensor, title: str, path: str | os.PathLike | None = None, nrow: int = 8,
              value_range: tuple[float, float] = (-1.0, 1.0), size: float = 6.0) -> plt.Figure:
    """Show a batch as one titled grid inline and save it as PNG."""
    fig, ax = plt.subplots(figsize=(size, size))
    _imshow(ax, image_grid(images, nrow=nrow, value_range=value_range))
    ax.set_title(title)
    save_figure(fig, path)
    plt.show()
    return fig


def show_panels(panels: Mapping[str, Tensor], title: str, path: str | os.PathLike | None = None,
                value_range: tuple[float, float] = (-1.0, 1.0), nrow: int = 8, size: float = 4.0) -> plt.Figure:
    """Show several images or batches side by side, each with its caption (e.g. content | style | result)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (caption, images) in zip(axes[0], panels.items()):
        batch = images if images.dim() == 4 else images.unsqueeze(0)
        _imshow(ax, image_grid(batch, nrow=nrow, value_range=value_range))
        ax.set_title(caption)
    return _finish(fig, title, path)


def plot_losses(history: History, names: Sequence[str], title: str, path: str | os.PathLike | None = None,
                xlabel: str = "iteration", ylabel: str = "loss", smooth: int = 1) -> plt.Figure:
    """Plot logged scalars against their step, optionally as a moving average over `smooth` points."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in names:
        steps, values = history.series(name)
        if smooth > 1 and len(values) >= smooth:
            kernel = torch.ones(smooth) / smooth
            values = torch.conv1d(torch.tensor(values).view(1, 1, -1), kernel.view(1, 1, -1)).flatten().tolist()
            steps = steps[smooth - 1:]
        ax.plot(steps, values, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    plt.show()
    return fig


def show_over_iterations(snapshots: Mapping[int, Tensor], title: str, path: str | os.PathLike | None = None,
                         nrow: int = 8, value_range: tuple[float, float] = (-1.0, 1.0)) -> plt.Figure:
    """The course brief's table of samples as one figure: the same noise decoded at several iterations, one
    column per iteration."""
    if not snapshots:
        raise ValueError("no snapshots to show; train for at least one snapshot interval first")
    fig, axes = plt.subplots(1, len(snapshots), figsize=(3 * len(snapshots), 3.4), squeeze=False)
    for ax, (step, images) in zip(axes[0], sorted(snapshots.items())):
        _imshow(ax, image_grid(images, nrow=nrow, value_range=value_range))
        ax.set_title(f"iteration {step:,}")
    return _finish(fig, title, path)


def show_rows(rows: Mapping[str, Tensor] | Sequence[tuple[str, Tensor]], title: str,
              path: str | os.PathLike | None = None, value_range: tuple[float, float] = (-1.0, 1.0),
              xlabel: str | None = None) -> plt.Figure:
    """One labelled strip of images per row (label -> batch), e.g. a caption and its samples, or input | output | target."""
    rows = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
    ncol = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6.0, 1.4 * ncol), 1.6 * len(rows)), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        _imshow(ax, image_grid(images, nrow=len(images), value_range=value_range))
        ax.set_title(label, fontsize=9, loc="left")
    if xlabel:
        axes[-1, 0].set_xlabel(xlabel)
    return _finish(fig, title, path)


def show_image_table(images: Tensor, row_labels: Sequence[str], column_labels: Sequence[str], title: str,
                     path: str | os.PathLike | None = None, xlabel: str = "seed", ylabel: str = "prompt") -> plt.Figure:
    """Images in [0, 1], (rows * columns, 3, H, W) row-major, as a table with labelled rows and columns."""
    rows, cols = len(row_labels), len(column_labels)
    if images.shape[0] != rows * cols:
        raise ValueError(f"{images.shape[0]} images do not fill a {rows} x {cols} table")
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 1.5, 2.2 * rows + 0.8), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.imshow(images[index].permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        r, c = divmod(index, cols)
        if r == rows - 1:
            ax.set_xlabel(f"{xlabel}: {column_labels[c]}", fontsize=8)
        if c == 0:
            label = row_labels[r] if len(row_labels[r]) <= 28 else row_labels[r][:26] + "…"
            ax.set_ylabel(f"{ylabel}: {label}" if ylabel else label, fontsize=7)
    return _finish(fig, title, path)
