"""Training the denoiser on the noise-prediction loss, and the autoencoder; resumable exactly."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..environment import GpuChoices
from ..training import TrainingRun, ema_update, load_checkpoint, save_checkpoint
from .schedule import NoiseSchedule, q_sample


@dataclass(frozen=True)
class DenoiserPlan:
    """How one denoiser trains: steps, batch, learning rate, label dropout, EMA, checkpoints."""
    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    p_uncond: float = 0.1       # share of captions/labels replaced by 'nothing' (for guidance)
    ema_decay: float = 0.999    # moving average of the weights, used for sampling
    checkpoint_every: int = 500
    eval_every: int = 0         # 0: no quality curve during training
    seed: int = 0


class RandomStream:
    """The generator behind batches, timesteps, noise and label dropout; saved in checkpoints."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["state"])


def diffusion_loss(model: nn.Module, schedule: NoiseSchedule, x0: Tensor, inputs: dict[str, Tensor],
                   t: Tensor, noise: Tensor) -> Tensor:
    """The simple DDPM loss:
    || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2."""
    x_t = q_sample(schedule, x0, t, noise)
    return F.mse_loss(model(x_t, t, **inputs).float(), noise)


class DenoiserRun:
    """One denoiser's training: model, EMA copy, optimizer, loss scaler, randomness, and `record`,
    the helpers.training.TrainingRun every training loop keeps (history, stopwatch, step)."""

    def __init__(self, model: nn.Module, plan: DenoiserPlan, choices: GpuChoices) -> None:
        self.model, self.plan, self.choices = model, plan, choices
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr,
                                          fused=choices.fused_adam or None)
        self.scaler = choices.grad_scaler()
        self.record, self.stream = TrainingRun(), RandomStream(plan.seed)

    def state(self) -> dict[str, Any]:
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer,
                "scaler": self.scaler, "run": self.record, "stream": self.stream}


def denoiser_train_step(run: DenoiserRun, schedule: NoiseSchedule, data: Tensor, labels: Tensor,
               condition) -> Tensor:
    """One optimisation step on a random batch: draw t and eps, noise the batch, regress eps."""
    g, plan, device = run.stream.generator, run.plan, data.device
    idx = torch.randint(len(data), (plan.batch_size,), generator=g)
    t = torch.randint(schedule.steps, (plan.batch_size,), generator=g)
    noise = torch.randn((plan.batch_size, *data.shape[1:]), generator=g)
    inputs = condition.training_inputs(labels[idx], g, plan.p_uncond)
    x0 = data[idx.to(device)]
    if run.choices.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    with run.choices.autocast():
        loss = diffusion_loss(run.model, schedule, x0, {k: v.to(device) for k, v in inputs.items()},
                              t.to(device), noise.to(device))
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    # the average starts short and grows to ema_decay, so that early weights do not linger in it
    step = run.record.step
    ema_update(run.ema, run.model, min(plan.ema_decay, (1 + step) / (10 + step)))
    return loss.detach()


def train_denoiser(run: DenoiserRun, schedule: NoiseSchedule, data: Tensor, labels: Tensor,
                   condition, folder: Path, config: dict[str, Any],
                   evaluate: Callable[[DenoiserRun], float] | None = None) -> DenoiserRun:
    """Train to plan.steps, saving folder/last.pt every plan.checkpoint_every steps. A finished run
    is reused, a stopped one resumed (both say so). evaluate(run) -> FD, every plan.eval_every."""
    plan, path = run.plan, Path(folder) / "last.pt"
    settings = {k: v for k, v in vars(plan).items() if k != "steps"}  # a longer plan may resume
    config = {**config, **settings, "schedule": schedule.kind, "T": schedule.steps}
    record = run.record  # history, stopwatch and step, restored from last.pt on resume
    if path.is_file():
        load_checkpoint(path, run.state(), config=config)
        done = record.step >= plan.steps
        print(f"{'reusing the finished run' if done else 'resuming from'} {path} "
              f"(step {record.step:,})")
    run.model.train()
    bar = tqdm(total=plan.steps, initial=record.step, desc=folder.name, leave=False)
    losses: list[Tensor] = []
    while record.step < plan.steps:
        with record.stopwatch:
            losses.append(denoiser_train_step(run, schedule, data, labels, condition))
            record.step += 1
            record.stopwatch.count(1, plan.batch_size)
        bar.update(1)
        if record.step % 50 == 0 or record.step == plan.steps:
            record.history.log(record.step, **{"loss/eps_mse": torch.stack(losses).mean()})
            losses = []
        due = plan.eval_every and (record.step % plan.eval_every == 0 or record.step == plan.steps)
        if evaluate and due:
            record.history.log(record.step, **{"quality/fd": evaluate(run),
                                               "quality/train_seconds": record.stopwatch.seconds})
        if record.step % plan.checkpoint_every == 0 or record.step == plan.steps:
            save_checkpoint(path, run.state(), step=record.step, config=config)
    bar.close()
    record.history.flush()
    return run


def train_autoencoder(model: nn.Module, images: Tensor, steps: int, batch_size: int, lr: float,
                      folder: Path, choices: GpuChoices, seed: int = 0) -> dict[str, Any]:
    """Reconstruction training (squared plus absolute error) to `steps`, reusing autoencoder.pt."""
    path = Path(folder) / "autoencoder.pt"
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=choices.fused_adam or None)
    scaler, record, stream = choices.grad_scaler(), TrainingRun(), RandomStream(seed)
    state = {"model": model, "optimizer": optimizer, "scaler": scaler, "run": record,
             "stream": stream}
    config = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    if path.is_file():
        load_checkpoint(path, state, config=config)
        print(f"reusing the trained autoencoder {path} ({record.step:,} steps)")
    model.train()
    for step in tqdm(range(record.step, steps), desc="autoencoder", leave=False):
        with record.stopwatch:
            idx = torch.randint(len(images), (batch_size,), generator=stream.generator)
            x = images[idx.to(images.device)]
            with choices.autocast():
                out = model(x).float()
            loss = F.mse_loss(out, x) + F.l1_loss(out, x)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            record.stopwatch.count(1, batch_size)
        record.step = step + 1
        if record.step % 1000 == 0 or record.step == steps:
            save_checkpoint(path, state, step=record.step, config=config)
    return {"steps": steps, "seconds": record.stopwatch.seconds}
