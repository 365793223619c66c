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
# **Run time.** Colab T4, full mode (CMP Facades at 256×256, three trained variants): about 20 to 40 minutes
# (an estimate from FLOP counts and the CPU timing below; not measured: no GPU was available when it was written).
# CPU smoke mode (`SMOKE=1`, tiny models, 32×32 toy data): about 1 minute on 2 cores.

# %% SETUP

# %%
import math
import os

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from helpers.environment import data_dir, describe_device, in_colab, pick_device, run_dir, seed_everything, smoke_mode
from helpers.losses import (PIX2PIXHD_VGG_LAYERS, feature_matching_loss, lsgan_discriminator_loss,
                            pix2pixhd_generator_loss, vgg_loss)
from helpers.pix2pixhd import (
    CMP_FACADES_CLASSES, GlobalGenerator, LocalEnhancer, MultiscaleDiscriminator, NLayerDiscriminator,
    PairedFolderDataset, ProceduralLabelImages, ResnetBlock, check_image_size, colorize_labels,
    download_cmp_facades, encode_input, input_channels, instance_edges, label_sketch, linear_decay_lr, one_hot_labels,
    set_lr,
)
from helpers.plotting import (image_grid, plot_losses, save_figure, show_grid, show_over_iterations, show_panels,
                              show_rows, show_source)
from helpers.metrics import psnr, ssim
from helpers.training import (History, Stopwatch, count_parameters, load_checkpoint, peak_memory_mb, save_checkpoint,
                              write_metrics)
from helpers.vgg import STAND_IN_NOTE, VGG19Features

torch.set_flush_denormal(True)  # CPU: tiny activations at the bottleneck otherwise slow convolutions ~10x

# %%
SMOKE = smoke_mode()
DEVICE = pick_device()
RUN = run_dir("05_pix2pixhd")
SEED = 0
seed_everything(SEED)

# Data: "cmp_facades" (CMP Facade Database, label maps -> photos, downloaded), "procedural" (offline toy streets,
# label maps + instance maps) or "procedural_sketch" (the same streets drawn as black-on-white RGB sketches)
DATASET = os.environ.get("PIX2PIXHD_DATASET", "procedural" if SMOKE else "cmp_facades")
IMAGE_SIZE = 32 if SMOKE else 256            # full resolution (local enhancer); the global stage runs at half of it
N_TRAIN = int(os.environ.get("PIX2PIXHD_N_TRAIN", 2 if SMOKE else 800))  # procedural data only; the env variables
N_TEST = int(os.environ.get("PIX2PIXHD_N_TEST", 4 if SMOKE else 100))     # serve the longer offline CPU run (sec. 7)
N_TEST_FACADES = 50                          # the last 50 facades (sorted by name) are held out
BATCH_SIZE = 1 if SMOKE else 4                # official: 1
NUM_WORKERS = 0 if SMOKE else 2

# Architecture. Official defaults: G1 width 64, G2 width 32, 9 + 3 residual blocks, D width 64, 3 layers, 3 scales.
# The Colab-T4 configuration is the same classes with half the generator width (G2 16, G1 32).
NGF_LOCAL = 4 if SMOKE else 16               # G2 width; G1 is built with 2 * NGF_LOCAL (official: 32 -> 64)
N_DOWNSAMPLE_GLOBAL = 3 if SMOKE else 4      # official 4 (smoke: 3, so that 32x32 images fit)
N_BLOCKS_GLOBAL = 2 if SMOKE else 9          # official 9
N_BLOCKS_LOCAL = 1 if SMOKE else 3           # official 3
NDF = 8 if SMOKE else 64                     # official 64
N_LAYERS_D = 3                               # official 3
NUM_D = 3                                    # the paper's 3 scales

# Losses (the paper's weights)
LAMBDA_FEAT = 10.0
LAMBDA_VGG = 10.0
VGG_PRETRAINED = not SMOKE                   # smoke: random-weight VGG19 (offline stand-in)

# Optimiser and the two-stage schedule (epochs: constant LR, then linear decay to 0); official: 100 + 100 each
LR, BETAS = 2e-4, (0.5, 0.999)
GLOBAL_EPOCHS = (0, 2) if SMOKE else (20, 20)    # stage 1: G1 alone at IMAGE_SIZE / 2
LOCAL_EPOCHS = (1, 1) if SMOKE else (10, 10)     # stage 2: G1 + G2 at IMAGE_SIZE
FIX_GLOBAL_EPOCHS = 1 if SMOKE else 5            # stage 2 keeps G1 frozen for its first epochs (official: 10)
INTERRUPT_AFTER_EPOCHS = 1                       # the main run is stopped here once and resumed (see Training)
USE_AMP = DEVICE.type == "cuda"
SNAPSHOT_IMAGES = 4                              # held-out maps drawn after every SNAPSHOT_EVERY epochs
SNAPSHOT_EVERY = 1 if SMOKE else 10
LPIPS_NET = None if SMOKE else "alex"            # LPIPS needs AlexNet ImageNet weights (download); None skips it

VARIANTS = {  # the ablation: every variant gets the same number of epochs (and so of generator updates)
    "g1_g2_full": {"title": "G1 + G2, GAN + FM + VGG", "local": True, "lambda_feat": LAMBDA_FEAT,
                   "lambda_vgg": LAMBDA_VGG},
    "g1_only_full": {"title": "G1 only, GAN + FM + VGG", "local": False, "lambda_feat": LAMBDA_FEAT,
                     "lambda_vgg": LAMBDA_VGG},
    "g1_g2_gan_only": {"title": "G1 + G2, GAN only", "local": True, "lambda_feat": 0.0, "lambda_vgg": 0.0},
}
MAIN_VARIANT = "g1_g2_full"
STAND_INS: list[str] = []
print(f"mode: {'smoke' if SMOKE else 'full'}, device: {describe_device(DEVICE)}, run dir: {RUN}, data: {DATASET}")
print(f"images {IMAGE_SIZE}x{IMAGE_SIZE} (global stage {IMAGE_SIZE // 2}), batch {BATCH_SIZE}, AMP: {USE_AMP}")

# %% [markdown]
# ## 1. The model in formulas
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
# of 2048×1024 Cityscapes. (4) Native `torch.autocast` mixed precision instead of apex.

# %% [markdown]
# ## 2. Data
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
    SKETCH = DATASET == "procedural_sketch"  # label_nc 0: the RGB sketch feeds G directly, as pix2pixHD's label_nc 0
    LABEL_NC, USE_INSTANCE = (0, False) if SKETCH else (train_set.label_nc, True)
    CLASS_NAMES = train_set.class_names
    STAND_INS.append(f"procedural toy-street {'sketches' if SKETCH else 'label maps'} ({N_TRAIN} train / {N_TEST} "
                     "test) instead of CMP Facades")
elif DATASET == "cmp_facades":
    folder = download_cmp_facades(data_dir())
    names = sorted(p.stem for p in folder.glob("*.jpg"))
    LABEL_NC, USE_INSTANCE, CLASS_NAMES = len(CMP_FACADES_CLASSES), False, CMP_FACADES_CLASSES
    train_set = PairedFolderDataset(folder, folder, IMAGE_SIZE, LABEL_NC, names=names[:-N_TEST_FACADES])
    test_set = PairedFolderDataset(folder, folder, IMAGE_SIZE, LABEL_NC, names=names[-N_TEST_FACADES:])
else:
    raise ValueError(f"DATASET={DATASET!r} is not known; use 'cmp_facades' (download), 'procedural' or "
                     "'procedural_sketch' (offline)")
if DATASET != "cmp_facades":
    print("STAND-IN:", STAND_INS[-1])
IN_NC = input_channels(LABEL_NC, USE_INSTANCE)
check_image_size(IMAGE_SIZE, IMAGE_SIZE, 32, "IMAGE_SIZE")
train_loader = DataLoader(train_set, BATCH_SIZE, shuffle=True, num_workers=NUM_WORKERS, drop_last=True)
test_loader = DataLoader(test_set, BATCH_SIZE, shuffle=False, num_workers=NUM_WORKERS)
print(f"{len(train_set)} training pairs, {len(test_set)} held-out pairs, {len(CLASS_NAMES)} classes "
      f"({', '.join(CLASS_NAMES)}), generator input: {IN_NC} channels")


def make_input(batch: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a batch to `size` (maps: nearest, photos: area) and encode it: (input map, target photo) on DEVICE."""
    label, image, instance = batch["label"][:, None].float(), batch["image"], batch.get("instance")
    if label.shape[-1] != size:
        label = F.interpolate(label, size=(size, size), mode="nearest")
        image = F.interpolate(image, size=(size, size), mode="area")
        if instance is not None:
            instance = F.interpolate(instance[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    label = label[:, 0].long()
    if LABEL_NC == 0:
        x = encode_input(label_sketch(label, instance), 0)
    else:
        x = encode_input(label, LABEL_NC, instance if USE_INSTANCE else None)
    return x.to(DEVICE), image.to(DEVICE)


def input_picture(batch: dict) -> torch.Tensor:
    """What G gets, as a picture: the label map in class colours, or the sketch itself."""
    if LABEL_NC == 0:
        return make_input(batch, batch["image"].shape[-1])[0].cpu()
    return colorize_labels(batch["label"], LABEL_NC)


preview = next(iter(DataLoader(test_set, 6)))
panels = {"input (label map: colours = classes)" if LABEL_NC else "input (RGB sketch)": input_picture(preview)}
if USE_INSTANCE:
    panels["instance edges"] = instance_edges(preview["instance"]).repeat(1, 3, 1, 1) * 2 - 1
panels["photo (target)"] = preview["image"]
fig = show_panels(panels, f"{DATASET}: what the generator sees and what it must draw", RUN / "data_preview.png",
                  nrow=3)
assert preview["image"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and preview["label"].dtype == torch.long

# %% [markdown]
# The input encoding: a one-hot plane per class, and one plane that is 1 wherever a pixel's instance id differs
# from one of its 4 neighbours. An RGB sketch or edge map (`label_nc = 0`) feeds the generator as it is.
# Bad inputs stop with a message that says what to do:

# %%
x_demo = make_input({k: v[:2] for k, v in preview.items()}, IMAGE_SIZE)[0].cpu()
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
# ## 3. The networks
#
# The classes live in `helpers/pix2pixhd.py`; read them here.

# %%
show_source(ResnetBlock)

# %%
show_source(GlobalGenerator)

# %%
show_source(LocalEnhancer)

# %%
show_source(NLayerDiscriminator)

# %%
show_source(MultiscaleDiscriminator)

# %% [markdown]
# **Parameter counts at the official defaults** (Cityscapes: 35 classes + 1 edge channel = 36 input channels;
# built on PyTorch's `meta` device, so nothing is allocated), then the configuration this run trains.

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


def build_generator(local: bool) -> torch.nn.Module:
    """This run's G1 + G2 (local=True) or G1 alone at 2 * NGF_LOCAL width."""
    if local:
        return LocalEnhancer(IN_NC, 3, NGF_LOCAL, N_DOWNSAMPLE_GLOBAL, N_BLOCKS_GLOBAL, N_BLOCKS_LOCAL)
    return GlobalGenerator(IN_NC, 3, 2 * NGF_LOCAL, N_DOWNSAMPLE_GLOBAL, N_BLOCKS_GLOBAL)


def build_discriminator() -> MultiscaleDiscriminator:
    """This run's multi-scale discriminator on (input map, image) pairs."""
    return MultiscaleDiscriminator(IN_NC + 3, NDF, N_LAYERS_D, NUM_D)


g_check, d_check = build_generator(True), build_discriminator()
RUN_PARAMS = {"G1 + G2": count_parameters(g_check), "G1 (inside G1 + G2)": count_parameters(g_check.global_features),
              "multi-scale D": count_parameters(d_check)}
for name, n in RUN_PARAMS.items():
    print(f"this run: {name:30s} {n:>12,d} parameters")
with torch.no_grad():
    fake_check = g_check(x_demo)
    d_out = d_check(x_demo, fake_check)
assert fake_check.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and fake_check.abs().max() <= 1
assert len(d_out) == NUM_D and all(len(scale) == N_LAYERS_D + 2 for scale in d_out)
assert d_out[1][-1].shape[-1] < d_out[0][-1].shape[-1]  # the 1/2-scale patch map is smaller
print("patch maps per scale:", [tuple(scale[-1].shape[-2:]) for scale in d_out])

# %% [markdown]
# **Memory of the Colab-T4 configuration (an estimate, not a measurement).** Training keeps, in fp32, the weights,
# their gradients and Adam's two moments (16 bytes per trainable parameter), plus the activations saved for the
# backward pass. We count the activation elements with forward hooks on the `meta` device (shapes only) for one batch
# of G, three discriminator passes and two VGG passes, and count them at 2 bytes (fp16 under autocast) plus 50% for
# the tensors autograd saves beside layer outputs. On a GPU the training cell below prints the measured peak.

# %%
def activation_elements(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Elements of every leaf module's output in one forward pass (shapes only on the meta device)."""
    counts: list[int] = []
    leaves = [m for m in module.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda _m, _i, out: counts.append(out.numel())) for m in leaves]
    module(*inputs)
    for hook in hooks:
        hook.remove()
    return sum(counts)


def estimate_training_gb(size: int, batch: int, ngf_local: int, ndf: int, in_nc: int) -> float:
    """Rough GPU memory (GB) of one training step of G1 + G2 at `size` with AMP, from parameter/activation counts."""
    with torch.device("meta"):
        g = LocalEnhancer(in_nc, 3, ngf_local, 4, 9, 3)
        d = MultiscaleDiscriminator(in_nc + 3, ndf, N_LAYERS_D, NUM_D)
        vgg_meta = VGG19Features(list(PIX2PIXHD_VGG_LAYERS), pretrained=False, normalize_input=False)
        x, img = torch.empty(batch, in_nc, size, size), torch.empty(batch, 3, size, size)
        acts = activation_elements(g, x) + 3 * activation_elements(d, x, img) + 2 * activation_elements(vgg_meta, img)
    weights = 16 * (count_parameters(g) + count_parameters(d)) + 4 * count_parameters(vgg_meta)
    return (weights + 2 * 1.5 * acts) / 1e9


COLAB_CONFIG = {"size": 256, "batch": 4, "ngf_local": 16, "ndf": 64, "in_nc": len(CMP_FACADES_CLASSES)}
MEMORY_ESTIMATE_GB = estimate_training_gb(**COLAB_CONFIG)
print(f"Colab-T4 configuration {COLAB_CONFIG}: about {MEMORY_ESTIMATE_GB:.1f} GB of GPU memory "
      "(estimate; the free T4 has 15 GB)")
assert MEMORY_ESTIMATE_GB < 15

# %% [markdown]
# ## 4. Losses
#
# LSGAN ($\mathcal{L}_D$ with the ½ on each term; $\mathcal{L}_\text{GAN}$ summed over scales) comes from the shared
# section of `helpers/losses.py`; feature matching, the VGG loss and $\mathcal{L}_G$ are pix2pixHD's section:

# %%
show_source(feature_matching_loss)

# %%
show_source(vgg_loss)

# %%
show_source(pix2pixhd_generator_loss)

# %% [markdown]
# The VGG19 features are relu1_1 … relu5_1 of a frozen ImageNet VGG19, fed the raw $[-1, 1]$ image as the official
# code does (no ImageNet normalisation).

# %%
vgg = VGG19Features(list(PIX2PIXHD_VGG_LAYERS), pretrained=VGG_PRETRAINED, normalize_input=False).to(DEVICE)
if not VGG_PRETRAINED:
    print("STAND-IN:", STAND_IN_NOTE)
    STAND_INS.append(STAND_IN_NOTE)
with torch.no_grad():
    same = pix2pixhd_generator_loss(d_out, d_out, vgg(fake_check.to(DEVICE)), vgg(fake_check.to(DEVICE)))
assert same["fm"].item() == 0 and same["vgg"].item() == 0  # identical features: nothing to match
print({k: round(v.item(), 4) for k, v in same.items()})

# %% [markdown]
# ## 5. Training
#
# Each iteration, as in the official code: one forward pass of $G$; $D$ on the real pair, on the detached fake pair
# (for $\mathcal{L}_D$) and on the fake pair (for $\mathcal{L}_\text{GAN}$ and $\mathcal{L}_\text{FM}$); one Adam step
# of $G$, then one of $D$. The learning rate is constant, then decays linearly to 0.
#
# The **two-stage schedule**: stage 1 trains $G_1$ alone at half resolution; stage 2 builds $G_1 + G_2$ at full
# resolution, copies the trained $G_1$ in, keeps it frozen for the first `FIX_GLOBAL_EPOCHS` epochs (only $G_2$
# learns), then trains all of $G$ with a freshly built Adam. The discriminator carries over.
#
# Every epoch ends with a checkpoint in `RUN_DIR` (G, D and both Adam states: about 0.65 GB per stage and variant in
# the Colab configuration, so mind the space if `RUN_DIR` is on Google Drive); calling `run_variant` again resumes
# from it (a Colab disconnect costs at most one epoch). To show that path on every run, the main run below is stopped after
# `INTERRUPT_AFTER_EPOCHS` epoch(s) and then resumed.

# %%
def stage_plan(variant: dict) -> list[tuple[str, int, tuple[int, int], int]]:
    """(stage, image size, (constant, decay) epochs, frozen-G1 epochs) of a variant; G1 alone gets the same epochs."""
    if variant["local"]:
        return [("global", IMAGE_SIZE // 2, GLOBAL_EPOCHS, 0), ("local", IMAGE_SIZE, LOCAL_EPOCHS, FIX_GLOBAL_EPOCHS)]
    total = (GLOBAL_EPOCHS[0] + LOCAL_EPOCHS[0], GLOBAL_EPOCHS[1] + LOCAL_EPOCHS[1])
    return [("global", IMAGE_SIZE, total, 0)]


def train_step(g, d, opt_g, opt_d, scaler, x, real, variant: dict) -> dict[str, float]:
    """One G step then one D step from the same forward pass; returns the loss terms."""
    with torch.autocast(DEVICE.type, dtype=torch.float16, enabled=USE_AMP):
        fake = g(x)
        d_real = d(x, real)
        d_fake_for_d = d(x, fake.detach())
        d_fake = d(x, fake)
        vgg_fake = vgg_real = None
        if variant["lambda_vgg"]:
            vgg_fake = vgg(fake)
            with torch.no_grad():
                vgg_real = vgg(real)
        g_terms = pix2pixhd_generator_loss(d_fake, d_real, vgg_fake, vgg_real,
                                           variant["lambda_feat"], variant["lambda_vgg"])
        loss_d = lsgan_discriminator_loss([s[-1] for s in d_real], [s[-1] for s in d_fake_for_d])
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(g_terms["total"]).backward()
    scaler.step(opt_g)
    opt_d.zero_grad(set_to_none=True)  # also drops the gradients G's loss left in D
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)
    scaler.update()
    return {**{f"G/{k}": v.item() for k, v in g_terms.items()}, "D/loss": loss_d.item()}


def adam(params) -> torch.optim.Adam:
    """The paper's optimiser."""
    return torch.optim.Adam(params, lr=LR, betas=BETAS)


def train_stage(key: str, stage: str, size: int, epochs: tuple[int, int], fix: int, g, d, log: dict,
                stop_after: int | None) -> bool:
    """Train one stage of a variant from its last checkpoint; False if stopped early at `stop_after` epochs."""
    variant, path = VARIANTS[key], RUN / "checkpoints" / f"{key}_{stage}.pt"
    n_epochs = sum(epochs)
    opt_g, opt_d = adam(g.parameters()), adam(d.parameters())  # frozen G1 gets no gradient, so Adam skips it
    scaler = torch.amp.GradScaler("cuda", enabled=USE_AMP)
    config = {"variant": key, "stage": stage, "size": size, "epochs": list(epochs), "fix": fix, "ngf": NGF_LOCAL,
              "ndf": NDF, "blocks": [N_BLOCKS_GLOBAL, N_BLOCKS_LOCAL], "n_down": N_DOWNSAMPLE_GLOBAL,
              "dataset": DATASET, "n_train": len(train_set), "batch": BATCH_SIZE}
    start = 0
    if path.is_file():
        state = load_checkpoint(path, {"G": g, "D": d, "opt_g": opt_g, "opt_d": opt_d}, config, map_location=DEVICE)
        start = state["extra"]["epoch"]
        log["history"].load_state_dict(state["extra"]["history"])
        log["watch"].__dict__.update(state["extra"]["watch"])
        log["snapshots"] = state["extra"]["snapshots"]
        print(f"{key}/{stage}: resumed from '{path.name}' after epoch {start}/{n_epochs}")
    watch, history = log["watch"], log["history"]
    bar = tqdm(total=(n_epochs - start) * len(train_loader), desc=f"{key}/{stage} {size}px", leave=False)
    for epoch in range(start, n_epochs):
        if stop_after is not None and epoch >= stop_after:
            bar.close()
            return False
        if stage == "local":
            g.freeze_global(epoch < fix)
            if fix and epoch == fix:
                opt_g = adam(g.parameters())  # the official code rebuilds Adam over all of G here
        lr = linear_decay_lr(epoch, LR, *epochs)
        set_lr(opt_g, lr)
        set_lr(opt_d, lr)
        g.train()
        for batch in train_loader:
            x, real = make_input(batch, size)
            with watch:
                losses = train_step(g, d, opt_g, opt_d, scaler, x, real, variant)
            watch.count(1, len(real))
            history.log(watch.iterations, lr=lr, **losses)
            bar.update()
            bar.set_postfix(G=f"{losses['G/total']:.2f}", D=f"{losses['D/loss']:.3f}")
        if (epoch + 1) % SNAPSHOT_EVERY == 0 or epoch + 1 == n_epochs:
            g.eval()
            with torch.no_grad():
                log["snapshots"][watch.iterations] = g(make_input(preview, size)[0][:SNAPSHOT_IMAGES]).float().cpu()
        history.flush()
        save_checkpoint(path, {"G": g, "D": d, "opt_g": opt_g, "opt_d": opt_d}, step=watch.iterations, config=config,
                        extra={"epoch": epoch + 1, "history": history.state_dict(), "snapshots": log["snapshots"],
                               "watch": {k: getattr(watch, k) for k in ("seconds", "iterations", "images")}})
    bar.close()
    if stage == "local":
        g.freeze_global(False)
    return True


def run_variant(key: str, stop_after: int | None = None) -> dict:
    """Train (or resume, or just load) every stage of a variant; returns G, D, history, stopwatch and snapshots."""
    seed_everything(SEED)
    log = {"history": History(RUN / "tensorboard" / key), "watch": Stopwatch(), "snapshots": {}}
    g, d = None, build_discriminator().to(DEVICE)
    for stage, size, epochs, fix in stage_plan(VARIANTS[key]):
        trained_g1 = g
        g = build_generator(stage == "local").to(DEVICE)
        if trained_g1 is not None:
            g.load_global(trained_g1)
        if not train_stage(key, stage, size, epochs, fix, g, d, log, stop_after):
            return {**log, "G": g, "D": d, "complete": False}
    return {**log, "G": g, "D": d, "complete": True}

# %%
if in_colab():
    get_ipython().run_line_magic("load_ext", "tensorboard")
    get_ipython().run_line_magic("tensorboard", f"--logdir {RUN / 'tensorboard'}")

interrupted = run_variant(MAIN_VARIANT, stop_after=INTERRUPT_AFTER_EPOCHS)
main = run_variant(MAIN_VARIANT)  # resumes from the checkpoint the interrupted run left
assert main["complete"]
steps, _ = main["history"].series("G/total")
assert steps == list(range(1, len(steps) + 1)), "the resumed history must continue without gaps"
assert main["watch"].iterations == (sum(GLOBAL_EPOCHS) + sum(LOCAL_EPOCHS)) * len(train_loader)
print(f"main run: {main['watch'].iterations} iterations in {main['watch'].seconds:.1f} s "
      f"({main['watch'].seconds / main['watch'].iterations:.2f} s/iteration), "
      f"peak memory {peak_memory_mb(DEVICE):,.0f} MiB ({'GPU allocator' if DEVICE.type == 'cuda' else 'process RSS'})")

# %%
smooth = max(1, main["watch"].iterations // 60)  # moving average over ~1/60 of the run
plot_losses(main["history"], ["G/total", "G/gan", "G/fm", "G/vgg"], "Generator loss terms (main run)",
            RUN / "losses_generator.png", smooth=smooth)
plot_losses(main["history"], ["D/loss"], "Discriminator LSGAN loss (main run)", RUN / "losses_discriminator.png",
            smooth=smooth)
plot_losses(main["history"], ["lr"], "Learning rate: constant, then linear decay, per stage",
            RUN / "learning_rate.png", ylabel="learning rate")
lrs = main["history"].series("lr")[1]
assert lrs[0] == LR and min(lrs) < LR  # the decay happened
show_over_iterations(main["snapshots"], "Held-out label maps through training (stage 1 at half size, then stage 2)",
                     RUN / "samples_over_iterations.png", nrow=2)

# %% [markdown]
# ## 6. Evaluation on held-out pairs
#
# PSNR ($10\log_{10}\frac{2^2}{\text{MSE}}$ for images in $[-1,1]$, dB, higher is better) and SSIM (11×11 Gaussian
# window, 1 is identical) compare each output with its real photo, pixel by pixel. A conditional GAN is not trying to
# reproduce the exact photo (many facades fit one label map), so these numbers reward blurry averages as much as
# realism; LPIPS (a learned perceptual distance, lower is better) is added where its AlexNet weights load.

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
def evaluate(g) -> dict[str, float]:
    """Mean PSNR, SSIM (and LPIPS) of G's outputs against the held-out photos at full size."""
    g.eval()
    scores = {"PSNR (dB)": [], "SSIM": [], "LPIPS": []}
    for batch in test_loader:
        x, real = make_input(batch, IMAGE_SIZE)
        fake = g(x).float().clamp(-1, 1)
        fake01, real01 = (fake + 1) / 2, (real + 1) / 2  # PSNR and SSIM are defined on [0, 1]
        scores["PSNR (dB)"] += psnr(fake01, real01).tolist()
        scores["SSIM"] += ssim(fake01, real01).tolist()
        if LPIPS_MODEL is not None:
            scores["LPIPS"] += [LPIPS_MODEL(f[None], r[None]).item() for f, r in zip(fake, real)]
    return {name: sum(v) / len(v) for name, v in scores.items() if v}


@torch.no_grad()
def outputs_for(g, batch: dict) -> torch.Tensor:
    """G's images for a batch of maps."""
    g.eval()
    return g(make_input(batch, IMAGE_SIZE)[0]).float().cpu()


main["scores"] = evaluate(main["G"])
print({k: round(v, 4) for k, v in main["scores"].items()})
assert all(math.isfinite(v) for v in main["scores"].values())
fig = show_rows({"input": input_picture(preview),
                 "output G(s)": outputs_for(main["G"], preview), "target photo": preview["image"]},
                f"{VARIANTS[MAIN_VARIANT]['title']}: input | output | target (held-out)", RUN / "input_output_target.png",
                xlabel="held-out example")

# %% [markdown]
# ## 7. Ablation at the same budget
#
# Same data, same number of epochs (so the same number of generator updates), same seed:
# * **G1 + G2, GAN + FM + VGG**: the main run above.
# * **G1 only**: the global generator trained directly at full resolution for all the epochs (no local enhancer,
#   no two-stage schedule). It is cheaper per image in parameters, dearer in compute: every epoch is at full size.
# * **G1 + G2, GAN only**: $\lambda_\text{feat} = \lambda_\text{VGG} = 0$, the LSGAN term alone.
#
# In smoke mode each variant trains for a handful of iterations: the table only proves the code path, its numbers
# mean nothing. Measured results of a longer offline run are in the next section.

# %%
results = {MAIN_VARIANT: main}
for key in VARIANTS:
    if key not in results:
        results[key] = run_variant(key)
        results[key]["scores"] = evaluate(results[key]["G"])
ablation = pd.DataFrame([
    {"variant": VARIANTS[k]["title"], **{m: round(v, 4) for m, v in r["scores"].items()},
     "G params": count_parameters(r["G"]), "iterations": r["watch"].iterations,
     "train s": round(r["watch"].seconds, 1)}
    for k, r in results.items()
]).set_index("variant")
display(ablation)
(RUN / "ablation.txt").write_text(ablation.to_string() + "\n")
assert len({r["watch"].iterations for r in results.values()}) == 1, "every variant gets the same budget"
fig = show_rows({"input": input_picture(preview),
                 **{VARIANTS[k]["title"]: outputs_for(r["G"], preview) for k, r in results.items()},
                 "target photo": preview["image"]}, "Ablation on held-out label maps (same budget)",
                RUN / "ablation_grid.png", xlabel="held-out example")

# %% [markdown]
# ### Measured offline results (CPU, procedural data, random-weight VGG)
#
# *Measured outside CI on 2026-11-23, on the 2-core CPU of the build machine, which four other jobs were sharing
# (times are inflated and uneven). Toy-street data and a random-weight VGG19 (no ImageNet weights offline): the
# numbers compare the variants with one another, nothing more.* Command (smoke architecture, more data):
#
# ```
# SMOKE=1 PIX2PIXHD_N_TRAIN=256 PIX2PIXHD_N_TEST=64 DATA_DIR=data RUN_DIR=/tmp/p2p/offline MPLBACKEND=Agg \
#   python tools/execute.py notebooks/05_pix2pixhd.ipynb /tmp/p2p/offline.out.ipynb
# ```
#
# G2 width 4, G1 width 8 with 3 downsamplings and 2 + 1 residual blocks, D width 8 × 3 scales, 32×32 images,
# batch 1, 4 epochs = 1,024 generator updates per variant, 64 held-out scenes, seed 0:
#
# | variant (same budget) | PSNR (dB) ↑ | SSIM ↑ | G parameters | training time (s) |
# |---|---|---|---|---|
# | G1 + G2, GAN + FM + VGG | **16.93** | **0.395** | 202,739 | 422 |
# | G1 only, GAN + FM + VGG | 14.99 | 0.265 | 200,195 | 421 |
# | G1 + G2, GAN only | 16.78 | 0.346 | 202,739 | 18 |
#
# At this budget the local enhancer with the two-stage schedule matters most (+1.9 dB, +0.13 SSIM over G1 trained
# directly at full size, whose outputs stay noisy and checkered); dropping feature matching and the VGG term costs
# 0.05 SSIM and 0.15 dB (here feature matching does the work: a random-weight VGG gives a small, uninformative loss).
# One seed and tiny models: differences of a few tenths of a dB are within run-to-run noise. The times are not
# comparable across rows: the machine's load changed during the run, and the GAN-only variant skips VGG19, the most
# expensive part of an iteration at this size.
#
# **CPU speed of the Colab configuration** (the same run, `helpers.pix2pixhd` models + the training step above):
# one iteration of G1 + G2 (G2 width 16, 9 + 3 residual blocks, 45.7 M parameters), the 3-scale D (width 64,
# 8.3 M) and VGG19 at 256×256, batch 4, fp32, took **3.7 to 5.4 s** on this CPU (2 threads, load ≈ 1.3) and 22 to
# 27 s while five jobs shared its two cores; stage 1 (G1 alone at 128×128, batch 4) took about 1.1 s.

# %% [markdown]
# ## 8. Reload the weights and generate
#
# A fresh generator, built from the parameters cell, loads the last checkpoint of the main run and must give the
# same images as the trained one.

# %%
final_checkpoint = RUN / "checkpoints" / f"{MAIN_VARIANT}_local.pt"
fresh_g, fresh_d = build_generator(True).to(DEVICE), build_discriminator().to(DEVICE)
info = load_checkpoint(final_checkpoint, {"G": fresh_g, "D": fresh_d}, map_location=DEVICE, restore_rng=False)
reloaded = outputs_for(fresh_g, preview)
assert torch.equal(reloaded, outputs_for(main["G"], preview)), "the reloaded generator must match the trained one"
print(f"reloaded '{final_checkpoint.name}' (iteration {info['step']}, epoch {info['extra']['epoch']}): outputs match")
show_grid(torch.cat([input_picture(preview), reloaded]), "Reloaded generator: label maps "
          "(top) and its images (bottom)", RUN / "reloaded_samples.png", nrow=len(reloaded))

# %%
total_iterations = sum(r["watch"].iterations for r in results.values())
total_seconds = sum(r["watch"].seconds for r in results.values())
metrics_path = write_metrics(
    RUN, "05_pix2pixhd", SMOKE, DEVICE, iterations=total_iterations, seconds=total_seconds,
    throughput={"it_per_s": total_iterations / total_seconds,
                "img_per_s": sum(r["watch"].images for r in results.values()) / total_seconds},
    quality={k: r["scores"] for k, r in results.items()}, stand_ins=STAND_INS,
    dataset=DATASET, image_size=IMAGE_SIZE, parameters_official=OFFICIAL_PARAMS, parameters_this_run=RUN_PARAMS,
    colab_memory_estimate_gb=round(MEMORY_ESTIMATE_GB, 2), seconds_per_iteration_main=main["watch"].seconds /
    main["watch"].iterations,
)
print(metrics_path.read_text())
