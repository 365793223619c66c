"""Drawing many samples (guided, DDIM, decoded from latents), scoring them like notebooks 01/02, the
GAN reference rows and the quality-against-training-time figure."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor, nn

from ..environment import GpuChoices
from ..metrics import SampleQuality, class_coverage, uint8_to_model_input
from ..plotting import save_figure
from .schedule import NoiseSchedule

# Notebook 02's full CPU run (FashionMNIST, 14,055 iterations per recipe at batch 64, 2 shared CPU
# cores, November 2026; 10,000 samples against the 10,000 test images): experiments/RESULTS.md.
GAN_REFERENCE = {
    "improved GAN recipe": {"fd": 21.7, "coverage_nats": 2.288, "train_seconds": 14_055 / 42.3},
    "baseline GAN recipe": {"fd": 58.2, "coverage_nats": 2.206, "train_seconds": 14_055 / 34.3},
}


def balanced_labels(n: int, num_classes: int = 10) -> Tensor:
    """0, 1, ..., 9, 0, 1, ...: every class asked for equally often."""
    return torch.arange(n) % num_classes


@torch.no_grad()
def diffusion_samples(model: nn.Module, schedule: NoiseSchedule, condition, labels: Tensor,
                      shape: tuple[int, ...], sampler: Callable, guide: Callable, steps: int,
                      w: float, device: torch.device, choices: GpuChoices, seed: int = 0,
                      decode: Callable[[Tensor], Tensor] | None = None,
                      batch: int = 1000) -> Tensor:
    """Images (N, 1, 28, 28) in [-1, 1] on the CPU for the requested labels: `sampler` (e.g. DDIM)
    with `steps` steps on the eps of `guide(model, cond, null, w)`, decoded from latents when
    `decode` is given. A batch that is not finite under the autocast dtype is drawn again in fp32
    (and said)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch):
        rows = labels[start:start + batch]
        x_T = torch.randn((len(rows), *shape), generator=generator).to(device)
        cond = {k: v.to(device) for k, v in condition.inputs(rows).items()}
        null = {k: v.to(device) for k, v in condition.null_inputs(len(rows)).items()}
        eps_fn = guide(model, cond, null, w)
        with choices.autocast():
            x = sampler(eps_fn, schedule, x_T, steps)
            images = decode(x).float() if decode else x.float()
        if not torch.isfinite(images).all():
            print(f"samples {start}-{start + len(rows)} were not finite in {choices.amp_dtype}; "
                  "drawing them again in fp32")
            x = sampler(eps_fn, schedule, x_T, steps)
            images = decode(x).float() if decode else x.float()
        out.append(images.clamp(-1, 1).cpu())
    images = torch.cat(out)
    assert torch.isfinite(images).all(), "every sample must be finite"
    return images


@torch.no_grad()
def score_with_labels(score: SampleQuality, images: Tensor, labels: Tensor) -> dict[str, float]:
    """FD and class coverage as in 01/02, plus class agreement: the share of images that the
    classifier reads as the class that was asked for."""
    result = score(images)
    predicted = torch.cat([score.classifier(images[i:i + 1000].to(score.device)).argmax(1).cpu()
                           for i in range(0, len(images), 1000)])
    result["agreement"] = float((predicted == labels).float().mean())
    assert math.isclose(result["coverage_nats"], class_coverage(predicted), rel_tol=1e-9)
    return result


def gan_rows(run_root: Path, score: SampleQuality) -> tuple[dict, str]:
    """The GAN rows of the scoreboard: notebook 02's own samples.npz under `run_root` when there is
    one (scored here), else the reference values above; and a caption saying which."""
    folder = run_root / "02_fashion_mnist_gan"
    samples, metrics_file = folder / "samples.npz", folder / "metrics.json"
    if samples.is_file() and metrics_file.is_file():
        saved, record = np.load(samples), json.loads(metrics_file.read_text())
        if record.get("mode") == "full":
            recipes = record.get("recipes", {})
            rows = {}
            for name, key, recipe in (("improved GAN recipe", "images", "improved"),
                                      ("baseline GAN recipe", "images_baseline", "baseline")):
                rows[name] = {**score(uint8_to_model_input(saved[key])),
                              "train_seconds": recipes.get(recipe, {}).get("seconds", float("nan"))}
            return rows, f"GAN rows: your own notebook 02 run in {folder}"
    return ({k: dict(v) for k, v in GAN_REFERENCE.items()},
            "GAN rows: reference values (notebook 02, FashionMNIST, 14,055 iterations per recipe, "
            "2 CPU cores)")


def plot_fd_against_seconds(curves: Mapping[str, tuple[list[float], list[float]]],
                            points: Mapping[str, tuple[float, float]], title: str,
                            path: str | os.PathLike | None = None) -> plt.Figure:
    """FD against CPU training seconds: one line per curve (FD during training), one marker per
    final score; log-scaled FD."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (seconds, fds) in curves.items():
        ax.plot(seconds, fds, marker=".", label=label)
    for label, (seconds, fd) in points.items():
        ax.scatter([seconds], [fd], marker="*", s=120, label=label, zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("FD (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.show()
    return fig


def load_scoreboard(path: Path, settings: dict) -> dict:
    """The scores a run already measured (scoreboard.json), or else an empty board."""
    if path.is_file():
        board = json.loads(path.read_text())
        if board.get("settings") == settings:
            print(f"reusing {len(board['rows'])} scored rows of {path}")
            return board
        print(f"{path.name} was scored with other settings; scoring again")
    return {"settings": settings, "rows": {}}


def save_scoreboard(path: Path, board: dict) -> None:
    """Write the board (atomically: a stopped run never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(board, indent=1))
    os.replace(tmp, path)


def fmt(row: Mapping, key: str, spec: str) -> str:
    """row[key] formatted, or a dash where the row has no such number."""
    value = row.get(key)
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "–" if missing else format(value, spec)
