"""GPU memory of a LoRA training step, estimated from an H100 measurement, and the gradient-checkpointing
decision it drives (on only when the step would not fit without it)."""
from __future__ import annotations

import gc

import torch

from ..environment import GpuChoices

# Measured on an H100 (experiments/RESULTS.md, section 06: what, machine and method): the SD 1.5-sized UNet with
# random weights, 512 px (64 x 64 latents), rank-4 LoRA, fp16 autocast, batch 2 x accumulation 2, UNet step only.
# (variant, gradient checkpointing) -> (optimizer steps/s, peak GPU memory in GB); None: not measured.
H100_MEASURED: dict[tuple[str, bool], tuple[float | None, float]] = {
    ("LoRA", True): (1.54, 2.26), ("LoRA", False): (3.29, 3.96),
    ("QLoRA", True): (1.22, 2.01), ("QLoRA", False): (None, 4.17),
}
UNET_WEIGHTS_GB = {"LoRA": 1.64, "QLoRA": 1.25}  # the same measurement: fp16 and 4-bit NF4 UNet weights
HEADROOM_GB = 1.5  # beyond the UNet step: VAE encoding of the batch at 512 px, allocator fragmentation
# A Colab T4 has 15 GB; CUDA's own context and SD 1.5's fp16 pipeline (2.1 GB) leave about 13 GB free
T4_FREE_GB = 13.0


def training_memory_gb(batch_size: int, latent_side: int, checkpointing: bool, quantized: bool = False) -> float:
    """GPU memory of an SD 1.5 UNet training step beyond its weights, in GB: the H100_MEASURED peak minus
    the weights, at batch 2 and 64 x 64 latents, scaled by batch x latent area (activations grow with both)."""
    kind = "QLoRA" if quantized else "LoRA"
    measured = H100_MEASURED[(kind, checkpointing)][1] - UNET_WEIGHTS_GB[kind]
    return measured * batch_size / 2 * (latent_side / 64) ** 2


def free_gpu_memory_gb(device: torch.device) -> float:
    """Free memory of a CUDA device in GB, after handing PyTorch's cached but unused blocks back to the GPU
    (without `empty_cache`, memory freed by deleted tensors still counts as used)."""
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0] / 1e9


def decide_gradient_checkpointing(choices: GpuChoices, free_gb: float | None,
                                  need_gb: float) -> tuple[bool, str]:
    """Whether to recompute activations in the backward pass (slower, less memory): only on the GPU path,
    and only when the step's need without it (`need_gb`, headroom included) exceeds `free_gb`; and why."""
    if not choices.gpu_path or free_gb is None:
        return False, f"{choices.device.type}: no GPU memory to save, so no gradient checkpointing (it only costs time)"
    use = need_gb > free_gb
    (slow, _), (fast, _) = H100_MEASURED[("LoRA", True)], H100_MEASURED[("LoRA", False)]
    verdict = ("on: it would not fit without" if use else f"off: it fits without, and checkpointing would "
               f"cost speed ({slow} vs {fast} steps/s in that measurement)")
    return use, (f"the step needs about {need_gb:.1f} GB without gradient checkpointing (derived from a "
                 "measurement on a large data-centre GPU, experiments/RESULTS.md section 06), "
                 f"{free_gb:.1f} GB of GPU memory is free: checkpointing {verdict}")


def choose_gradient_checkpointing(choices: GpuChoices, batch_size: int, latent_side: int,
                                  quantized: bool = False) -> tuple[bool, str]:
    """The gradient-checkpointing decision with this GPU's free memory (a CUDA query). In the T4 emulation,
    where no CUDA memory can be queried, the decision a T4 with T4_FREE_GB free would take."""
    need = training_memory_gb(batch_size, latent_side, False, quantized) + HEADROOM_GB
    free = None
    if choices.cuda:
        free = free_gpu_memory_gb(choices.device)
    elif choices.gpu_path:
        choices.skip("torch.cuda.mem_get_info (free GPU memory)",
                     f"the decision of a T4 with {T4_FREE_GB:.0f} GB free")
        free = T4_FREE_GB
    return decide_gradient_checkpointing(choices, free, need)
