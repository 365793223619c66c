"""The GAN's CUDA fast path: the whole training step captured once as a CUDA graph and replayed, with
the bookkeeping that makes its updates equal the eager step's."""
from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..environment import gpu_choices
from .model import IMAGE_SHAPE, Recipe, StepFn


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
