"""Training of notebook 04: the loss weights of a recipe, one GAN-CLS iteration (discriminator step, then
generator step, under autocast where the device has it), and a loop that resumes from its checkpoint."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..environment import autocast
from ..training import TrainingRun, load_checkpoint, save_checkpoint
from .evaluate import images_from_text
from .losses import (auxiliary_class_loss, feature_matching_mse, gan_cls_discriminator_loss,
                     gan_cls_generator_loss, interpolate_embeddings, l1_image_loss, mode_seeking_loss)
from .model import Discriminator, Generator, packed


@dataclass
class TextToImageRecipe:
    """The extra loss terms and their weights (0 switches a term off)."""

    gan_int: float = 1.0           # GAN-INT: G also on interpolated captions (paper: on)
    beta: float = 0.5              # GAN-INT: h_int = beta h_1 + (1 - beta) h_2 (paper: 0.5)
    feature_matching: float = 0.0  # seed: MSE of D's mean image features, fakes vs reals
    l1: float = 0.0                # seed: L1 to the real image of the same caption
    mode_seeking: float = 0.0      # Mao et al. 2019: two noise vectors, one caption, images apart
    mode_seeking_cap: float | None = None  # no reward for images further apart than this ratio
    auxiliary: float = 0.0         # TAC-GAN: D's heads name the labels (D needs n_classes)


def gan_cls_discriminator_step(D: Discriminator, opt_d: torch.optim.Optimizer,
                               scaler: torch.amp.GradScaler, images: Tensor, fake: Tensor,
                               h: Tensor, h_wrong: Tensor, labels: Tensor,
                               recipe: TextToImageRecipe,
                               amp_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """GAN-CLS: (real image, right text) -> real; (real, wrong text) and (fake, right text) -> fake;
    with recipe.auxiliary, D's class heads also learn the labels of the real images. `amp_dtype`:
    the autocast dtype (float16 on a T4, with an enabled `scaler`; None: float32)."""
    with autocast(images.device, amp_dtype):
        s_r, real_features = D(images, h)
        s_w, _ = D(images, h_wrong)
        s_f, _ = D(fake.detach(), h)
        loss = gan_cls_discriminator_loss(s_r.float(), s_w.float(), s_f.float())
        if recipe.auxiliary:  # inside autocast: the heads read the features in their dtype
            loss = loss + recipe.auxiliary * auxiliary_class_loss(D, real_features, labels)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_d)
    beliefs = {f"D/{k}": torch.sigmoid(s.detach().float()).mean() for k, s in
               (("real_right", s_r), ("real_wrong", s_w), ("fake", s_f))}
    return {"loss/D": loss.detach(), **beliefs}


def gan_cls_generator_step(G: Generator, D: Discriminator, opt_g: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler, images: Tensor, z: Tensor, fake: Tensor,
                           h: Tensor, labels: Tensor,
                           recipe: TextToImageRecipe,
                           amp_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """GAN-CLS generator loss against D after its step, plus the weighted terms of `recipe`."""
    with autocast(images.device, amp_dtype):
        s_f, fake_features = D(fake, h)
        terms = {"gan": gan_cls_generator_loss(s_f.float())}
        if recipe.gan_int:
            h_int = interpolate_embeddings(h, h.roll(1, dims=0), recipe.beta)  # caption i and i - 1
            s_int, _ = D(packed(G(torch.randn_like(z), h_int.repeat(D.pack, 1)), D.pack), h_int)
            terms["int"] = recipe.gan_int * gan_cls_generator_loss(s_int.float())
        if recipe.feature_matching:
            with torch.no_grad():
                _, real_features = D(images, h)  # the same D as the fakes' features: after its step
            fm = feature_matching_mse(fake_features.float(), real_features.float())
            terms["fm"] = recipe.feature_matching * fm
        if recipe.l1:
            terms["l1"] = recipe.l1 * l1_image_loss(fake.float(), images)
        if recipe.mode_seeking:
            half, z_2 = len(h) // 2, torch.randn_like(z[: len(h) // 2])
            ms = mode_seeking_loss(fake[:half, :3].float(), G(z_2, h[:half]).float(), z[:half], z_2,
                                   recipe.mode_seeking_cap)
            terms["ms"] = recipe.mode_seeking * ms
        if recipe.auxiliary:
            terms["aux"] = recipe.auxiliary * auxiliary_class_loss(D, fake_features, labels)
    loss = sum(terms.values())
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_g)
    return {"loss/G": loss.detach(), **{f"loss/G_{k}": v.detach() for k, v in terms.items()}}


def gan_cls_train_step(G: Generator, D: Discriminator, opt_g: torch.optim.Optimizer,
                       opt_d: torch.optim.Optimizer, scaler: torch.amp.GradScaler, images: Tensor,
                       h: Tensor, h_wrong: Tensor, labels: Tensor,
                       recipe: TextToImageRecipe,
                       amp_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """One iteration: fakes from fresh noise (D.pack per caption), a discriminator step, then a
    generator step; under autocast in `amp_dtype` if one is given."""
    z = torch.randn(len(images) * D.pack, G.z_dim, device=images.device)
    with autocast(images.device, amp_dtype):
        fake = packed(G(z, h.repeat(D.pack, 1)), D.pack)
    scalars = gan_cls_discriminator_step(D, opt_d, scaler, images, fake, h, h_wrong, labels,
                                         recipe, amp_dtype)
    scalars.update(gan_cls_generator_step(G, D, opt_g, scaler, images, z, fake, h, labels,
                                          recipe, amp_dtype))
    scaler.update()
    return scalars


@dataclass
class TextToImageSchedule:
    """How long the loop runs; when it halves the learning rate, logs, keeps samples, saves."""

    iterations: int
    lr: float = 2e-4
    lr_halving_every: int = 10**9
    snapshot_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 1  # History gets the mean of each window of log_every iterations

    def logs_at(self, step: int) -> bool:
        """True where a window of logged means closes: every log_every iterations, at a checkpoint
        (so a resumed run logs what a straight one does) and at the end."""
        return (step % self.log_every == 0 or step % self.checkpoint_every == 0
                or step == self.iterations)


def train_text_to_image(state: dict, batch_at: Callable[[int], tuple[Tensor, ...]],
                        recipe: TextToImageRecipe, schedule: TextToImageSchedule, checkpoint: Path,
                        config: dict, fixed: tuple[Tensor, Tensor],
                        amp_dtype: torch.dtype | None = None) -> TrainingRun:
    """Train to schedule.iterations, first resuming from `checkpoint` if it exists. `state`
    holds G, D, opt_g, opt_d, scaler and run (a TrainingRun); batch_at(i) is iteration i's
    (images, h, h_wrong, labels); `amp_dtype`: the steps' autocast dtype (None: float32). History
    gets the losses' mean over each window of schedule.log_every iterations, read from the device
    once per window."""
    G, D, run = state["G"], state["D"], state["run"]
    if checkpoint.exists():
        load_checkpoint(checkpoint, state, config)
        print(f"reusing the finished run in {checkpoint} ({run.step:,} iterations)"
              if run.step >= schedule.iterations else f"resuming from {checkpoint} at {run.step:,}")
    window: list[dict[str, Tensor]] = []  # this window's losses, still on the device
    for step in tqdm(range(run.step + 1, schedule.iterations + 1), "training", initial=run.step,
                     total=schedule.iterations):
        lr = schedule.lr * 0.5 ** ((step - 1) // schedule.lr_halving_every)
        for group in [*state["opt_g"].param_groups, *state["opt_d"].param_groups]:
            group["lr"] = lr
        images, h, h_wrong, labels = batch_at(step)
        with run.stopwatch:  # the wait for the device at a logged step counts as training time
            scalars = gan_cls_train_step(G, D, state["opt_g"], state["opt_d"], state["scaler"],
                                         images, h, h_wrong, labels, recipe, amp_dtype)
            window.append(scalars)
            if schedule.logs_at(step):  # the one read from the device in this window
                run.history.log(step, **{k: torch.stack([s[k] for s in window]).mean()
                                         for k in scalars})
                window = []
        run.stopwatch.count(1, len(images))
        run.step = step
        if step % schedule.snapshot_every == 0 or step == schedule.iterations:
            run.snapshots[step] = images_from_text(G, *fixed)
        if step % schedule.checkpoint_every == 0 or step == schedule.iterations:
            save_checkpoint(checkpoint, state, step, config)
    run.history.flush()
    return run
