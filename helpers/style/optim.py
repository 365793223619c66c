"""Optimising the image: its pixels as the only parameters, a sync-free L-BFGS, one optimisation step, a whole
stylisation, and the checks that the optimiser matches torch's and never waits for the GPU."""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .model import StyleObjective


class StylisedImage(nn.Module):
    """The image being optimised: its pixels, in [0, 1], are the only parameters."""

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.pixels = nn.Parameter(init.detach().clone())

    def forward(self) -> Tensor:
        """The current image (1, 3, H, W)."""
        return self.pixels


def initial_image(content: Tensor, init: str = "noise", seed: int = 0) -> Tensor:
    """Start of the optimisation: white noise in [0, 1] (the paper) or the content image, on the content's device."""
    if init == "content":
        return content.detach().clone()
    if init != "noise":
        raise ValueError(f"init must be 'noise' (the paper) or 'content', got {init!r}")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(content.shape, generator=generator).to(content.device)


class SyncFreeLBFGS(torch.optim.Optimizer):
    """L-BFGS without line search, one iteration per step(closure), that never waits for the GPU.

    It takes the steps of torch.optim.LBFGS(lr, max_iter=1, history_size) (tests compare the two), but keeps every
    scalar on the device: torch's version reads values back to the host about twice per stored pair and iteration
    (up to 200 host syncs per iteration), each one stalling a GPU. Where torch's decides on the host, this one does
    it with arithmetic: a curvature pair with y.s <= 1e-10 is stored with weight 0 instead of being skipped (it
    takes a history slot), and no step is refused or stops early (torch skips a step whose direction does not
    descend or whose gradient is below 1e-7; we let the step run).
    """

    def __init__(self, params, lr: float = 1.0, history_size: int = 100) -> None:
        super().__init__(params, {"lr": lr, "history_size": history_size})
        tensors = [p for group in self.param_groups for p in group["params"]]
        if len(tensors) != 1:
            raise ValueError(f"SyncFreeLBFGS optimises one tensor (the image's pixels), got {len(tensors)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """Evaluate the loss and gradient by `closure`, then move the pixels along the L-BFGS direction."""
        with torch.enable_grad():
            loss = closure()
        group = self.param_groups[0]
        pixels = group["params"][0]
        grad = pixels.grad.detach().reshape(-1).clone()
        state = self.state[pixels]
        if not state:  # first iteration: steepest descent, as torch's, with step min(1, 1/|g|_1) * lr
            size = group["history_size"], grad.numel()
            state.update(pairs=0, s=grad.new_zeros(size), y=grad.new_zeros(size), rho=grad.new_zeros(size[0]),
                         h_diag=grad.new_ones(()))
            direction, step_size = -grad, (1 / grad.abs().sum()).clamp(max=1.0) * group["lr"]
        else:
            self._store_pair(state, grad)
            direction, step_size = self._direction(state, grad), group["lr"]
        pixels.add_(direction.view_as(pixels) * step_size)
        state.update(prev_grad=grad, direction=direction, step_size=step_size)
        return loss

    @staticmethod
    def _store_pair(state: dict, grad: Tensor) -> None:
        """Add the newest curvature pair (s, y) to the ring buffer; its weight rho is 0 where y.s <= 1e-10."""
        s, y = state["direction"] * state["step_size"], grad - state["prev_grad"]
        ys = y.dot(s)
        curved = ys > 1e-10
        slot = state["pairs"] % len(state["rho"])
        state["s"][slot], state["y"][slot] = s, y
        state["rho"][slot] = torch.where(curved, 1 / ys, 0.0)
        state["h_diag"] = torch.where(curved, ys / y.dot(y), state["h_diag"])
        state["pairs"] += 1

    @staticmethod
    def _direction(state: dict, grad: Tensor) -> Tensor:
        """-H g by the two-loop recursion over the stored pairs (newest first, then oldest first)."""
        size = len(state["rho"])
        newest_first = [(state["pairs"] - 1 - k) % size for k in range(min(state["pairs"], size))]
        s, y, rho = state["s"], state["y"], state["rho"]
        q, alphas = -grad, {}
        for i in newest_first:
            alphas[i] = rho[i] * s[i].dot(q)
            q.addcmul_(y[i], alphas[i], value=-1)  # q -= alpha_i y_i
        r = q.mul_(state["h_diag"])
        for i in reversed(newest_first):
            r.addcmul_(s[i], alphas[i] - rho[i] * y[i].dot(r))  # r += (alpha_i - beta_i) s_i
        return r


def make_optimizer(image: StylisedImage, name: str = "lbfgs", lr: float | None = None,
                   history_size: int = 100) -> torch.optim.Optimizer:
    """Optimizer over the image's pixels: "lbfgs" (the paper's method, SyncFreeLBFGS), "torch_lbfgs"
    (torch.optim.LBFGS, one iteration per step() call: the same steps, with host syncs) or "adam"."""
    if name == "lbfgs":
        return SyncFreeLBFGS(image.parameters(), lr=lr or 1.0, history_size=history_size)
    if name == "torch_lbfgs":
        return torch.optim.LBFGS(image.parameters(), lr=lr or 1.0, max_iter=1, history_size=history_size)
    if name == "adam":
        return torch.optim.Adam(image.parameters(), lr=lr or 0.02)
    raise ValueError(f"optimizer must be 'lbfgs' (the paper's), 'torch_lbfgs' or 'adam', got {name!r}")


def optimisation_step(objective: StyleObjective, image: StylisedImage,
                      optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """One iteration: losses at the current image, one optimizer step, pixels clamped to [0, 1].

    The losses come back as tensors on the device: float(...) of one waits for the GPU, so a loop
    reads them only every few iterations.
    """
    losses: dict[str, Tensor] = {}

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses.update(objective(image()))
        losses["total"].backward()
        return losses["total"]

    optimizer.step(closure)
    with torch.no_grad():
        image.pixels.clamp_(0, 1)
    return {name: value.detach() for name, value in losses.items()}


def run_key(*tensors: Tensor, **settings) -> str:
    """A short name for one stylisation run: a hash of its input tensors' values and of its settings, so that a
    saved result is reused only by the same run."""
    digest = hashlib.sha1(repr(sorted(settings.items())).encode())
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def stylise(objective: StyleObjective, init: Tensor, steps: int, optimizer: str = "lbfgs",
            lr: float | None = None) -> Tensor:
    """Gatys et al.'s optimisation: from `init`, `steps` optimizer iterations; returns the image."""
    image = StylisedImage(init)
    opt = make_optimizer(image, optimizer, lr)
    for _ in range(steps):
        optimisation_step(objective, image, opt)
    return image().detach()


class HostReadCounter(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (.item(), float(), bool(), int() of a tensor) while active.

    On a GPU each such read waits for every queued kernel: a host sync. On a CPU nothing waits, but the reads are
    the same, so counting them checks on any device that an optimizer step would never stall a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def lockstep_differences(objective: StyleObjective, init: Tensor, steps: int, lr: float = 1.0,
                         history_size: int = 100) -> tuple[list[float], float]:
    """SyncFreeLBFGS and torch.optim.LBFGS side by side from `init`: after each of `steps` iterations, the largest
    pixel difference between the two images; and the largest pixel change of one torch iteration (the scale)."""
    images = {name: StylisedImage(init) for name in ("lbfgs", "torch_lbfgs")}
    optimizers = {name: make_optimizer(image, name, lr, history_size) for name, image in images.items()}
    differences, largest_step = [], 0.0
    for _ in range(steps):
        before = images["torch_lbfgs"]().detach().clone()
        for name in images:
            optimisation_step(objective, images[name], optimizers[name])
        ours, theirs = images["lbfgs"]().detach(), images["torch_lbfgs"]().detach()
        largest_step = max(largest_step, float((theirs - before).abs().max()))
        differences.append(float((ours - theirs).abs().max()))
    return differences, largest_step


def autocast_gradient_error(objective: StyleObjective, reference: StyleObjective, images: Tensor,
                            loss_scale: float = 1.0) -> float:
    """|g - g_ref| / |g_ref| for the gradient g of `objective` (e.g. VGG under fp16 autocast) against that of
    `reference` (float32) at `images`; `loss_scale` multiplies the loss before backward and divides the gradient
    after it, as a GradScaler does."""
    grads = []
    for obj, scale in ((objective, loss_scale), (reference, 1.0)):
        x = images.detach().clone().requires_grad_(True)
        (obj(x)["total"] * scale).backward()
        grads.append(x.grad.double() / scale)
    return float((grads[0] - grads[1]).norm() / grads[1].norm())

