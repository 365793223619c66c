"""Pix2PixHD's training: the learning-rate schedule, the training step, an epoch, and the resumable two-stage
schedule (G1 alone at half size, then G1 + G2 at full size) of one variant; the FLOPs of a step.

Each variant keeps one helpers.training.TrainingRun (losses, stopwatch, snapshots, iterations, epochs of the
current stage), saved under "run" in the checkpoint of every stage. Notebook 05 holds the step, the epoch and
the schedule as editable cells (the build copies them from here; a test keeps them equal): lines <= 100.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..environment import autocast
from ..losses import lsgan_discriminator_loss
from ..training import (CheckpointMismatchError, History, TrainingRun, load_checkpoint, save_checkpoint,
                        synchronize)
from .fast_path import FastPath
from .losses import pix2pixhd_generator_loss

# --- learning-rate schedule -----------------------------------------------------------------------------------------


def linear_decay_lr(epoch: int, base_lr: float, n_constant: int, n_decay: int) -> float:
    """LR of 0-based `epoch`: base_lr for epochs 0..n_constant, then down by base_lr/n_decay per epoch."""
    if n_decay <= 0:
        return base_lr
    return base_lr * max(0.0, 1.0 - max(0, epoch - n_constant) / n_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- the step, an epoch, the stages of a variant (taught in notebook 05) -------------------------


@dataclass
class TrainingSetup:
    """What every stage of a variant uses: data, frozen VGG, loss weights, Adam, the fast path."""

    loader: DataLoader  # batches of {"label", "image"(, "instance")}
    encode: Callable[[dict, int], tuple[Tensor, Tensor]]  # (batch, size) -> (map, photo) on device
    preview: dict  # a batch whose outputs are kept as snapshots while training
    vgg: nn.Module | None = None  # None (or lambda_vgg 0): no VGG term
    lambda_feat: float = 10.0
    lambda_vgg: float = 10.0
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    fast: FastPath = field(default_factory=FastPath)
    snapshot_every: int = 1  # epochs between snapshots (and one at the end of every stage)


@dataclass
class Trained:
    """A variant after `train_variant`: its models, its run record, and whether every stage finished."""

    G: nn.Module
    D: nn.Module
    complete: bool
    run: TrainingRun  # losses, stopwatch, snapshots, iterations, epochs of the last stage trained
    saved_before: int = 0  # epochs its checkpoints held when the call began (0: a fresh start)


def pix2pixhd_train_step(G: nn.Module, D: nn.Module, vgg: nn.Module | None,
                         opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler, x: Tensor, real: Tensor,
                         lambda_feat: float = 10.0, lambda_vgg: float = 10.0,
                         amp_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """One iteration as in the official code: one forward pass of G; D on the real pair, the fake
    pair (for G's losses) and the detached fake pair (for D's); an Adam step of G, then one of D.
    amp_dtype: autocast dtype, None for fp32; the scaler scales fp16 losses (a no-op otherwise)."""
    with autocast(x.device, amp_dtype):
        fake = G(x)
        d_real = D(x, real)
        d_fake = D(x, fake)  # not detached: L_GAN and L_FM reach G through D
        d_fake_detached = D(x, fake.detach())  # for L_D: D's step must not move G
        use_vgg = vgg is not None and lambda_vgg > 0
        vgg_fake = vgg(fake) if use_vgg else None
        with torch.no_grad():
            vgg_real = vgg(real) if use_vgg else None
        g_terms = pix2pixhd_generator_loss(d_fake, d_real, vgg_fake, vgg_real, lambda_feat,
                                           lambda_vgg)
        loss_d = lsgan_discriminator_loss([s[-1] for s in d_real], [s[-1] for s in d_fake_detached])
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(g_terms["total"]).backward()
    scaler.step(opt_g)
    opt_d.zero_grad(set_to_none=True)  # also drops the gradients that G's loss left in D
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)
    scaler.update()
    return {**{f"G/{k}": v.detach() for k, v in g_terms.items()}, "D/loss": loss_d.detach()}


@torch.no_grad()
def snapshot(G: nn.Module, setup: TrainingSetup, size: int) -> Tensor:
    """G's images, on the CPU, for the preview batch's maps at `size`."""
    G.eval()
    return G(setup.fast.tensor(setup.encode(setup.preview, size)[0])).float().cpu()


def pix2pixhd_train_epoch(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer,
                          opt_d: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                          setup: TrainingSetup, size: int, run: TrainingRun, lr: float) -> None:
    """One pass over the data at `size` px. The losses stay on the device until the epoch ends, so
    that logging never makes the CPU wait for the GPU in the middle of an epoch."""
    G.train()
    D.train()
    steps = []
    with run.stopwatch:
        for batch in tqdm(setup.loader, desc=f"{size} px, lr {lr:.1e}", leave=False):
            x, real = (setup.fast.tensor(t) for t in setup.encode(batch, size))
            losses = pix2pixhd_train_step(G, D, setup.vgg, opt_g, opt_d, scaler, x, real,
                                          setup.lambda_feat, setup.lambda_vgg, setup.fast.amp_dtype)
            run.stopwatch.count(1, len(real))
            run.step += 1
            steps.append((run.step, losses))
        synchronize(next(G.parameters()).device)
    for step, losses in steps:
        run.history.log(step, lr=lr, **losses)
    run.history.flush()


@dataclass
class Stage:
    """One stage of the schedule: which generator, at what size, for how many epochs."""

    name: str  # "global": G1 alone; "local": G1 + G2, the local enhancer
    size: int  # image height and width in this stage
    epochs: tuple[int, int]  # (constant-LR epochs, linear-decay epochs)
    fix_global: int = 0  # "local" only: first epochs with G1 frozen (official: niter_fix_global)


def two_stage_plan(size: int, global_epochs: tuple[int, int], local_epochs: tuple[int, int],
                   fix_global: int) -> list[Stage]:
    """The paper's schedule: G1 alone at half size, then G1 + G2 at full size, G1 first frozen."""
    return [Stage("global", size // 2, global_epochs),
            Stage("local", size, local_epochs, fix_global)]


def train_stage(stage: Stage, G: nn.Module, D: nn.Module, setup: TrainingSetup, run: TrainingRun,
                path: Path, config: dict, stop_after: int | None = None) -> bool:
    """Train one stage from its checkpoint (if `path` exists) to its last epoch, saving after every
    epoch; False when stopped after `stop_after` epochs of the stage (a simulated disconnect)."""
    device = next(G.parameters()).device
    opt_g = setup.fast.adam(G.parameters(), setup.lr, setup.betas)
    opt_d = setup.fast.adam(D.parameters(), setup.lr, setup.betas)
    scaler = setup.fast.grad_scaler(device)
    state = {"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d, "scaler": scaler, "run": run}
    n_epochs = sum(stage.epochs)
    run.epoch = 0
    if path.is_file():
        load_checkpoint(path, state, config, map_location=device)
    while run.epoch < n_epochs:
        if stop_after is not None and run.epoch >= stop_after:
            return False
        if stage.fix_global:  # G1 frozen at first; then, as officially, a new Adam over all of G
            G.freeze_global(run.epoch < stage.fix_global)
            if run.epoch == stage.fix_global:
                opt_g = state["opt_g"] = setup.fast.adam(G.parameters(), setup.lr, setup.betas)
        lr = linear_decay_lr(run.epoch, setup.lr, *stage.epochs)
        set_lr(opt_g, lr)
        set_lr(opt_d, lr)
        pix2pixhd_train_epoch(G, D, opt_g, opt_d, scaler, setup, stage.size, run, lr)
        run.epoch += 1
        if run.epoch % setup.snapshot_every == 0 or run.epoch == n_epochs:
            run.snapshots[run.step] = snapshot(G, setup, stage.size)
        save_checkpoint(path, state, run.step, config)
    if stage.fix_global:
        G.freeze_global(False)
    return True


def saved_epochs(name: str, plan: Sequence[Stage], folder: Path) -> int:
    """Epochs of variant `name` that its checkpoints in folder/checkpoints hold (0: none saved).
    Reads only each checkpoint's run record (mmap: the weights stay on disk)."""
    done = 0
    for stage in plan:
        path = folder / "checkpoints" / f"{name}_{stage.name}.pt"
        if not path.is_file():
            break
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if "run" not in saved.get("state", {}):
            raise CheckpointMismatchError(f"'{path}' holds no run record (another version wrote it); "
                                          "delete it, or point RUN_DIR at a new folder")
        epoch = saved["state"]["run"]["epoch"]
        done += epoch
        if epoch < sum(stage.epochs):
            break
    return done


def train_variant(name: str, plan: Sequence[Stage], build_generator: Callable[[str], nn.Module],
                  D: nn.Module, setup: TrainingSetup, folder: Path, config: dict,
                  stop_after: int | None = None) -> Trained:
    """Train, resume or just load every stage of a variant: checkpoints in folder/checkpoints,
    losses in folder/tensorboard/<name>. Stage 2's G starts from stage 1's trained G1; D carries
    over. stop_after: stop after that many epochs of the run (a disconnect; a new call resumes).
    Prints whether it reuses a finished run or resumes a stopped one."""
    total, saved = sum(sum(stage.epochs) for stage in plan), saved_epochs(name, plan, folder)
    if saved:
        what = "reusing the finished run" if saved == total else "resuming the run saved"
        print(f"{name}: {what} in {folder / 'checkpoints'} (epoch {saved} of {total})")
    run = TrainingRun(history=History(folder / "tensorboard" / name))
    setup.fast.prepare(D)
    G, done = None, 0
    for stage in plan:
        trained_g1, G = G, setup.fast.prepare(build_generator(stage.name))
        if trained_g1 is not None:
            G.load_global(trained_g1)
        stage_config = {**config, "stage": stage.name, "size": stage.size,
                        "epochs": list(stage.epochs), "fix_global": stage.fix_global,
                        "fp16": setup.fast.amp_dtype == torch.float16}
        path = folder / "checkpoints" / f"{name}_{stage.name}.pt"
        left = None if stop_after is None else stop_after - done
        if not train_stage(stage, G, D, setup, run, path, stage_config, left):
            return Trained(G, D, False, run, saved_before=saved)
        done += sum(stage.epochs)
    return Trained(G, D, True, run, saved_before=saved)


def training_step_flops(G: nn.Module, D: nn.Module, vgg: nn.Module | None, input_nc: int,
                        height: int, width: int, batch: int) -> int:
    """FLOPs of one `pix2pixhd_train_step` (convolutions and matrix products, forward and
    backward), counted on shapes only: build G, D and vgg under `torch.device("meta")`."""
    with torch.device("meta"):
        x, real = torch.empty(batch, input_nc, height, width), torch.empty(batch, 3, height, width)
        # SGD: the counter sees no optimizer FLOPs anyway, and Adam reads its step count with .item()
        # on torch 2.11, which meta tensors cannot do
        opt_g, opt_d = torch.optim.SGD(G.parameters(), 0.0), torch.optim.SGD(D.parameters(), 0.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        with FlopCounterMode(display=False) as counter:
            pix2pixhd_train_step(G, D, vgg, opt_g, opt_d, scaler, x, real)
    return counter.get_total_flops()
