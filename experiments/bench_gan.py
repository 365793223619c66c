"""`make bench` case for notebooks 01/02: one training step of each recipe at batch 64 with the full-mode
networks; the taught eager fp32 step (the baseline) and, on CUDA, the same step replayed as a CUDA graph."""
from __future__ import annotations

import torch

from helpers.gan.cuda_graph import choose_step
from helpers.gan.model import baseline_recipe, improved_recipe
from helpers.training import time_per_step

BATCH_SIZE = 64
LATENT_DIM = 100


def time_recipe(label: str, step_name: str, build, device: torch.device, reduced: bool) -> list[dict]:
    """Rows for one recipe: its eager step, and its CUDA-graph step where the device is a GPU."""
    real = torch.rand(BATCH_SIZE, 1, 28, 28, device=device) * 2 - 1
    z = torch.randn(BATCH_SIZE, LATENT_DIM, device=device)
    config = {"batch": BATCH_SIZE, "G": "100-128-256-512-1024-784", "D": "784-512-256-1"}
    iterations = 100 if reduced else 500
    eager = build(device)
    rows = [{"notebook": label, "variant": f"eager fp32 step (the taught {step_name})", "baseline": True,
             "config": config, **time_per_step(lambda: eager.step(real, z), device, iterations, 10),
             "note": "CPU: the loop runs this step" if device.type != "cuda" else ""}]
    if device.type == "cuda":
        graphed = build(device)
        fast = choose_step(graphed, BATCH_SIZE, device)
        rows.append({"notebook": label, "variant": "CUDA graph of the whole step (the notebook's GPU path)",
                     "baseline": False, "config": config,
                     **time_per_step(lambda: fast(real, z), device, 5 * iterations, 20),
                     "note": "same updates as eager (tests/test_mnist_gan.py)"})
    else:
        rows[0]["note"] += "; the CUDA-graph fast path is CUDA-only, not timed here"
    return rows


def run(device: torch.device, reduced: bool) -> list[dict]:
    """The baseline recipe's and the improved recipe's steps (the networks are small enough to keep their
    full-mode sizes on a CPU; `reduced` only shortens the timing)."""
    return (time_recipe("01/02 baseline", "gan_train_step", baseline_recipe, device, reduced)
            + time_recipe("01/02 improved", "improved_step", improved_recipe, device, reduced))
