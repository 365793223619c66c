"""`make bench`, case "style" (notebook 03): a plain tutorial-style Gatys loop beside the notebook's path.

Baseline: the code a student writes after the PyTorch tutorial "Neural Transfer Using PyTorch": VGG19's layers copied
into a Sequential with ContentLoss / StyleLoss modules after the loss layers (cut after the last one), LBFGS with its
defaults (lr 1, 20 iterations per step() call, a history of 100), the pixels clamped inside the closure, and every loss
read with .item() in the closure. It computes the notebook's objective (the paper's layers, relative units, beta, TV),
so that the final losses compare. Rows after it: the notebook's optimisation_step with torch.optim.LBFGS, with
SyncFreeLBFGS, and on CUDA also channels-last + cuDNN autotuning and VGG in bf16 (fp16 where the GPU has no bf16)
autocast (with the gradient's error against float32 at the start: no loss scaling, which would not reduce it,
since it comes from rounding). Every row runs the same iterations from the same white-noise start; its final
loss is evaluated in float32 by the notebook's objective. GPU: the full-mode size (512 px on the long side; chelsea
is 512x341), 300 timed iterations after 20. CPU (reduced): 128 px, 20 after 10. ImageNet weights when
torchvision has them cached, else random weights (the timings hold; the losses are those of a random network,
and the table says so).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VGG19_Weights

from helpers.style.data import load_image
from helpers.style.evaluate import evaluate
from helpers.style.losses import gram_matrix, total_variation_loss
from helpers.style.model import CONTENT_LAYERS, STYLE_LAYERS, StyleObjective
from helpers.style.optim import (HostReadCounter, StylisedImage, autocast_gradient_error, initial_image,
                                 make_optimizer, optimisation_step)
from helpers.training import synchronize, time_per_step
from helpers.vgg import IMAGENET_MEAN, IMAGENET_STD, VGG19Features

CONTENT, STYLE = "skimage:chelsea", "skimage:immunohistochemistry"  # offline: the GPU machine has no internet
BETA, TAU = 400.0, 10.0  # the notebook's STYLE_WEIGHT and TV_WEIGHT (alpha = 1)
FULL = {"size": 512, "warmup": 20, "iterations": 300}
REDUCED = {"size": 128, "warmup": 10, "iterations": 20}


class ContentLoss(nn.Module):
    """The tutorial's transparent layer: remembers mean (F - P)^2 / mean(P^2) and passes F on."""

    def __init__(self, target: Tensor) -> None:
        super().__init__()
        self.target = target.detach()
        self.scale = float(self.target.square().mean())
        self.loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        self.loss = F.mse_loss(x, self.target) / self.scale
        return x


class StyleLoss(nn.Module):
    """The tutorial's transparent layer: remembers w * 1/4 mean(G - A)^2 / (1/4 mean(A^2)) and passes F on."""

    def __init__(self, target_features: Tensor, weight: float) -> None:
        super().__init__()
        self.target = gram_matrix(target_features).detach()
        self.weight = weight / (0.25 * float(self.target.square().mean()))
        self.loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        self.loss = self.weight * 0.25 * F.mse_loss(gram_matrix(x), self.target)
        return x


class Normalization(nn.Module):
    """ImageNet normalisation as the first layer."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(-1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(-1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def tutorial_model(vgg: VGG19Features, content: Tensor, style: Tensor) -> tuple[nn.Sequential, list, list]:
    """The tutorial's get_style_model_and_losses, with the paper's layers and the same VGG weights as `vgg`."""
    model, trunk = nn.Sequential(Normalization(content.device)), nn.Sequential(Normalization(content.device))
    content_losses, style_losses = [], []
    for name, layer in zip(vgg.names, copy.deepcopy(list(vgg.body))):
        layer = nn.ReLU(inplace=False) if isinstance(layer, nn.ReLU) else layer
        model.add_module(name, layer)
        trunk.add_module(name, layer)  # the same layers without the loss modules: computes the targets
        if name in CONTENT_LAYERS:
            content_losses.append(ContentLoss(trunk(content)))
            model.add_module(f"content_loss_{name}", content_losses[-1])
        if name in STYLE_LAYERS:
            style_losses.append(StyleLoss(trunk(style), 1 / len(STYLE_LAYERS)))
            model.add_module(f"style_loss_{name}", style_losses[-1])
    return model, content_losses, style_losses


def tutorial_step(vgg: VGG19Features, content: Tensor, style: Tensor, image: Tensor,
                  iterations_per_call: int) -> tuple[Callable[[], None], list[int]]:
    """One LBFGS step() call of the tutorial's loop (iterations_per_call iterations); the evaluation counter."""
    model, content_losses, style_losses = tutorial_model(vgg, content, style)
    optimizer = torch.optim.LBFGS([image], max_iter=iterations_per_call)
    evaluations, log = [0], []

    def closure() -> Tensor:
        with torch.no_grad():
            image.clamp_(0, 1)
        optimizer.zero_grad()
        model(image)
        content_score = sum(cl.loss for cl in content_losses) / len(content_losses)
        style_score = sum(sl.loss for sl in style_losses)
        loss = content_score + BETA * style_score + TAU * total_variation_loss(image)
        loss.backward()
        evaluations[0] += 1
        log.append((content_score.item(), style_score.item(), loss.item()))
        return loss

    return lambda: optimizer.step(closure), evaluations


def baseline_row(vgg: VGG19Features, content: Tensor, style: Tensor, config: dict, device: torch.device,
                 judge: StyleObjective) -> dict:
    """Time the tutorial-style loop (one step() call = `warmup` iterations, 20 on a GPU as the tutorial's LBFGS):
    one call to warm up, then iterations / warmup calls; ms per iteration, final loss."""
    image = initial_image(content).requires_grad_(True)
    step, evaluations = tutorial_step(vgg, content, style, image, config["warmup"])
    calls = config["iterations"] // config["warmup"]
    marks: list[int] = []
    timing = time_per_step(lambda: (marks.append(evaluations[0]), step()), device, calls, warmup=1)
    timed_iterations = evaluations[0] - marks[1]
    with torch.no_grad():
        image.clamp_(0, 1)
    ms = timing["ms_per_step"] * calls / timed_iterations
    return {"variant": "plain tutorial-style loop: torch.optim.LBFGS, .item() in the closure", "baseline": True,
            "ms_per_step": ms, "it_per_s": 1000 / ms, "peak_memory_mb": timing["peak_memory_mb"],
            "final_loss": evaluate(judge, image.detach())["total"], "timed_iterations": timed_iterations}


def notebook_row(vgg: VGG19Features, content: Tensor, style: Tensor, config: dict, device: torch.device,
                 judge: StyleObjective, label: str, optimizer: str, autocast: torch.dtype | None = None) -> dict:
    """Time the notebook's optimisation_step with `optimizer` (and VGG autocast); ms per iteration, final loss."""
    objective = StyleObjective(vgg, content, style, beta=BETA, tau=TAU, autocast=autocast)
    image = StylisedImage(initial_image(content))
    opt = make_optimizer(image, optimizer)
    timing = time_per_step(lambda: optimisation_step(objective, image, opt), device, config["iterations"],
                           config["warmup"])
    return {"variant": label, "baseline": False, **timing, "final_loss": evaluate(judge, image().detach())["total"],
            "timed_iterations": config["iterations"]}


def no_host_sync(vgg: VGG19Features, content: Tensor, style: Tensor) -> str:
    """On CUDA, run SyncFreeLBFGS steps with torch's sync debug mode set to error: a host sync would raise."""
    objective = StyleObjective(vgg, content, style, beta=BETA, tau=TAU)
    image = StylisedImage(initial_image(content))
    opt = make_optimizer(image)
    optimisation_step(objective, image, opt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            optimisation_step(objective, image, opt)
        return "no host sync in 3 iterations (sync debug mode 'error')"
    except RuntimeError as err:
        return f"HOST SYNC: {err}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def host_reads(vgg: VGG19Features, content: Tensor, style: Tensor) -> str:
    """Host reads (.item(), float(), bool() of a tensor) per SyncFreeLBFGS iteration, counted on any device."""
    objective = StyleObjective(vgg, content, style, beta=BETA, tau=TAU)
    image = StylisedImage(initial_image(content))
    opt = make_optimizer(image)
    optimisation_step(objective, image, opt)
    with HostReadCounter() as counter:
        for _ in range(3):
            optimisation_step(objective, image, opt)
    return f"{counter.reads / 3:.0f} host reads per iteration (counted)"


def imagenet_weights_cached() -> bool:
    """True when torchvision's ImageNet VGG19 file is already in the torch hub cache (the bench downloads nothing)."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG19_Weights.IMAGENET1K_V1.url).name).is_file()


def cuda_rows(vgg: VGG19Features, content: Tensor, style: Tensor, config: dict, device: torch.device,
              judge: StyleObjective) -> list[dict]:
    """Channels-last + cuDNN autotuning, then VGG in bf16 (or fp16) autocast on top."""
    half = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    torch.backends.cudnn.benchmark = True
    fast_vgg = copy.deepcopy(vgg).to(memory_format=torch.channels_last)
    try:
        rows = [notebook_row(fast_vgg, content, style, config, device, judge,
                             "notebook step, SyncFreeLBFGS, channels-last VGG, cuDNN autotuning", "lbfgs"),
                notebook_row(fast_vgg, content, style, config, device, judge,
                             f"... and VGG in {str(half).removeprefix('torch.')} autocast", "lbfgs", half)]
        # No loss scaling: the error below is rounding of the features, which a loss scale does not reduce.
        error = autocast_gradient_error(StyleObjective(fast_vgg, content, style, beta=BETA, tau=TAU, autocast=half),
                                        judge, initial_image(content))
        rows[-1]["gradient_error"] = error
        rows[-1]["variant"] += f" (gradient {100 * error:.1f} % off float32's, at the start)"
        return rows
    finally:
        torch.backends.cudnn.benchmark = False


def run(device: torch.device, reduced: bool) -> list[dict]:
    """The rows of the style case: baseline first, the same iterations and start for every row."""
    config = REDUCED if reduced else FULL
    pretrained = imagenet_weights_cached()
    torch.manual_seed(0)
    vgg = VGG19Features([*CONTENT_LAYERS, *STYLE_LAYERS], pretrained=pretrained).to(device)
    content = load_image(CONTENT, config["size"], "content image", device)
    style = load_image(STYLE, config["size"], "style image", device)
    judge = StyleObjective(vgg, content, style, beta=BETA, tau=TAU)
    rows = [baseline_row(vgg, content, style, config, device, judge),
            notebook_row(vgg, content, style, config, device, judge, "notebook step, torch.optim.LBFGS", "torch_lbfgs"),
            notebook_row(vgg, content, style, config, device, judge, "notebook step, SyncFreeLBFGS", "lbfgs")]
    if device.type == "cuda":
        rows += cuda_rows(vgg, content, style, config, device, judge)
        sync_note = no_host_sync(vgg, content, style)
    else:
        sync_note = "CPU: nothing to synchronise; " + host_reads(vgg, content, style)
    base_loss = rows[0]["final_loss"]
    size = f"{content.shape[-1]}x{content.shape[-2]}"
    for row in rows:
        iterations = config["warmup"] + row.pop("timed_iterations")
        seconds_300 = row["ms_per_step"] * 300 / 1000
        row.update(notebook="03", config={"size": size, "iterations": iterations, "timed": config["iterations"],
                                          "weights": "ImageNet" if pretrained else "random"},
                   note=f"final loss {row['final_loss']:.4f} ({100 * (row['final_loss'] / base_loss - 1):+.2f} % "
                        f"vs baseline) after {iterations} iterations; {seconds_300:.1f} s per 300 iterations"
                        + ("" if row["baseline"] else f"; {sync_note}" if "SyncFree" in row["variant"] else ""))
    synchronize(device)
    return rows

