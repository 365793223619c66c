"""`make bench` case for notebook 04: one GAN-CLS iteration (`gan_cls_train_step`) of the improved recipe.

GPU: the flowers configuration of the notebook (64 px, 64 feature maps, batch 64 real images, two fakes per caption
for the packing discriminator, 102 species labels, GAN-INT on): the eager fp32 step (the baseline) beside the
notebook's GPU path (float16 autocast with a GradScaler, channels-last, cuDNN autotuning). CPU (reduced): the
shapes configuration of the CPU run (32 px, 16 feature maps, GAN-INT off), eager fp32 only, which is what the
notebook runs there. Random text embeddings of the MiniLM size (384): the step's cost does not depend on them.
"""
from __future__ import annotations

import torch

from helpers.t2i.model import Discriminator, Generator
from helpers.t2i.train import TextToImageRecipe, gan_cls_train_step
from helpers.training import time_per_step

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
BATCH_SIZE, PACK = 64, 2


def time_step(device: torch.device, size: int, width: int, n_classes: tuple[int, ...], gan_int: float,
              fast: bool, iterations: int) -> dict:
    """ms per iteration of the improved recipe at this size; `fast`: the notebook's CUDA path."""
    torch.backends.cudnn.benchmark = fast
    fmt = torch.channels_last if fast else torch.contiguous_format
    G = Generator(EMBEDDING_DIM, ngf=width, image_size=size, conditional_bn=True).to(device, memory_format=fmt)
    D = Discriminator(EMBEDDING_DIM, ndf=width, image_size=size, projection=True, n_classes=n_classes,
                      pack=PACK).to(device, memory_format=fmt)
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=fast)
    captions = BATCH_SIZE // PACK
    images = (torch.rand(captions, 3 * PACK, size, size, device=device) * 2 - 1).to(memory_format=fmt)
    right, wrong = torch.randn(2, captions, EMBEDDING_DIM, device=device)
    labels = torch.stack([torch.randint(0, n, (captions,), device=device) for n in n_classes], dim=1)
    recipe = TextToImageRecipe(gan_int=gan_int, auxiliary=1.0)
    amp_dtype = torch.float16 if fast else None  # a T4's autocast dtype, with the enabled GradScaler above
    return time_per_step(lambda: gan_cls_train_step(G, D, opt_g, opt_d, scaler, images, right, wrong, labels,
                                                    recipe, amp_dtype), device, iterations, 5)


def run(device: torch.device, reduced: bool) -> list[dict]:
    """Rows: eager fp32 (baseline) and, on CUDA, the notebook's fp16 + channels-last path."""
    if reduced:
        size, width, n_classes, gan_int, iterations = 32, 16, (4, 3, 2, 4), 0.0, 20
    else:
        size, width, n_classes, gan_int, iterations = 64, 64, (102,), 1.0, 200
    config = {"size": size, "width": width, "batch": BATCH_SIZE, "pack": PACK, "gan_int": gan_int}
    rows = [{"notebook": "04", "variant": "eager fp32 (the taught gan_cls_train_step)", "baseline": True,
             "config": config, **time_step(device, size, width, n_classes, gan_int, False, iterations),
             "note": "" if device.type == "cuda" else "CPU: the notebook runs this step"}]
    if device.type == "cuda":
        rows.append({"notebook": "04", "variant": "fp16 autocast + GradScaler, channels-last, cuDNN autotune",
                     "baseline": False, "config": config,
                     **time_step(device, size, width, n_classes, gan_int, True, iterations),
                     "note": "the notebook's GPU path"})
    else:
        rows[0]["note"] += "; the fp16 channels-last path is CUDA-only, not timed here"
    return rows
