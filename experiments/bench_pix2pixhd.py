"""`make bench` case for notebook 05 (Pix2PixHD): the plain eager fp32 training step beside the fast-path options.

GPU: the official configuration (1024x512, 36 input channels, global generator ngf 64 + local enhancer ngf 32,
3-scale PatchGAN ndf 64, VGG19 loss, batch 1), one row per option added in turn, plus the notebook's Colab
configuration (256x256, 13 classes, G2 16 / G1 32, batch 4) eager and with the notebook's default fast path,
whose peak memory is the figure the notebook quotes. CPU (reduced): 64x64, tiny widths, the options that run on a
CPU. Every row starts from the same seeded weights and batch; its note gives the relative difference of its first
step's generator gradients from the eager step's (autocast rows differ by bf16/fp16 rounding) and the achieved
GFLOP/s (FLOPs counted by `training_step_flops`). VGG19 has random weights: the same cost as ImageNet weights.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from helpers.pix2pixhd.fast_path import FastPath
from helpers.pix2pixhd.losses import PIX2PIXHD_VGG_LAYERS
from helpers.pix2pixhd.model import LocalEnhancer, MultiscaleDiscriminator
from helpers.pix2pixhd.train import pix2pixhd_train_step, training_step_flops
from helpers.training import time_per_step
from helpers.vgg import VGG19Features

OFFICIAL = {"height": 512, "width": 1024, "classes": 35, "edges": True, "ngf": 32, "n_down": 4,
            "blocks": (9, 3), "ndf": 64, "batch": 1}
COLAB = {"height": 256, "width": 256, "classes": 13, "edges": False, "ngf": 16, "n_down": 4,
         "blocks": (9, 3), "ndf": 64, "batch": 4}
REDUCED = {"height": 64, "width": 64, "classes": 6, "edges": True, "ngf": 4, "n_down": 3,
           "blocks": (2, 1), "ndf": 16, "batch": 1}


# fp32 rows may differ from the baseline by summation order only: about n * eps of the largest gradient for the
# step's longest sums (a few thousand terms; see tests/test_pix2pixhd_training.py). Beyond that a row is wrong,
# e.g. channels-last on a CPU at batch 1, where torch's InstanceNorm gradient is off by the gradient's own size.
FP32_ROUNDING = 4096 * torch.finfo(torch.float32).eps


def input_nc(config: dict) -> int:
    """Channels of G's input: one-hot classes (+ the instance-edge map)."""
    return config["classes"] + int(config["edges"])


def build(config: dict, fast: FastPath, device: torch.device) -> tuple:
    """Seeded G, D, VGG19, both Adams, the loss scaler and one batch (random label map, random photo)."""
    torch.manual_seed(0)
    g = LocalEnhancer(input_nc(config), 3, config["ngf"], config["n_down"], *config["blocks"])
    d = MultiscaleDiscriminator(input_nc(config) + 3, config["ndf"])
    G, D = fast.prepare(g.to(device)), fast.prepare(d.to(device))
    vgg = VGG19Features(list(PIX2PIXHD_VGG_LAYERS), pretrained=False, normalize_input=False).to(device)
    opt_g, opt_d = fast.adam(G.parameters(), 2e-4, (0.5, 0.999)), fast.adam(D.parameters(), 2e-4, (0.5, 0.999))
    shape = (config["batch"], config["height"], config["width"])
    labels = F.one_hot(torch.randint(0, config["classes"], shape), config["classes"]).permute(0, 3, 1, 2)
    edges = (torch.rand(config["batch"], 1, *shape[1:]) < 0.05).float()
    x = torch.cat([labels.float(), edges], 1) if config["edges"] else labels.float()
    real = torch.rand(config["batch"], 3, *shape[1:]) * 2 - 1
    x, real = fast.tensor(x.to(device)), fast.tensor(real.to(device))
    return G, D, vgg, opt_g, opt_d, fast.grad_scaler(device), x, real


def measure(config: dict, fast: FastPath, device: torch.device, iterations: int, warmup: int,
            reference: dict | None) -> tuple[dict, dict]:
    """Timing of one configuration and option set, and its first step's generator gradients."""
    G, D, vgg, opt_g, opt_d, scaler, x, real = build(config, fast, device)

    def step() -> dict:
        return pix2pixhd_train_step(G, D, vgg, opt_g, opt_d, scaler, x, real, amp_dtype=fast.amp_dtype)

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    grads = {n: p.grad.detach().float().clone() for n, p in G.named_parameters() if p.grad is not None}
    timing = time_per_step(step, device, iterations, warmup)
    timing["first_step_s"] = first_s
    if reference is not None:
        scale = max(g.abs().max().item() for g in reference.values())
        timing["grad_difference"] = max((grads[n] - g).abs().max().item() for n, g in reference.items()) / scale
    del G, D, vgg, opt_g, opt_d
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return timing, grads


def step_flops(config: dict) -> int:
    """FLOPs of one step of `config`, counted on the meta device."""
    with torch.device("meta"):
        g = LocalEnhancer(input_nc(config), 3, config["ngf"], config["n_down"], *config["blocks"])
        d = MultiscaleDiscriminator(input_nc(config) + 3, config["ndf"])
        vgg = VGG19Features(list(PIX2PIXHD_VGG_LAYERS), pretrained=False, normalize_input=False)
    return training_step_flops(g, d, vgg, input_nc(config), config["height"], config["width"], config["batch"])


def gpu_variants(device: torch.device) -> list[tuple[str, dict, FastPath]]:
    """(name, configuration, options): the official configuration with one option added per row, the
    compiled path without autocast and with channels-last, and the Colab configuration."""
    default = FastPath.for_device(device)
    amp = str(default.amp_dtype).removeprefix("torch.")
    compiled = replace(default, compile=True)
    return [
        ("eager fp32 (baseline)", OFFICIAL, FastPath()),
        ("cuDNN autotuning", OFFICIAL, FastPath(cudnn_benchmark=True)),
        (f"+ autocast {amp}", OFFICIAL, replace(default, fused_adam=False)),
        ("+ fused Adam (the notebook's default)", OFFICIAL, default),
        ("+ torch.compile (COMPILE = True)", OFFICIAL, compiled),
        ("compiled, no autocast", OFFICIAL, replace(compiled, amp_dtype=None)),
        ("compiled + channels-last", OFFICIAL, replace(compiled, channels_last=True)),
        ("Colab config: eager fp32 (baseline)", COLAB, FastPath()),
        ("Colab config: the notebook's default", COLAB, default),
    ]


def cpu_variants() -> list[tuple[str, dict, FastPath]]:
    """Reduced sizes on a CPU: the options that exist there (autocast and compile are for GPUs here)."""
    return [("eager fp32 (baseline)", REDUCED, FastPath()),
            ("fused Adam", REDUCED, FastPath(fused_adam=True)),
            ("channels-last", REDUCED, FastPath(channels_last=True))]


def run(device: torch.device, reduced: bool) -> list[dict]:
    """One row per variant; each configuration's first row is its baseline."""
    variants = cpu_variants() if reduced else gpu_variants(device)
    iterations, warmup = (5, 2) if reduced else (20, 5)
    rows, references, flops = [], {}, {}
    for name, config, fast in variants:
        key = "official" if config is OFFICIAL else "colab" if config is COLAB else "reduced"
        flops.setdefault(key, step_flops(config))
        timing, grads = measure(config, fast, device, iterations, warmup, references.get(key))
        baseline = key not in references
        references.setdefault(key, grads)
        achieved = flops[key] / (timing["ms_per_step"] / 1000)
        note = f"{achieved / 1e9:,.0f} GFLOP/s; first step {timing['first_step_s']:.1f} s"
        if not baseline:
            note += f"; grad difference {timing['grad_difference']:.1e} of max |grad|"
            if fast.amp_dtype is None and timing["grad_difference"] > FP32_ROUNDING:
                note += " (WRONG: beyond float32 rounding, do not use this option here)"
        rows.append({"notebook": "05" if key != "colab" else "05 Colab config", "variant": name,
                     "baseline": baseline, "config": {**config, "options": fast.describe()},
                     "ms_per_step": timing["ms_per_step"], "it_per_s": timing["it_per_s"],
                     "peak_memory_mb": timing["peak_memory_mb"], "note": note})
        print(f"  05 {key}: {name}: {timing['ms_per_step']:.1f} ms/step ({note})")
    return rows
