# %% [markdown]
# # 05 · Pix2PixHD: from a label map to a photo
#
# {{BADGE}}
#
# Pix2PixHD (Wang et al. 2018, *High-Resolution Image Synthesis and Semantic Manipulation with Conditional GANs*)
# turns a semantic label map (or a sketch) into a photo. This notebook builds its parts as the paper and the
# official code define them (global generator, local enhancer, multi-scale PatchGAN, LSGAN + feature matching + VGG
# losses), trains them with the paper's two-stage schedule on the CMP Facades label maps, measures PSNR and SSIM on
# held-out pairs, and runs an ablation at the same budget: global generator alone vs with the local enhancer, and
# without the feature-matching and VGG terms.
#
# **What you get:** the networks, the losses, the training step and the two-stage schedule as cells you can edit
# and re-run; a training run that checkpoints every epoch and resumes after a disconnect (shown by stopping and
# resuming it); TensorBoard logs; loss curves; the held-out label maps drawn through training; PSNR, SSIM (and LPIPS
# where its weights load) for three variants; the step's speed with and without the GPU fast path; `metrics.json`.
#
# **Run time.** Colab T4, full mode (CMP Facades at 256×256, three variants, 10.6 PFLOP of training): about 25 to
# 45 minutes of training, *derived, not measured*: the FLOPs of each step counted with `torch.utils.flop_counter`
# (`training_step_flops`), times the steps of the schedule, divided by the rate an H100 reached with this code on
# the official configuration in fp32 (2.9 TFLOP per step in 69.8 ms, about 42 TFLOP/s) scaled down to a T4 by
# memory bandwidth (the step is bound by memory traffic; H100/T4 bandwidth ratio 6 to 10; experiments/RESULTS.md,
# section 05). The fp16 fast path a T4 gets should be faster; section 9 measures it. CPU smoke mode (`SMOKE=1`,
# tiny models, 32×32 toy data): 16 to 21 s on 2 shared CPU cores (measured under nbval), 31 to 52 s with
# `EMULATE_T4=1`, where the CPU runs the fp16 path of a T4 (a CPU has no fast fp16 arithmetic).

# %% SETUP

# %% [markdown]
# ## 1. Parameters
#
# Every knob is here; smoke values (CI) sit beside the full ones. The full configuration is the **Colab-T4
# configuration**: the official classes at half the official generator width (G2 16, G1 32 channels), 256×256
# images, batch 4. The official widths are the classes' defaults; their parameter counts are printed in section 4.

# %%
import contextlib
import math
import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from helpers.environment import (autocast, data_dir, describe_device, in_colab, pick_device,
                                 run_dir, seed_everything, smoke_mode, use_drive_for_runs)
from helpers.metrics import psnr, ssim
from helpers.pix2pixhd.data import (
    CMP_FACADES_CLASSES, PairedFolderDataset, ProceduralLabelImages, check_image_size,
    colorize_labels, download_cmp_facades, encode_input, encode_pair_batch, input_channels,
    instance_edges, label_sketch, one_hot_labels,
)
from helpers.pix2pixhd.fast_path import FastPath
from helpers.pix2pixhd.train import (Trained, TrainingSetup, linear_decay_lr, saved_epochs, set_lr,
                                     snapshot)
from helpers.plotting import plot_losses, show_grid, show_over_iterations, show_panels, show_rows
from helpers.training import (History, TrainingRun, count_parameters, load_checkpoint,
                              peak_memory_mb, save_checkpoint, synchronize, time_per_step,
                              write_metrics)
from helpers.vgg import STAND_IN_NOTE, VGG19Features

SMOKE = smoke_mode()                  # SMOKE=1 in the environment: tiny CI run, nothing downloaded
NOTEBOOK = "{{NOTEBOOK}}"
RUN_DIR_ON_DRIVE = False              # True in Colab: runs on Google Drive, so a re-run resumes
SEED = 0
# Data: "cmp_facades" (CMP Facade Database, label maps -> photos, downloaded), "procedural" (offline
# toy streets: label + instance maps) or "procedural_sketch" (the same streets as RGB sketches)
DATASET = os.environ.get("PIX2PIXHD_DATASET", "procedural" if SMOKE else "cmp_facades")
IMAGE_SIZE = 32 if SMOKE else 256     # full size (local enhancer); stage 1 runs at half of it
N_TRAIN = int(os.environ.get("PIX2PIXHD_N_TRAIN", 2 if SMOKE else 800))  # procedural data only;
N_TEST = int(os.environ.get("PIX2PIXHD_N_TEST", 4 if SMOKE else 100))    # for longer CPU runs
N_TEST_FACADES = 50                   # the last 50 facades (sorted by name) are held out
BATCH_SIZE = 1 if SMOKE else 4        # official: 1
NUM_WORKERS = 0 if SMOKE else 2

# Architecture. Official: G2 width 32, G1 64, 4 downsamplings, 9 + 3 residual blocks; D width 64,
# 3 layers, 3 scales
NGF_LOCAL = 4 if SMOKE else 16        # G2 width; G1 gets 2 * NGF_LOCAL (official: 32 -> 64)
N_DOWNSAMPLE_GLOBAL = 3 if SMOKE else 4   # official 4 (smoke: 3, so that 32x32 images fit)
N_BLOCKS_GLOBAL = 2 if SMOKE else 9   # official 9
N_BLOCKS_LOCAL = 1 if SMOKE else 3    # official 3
NDF = 8 if SMOKE else 64              # official 64
N_LAYERS_D = 3                        # official 3
NUM_D = 3                             # the paper's 3 scales

# Losses (the paper's weights)
LAMBDA_FEAT = 10.0
LAMBDA_VGG = 10.0
VGG_PRETRAINED = not SMOKE            # smoke: random-weight VGG19 (offline stand-in)

# Optimiser and the two-stage schedule, in epochs (constant LR, linear decay); official 100 + 100
LR, BETAS = 2e-4, (0.5, 0.999)
GLOBAL_EPOCHS = (0, 2) if SMOKE else (20, 20)   # stage 1: G1 alone at IMAGE_SIZE / 2
LOCAL_EPOCHS = (1, 1) if SMOKE else (10, 10)    # stage 2: G1 + G2 at IMAGE_SIZE
FIX_GLOBAL_EPOCHS = 1 if SMOKE else 5           # first stage-2 epochs with G1 frozen (official 10)
INTERRUPT_AFTER_EPOCHS = sum(GLOBAL_EPOCHS) + 1  # the main run stops here once (G1 frozen)
COMPILE = False                       # torch.compile G and D on a GPU (minutes of compiling)
SNAPSHOT_IMAGES = 4                   # held-out maps drawn after every SNAPSHOT_EVERY epochs
SNAPSHOT_EVERY = 1 if SMOKE else 10
LPIPS_NET = None if SMOKE else "alex"  # LPIPS needs AlexNet weights (download); None skips it
TIMED_STEPS = 2 if SMOKE else 20      # steps per row of the speed comparison (section 9)

VARIANTS = {  # the ablation: the same epochs (so the same generator updates) for every variant
    "g1_g2_full": {"title": "G1 + G2, GAN + FM + VGG", "local": True,
                   "lambda_feat": LAMBDA_FEAT, "lambda_vgg": LAMBDA_VGG},
    "g1_only_full": {"title": "G1 only, GAN + FM + VGG", "local": False,
                     "lambda_feat": LAMBDA_FEAT, "lambda_vgg": LAMBDA_VGG},
    "g1_g2_gan_only": {"title": "G1 + G2, GAN only", "local": True,
                       "lambda_feat": 0.0, "lambda_vgg": 0.0},
}
MAIN_VARIANT = "g1_g2_full"
STAND_INS: list[str] = []

use_drive_for_runs(RUN_DIR_ON_DRIVE)  # mounts Drive and sets $RUN_DIR there (Colab only)

DEVICE = pick_device()
RUN_DIR = run_dir(NOTEBOOK)           # $RUN_DIR/<notebook>: checkpoints, TensorBoard, figures
FAST = FastPath.for_device(DEVICE, compile=COMPILE)
torch.set_flush_denormal(True)        # CPU: tiny activations otherwise slow the convolutions ~10x
seed_everything(SEED)
print(f"mode: {'smoke' if SMOKE else 'full'} | device: {describe_device(DEVICE)} | "
      f"run dir: {RUN_DIR}")
print(f"data: {DATASET}, {IMAGE_SIZE}x{IMAGE_SIZE} (stage 1: {IMAGE_SIZE // 2}), "
      f"batch {BATCH_SIZE}")
print(f"training step: {FAST.describe()}")

# %% [markdown]
# ## 2. The model in formulas
#
# **Generator** $G = \{G_1, G_2\}$. The *global generator* $G_1$ is the residual network
# `c7s1-64, d128, d256, d512, d1024, R1024×9, u512, u256, u128, u64, c7s1-3`: a 7×7 convolution, four stride-2
# 3×3 convolutions that halve the size and double the width, nine residual blocks
# $x \mapsto x + \mathrm{IN}(\mathrm{conv}(\mathrm{ReLU}(\mathrm{IN}(\mathrm{conv}(x)))))$, four stride-2 transposed
# convolutions back to full size, and a 7×7 convolution to RGB with $\tanh$. Instance norm without parameters,
# reflection padding, ReLU everywhere.
#
# The *local enhancer* $G_2$ (`c7s1-32, d64, R64×3, u32, c7s1-3`) works at twice the resolution. Its front end
# $G_2^{(F)}$ halves the full-size input; $G_1$, without its RGB head, runs on the input downsampled by
# $\mathrm{AvgPool}(3, \text{stride } 2)$; the two 64-channel feature maps are **added**, and the back end
# $G_2^{(B)}$ (3 residual blocks, one upsampling, RGB head) makes the image:
#
# $$G(x) = G_2^{(B)}\big(G_2^{(F)}(x) + G_1^{\text{feat}}(\downarrow x)\big).$$
#
# ```
#  x (full size) ──► G2 front: c7s1-32, d64 ─────────────┐
#                                                        (+)──► R64×3 ─► u32 ─► c7s1-3, tanh ─► G(x)
#  ↓x (half size) ─► G1: c7s1-64 … d1024, R1024×9 … u64 ──┘
# ```
#
# **Discriminators.** $D_1, D_2, D_3$ are identical 70×70 PatchGANs (`C64-C128-C256-C512`, 4×4 kernels, instance
# norm except on the first, LeakyReLU 0.2, no pooling) on the pair (input map, image) at full, ½ and ¼ resolution.
# Each returns all five block outputs $D_k^{(1)}, \dots, D_k^{(5)}$: the last is the patch prediction, the others
# feed feature matching.
#
# **Losses** (least-squares GAN, Mao et al. 2017). For the discriminators, with $s$ the input map and $x$ the photo:
#
# $$\mathcal{L}_D = \tfrac12 \sum_{k=1}^{3} \mathbb{E}\big[(D_k(s, x) - 1)^2\big] + \tfrac12 \sum_{k=1}^{3}
#   \mathbb{E}\big[D_k(s, G(s))^2\big].$$
#
# For the generator, the adversarial term, feature matching over the $T = n_\text{layers}+1 = 4$ intermediate layers of
# every scale, and the VGG19 perceptual loss over $N = 5$ layers (relu1_1 … relu5_1, $w = \frac1{32}, \frac1{16},
# \frac18, \frac14, 1$):
#
# $$\mathcal{L}_\text{GAN} = \sum_{k} \mathbb{E}\big[(D_k(s, G(s)) - 1)^2\big], \qquad
#   \mathcal{L}_\text{FM} = \sum_{k=1}^{3} \sum_{i=1}^{T} \frac{1}{3}\cdot\frac{4}{n_\text{layers}+1}\,
#   \big\| D_k^{(i)}(s, x) - D_k^{(i)}(s, G(s)) \big\|_1,$$
#
# $$\mathcal{L}_\text{VGG} = \sum_{i=1}^{N} w_i \big\| F^{(i)}(x) - F^{(i)}(G(s)) \big\|_1, \qquad
#   \mathcal{L}_G = \mathcal{L}_\text{GAN} + \lambda_\text{feat}\,\mathcal{L}_\text{FM} + \lambda_\text{VGG}\,
#   \mathcal{L}_\text{VGG}, \quad \lambda_\text{feat} = \lambda_\text{VGG} = 10,$$
#
# where $\|\cdot\|_1$ is the mean absolute difference. The paper writes $\frac{1}{N_i}$ per layer; the official code
# weights every layer by $\frac{1}{\text{num}_D}\cdot\frac{4}{n_\text{layers}+1}$, which we follow.
#
# **Where we depart, on purpose.** (1) Seed 002 writes the generator's LSGAN term as
# $\tfrac12\,\mathbb{E}[(D(G(z))-1)^2]$; the official code has no ½, and we follow the official code (the ½ only
# rescales $\lambda_\text{feat}$ and $\lambda_\text{VGG}$ by 2). (2) Fewer epochs than the paper's 200 per stage and
# a generator of half the official width in the Colab configuration (the official widths are the classes' defaults;
# their parameter counts are printed below). (3) One local enhancer (as the official scripts), 256×256 facades instead
# of 2048×1024 Cityscapes. (4) Native `torch.autocast` mixed precision on a GPU (bf16 where the GPU has it, fp16 on a
# T4) instead of apex, and a fused Adam; the official code trains in fp32 by default.

# %% [markdown]
# ## 3. Data
#
# **Full mode: the CMP Facade Database** (Tyleček & Šára 2013, `CMP_facade_DB_base.zip` from
# [cmp.felk.cvut.cz/~tylecr1/facade](https://cmp.felk.cvut.cz/~tylecr1/facade/), 378 rectified facades, no
# login). It is the data behind the pix2pix "facades" set, but we take it from its authors' page rather than the
# pix2pix mirror for one reason: the mirror stores the labels as JPEG-compressed *colour* pictures glued to the photo,
# while the original zip has a PNG **label map of class indices** beside each photo (12 classes: background, facade,
# window, door, cornice, sill, balcony, blind, deco, molding, pillar, shop, numbered from 1). That is exactly
# pix2pixHD's input: a one-hot map per class. `label_nc = 13` covers indices 0 … 12 (0 unused); any other value
# stops the data loader with an error naming the file. The facades have no instance maps, so there is no edge
# channel. The last 50 facades by name are held out for evaluation.
#
# **Smoke / offline mode: procedural toy streets.** Each scene has 6 classes (sky, ground, building, window, tree,
# sun) and an instance map (every building, tree and sun is its own instance). The photo is a deterministic function
# of the maps: class colours, a sky and ground gradient, shaded trees, and dark outlines where two *instances* of a
# building meet, which only the instance-edge channel reveals. A small model can learn it on a CPU.

# %%
if DATASET in ("procedural", "procedural_sketch"):
    train_set = ProceduralLabelImages(N_TRAIN, IMAGE_SIZE, seed=SEED)
    test_set = ProceduralLabelImages(N_TEST, IMAGE_SIZE, seed=SEED + 1)
    SKETCH = DATASET == "procedural_sketch"  # label_nc 0: the RGB sketch feeds G directly
    LABEL_NC, USE_INSTANCE = (0, False) if SKETCH else (train_set.label_nc, True)
    CLASS_NAMES = train_set.class_names
    kind = "sketches" if SKETCH else "label maps"
    STAND_INS.append(f"procedural toy-street {kind} ({N_TRAIN} train / {N_TEST} test) instead of "
                     "CMP Facades")
    print("STAND-IN:", STAND_INS[-1])
elif DATASET == "cmp_facades":
    folder = download_cmp_facades(data_dir())
    names = sorted(p.stem for p in folder.glob("*.jpg"))
    LABEL_NC, USE_INSTANCE, CLASS_NAMES = len(CMP_FACADES_CLASSES), False, CMP_FACADES_CLASSES
    pairs = partial(PairedFolderDataset, folder, folder, IMAGE_SIZE, LABEL_NC)
    train_set, test_set = pairs(names=names[:-N_TEST_FACADES]), pairs(names=names[-N_TEST_FACADES:])
else:
    raise ValueError(f"DATASET={DATASET!r} is not known; use 'cmp_facades' (download), "
                     "'procedural' or 'procedural_sketch' (offline)")
IN_NC = input_channels(LABEL_NC, USE_INSTANCE)
check_image_size(IMAGE_SIZE, IMAGE_SIZE, 32, "IMAGE_SIZE")
train_loader = DataLoader(train_set, BATCH_SIZE, shuffle=True, num_workers=NUM_WORKERS,
                          drop_last=True)
test_loader = DataLoader(test_set, BATCH_SIZE, shuffle=False, num_workers=NUM_WORKERS)
encode = partial(encode_pair_batch, label_nc=LABEL_NC, use_instance=USE_INSTANCE, device=DEVICE)
print(f"{len(train_set)} training pairs, {len(test_set)} held-out pairs, {len(CLASS_NAMES)} "
      f"classes ({', '.join(CLASS_NAMES)}), generator input: {IN_NC} channels")

# %%
def input_picture(batch: dict) -> torch.Tensor:
    """What G gets, as a picture: the label map in class colours, or the sketch itself."""
    if LABEL_NC == 0:
        return encode(batch, batch["image"].shape[-1])[0].cpu()
    return colorize_labels(batch["label"], LABEL_NC)


preview = next(iter(DataLoader(test_set, 6)))
what_g_gets = "input (label map: colours = classes)" if LABEL_NC else "input (RGB sketch)"
panels = {what_g_gets: input_picture(preview)}
if USE_INSTANCE:
    panels["instance edges"] = instance_edges(preview["instance"]).repeat(1, 3, 1, 1) * 2 - 1
panels["photo (target)"] = preview["image"]
fig = show_panels(panels, f"{DATASET}: what the generator sees and what it must draw",
                  RUN_DIR / "data_preview.png", nrow=3)
assert preview["image"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
assert preview["label"].dtype == torch.long

# %% [markdown]
# The input encoding: a one-hot plane per class, and one plane that is 1 wherever a pixel's instance id differs
# from one of its 4 neighbours. An RGB sketch or edge map (`label_nc = 0`) feeds the generator as it is.
# Bad inputs stop with a message that says what to do:

# %%
x_demo = encode({k: v[:2] for k, v in preview.items()}, IMAGE_SIZE)[0].cpu()
assert x_demo.shape == (2, IN_NC, IMAGE_SIZE, IMAGE_SIZE)
assert LABEL_NC == 0 or torch.all(x_demo[:, :LABEL_NC].sum(1) == 1)  # exactly one class per pixel
sketch_demo = label_sketch(preview["label"][:2])
assert encode_input(sketch_demo, 0).shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)  # the RGB-sketch path
for bad_call in (lambda: one_hot_labels(torch.full((1, 4, 4), 9), 6),
                 lambda: encode_input(torch.full((1, 3, 4, 4), 255.0), 0),
                 lambda: check_image_size(250, 256)):
    try:
        bad_call()
        raise AssertionError("bad input was accepted")
    except ValueError as err:
        print("ValueError:", err)

# %% [markdown]
# ## 4. The networks
#
# The building blocks first: a convolution with instance norm and ReLU (reflection-padded for the 7×7 ones), the
# transposed convolution that doubles the size, the RGB head, the official initialisation N(0, 0.02), and the
# average-pool downsampling used between the generator's and the discriminator's scales.

# %% [helpers] pix2pixhd/model: init_weights, conv_block, up_block, to_rgb, downsample

# %% [markdown]
# The residual block and the global generator $G_1$. `forward` refuses sizes its downsamplings cannot undo.

# %% [helpers] pix2pixhd/model: ResnetBlock, GlobalGenerator

# %% [markdown]
# The local enhancer $G = \{G_1, G_2\}$: $G_1$'s feature extractor (its `features`, without the RGB head) at twice
# G2's width, and G2's front end, residual blocks and head. `load_global` copies a trained $G_1$ in;
# `freeze_global` freezes it for the first epochs of stage 2.

# %% [helpers] pix2pixhd/model: LocalEnhancer

# %% [markdown]
# The 70×70 PatchGAN returns every block's output (feature matching needs them); the multi-scale discriminator runs
# independent PatchGANs on the (input map, image) pair at full, ½ and ¼ size.

# %% [helpers] pix2pixhd/model: NLayerDiscriminator

# %% [helpers] pix2pixhd/model: MultiscaleDiscriminator

# %% [markdown]
# **Parameter counts at the official defaults** (Cityscapes: 35 classes + 1 edge channel = 36 input channels;
# built on PyTorch's `meta` device, so nothing is allocated), checked against the counts worked out by hand in
# `tests/test_pix2pixhd.py`.

# %%
with torch.device("meta"):
    official = {
        "global generator G1 (ngf 64, 9 blocks)": GlobalGenerator(36),
        "G1 + local enhancer G2 (ngf 32, 3 blocks)": LocalEnhancer(36),
        "one PatchGAN (ndf 64, 3 layers)": NLayerDiscriminator(36 + 3),
        "multi-scale D (3 PatchGANs)": MultiscaleDiscriminator(36 + 3),
    }
OFFICIAL_PARAMS = {name: count_parameters(model) for name, model in official.items()}
for name, n in OFFICIAL_PARAMS.items():
    print(f"{name:45s} {n:>13,d} parameters")
assert list(OFFICIAL_PARAMS.values()) == [182_546_755, 182_857_059, 2_801_601, 8_404_803]

# %% [markdown]
# This run's models, built from the parameters of section 1 (edit the cells above and re-run from here to train
# your own version):

# %%
def build_generator(stage: str) -> nn.Module:
    """This run's G1 + G2 for the "local" stage, else G1 alone (width 2 * NGF_LOCAL), on DEVICE."""
    if stage == "local":
        g = LocalEnhancer(IN_NC, 3, NGF_LOCAL, N_DOWNSAMPLE_GLOBAL, N_BLOCKS_GLOBAL, N_BLOCKS_LOCAL)
    else:
        g = GlobalGenerator(IN_NC, 3, 2 * NGF_LOCAL, N_DOWNSAMPLE_GLOBAL, N_BLOCKS_GLOBAL)
    return g.to(DEVICE)


def build_discriminator() -> MultiscaleDiscriminator:
    """This run's multi-scale discriminator on (input map, image) pairs, on DEVICE."""
    return MultiscaleDiscriminator(IN_NC + 3, NDF, N_LAYERS_D, NUM_D).to(DEVICE)


g_check, d_check = build_generator("local").cpu(), build_discriminator().cpu()
RUN_PARAMS = {"G1 + G2": count_parameters(g_check),
              "G1 inside it": count_parameters(g_check.global_features),
              "multi-scale D": count_parameters(d_check)}
for name, n in RUN_PARAMS.items():
    print(f"this run: {name:20s} {n:>12,d} parameters")
with torch.no_grad():
    fake_check = g_check(x_demo)
    d_out = d_check(x_demo, fake_check)
assert fake_check.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
assert len(d_out) == NUM_D and all(len(scale) == N_LAYERS_D + 2 for scale in d_out)
def patch_map_size(size: int) -> int:
    """k4 p2 convs map n pixels to n // stride + 1; strides 2 (N_LAYERS_D times), 1, 1."""
    for stride in [2] * N_LAYERS_D + [1, 1]:
        size = size // stride + 1
    return size


patch_maps = [tuple(scale[-1].shape[-2:]) for scale in d_out]
assert patch_maps == [(patch_map_size(IMAGE_SIZE // 2**k),) * 2 for k in range(NUM_D)]
print("patch maps per scale:", patch_maps)

# %% [markdown]
# ## 5. Losses
#
# LSGAN, with the ½ on each term of $\mathcal{L}_D$ and the scales summed. By hand, one scale with
# $D(s, x) = 0.9$ and $D(s, G(s)) = 0.2$: $\mathcal{L}_D = \tfrac12[(0.9-1)^2 + 0.2^2] = 0.025$ and
# $\mathcal{L}_\text{GAN} = (0.2 - 1)^2 = 0.64$.

# %% [helpers] losses: _as_list, lsgan_discriminator_loss, lsgan_generator_loss

# %% [markdown]
# Feature matching and the VGG loss: each term a mean absolute difference, weighted as in section 2.

# %% [helpers] pix2pixhd/losses: feature_matching_loss

# %% [helpers] pix2pixhd/losses: PIX2PIXHD_VGG_LAYERS, PIX2PIXHD_VGG_WEIGHTS, vgg_loss

# %% [helpers] pix2pixhd/losses: pix2pixhd_generator_loss

# %% [markdown]
# The VGG19 features are relu1_1 … relu5_1 of a frozen ImageNet VGG19, fed the raw $[-1, 1]$ image as the official
# code does (no ImageNet normalisation). Checks of the claims above: the hand-computed LSGAN values, and the
# feature-matching weights of section 2. They make $\mathcal{L}_\text{FM}$ independent of the number of scales and
# layers: a difference of 0.3 in every matched layer gives $\lambda_\text{feat} \cdot 4 \cdot 0.3 = 12$ with 3 scales of
# 4 layers, and also with 1 scale of 1 layer.

# %%
vgg = VGG19Features(list(PIX2PIXHD_VGG_LAYERS), pretrained=VGG_PRETRAINED, normalize_input=False)
vgg = vgg.to(DEVICE)
if not VGG_PRETRAINED:
    print("STAND-IN:", STAND_IN_NOTE)
    STAND_INS.append(STAND_IN_NOTE)
ROUNDING = 16 * torch.finfo(torch.float32).eps  # a few float32 roundings, relative
d_real_example, d_fake_example = torch.tensor([0.9]), torch.tensor([0.2])
loss_d_example = lsgan_discriminator_loss(d_real_example, d_fake_example).item()
assert math.isclose(loss_d_example, 0.025, rel_tol=ROUNDING)
assert math.isclose(lsgan_generator_loss(d_fake_example).item(), 0.64, rel_tol=ROUNDING)
for layers in (d_out, [d_out[0][-2:]]):  # this run's 3 scales x 4 layers, then 1 scale x 1 layer
    shifted = [[torch.full_like(t, 0.3) for t in scale] for scale in layers]
    zeros = [[torch.zeros_like(t) for t in scale] for scale in layers]
    fm_example = feature_matching_loss(shifted, zeros, LAMBDA_FEAT).item()
    assert math.isclose(fm_example, LAMBDA_FEAT * 4 * 0.3, rel_tol=ROUNDING), fm_example
with torch.no_grad():
    features = vgg(fake_check.to(DEVICE))
    d_other, features_other = d_check(x_demo, -fake_check), vgg(-fake_check.to(DEVICE))
    other = pix2pixhd_generator_loss(d_out, d_other, features, features_other)
print("G's loss terms, image vs its negative:", {k: round(v.item(), 4) for k, v in other.items()})

# %% [markdown]
# ## 6. Training
#
# ### The step
# Each iteration, as in the official code: one forward pass of $G$; $D$ on the real pair, on the fake pair (for
# $\mathcal{L}_\text{GAN}$ and $\mathcal{L}_\text{FM}$, so that their gradients reach $G$ through $D$) and on the
# detached fake pair (for $\mathcal{L}_D$); one Adam step of $G$, then one of $D$. On a GPU the step runs under
# `torch.autocast` (bf16 where the GPU has it, fp16 with a loss scaler on a T4); on a CPU in plain fp32.
# `EMULATE_T4=1` makes any device take a T4's choices, so a CPU runs the fp16 path too.
#
# The **loss scaler** (`torch.amp.GradScaler`) multiplies the loss by a scale $s$ before the backward pass, so
# that small fp16 gradients do not round to 0, and divides the gradients by $s$ before Adam. A step whose
# gradients overflow (fp16 stops at 65,504) is skipped and $s$ is halved. Here $s$ starts at $2^8$: at torch's
# default $2^{16}$, every gradient above 1 overflows, and this model's first steps would be lost.

# %% [helpers] pix2pixhd/train: pix2pixhd_train_step

# %% [markdown]
# ### An epoch, the two stages, a variant
# An epoch runs the step over the data; the losses stay on the device until the epoch ends (reading a loss at every
# step would make the CPU wait for the GPU each time). The **two-stage schedule**: stage 1 trains $G_1$ alone at
# half resolution; stage 2 builds $G_1 + G_2$ at full resolution, copies the trained $G_1$ in, keeps it frozen for
# the first `FIX_GLOBAL_EPOCHS` epochs (only $G_2$ learns), then trains all of $G$ with a freshly built Adam. The
# discriminator carries over. The learning rate is constant, then decays linearly (per stage).

# %% [helpers] pix2pixhd/train: pix2pixhd_train_epoch

# %% [helpers] pix2pixhd/train: Stage, two_stage_plan

# %% [markdown]
# Every epoch ends with a checkpoint in `RUN_DIR/checkpoints` holding G, D, both Adam states, the loss scaler, the
# run record (loss history, stopwatch, iterations, epoch, snapshots), each through its `state_dict`; calling
# `train_variant` again resumes from it, so a Colab disconnect costs at most one epoch. (In the Colab configuration a
# checkpoint is about 0.65 GB, two per variant: mind the space when `RUN_DIR` is on Google Drive.)

# %% [helpers] pix2pixhd/train: train_stage

# %% [helpers] pix2pixhd/train: train_variant

# %% [markdown]
# ### The runs
# One setup per variant (the ablation changes only the loss weights and the plan), and one function that trains,
# resumes or loads a variant. To show the resume path, a new main run is stopped once after
# `INTERRUPT_AFTER_EPOCHS` epochs (inside the frozen-G1 epochs of stage 2) and then resumed. Run the notebook
# again with the same `RUN_DIR` (the next day, or after a Colab reset with runs on Drive) and every finished run
# is loaded, not trained again: the output says "reusing the finished run". A run that stopped halfway says
# "resuming" and goes on from its last epoch.

# %%
snapshot_maps = {k: v[:SNAPSHOT_IMAGES] for k, v in preview.items()}
BASE_SETUP = TrainingSetup(train_loader, encode, snapshot_maps, vgg, lr=LR, betas=BETAS, fast=FAST,
                           snapshot_every=SNAPSHOT_EVERY)
CONFIG = {"dataset": DATASET, "n_train": len(train_set), "batch": BATCH_SIZE,
          "ngf_local": NGF_LOCAL, "n_down": N_DOWNSAMPLE_GLOBAL,
          "blocks": [N_BLOCKS_GLOBAL, N_BLOCKS_LOCAL], "ndf": NDF, "seed": SEED}


def plan_for(variant: dict) -> list[Stage]:
    """The two-stage plan, or for "G1 only" one stage at full size with the same epochs in all."""
    if variant["local"]:
        return two_stage_plan(IMAGE_SIZE, GLOBAL_EPOCHS, LOCAL_EPOCHS, FIX_GLOBAL_EPOCHS)
    epochs = (GLOBAL_EPOCHS[0] + LOCAL_EPOCHS[0], GLOBAL_EPOCHS[1] + LOCAL_EPOCHS[1])
    return [Stage("global", IMAGE_SIZE, epochs)]


def run_variant(key: str, stop_after: int | None = None) -> Trained:
    """Train, resume or just load variant `key` from RUN_DIR (every variant starts from SEED)."""
    seed_everything(SEED)
    variant = VARIANTS[key]
    setup = replace(BASE_SETUP, lambda_feat=variant["lambda_feat"],
                    lambda_vgg=variant["lambda_vgg"])
    return train_variant(key, plan_for(variant), build_generator, build_discriminator(), setup,
                         RUN_DIR, {**CONFIG, "variant": key}, stop_after)

# %%
if in_colab():
    %load_ext tensorboard
    %tensorboard --logdir {RUN_DIR / "tensorboard"}
if DEVICE.type == "cuda":
    torch.cuda.reset_peak_memory_stats(DEVICE)

TOTAL_EPOCHS = sum(GLOBAL_EPOCHS) + sum(LOCAL_EPOCHS)
saved = saved_epochs(MAIN_VARIANT, plan_for(VARIANTS[MAIN_VARIANT]), RUN_DIR)
if saved < INTERRUPT_AFTER_EPOCHS:  # a new run: stop it once, as a disconnect would
    interrupted = run_variant(MAIN_VARIANT, stop_after=INTERRUPT_AFTER_EPOCHS)
    assert not interrupted.complete
    assert interrupted.run.stopwatch.iterations == INTERRUPT_AFTER_EPOCHS * len(train_loader)
    print(f"stopped after epoch {INTERRUPT_AFTER_EPOCHS} of {TOTAL_EPOCHS} "
          f"({interrupted.run.stopwatch.iterations} iterations), as a disconnect would")
main = run_variant(MAIN_VARIANT)  # resumes from the last checkpoint, or reuses a finished run
if saved == TOTAL_EPOCHS:
    print("(the stop and the resume were shown when this run was trained; to see them again, "
          "set RUN_DIR to a new folder)")
assert main.complete
steps, _ = main.run.history.series("G/total")
assert steps == list(range(1, len(steps) + 1)), "the resumed history must continue without gaps"
assert main.run.stopwatch.iterations == TOTAL_EPOCHS * len(train_loader)
TRAINED_HERE = main.saved_before < TOTAL_EPOCHS  # False: an earlier Run all trained it
MAIN_PEAK_MB = peak_memory_mb(DEVICE) if DEVICE.type == "cuda" and TRAINED_HERE else None
seconds_per_iteration = main.run.stopwatch.seconds / main.run.stopwatch.iterations
print(f"main run: {main.run.stopwatch.iterations} iterations in {main.run.stopwatch.seconds:.1f} s "
      f"({seconds_per_iteration:.2f} s/iteration, data loading included)")
if MAIN_PEAK_MB is None:
    why = "no GPU here" if DEVICE.type != "cuda" else "this Run all reused the finished run"
    print(f"peak GPU memory: not measured ({why})")
else:
    print(f"peak GPU memory of the main run: {MAIN_PEAK_MB:,.0f} MiB (CUDA allocator)")
    if not SMOKE:  # section 1's claim: the Colab configuration fits a T4 (14.6 GiB usable)
        assert MAIN_PEAK_MB < 14.5 * 1024, f"{MAIN_PEAK_MB:,.0f} MiB would not fit a T4"

# %% [markdown]
# ### What a checkpoint holds
# Each stage has one checkpoint file, rewritten after every epoch. Resuming reads it back: the weights, both
# Adam states, the loss scaler, the losses so far and the epoch counter. Below: what the main run's files hold,
# and how many steps each Adam took. With fp16 the loss scaler skips a step whose gradients overflowed, so
# fewer Adam steps than iterations would mean lost training.

# %%
for stage in plan_for(VARIANTS[MAIN_VARIANT]):
    path = RUN_DIR / "checkpoints" / f"{MAIN_VARIANT}_{stage.name}.pt"
    saved_state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["state"]
    adam_steps = {name: max(int(s["step"]) for s in saved_state[name]["state"].values())
                  for name in ("opt_g", "opt_d")}
    print(f"{path.name}: {path.stat().st_size / 2**20:,.1f} MiB, epoch "
          f"{saved_state['run']['epoch']} of {sum(stage.epochs)}, "
          f"{saved_state['run']['step']} iterations in all, Adam steps {adam_steps}, "
          f"loss scale {saved_state['scaler'].get('scale', 'off (fp32 or bf16)')}")
    # stage 2 rebuilds G's Adam after the frozen-G1 epochs; D's Adam is new in each stage
    n = len(train_loader)
    expected = {"opt_g": (sum(stage.epochs) - stage.fix_global) * n, "opt_d": sum(stage.epochs) * n}
    for name, steps in expected.items():  # at most 1 % of the steps skipped by the loss scaler
        assert adam_steps[name] >= 0.99 * steps, f"{name} took {adam_steps[name]} of {steps} steps"

# %%
smooth = max(1, main.run.stopwatch.iterations // 60)  # moving average over ~1/60 of the run
plot_losses(main.run.history, ["G/total", "G/gan", "G/fm", "G/vgg"],
            "Generator loss terms (main run)", RUN_DIR / "losses_generator.png", smooth=smooth)
plot_losses(main.run.history, ["D/loss"], "Discriminator LSGAN loss (main run)",
            RUN_DIR / "losses_discriminator.png", smooth=smooth)
plot_losses(main.run.history, ["lr"], "Learning rate: constant, then linear decay, per stage",
            RUN_DIR / "learning_rate.png", ylabel="learning rate")
lrs = main.run.history.series("lr")[1]
assert lrs[0] == LR and min(lrs) < LR  # the decay happened
show_over_iterations(main.run.snapshots, "Held-out label maps through training (stage 1 at "
                     "half size, then stage 2)", RUN_DIR / "samples_over_iterations.png", nrow=2)

# %% [markdown]
# ## 7. Evaluation on held-out pairs
#
# PSNR ($10\log_{10}\frac{1}{\text{MSE}}$, dB, higher is better) and SSIM (Wang et al. 2004: 11×11 Gaussian window,
# 1 is identical) compare each output with its real photo, pixel by pixel, on images mapped from $[-1, 1]$ to
# $[0, 1]$: SSIM's luminance term $\frac{2\mu_x\mu_y + C_1}{\mu_x^2 + \mu_y^2 + C_1}$ is not shift-invariant, so on
# $[-1, 1]$ a mid-grey wall ($\mu \approx 0$) against the same wall 5 % brighter would score 0.04 instead of 0.995.
# A conditional GAN is not trying to reproduce the exact photo (many facades fit one label map), so these numbers
# reward blurry averages as much as realism; LPIPS (a learned perceptual distance, lower is better) is added where
# its AlexNet weights load.

# %%
def load_lpips():
    """torchmetrics' LPIPS (AlexNet), or None with the reason when its weights cannot load."""
    if LPIPS_NET is None:
        return None, "LPIPS skipped in smoke mode (its AlexNet weights would be downloaded)"
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        return LearnedPerceptualImagePatchSimilarity(net_type=LPIPS_NET).to(DEVICE), ""
    except Exception as err:  # no internet, or no weights
        return None, f"LPIPS skipped: its weights did not load ({err})"


LPIPS_MODEL, LPIPS_NOTE = load_lpips()
if LPIPS_NOTE:
    print(LPIPS_NOTE)
    STAND_INS.append(LPIPS_NOTE)


@torch.no_grad()
def evaluate(g: nn.Module) -> dict[str, float]:
    """Mean PSNR, SSIM (on [0, 1]) and LPIPS of G's outputs against the held-out photos."""
    g.eval()
    scores = {"PSNR (dB)": [], "SSIM": [], "LPIPS": []}
    for batch in test_loader:
        x, real = encode(batch, IMAGE_SIZE)
        fake = g(FAST.tensor(x)).float().clamp(-1, 1)
        fake01, real01 = (fake + 1) / 2, (real + 1) / 2
        scores["PSNR (dB)"] += psnr(fake01, real01).tolist()
        scores["SSIM"] += ssim(fake01, real01).tolist()
        if LPIPS_MODEL is not None:
            scores["LPIPS"] += [LPIPS_MODEL(f[None], r[None]).item() for f, r in zip(fake, real)]
    return {name: sum(v) / len(v) for name, v in scores.items() if v}

# %%
@torch.no_grad()
def outputs_for(g: nn.Module, batch: dict) -> torch.Tensor:
    """G's images (on the CPU) for a batch of maps."""
    g.eval()
    return g(FAST.tensor(encode(batch, IMAGE_SIZE)[0])).float().cpu()


scores = {MAIN_VARIANT: evaluate(main.G)}
print({k: round(v, 4) for k, v in scores[MAIN_VARIANT].items()})
assert all(math.isfinite(v) for v in scores[MAIN_VARIANT].values())
fig = show_rows({"input": input_picture(preview), "output G(s)": outputs_for(main.G, preview),
                 "target photo": preview["image"]},
                f"{VARIANTS[MAIN_VARIANT]['title']}: input | output | target (held-out)",
                RUN_DIR / "input_output_target.png", xlabel="held-out example")

# %% [markdown]
# ## 8. Ablation at the same budget
#
# Same data, same number of epochs (so the same number of generator updates), same seed:
# * **G1 + G2, GAN + FM + VGG**: the main run above.
# * **G1 only**: the global generator trained directly at full resolution for all the epochs (no local enhancer,
#   no two-stage schedule). It is cheaper per image in parameters, dearer in compute: every epoch is at full size.
# * **G1 + G2, GAN only**: $\lambda_\text{feat} = \lambda_\text{VGG} = 0$, the LSGAN term alone.
#
# In smoke mode each variant trains for a handful of iterations: the table only proves the code path, its numbers
# mean nothing. Measured results of a longer (still smoke-sized) offline run follow the table.

# %%
results = {MAIN_VARIANT: main}
for key in VARIANTS:
    if key not in results:
        results[key] = run_variant(key)
        scores[key] = evaluate(results[key].G)
ablation = pd.DataFrame([
    {"variant": VARIANTS[k]["title"], **{m: round(v, 4) for m, v in scores[k].items()},
     "G params": count_parameters(r.G), "iterations": r.run.stopwatch.iterations,
     "train s": round(r.run.stopwatch.seconds, 1)}
    for k, r in results.items()
]).set_index("variant")
display(ablation)
(RUN_DIR / "ablation.txt").write_text(ablation.to_string() + "\n")
budgets = {r.run.stopwatch.iterations for r in results.values()}
assert len(budgets) == 1, f"every variant gets the same budget, got {budgets} iterations"
fig = show_rows({"input": input_picture(preview),
                 **{VARIANTS[k]["title"]: outputs_for(r.G, preview) for k, r in results.items()},
                 "target photo": preview["image"]}, "Ablation on held-out label maps (same budget)",
                RUN_DIR / "ablation_grid.png", xlabel="held-out example")

# %% [markdown]
# ### Measured offline results: smoke-sized, not the meaningful ablation
#
# *Measured on a 2-core CPU shared with other jobs (so the times are inflated), with the smoke architecture and a
# random-weight VGG19 (no ImageNet weights offline); SSIM on [0, 1]; the date and the command are in
# experiments/RESULTS.md, section 05. The numbers compare the variants with one another at a toy size and one
# seed, nothing more: the meaningful ablation (procedural set at 128 px or more, full-mode width ratios, long
# enough that the order holds over two seeds) needs a GPU and has not been run.*
#
# G2 width 4, G1 width 8 with 3 downsamplings and 2 + 1 residual blocks, D width 8 × 3 scales, 32×32 images,
# batch 1, 4 epochs = 1,024 generator updates per variant, 64 held-out scenes, seed 0:
#
# | variant (same budget) | PSNR (dB) ↑ | SSIM ↑ | G parameters | training time (s) |
# |---|---|---|---|---|
# | G1 + G2, GAN + FM + VGG | **17.52** | **0.519** | 202,739 | 195 |
# | G1 only, GAN + FM + VGG | 14.86 | 0.319 | 200,195 | 210 |
# | G1 + G2, GAN only | 16.71 | 0.431 | 202,739 | 62 |
#
# At this toy budget the local enhancer with the two-stage schedule matters most (+2.7 dB, +0.20 SSIM over G1
# trained directly at full size, whose outputs stay noisy and checkered); dropping feature matching and the VGG term
# costs 0.8 dB and 0.09 SSIM (with a random-weight VGG, feature matching does most of that work). One seed and tiny
# models: small differences are within run-to-run noise. The GAN-only variant trains 3× faster here because it
# skips VGG19, the most expensive part of an iteration at this size. (SSIM computed on $[-1, 1]$ reads 0.435,
# 0.256 and 0.355 on the same outputs.)

# %% [markdown]
# ## 9. Speed: the plain step and the fast path
#
# The same step timed side by side (`time_per_step`: warm-up first, then synchronised timing) at this run's full
# size: the plain eager fp32 step a student would write, and the fast path this device gets. `make bench`
# (`experiments/bench_pix2pixhd.py`) does the same at the official configuration (1024×512, official widths), one
# row per option. On a CPU the fast path *is* the eager step, so there is one row. With `EMULATE_T4=1` the CPU also
# times a T4's fast path: fp16 is slower there, so that row proves the code runs, not that it pays.

# %%
def step_to_time(fast: FastPath) -> Callable[[], object]:
    """One training step of fresh main-configuration models at full size with the options `fast`."""
    seed_everything(SEED)
    G, D = fast.prepare(build_generator("local")), fast.prepare(build_discriminator())
    opt_g, opt_d = fast.adam(G.parameters(), LR, BETAS), fast.adam(D.parameters(), LR, BETAS)
    scaler = fast.grad_scaler(DEVICE)
    x, real = (fast.tensor(t) for t in encode(next(iter(train_loader)), IMAGE_SIZE))
    return lambda: pix2pixhd_train_step(G, D, vgg, opt_g, opt_d, scaler, x, real, LAMBDA_FEAT,
                                        LAMBDA_VGG, fast.amp_dtype)


paths = {"eager fp32": FastPath()}
if FAST != FastPath():
    paths[f"fast path: {FAST.describe()}"] = FAST
timings = {name: time_per_step(step_to_time(fast), DEVICE, TIMED_STEPS, warmup=1 if SMOKE else 5)
           for name, fast in paths.items()}
for name, t in timings.items():
    memory = f", peak {t['peak_memory_mb']:,.0f} MiB" if t["peak_memory_mb"] is not None else ""
    print(f"{name}: {t['ms_per_step']:,.1f} ms/step ({t['it_per_s']:.2f} steps/s{memory})")
if DEVICE.type == "cuda" and not SMOKE and len(timings) == 2:  # the claim: the fast path pays
    eager_ms, fast_ms = (t["ms_per_step"] for t in timings.values())
    assert fast_ms < eager_ms, f"fast path {fast_ms:.1f} ms/step, eager {eager_ms:.1f} ms/step"

# %% [markdown]
# ## 10. Reload the weights and generate
#
# A fresh generator, built from the parameters cell, loads the last checkpoint of the main run. It must hold the
# same weights and give the same images as the trained one, bit for bit. On a GPU, cuDNN may choose another
# algorithm for the same layer from one call to the next, and some algorithms add in a varying order. So the
# comparison asks cuDNN for deterministic algorithms.

# %%
@contextlib.contextmanager
def deterministic_kernels():
    """cuDNN without autotuning and with deterministic algorithms: same weights, same bits."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


final_checkpoint = RUN_DIR / "checkpoints" / f"{MAIN_VARIANT}_local.pt"
fresh_g = build_generator("local")
info = load_checkpoint(final_checkpoint, {"G": fresh_g}, map_location=DEVICE, restore_rng=False)
trained_weights = main.G.state_dict()
assert all(torch.equal(w, trained_weights[k]) for k, w in fresh_g.state_dict().items())
with deterministic_kernels():
    reloaded, trained = outputs_for(fresh_g, preview), outputs_for(main.G, preview)
if FAST.compile:  # the compiled G fuses operations, so it rounds differently
    print(f"compiled G: largest difference {(reloaded - trained).abs().max():.1e}")
else:
    assert torch.equal(reloaded, trained), "reloaded G differs from the trained G"
print(f"reloaded '{final_checkpoint.name}' (iteration {info['step']}): weights and outputs match")
show_grid(torch.cat([input_picture(preview), reloaded]), "Reloaded generator: label maps (top) and "
          "its images (bottom)", RUN_DIR / "reloaded_samples.png", nrow=len(reloaded))

# %% [markdown]
# ## 11. Metrics
# Everything above lands in `metrics.json`: quality per variant, training time and throughput, the step timings,
# the measured peak GPU memory (none on a CPU) and the stand-ins this run used.

# %%
total_iterations = sum(r.run.stopwatch.iterations for r in results.values())
total_seconds = sum(r.run.stopwatch.seconds for r in results.values())
metrics_path = write_metrics(
    RUN_DIR, NOTEBOOK, SMOKE, DEVICE, iterations=total_iterations, seconds=total_seconds,
    throughput={"it_per_s": total_iterations / total_seconds,
                "img_per_s": sum(r.run.stopwatch.images for r in results.values()) / total_seconds},
    quality=scores, stand_ins=STAND_INS, dataset=DATASET, image_size=IMAGE_SIZE,
    parameters_official=OFFICIAL_PARAMS, parameters_this_run=RUN_PARAMS, fast_path=FAST.describe(),
    step_timings=timings, main_run_peak_gpu_mb=MAIN_PEAK_MB,
    seconds_per_iteration_main=main.run.stopwatch.seconds / main.run.stopwatch.iterations,
)
print(metrics_path.read_text())

# %% [markdown]
# ## What to take away
# * Pix2PixHD is a conditional GAN made of plain parts: residual generators with instance norm, a coarse-to-fine
#   split (the global generator sees the half-size map, the local enhancer adds full-resolution detail), and three
#   PatchGANs that judge realism at three scales.
# * Its generator loss is mostly *not* adversarial: feature matching in the discriminators' layers and the VGG
#   perceptual loss carry the content, the LSGAN term the realism. Compare the loss terms' sizes in the plot.
# * Training in stages (G1 first, G1 frozen while G2 starts, then jointly with a fresh Adam) is ordinary code: a
#   plan of stages, one checkpoint per epoch, and a resume that continues exactly where it stopped.
# * Pixel metrics (PSNR, SSIM) reward the average photo for a map; compute SSIM on [0, 1] images, or it is wrong.
# * A speed option is a hypothesis until the step is timed beside the plain one (section 9, `make bench`), and
#   checked: with channels-last tensors, torch's CPU InstanceNorm returns wrong gradients at batch 1 (a unit test
#   shows it), which is why the fast path here leaves channels-last off.

# %% [markdown]
# ## What to try next
# * Train the main variant at the official widths (`NGF_LOCAL = 32`, `NDF = 64`) on a larger GPU, or at 512×512.
# * `DATASET = "procedural_sketch"`: the same scenes as black-on-white sketches (`label_nc = 0`, RGB input).
# * Change `FIX_GLOBAL_EPOCHS` (0: no frozen phase) and compare the held-out SSIM and the samples over iterations.
# * Replace instance norm by group norm in the cells of section 4 and compare quality and speed.
# * Set `COMPILE = True` on a GPU and compare the two rows of section 9 (and `make bench`'s table).
# * Add the paper's instance-wise feature encoder (section 3.4 of the paper) for multi-modal outputs.
