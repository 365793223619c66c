"""The fully-connected GAN of seed 003 (MNIST / FashionMNIST): models, the seed's training step, an
improved recipe beside it, the resumable training loop and its CUDA-graph fast path, figures.

Notebooks 01 and 02 share this code and differ only in the dataset and their text.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn
from torch.optim import Optimizer
from tqdm.auto import tqdm

from .environment import gpu_choices
from .losses import bce_discriminator_loss, bce_generator_loss
from .plotting import save_figure
from .training import History, Stopwatch, load_checkpoint, save_checkpoint

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


def train_step(G: nn.Module, D: nn.Module, opt_g: Optimizer, opt_d: Optimizer, real: Tensor,
               z: Tensor) -> dict[str, Tensor]:
    """One iteration of seed 003: a G step on the fakes G(z) labelled real, then a D step on
    d_loss = (real_loss + fake_loss) / 2 with the fakes detached. Returns the values to log."""
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


def seed_recipe(device: torch.device, latent_dim: int = 100,
                g_hidden: Sequence[int] = (128, 256, 512, 1024),
                d_hidden: Sequence[int] = (512, 256), lr: float = 2e-4,
                betas: tuple[float, float] = (0.5, 0.999)) -> Recipe:
    """Seed 003's recipe: its generator and discriminator, BCE losses, Adam(lr, betas) for both."""
    G = Generator(latent_dim, g_hidden).to(device)
    D = Discriminator(d_hidden).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=betas)
    config = {"recipe": "seed", "latent_dim": latent_dim, "g_hidden": list(g_hidden),
              "d_hidden": list(d_hidden), "lr": lr, "betas": list(betas)}
    return Recipe("seed", G, D, opt_g, opt_d, partial(train_step, G, D, opt_g, opt_d), G, config)


# --- the improved recipe --------------------------------------------------------------------------


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model, for every weight and batch-norm statistic
    (the count of batches seen is copied)."""
    for mine, theirs in zip(average.state_dict().values(), model.state_dict().values()):
        mine.lerp_(theirs, 1 - decay) if mine.is_floating_point() else mine.copy_(theirs)


def improved_step(G: nn.Module, D: nn.Module, opt_g: Optimizer, opt_d: Optimizer, G_ema: nn.Module,
                  decay: float, real: Tensor, z: Tensor) -> dict[str, Tensor]:
    """The seed's step, then the moving average of G's weights updated."""
    out = train_step(G, D, opt_g, opt_d, real, z)
    ema_update(G_ema, G, decay)
    return out


def improved_recipe(device: torch.device, latent_dim: int = 100,
                    g_hidden: Sequence[int] = (128, 256, 512, 1024),
                    d_hidden: Sequence[int] = (512, 256), lr: float = 2e-4,
                    betas: tuple[float, float] = (0.0, 0.9), ema_decay: float = 0.99) -> Recipe:
    """The improved recipe: the seed's recipe with Adam(lr, betas) without momentum, and samples
    drawn from a moving average of G's weights."""
    base = seed_recipe(device, latent_dim, g_hidden, d_hidden, lr, betas)
    G_ema = copy.deepcopy(base.G).requires_grad_(False)
    step = partial(improved_step, base.G, base.D, base.opt_g, base.opt_d, G_ema, ema_decay)
    config = {**base.config, "recipe": "improved", "ema_decay": ema_decay}
    return dataclasses.replace(base, name="improved", step=step, sampler=G_ema, config=config)


# --- the training loop ----------------------------------------------------------------------------


@dataclass
class Plan:
    """The training loop's knobs (from the parameters cell): length, batch, logging, scoring."""

    epochs: int
    iterations_per_epoch: int
    batch_size: int
    seed: int
    log_every: int
    snapshot_steps: Sequence[int]
    fixed_noise: Tensor
    quality: Callable[[nn.Module], dict[str, float]]
    time_limit_s: float = math.inf


@dataclass
class GanRun:
    """What the training loop keeps between epochs; saved in last.pt through state_dict()."""

    history: History
    stopwatch: Stopwatch = field(default_factory=Stopwatch)
    snapshots: dict[int, Tensor] = field(default_factory=dict)
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_by_g_loss: dict = field(default_factory=dict)
    best_by_quality: dict = field(default_factory=dict)
    step: int = 0
    epoch: int = 0

    def state_dict(self) -> dict:
        """Everything above, as plain values (History and Stopwatch through their state_dict)."""
        state = {k: v for k, v in vars(self).items() if k not in ("history", "stopwatch")}
        return {**state, "history": self.history.state_dict(),
                "stopwatch": self.stopwatch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved run."""
        state = dict(state)
        self.history.load_state_dict(state.pop("history"))
        self.stopwatch.load_state_dict(state.pop("stopwatch"))
        for name, value in state.items():
            setattr(self, name, value)


def batches(images: Tensor, batch_size: int, count: int,
            generator: torch.Generator) -> list[Tensor]:
    """`count` shuffled batches: passes over `images`, each in a new random order with its last
    incomplete batch dropped; a small dataset is passed over several times."""
    per_pass = len(images) // batch_size
    if per_pass < 1:
        raise ValueError(f"{len(images)} images make no batch of {batch_size}; "
                         "use more images or a smaller batch")
    passes = -(-count // per_pass)
    order = torch.cat([torch.randperm(len(images), generator=generator)[:per_pass * batch_size]
                       for _ in range(passes)])
    return [images[order[i * batch_size:(i + 1) * batch_size]] for i in range(count)]


def train_epoch(step: StepFn, recipe: Recipe, real_batches: list[Tensor], run: GanRun,
                plan: Plan) -> float:
    """One epoch: a step per batch with fresh noise; losses stay on the device and are logged every
    plan.log_every iterations; snapshots at plan.snapshot_steps. Returns the mean generator loss."""
    g_loss_sum = torch.zeros((), device=real_batches[0].device)
    progress = tqdm(real_batches, desc=f"{recipe.name}: epoch {run.epoch + 1}/{plan.epochs}",
                    leave=False)
    for real in progress:
        z = torch.randn(len(real), recipe.G.latent_dim, device=real.device)
        out = step(real, z)
        g_loss_sum += out["loss/generator"]
        run.step += 1
        if run.step % plan.log_every == 0:
            run.history.log(run.step, **out)
        if run.step in plan.snapshot_steps:
            run.snapshots[run.step] = sample(recipe.sampler, plan.fixed_noise).cpu()
    run.stopwatch.count(len(real_batches), sum(len(real) for real in real_batches))
    return g_loss_sum.item() / len(real_batches)


def end_epoch(sampler: nn.Module, run: GanRun, g_loss: float, scores: dict[str, float],
              folder: Path) -> None:
    """Record the epoch's mean G loss and sample quality; save the sampling G when either is the
    best so far."""
    record = {"epoch": run.epoch, "step": run.step, "g_loss": g_loss, **scores}
    run.epochs.append(record)
    run.history.log(run.step, **{"epoch/generator_loss": g_loss, "epoch/fd": scores["fd"]})
    if not run.best_by_g_loss or g_loss < run.best_by_g_loss["g_loss"]:
        run.best_by_g_loss = record
        save_checkpoint(folder / "best_by_g_loss.pt", {"G": sampler}, step=run.step, extra=record)
    if not run.best_by_quality or scores["fd"] < run.best_by_quality["fd"]:
        run.best_by_quality = record
        save_checkpoint(folder / "best_by_fd.pt", {"G": sampler}, step=run.step, extra=record)


def train_gan(recipe: Recipe, images: Tensor, plan: Plan, folder: Path) -> GanRun:
    """Train `recipe` for plan.epochs, resuming from folder/last.pt; score and checkpoint after
    every epoch."""
    run = GanRun(History(folder / "tensorboard"))
    state = {**recipe.state(), "run": run}
    config = {**recipe.config, "train_images": len(images), "batch_size": plan.batch_size,
              "seed": plan.seed, "iterations_per_epoch": plan.iterations_per_epoch}
    if (folder / "last.pt").exists():
        load_checkpoint(folder / "last.pt", state, config=config)
        done = run.epoch >= plan.epochs
        print(f"{recipe.name}: {'reusing the finished run' if done else 'resuming'} in "
              f"{folder / 'last.pt'} (epoch {run.epoch} of {plan.epochs})")
    step = choose_step(recipe, plan.batch_size, images.device) if run.epoch < plan.epochs else None
    started = time.perf_counter()
    while run.epoch < plan.epochs and time.perf_counter() - started < plan.time_limit_s:
        recipe.G.train(), recipe.D.train()
        shuffle = torch.Generator().manual_seed(1_000_003 * plan.seed + run.epoch)  # same on resume
        real_batches = batches(images, plan.batch_size, plan.iterations_per_epoch, shuffle)
        with run.stopwatch:
            g_loss = train_epoch(step, recipe, real_batches, run, plan)
        run.epoch += 1
        end_epoch(recipe.sampler, run, g_loss, plan.quality(recipe.sampler), folder)
        save_checkpoint(folder / "last.pt", state, run.step, config)
    run.snapshots[run.step] = sample(recipe.sampler, plan.fixed_noise).cpu()
    run.history.flush()
    return run


# --- the CUDA fast path: the whole step as one CUDA graph -----------------------------------------


def choose_step(recipe: Recipe, batch_size: int, device: torch.device) -> StepFn:
    """The recipe's step replayed as a CUDA graph on a GPU (graphed_step), else the eager step;
    prints which. With EMULATE_T4=1 on a CPU: graphed_step's function, its step run eagerly."""
    choices = gpu_choices(device)
    if not choices.gpu_path:
        for opt in (recipe.opt_g, recipe.opt_d):
            set_capturable(opt, False)  # e.g. a checkpoint written on a GPU, resumed on a CPU
        print(f"{recipe.name}: eager step on {device.type} (the CUDA-graph fast path needs a GPU)")
        return recipe.step
    if not choices.cuda:
        choices.skip(f"{recipe.name}: capturing the step as a CUDA graph",
                     "the graphed step's static buffers, warm-up and undo, with the step run eagerly")
    else:
        print(f"{recipe.name}: fast path, the whole step replayed as one CUDA graph per iteration")
    return graphed_step(recipe, batch_size)


def set_capturable(opt: Optimizer, capturable: bool) -> None:
    """Switch Adam's `capturable` flag (a CUDA graph can capture its step only when on) and move its
    step counters where that mode keeps them: beside the parameters when on, on the CPU when off."""
    for group in opt.param_groups:
        group["capturable"] = capturable
        for p in group["params"]:
            state = opt.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device if capturable else "cpu", torch.float32)


def state_tensors(recipe: Recipe) -> list[Tensor]:
    """Every tensor a step changes in place: weights, buffers (batch-norm statistics), the moving
    average and the optimizer state."""
    modules = {id(m): m for m in (recipe.G, recipe.D, recipe.sampler)}.values()
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return tensors + [value for opt in (recipe.opt_g, recipe.opt_d)
                      for per_param in opt.state.values()
                      for value in per_param.values() if torch.is_tensor(value)]


@contextmanager
def undone(recipe: Recipe) -> Iterator[None]:
    """Run the block, then put every tensor of state_tensors back as it was; optimizer state that
    the block created is zeroed, which for Adam is the same as never having stepped."""
    before = {id(t): t.detach().clone() for t in state_tensors(recipe)}
    yield
    with torch.no_grad():
        for t in state_tensors(recipe):
            t.copy_(before[id(t)]) if id(t) in before else t.zero_()


def graphed_step(recipe: Recipe, batch_size: int, warmup: int = 3) -> StepFn:
    """The recipe's step captured once as a CUDA graph: each call copies the batch and the noise
    into static buffers and replays the graph (one launch instead of hundreds); the next call
    overwrites the returned tensors. Capture needs warm-up steps on a side stream: undone after.
    Off CUDA (the T4 emulation) the same buffers, warm-up and undo run, and each call runs the
    step eagerly instead of replaying it."""
    device = next(recipe.G.parameters()).device
    cuda = device.type == "cuda"
    for opt in (recipe.opt_g, recipe.opt_d):
        set_capturable(opt, cuda)  # Adam's capturable mode exists on CUDA only
    static_real = torch.zeros(batch_size, *IMAGE_SHAPE, device=device)
    static_z = torch.zeros(batch_size, recipe.G.latent_dim, device=device)
    main = torch.cuda.current_stream(device) if cuda else None
    side = torch.cuda.Stream(device) if cuda else None
    with undone(recipe):
        if cuda:
            side.wait_stream(main)
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            for _ in range(warmup):
                recipe.step(static_real, static_z)
        if cuda:
            main.wait_stream(side)
    recipe.G.zero_grad(set_to_none=True)  # the gradients are then allocated inside the graph
    recipe.D.zero_grad(set_to_none=True)
    static_out: dict[str, Tensor] = {}
    if cuda:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out.update(recipe.step(static_real, static_z))
        replay = graph.replay
    else:
        def replay() -> None:
            static_out.update(recipe.step(static_real, static_z))

    def step(real: Tensor, z: Tensor) -> dict[str, Tensor]:
        static_real.copy_(real)
        static_z.copy_(z)
        replay()
        return static_out

    return step


# --- sampling and figures -------------------------------------------------------------------------


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
def generate(G: nn.Module, n: int, device: torch.device, seed: int = 0,
             batch: int = 1000) -> Tensor:
    """`n` images from a seeded noise stream (the same seed gives the same images)."""
    rng = torch.Generator(device="cpu").manual_seed(seed)
    sizes = [min(batch, n - i) for i in range(0, n, batch)]
    noise = (torch.randn(size, G.latent_dim, generator=rng) for size in sizes)
    chunks = [sample(G, z.to(device)).cpu() for z in noise]
    return torch.cat(chunks)


def plot_fd_over_iterations(runs: dict[str, GanRun], title: str,
                            path: Path | None = None) -> plt.Figure:
    """FD after every epoch against iterations, a line per recipe (log scale); rings: the best."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, run in runs.items():
        steps, fds = [e["step"] for e in run.epochs], [e["fd"] for e in run.epochs]
        line, = ax.plot(steps, fds, ".-", label=name)
        best = run.best_by_quality
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


def plot_loss_vs_fd(run: GanRun, title: str, path: Path | None = None) -> plt.Figure:
    """Per epoch, the mean generator loss beside the FD; dashed lines mark each criterion's best."""
    epochs = [e["epoch"] for e in run.epochs]
    fig, ax_loss = plt.subplots(figsize=(8, 4))
    ax_loss.plot(epochs, [e["g_loss"] for e in run.epochs], "o-", color="tab:blue")
    ax_loss.set_xlabel("epoch")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_ylabel("mean generator loss", color="tab:blue")
    ax_fd = ax_loss.twinx()
    ax_fd.plot(epochs, [e["fd"] for e in run.epochs], "s-", color="tab:red")
    ax_fd.set_ylabel("FD in classifier features (lower is better)", color="tab:red")
    for best, color in ((run.best_by_g_loss, "tab:blue"), (run.best_by_quality, "tab:red")):
        ax_loss.axvline(best["epoch"], color=color, ls="--", alpha=0.6)
    ax_loss.set_title(title)
    save_figure(fig, path)
    plt.show()
    return fig
