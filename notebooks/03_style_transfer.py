# %% [markdown]
# # 03 · Neural style transfer: Gatys et al. on VGG19, and many stylisations from one painting
#
# {{BADGE}}
#
# The style transfer of Gatys, Ecker and Bethge (CVPR 2016), explained and implemented: the image itself is
# optimised until its VGG19 features carry the *content* of a photo and the *style* (Gram matrices) of a painting.
# Then **multi-modal** style transfer: from ONE painting, several different stylisations, by the deep feature
# perturbation (DFP) of Wang et al. (CVPR 2020), its diversity measured against plain Gatys runs that differ only in
# their random start.
#
# **What you get:** the losses and the optimisation step as editable cells beside their formulas; a stylised photo
# in the style of Van Gogh's *The Starry Night* (public-domain paintings, downloaded from Wikimedia Commons), with a
# checkpoint you can resume from; the luminance-only variant that keeps the photo's colours; a style-weight sweep;
# the same photo in three more paintings' styles; K DFP stylisations against K random starts with their measured
# diversity; a side-by-side timing of the optimiser; `metrics.json` and titled PNGs in `RUN_DIR`. Any content or
# style image works, by path, URL or `skimage:NAME`.
#
# **Run time.** CPU smoke mode (`SMOKE=1`, what CI runs; 48 px, random-weight VGG19 as an offline stand-in, so its
# pictures are not meaningful): 25 to 45 s measured on 2 CPU cores shared with other jobs. Colab T4, full
# mode (ImageNet VGG19, 512×341 px, about 5,000 L-BFGS iterations in all): not measured; derived as 3 to 6
# minutes of GPU time: each iteration is 268.6 GFLOP (counted with `torch.utils.flop_counter` on this
# notebook's objective at 512×341), 5,040 iterations are 1,354 TFLOP, which a
# T4 (8.1 TFLOP/s fp32 peak) needs 2.8 minutes for at its peak and about 5.6 minutes at half of it; plus a one-time
# download of VGG19 (548 MB) and AlexNet for LPIPS (233 MB). Section 10 times the optimiser on your runtime.

# %% SETUP

# %% [markdown]
# ## 1. Parameters
# Every knob is here; the smoke-mode value stands beside the full one. The content and style accept a path, an
# http(s) URL or `skimage:NAME` (an image shipped with scikit-image); the environment variables `CONTENT_IMAGE` and
# `STYLE_IMAGE` override them. In full mode the style is a painting from `PAINTINGS`, downloaded once into
# `DATA_DIR/paintings` (with a timeout, and from a second address when the first fails); smoke mode downloads
# nothing and uses scikit-image pictures as stand-ins, and says so.

# %%
import math
import os
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import AlexNet_Weights
from tqdm.auto import tqdm

from helpers.downloads import DownloadError, cache_torchvision_weights
from helpers.environment import (data_dir, describe_device, gpu_choices, in_colab, pick_device,
                                 run_dir, seed_everything, smoke_mode, use_drive_for_runs)
from helpers.plotting import save_figure, show_image_table, show_panels
from helpers.style.data import (PAINTING_STAND_INS, PAINTINGS, describe_source, fetch_painting,
                                load_image)
from helpers.style.evaluate import evaluate, feature_diversity, lpips_diversity, pixel_diversity
from helpers.style.model import check_objective_layers, keep_colours, luminance_image, rgb_to_yiq
from helpers.style.multimodal import feature_covariance
from helpers.style.optim import (HostReadCounter, autocast_gradient_error, initial_image,
                                 lockstep_differences, make_optimizer, run_key)
from helpers.training import (History, TrainingRun, count_parameters, load_checkpoint,
                              save_checkpoint, synchronize, time_per_step, write_metrics)
from helpers.vgg import STAND_IN_NOTE, VGG19Features

SMOKE = smoke_mode()                   # SMOKE=1: tiny CI run, nothing downloaded
NOTEBOOK = "03_style_transfer"
RUN_DIR_ON_DRIVE = False               # True in Colab: runs go to Google Drive, so a re-run resumes
SEED = 0
PAINTING = "starry_night"              # the style: a key of PAINTINGS (public domain, on Wikimedia)
CONTENT_IMAGE = os.environ.get("CONTENT_IMAGE", "skimage:chelsea")  # path, URL or skimage:NAME
STYLE_IMAGE = os.environ.get("STYLE_IMAGE", "")  # empty: PAINTING (smoke: its stand-in)
GRAY_STYLE_IMAGE = "skimage:gravel"    # a grayscale texture, to show the gray -> RGB conversion
IMAGE_SIZE = 48 if SMOKE else 512      # longer side in px, aspect ratio kept (chelsea: 512x341)

PRETRAINED = not SMOKE                 # ImageNet VGG19 (downloads once); smoke: random weights
POOLING = "max"                        # "avg": slightly better in the paper; VGG19 trained with max
CONTENT_LAYERS = ["relu4_2"]           # the paper's conv4_2 (see the theory on conv vs relu names)
STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]  # conv1_1 ... conv5_1
STYLE_LAYER_WEIGHTS = [1 / 5] * 5      # w_l of the paper
CONTENT_WEIGHT = 1.0                   # alpha, in the relative units explained below
STYLE_WEIGHT = 400.0                   # beta, same units; the sweep shows 4 ... 4,000
TV_WEIGHT = 10.0                       # total-variation weight (0 = the paper): less pixel noise
PRESERVE_COLOURS = False               # True: transfer the luminance only (also shown below)

OPTIMIZER = "lbfgs"                    # the paper's L-BFGS (sync-free); "torch_lbfgs"; "adam"
LEARNING_RATE = {"lbfgs": 1.0, "torch_lbfgs": 1.0, "adam": 0.02}[OPTIMIZER]
HISTORY_SIZE = 100                     # L-BFGS memory: curvature pairs kept (torch's default)
INIT = "noise"                         # the paper starts from white noise; "content": the photo
STEPS = 10 if SMOKE else 300           # iterations of the main run
FIRST_SESSION_STEPS = STEPS // 2       # the main run stops here once, to show resume
LOG_EVERY = 1 if SMOKE else 10         # iterations between reads of the losses (a read waits)
CHECKPOINT_EVERY = 5 if SMOKE else 100  # a checkpoint holds the L-BFGS memory: ~420 MB at 512 px
SWEEP_STYLE_WEIGHTS = [4.0, 40.0, 400.0, 4_000.0]  # beta values of the style-weight sweep
SWEEP_STEPS = 5 if SMOKE else 300
GALLERY_STEPS = 5 if SMOKE else 200

K = 3 if SMOKE else 4                  # stylisations of the DFP set (and of the seeds-only set)
MULTI_STEPS = 5 if SMOKE else 300
DFP_LAMBDA = 0.6                       # diversity strength lambda (the DFP paper's default)
DFP_ALPHA = 0.6                        # stylisation strength alpha (the DFP code's default)
DFP_WEIGHT = STYLE_WEIGHT              # gamma: weight of matching the DFP feature targets
DFP_LAYERS = STYLE_LAYERS              # layers whose features are perturbed and matched
LPIPS_NET = None if SMOKE else "alex"  # LPIPS backbone (downloads AlexNet); smoke: skipped
TIMING_WARMUP = 2 if SMOKE else HISTORY_SIZE  # warm-up fills the L-BFGS memory first
TIMING_ITERATIONS = 3 if SMOKE else 20
LOCKSTEP_STEPS = 3                     # first iterations in which both L-BFGS versions must agree
LOCKSTEP_TOLERANCE = 1e-4              # ... to this fraction of an iteration's largest change
LOSS_MARGIN = 0.20                     # SyncFreeLBFGS's final loss: at most 20 % above torch's
LOSS_SCALE = 2.0**7                    # the loss scale tried with fp16 in section 10

use_drive_for_runs(RUN_DIR_ON_DRIVE)   # mounts Drive and sets $RUN_DIR there (Colab only)

DEVICE = pick_device()
RUN_DIR = run_dir(NOTEBOOK)            # $RUN_DIR/<notebook>: checkpoint, figures, metrics.json
CHECKPOINT = RUN_DIR / "gatys_checkpoint.pt"
CHOICES = gpu_choices(DEVICE)          # the GPU path's decisions (a T4's with EMULATE_T4=1)
CHANNELS_LAST = CHOICES.channels_last  # the memory layout that fast GPU convolutions prefer
VGG_AUTOCAST = None                    # float32; section 10 shows what fp16/bf16 do to the gradient
if CHOICES.cuda:
    torch.backends.cudnn.benchmark = True  # one image size throughout: autotune the kernels
elif CHOICES.emulated:
    CHOICES.skip("cuDNN autotuning (torch.backends.cudnn.benchmark)", "the CPU's convolutions")
STAND_INS = [] if PRETRAINED else [STAND_IN_NOTE]
seed_everything(SEED)
print(f"mode: {'smoke' if SMOKE else 'full'} | device: {describe_device(DEVICE)} | run: {RUN_DIR}")
print("GPU path:", CHOICES.describe(), "| VGG in float32" if VGG_AUTOCAST is None else "")

# %% [markdown]
# **The paintings.** Each painting is downloaded once into `DATA_DIR/paintings` and reused after that. If
# Wikimedia's first address fails, its 960 px copy of the same file is tried. If a painting of the gallery
# (section 8) still fails, it is left out with a message; the main painting must load.

# %%
def painting_source(key: str) -> str:
    """The painting's file (downloaded once); in smoke mode its stand-in, listed in STAND_INS."""
    if SMOKE:
        STAND_INS.append(f"style: {PAINTING_STAND_INS[key]} stands in for the painting "
                         f"'{PAINTINGS[key].title}' (smoke mode downloads nothing)")
        return PAINTING_STAND_INS[key]
    return str(fetch_painting(key, data_dir() / "paintings"))


STYLE_IMAGE = STYLE_IMAGE or painting_source(PAINTING)
GALLERY, LEFT_OUT = {}, []             # the other paintings, for section 8
for key in PAINTINGS:
    if key != PAINTING:
        try:
            GALLERY[key] = painting_source(key)
        except DownloadError as err:
            print(f"LEFT OUT of the gallery: {err}")
            LEFT_OUT.append(f"{PAINTINGS[key].title}: download failed")
for note in STAND_INS:
    print("STAND-IN:", note)

# %% [markdown]
# ## 2. Theory: Gatys et al. (2016)
#
# A VGG19 trained on ImageNet turns an image into feature maps, layer after layer. At layer $l$ there are $N_l$
# feature maps of $M_l = H_l W_l$ positions, written as a matrix $F^l \in \mathbb{R}^{N_l \times M_l}$ for the
# image $\vec{x}$ being generated, $P^l$ for the content photo $\vec{p}$ and $S^l$ for the style image $\vec{a}$.
#
# **Content representation.** Deep layers keep *what* is where (objects, their layout) but not the exact pixels.
# The content loss compares features directly, at one deep layer (the paper: conv4_2):
# $$\mathcal{L}_{content}(\vec{p}, \vec{x}) = \tfrac12 \sum_{i,j} \big(F^l_{ij} - P^l_{ij}\big)^2 .$$
#
# **Style representation.** The Gram matrix of a layer holds the correlations between its feature maps, summed
# over all positions, so it keeps textures, colours and strokes while discarding where they are:
# $$G^l_{ij} = \sum_k F^l_{ik} F^l_{jk}, \qquad
# E_l = \frac{1}{4 N_l^2 M_l^2} \sum_{i,j}\big(G^l_{ij} - A^l_{ij}\big)^2,
# \qquad \mathcal{L}_{style}(\vec{a}, \vec{x}) = \sum_l w_l E_l ,$$
# with $A^l$ the Gram matrix of the style image and $w_l = 1/5$ on conv1_1, conv2_1, conv3_1, conv4_1, conv5_1.
# Several layers, from shallow to deep, match the style at several scales: conv1_1 alone reproduces colours and
# fine grain, adding deeper layers gives larger, more coherent strokes (the paper's Figure 1). Content and style
# are thus separable: the deep content layer fixes the layout, the Gram matrices the "texture" painted over it.
#
# **Total loss and optimisation.** The image $\vec{x}$ itself is the variable; from white noise, L-BFGS minimises
# $$\mathcal{L}_{total} = \alpha\,\mathcal{L}_{content} + \beta\,\mathcal{L}_{style}
# \;(+\;\tau\,\mathrm{TV}(\vec{x})),
# \qquad \mathrm{TV}(\vec{x}) = \overline{(x_{i+1,j}-x_{i,j})^2} + \overline{(x_{i,j+1}-x_{i,j})^2},$$
# with $\alpha/\beta$ about $10^{-3}$ in the paper. VGG19 was trained on images normalised by the ImageNet mean
# and standard deviation, so the image in $[0, 1]$ is normalised the same way before VGG (inside `VGG19Features`).
#
# **Where this notebook's code stands against the paper** (all faithful except where said):
# - *Layer names.* The paper's Caffe network applies ReLU in place, so what it calls "conv4_2" is the response
#   after the ReLU; the authors' PyTorch code reads `r42` and `r11 ... r51`. Here: `relu4_2` and
#   `relu1_1 ... relu5_1` of torchvision's VGG19.
# - *Normalisations.* `gram_matrix` divides by $M_l$: $G = F F^\top / M_l$, the mean over positions, so it does
#   not grow with the image size. Then $E_l = \frac14\,\mathrm{mean}_{ij}(G_{ij}-A_{ij})^2$ is *exactly* the
#   paper's $E_l$. `content_loss` is the mean $\frac{1}{N_l M_l}\sum(F-P)^2$, the paper's sum divided by
#   $N_l M_l / 2$: the same minimiser, without growing with the image size.
# - *Relative units.* The paper's $\alpha/\beta = 10^{-3}$ is in units of its Caffe network's features;
#   torchvision's VGG19 has other feature scales, so that ratio does not carry over. We divide each term by its
#   value for an all-zero feature map: $\overline{P^2}$ for content, $\frac14\overline{A_l^2}$ for style layer $l$
#   (section 6 checks that a zero map scores exactly 1). A relative content loss of 0.4 means "features off by
#   40 % of their energy", and $\alpha = 1$, $\beta = 400$ mean about the same whatever the network's feature
#   scale (if a result keeps too much of the photo, or too little, move $\beta$ along the sweep in section 8):
#   $$\mathcal{L} = \alpha\,\frac{\mathcal{L}_{content}}{\overline{P^2}}
#   + \beta \sum_l w_l \frac{E_l}{\frac14 \overline{A_l^2}} + \tau\,\mathrm{TV}.$$
#   ($\beta = 400$ is a starting point, not a tuned optimum.)
# - *Pixels* are clamped to $[0, 1]$ after each step (as in the PyTorch tutorial), so VGG always sees an image.
# - *L-BFGS* takes the steps of `torch.optim.LBFGS` (no line search, a memory of 100 pairs, as the tutorial), but
#   our version never waits for the GPU (section 7).

# %% [markdown]
# ## 3. Data: content and style images
# `load_image` reads a path, an http(s) URL or `skimage:NAME`; converts grayscale, palette and RGBA (flattened on
# white) images to RGB; resizes the longer side to `IMAGE_SIZE` with the aspect ratio kept; and checks that VGG19's
# four poolings leave conv5_1 at least 2 x 2 positions. Bad input gets an error naming the input and what to do:

# %%
not_an_image = RUN_DIR / "notes.jpg"
not_an_image.write_text("a text file with an image's name")
for bad_source, size in [("my_photo.jpg", IMAGE_SIZE), (not_an_image, IMAGE_SIZE),
                         ("http://127.0.0.1:9/style.jpg", IMAGE_SIZE),
                         ("skimage:starry", IMAGE_SIZE), (CONTENT_IMAGE, 24)]:
    try:
        load_image(bad_source, size, "style image")
        raise AssertionError(f"{bad_source} should have been refused")
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        print(f"{type(err).__name__}: {err}\n")

# %%
content = load_image(CONTENT_IMAGE, IMAGE_SIZE, "content image", DEVICE)
style_image = load_image(STYLE_IMAGE, IMAGE_SIZE, "style image", DEVICE)
gray_style = load_image(GRAY_STYLE_IMAGE, IMAGE_SIZE, "style image", DEVICE)
h, w = content.shape[-2:]
assert content.shape[:2] == (1, 3) and max(h, w) == IMAGE_SIZE
print(f"content {w}x{h} px: {describe_source(CONTENT_IMAGE)}")
print(f"style   {style_image.shape[-1]}x{style_image.shape[-2]} px: {describe_source(STYLE_IMAGE)}")
show_panels({f"content: {describe_source(CONTENT_IMAGE)}": content,
             f"style: {describe_source(STYLE_IMAGE)}": style_image,
             f"grayscale style: {describe_source(GRAY_STYLE_IMAGE)}": gray_style},
            "Inputs: the content photo and the style images" + (" (STAND-INS)" if SMOKE else ""),
            RUN_DIR / "inputs.png", value_range=(0, 1))

# %% [markdown]
# ## 4. Model: a frozen VGG19 feature extractor
# Only the layers up to relu5_1 are built (12.9 M parameters, all frozen): nothing after the last layer a loss
# reads is computed. The only trainable parameters in this notebook are the pixels of the image being stylised.

# %%
seed_everything(SEED)  # the random-weight stand-in must be rebuilt identically for the reload check
vgg = VGG19Features([*CONTENT_LAYERS, *STYLE_LAYERS], PRETRAINED, POOLING).to(DEVICE)
if CHANNELS_LAST:
    vgg = vgg.to(memory_format=torch.channels_last)
n_params, n_trainable = count_parameters(vgg), count_parameters(vgg, trainable_only=True)
print(f"VGG19 up to relu5_1: {n_params:,} parameters ({n_trainable} trainable) | weights: "
      f"{'ImageNet' if PRETRAINED else 'RANDOM (stand-in: losses and images not meaningful)'}")
assert n_trainable == 0
assert n_params == 12_944_960  # conv1_1 ... conv5_1: sum of (in * out * 9 + out)
expected = {"relu4_2": (512, h // 8, w // 8), "relu1_1": (64, h, w),
            "relu2_1": (128, h // 2, w // 2), "relu3_1": (256, h // 4, w // 4),
            "relu4_1": (512, h // 8, w // 8), "relu5_1": (512, h // 16, w // 16)}
for name, f in zip(vgg.layers, vgg(content)):
    assert tuple(f.shape[1:]) == expected[name], (name, f.shape)
    print(f"{name}: {tuple(f.shape[1:])} (channels, height px, width px)")

# %% [markdown]
# ## 5. Losses, beside their formulas
# **Gram matrix.** $G = FF^\top/M$: the mean over the $M$ positions of the products of two feature maps.

# %% [helpers] style/losses: gram_matrix

# %% [markdown]
# **Content loss** at the content layer: $\mathrm{mean}(F-P)^2$, the paper's $\tfrac12\sum(F-P)^2$ divided by
# $N M / 2$. **Style loss**: per layer $E_l = \frac14\,\mathrm{mean}(G-A)^2$, which equals the paper's
# $\frac{1}{4N^2M^2}\sum(\hat G - \hat A)^2$ for the unnormalised Grams $\hat G = M G$; then $\sum_l w_l E_l$.
# **Total variation**: the mean squared difference of neighbouring pixels, down and across.

# %% [helpers] style/losses: content_loss, style_layer_loss, style_loss

# %% [helpers] style/losses: total_variation_loss

# %% [markdown]
# A check by hand, on one image with two channels at two positions, $F = \begin{pmatrix}1&2\\3&4\end{pmatrix}$:
# $\hat G = FF^\top = \begin{pmatrix}5&11\\11&25\end{pmatrix}$, so $G = \hat G / 2$; against a zero target,
# $E = (25 + 121 + 121 + 625)/(4 \cdot 2^2 \cdot 2^2) = 13.9375$; the content loss against zero is
# $(1 + 4 + 9 + 16)/4 = 7.5$; and the image $\begin{pmatrix}0&1\\2&4\end{pmatrix}$ has
# TV $= \frac{2^2 + 3^2}{2} + \frac{1^2 + 2^2}{2} = 9$.

# %%
F_example = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
assert torch.equal(gram_matrix(F_example), torch.tensor([[[2.5, 5.5], [5.5, 12.5]]]))
assert math.isclose(style_layer_loss(F_example, torch.zeros(1, 2, 2)).item(), 13.9375, rel_tol=1e-6)
assert math.isclose(content_loss(F_example, torch.zeros_like(F_example)).item(), 7.5, rel_tol=1e-6)
tv_example = total_variation_loss(torch.tensor([[0.0, 1.0], [2.0, 4.0]]).view(1, 1, 2, 2)).item()
assert math.isclose(tv_example, 9.0, rel_tol=1e-6)
print("hand-computed values: E = 13.9375, content = 7.5, TV = 9.0: all reproduced")

# %% [markdown]
# **A Gram matrix forgets where features are.** Shuffling, flipping or rotating the positions of a feature map
# leaves $G = FF^\top/M$ unchanged (a permutation $\Pi$ of positions gives $F\Pi\Pi^\top F^\top = FF^\top$). So
# spatial transforms of the style features give *no* new style targets; diversity has to come from the channel
# space (as DFP does in section 9), from clustering into sub-styles, or from the random start.

# %%
f = dict(zip(vgg.layers, vgg(style_image)))["relu3_1"]
shuffled = f.flatten(2)[..., torch.randperm(f.shape[-2] * f.shape[-1], device=DEVICE)].view_as(f)
for name, moved in [("shuffle", shuffled), ("flip", f.flip(-1)), ("rotate", f.rot90(1, (-2, -1)))]:
    change = (gram_matrix(moved) - gram_matrix(f)).abs().max() / gram_matrix(f).abs().max()
    print(f"{name:9s}: largest Gram change {change:.1e} of the largest entry")
    assert change < 1e-4
shuffled_content = content_loss(shuffled, f) / f.square().mean()
print(f"content loss of the shuffled map: {float(shuffled_content):.2f} of its energy (not zero)")
assert shuffled_content > 0.1

# %% [markdown]
# ## 6. The objective: content, style and TV in relative units
# `StyleObjective` computes the targets once (the content's features, the style's Gram matrices), then, for an
# image, all the losses of the theory section divided by their value for an all-zero feature map. VGG may run in
# mixed precision (`autocast`, for a GPU); the feature maps are turned back to float32 before any loss, since the
# Gram sums and L-BFGS's curvature estimates need the precision. The optional `feature_targets` term is DFP's
# (section 9).

# %% [helpers] style/model: energy, features_by_name, relative_feature_loss

# %% [helpers] style/model: StyleObjective

# %% [markdown]
# Every objective of this notebook has the parameters cell's layers and weights; only the images, $\beta$ and
# the DFP targets change. The claim of the relative units, checked: a loss says what fraction of the target's
# energy is missing. Feature maps at half the content's give a relative content loss of
# $\overline{(P/2 - P)^2}/\overline{P^2} = 1/4$. Half the style's features give Gram matrices $A_l/4$, so each
# style layer scores $w_l \cdot \tfrac14\overline{(A_l/4 - A_l)^2} / \tfrac14\overline{A_l^2} = (3/4)^2\,w_l$.

# %%
def make_objective(content_img: Tensor, style_img: Tensor, beta: float = STYLE_WEIGHT,
                   feature_targets: Sequence[Tensor] = (),
                   autocast: torch.dtype | None = VGG_AUTOCAST,
                   extractor: VGG19Features = vgg) -> StyleObjective:
    """StyleObjective with the parameters cell's layers and weights."""
    return StyleObjective(extractor, content_img, style_img, CONTENT_LAYERS, STYLE_LAYERS,
                          STYLE_LAYER_WEIGHTS, CONTENT_WEIGHT, beta, TV_WEIGHT, feature_targets,
                          DFP_WEIGHT, autocast)


objective = make_objective(content, style_image)
style_maps = features_by_name(vgg, style_image)
half_content = {n: t / 2 for n, t in zip(CONTENT_LAYERS, objective.content_targets)}
half_style = [lw * style_layer_loss(style_maps[n] / 2, a) for n, lw, a in
              zip(STYLE_LAYERS, objective.layer_weights, objective.gram_targets)]
content_half = relative_feature_loss(half_content, CONTENT_LAYERS, objective.content_targets,
                                     objective.content_scales)
print(f"feature maps at half the targets: relative content loss {float(content_half):.4f} "
      f"(expected 0.25), style loss per layer {', '.join(f'{float(v):.4f}' for v in half_style)} "
      f"(expected {0.75**2 / len(STYLE_LAYERS):.4f} each)")
assert math.isclose(float(content_half), 0.25, rel_tol=1e-4)
assert all(math.isclose(float(v), 0.75**2 * lw, rel_tol=1e-4)
           for v, lw in zip(half_style, STYLE_LAYER_WEIGHTS))

# %% [markdown]
# ## 7. Optimising the image
# The image's pixels are the only parameters. One iteration evaluates the objective at the current image, takes
# one optimizer step and clamps the pixels to $[0, 1]$. The losses come back as tensors that stay on the device:
# reading one (`float(...)`, `.item()`, printing) makes the host wait for the GPU, so the loop below reads them
# only every `LOG_EVERY` iterations.
#
# **L-BFGS** keeps the last 100 pairs $s_k = x_{k+1} - x_k$, $y_k = \nabla_{k+1} - \nabla_k$ and from them builds,
# by the two-loop recursion, a step $-H\nabla$ with $H$ an estimate of the inverse Hessian: Newton-like steps
# without a Hessian. `torch.optim.LBFGS` reads about 200 numbers back to the host per iteration to take its
# decisions, and each read stalls a GPU; `SyncFreeLBFGS` (in `helpers/style/optim.py`) takes the same steps
# (a test compares them) with every number kept on the device. `make_optimizer` picks it for `OPTIMIZER = "lbfgs"`.

# %% [helpers] style/optim: StylisedImage, optimisation_step

# %% [helpers] style/optim: stylise

# %% [markdown]
# ### The main run, with checkpoints and resume
# A checkpoint (pixels, L-BFGS memory, history of the losses, time spent) is written every `CHECKPOINT_EVERY`
# iterations to `RUN_DIR`; re-running the cell resumes from it (Colab disconnects). To show it, the first call
# stops at `FIRST_SESSION_STEPS` and the second call starts from the saved state. Losses go to TensorBoard.

# %%
content_in, style_in = content, style_image
if PRESERVE_COLOURS:
    content_in, style_in = luminance_image(content), luminance_image(style_image, reference=content)
objective = make_objective(content_in, style_in)
CONFIG = {"content": CONTENT_IMAGE, "style": STYLE_IMAGE, "size": IMAGE_SIZE,
          "pretrained": PRETRAINED, "pooling": POOLING, "layers": [*CONTENT_LAYERS, *STYLE_LAYERS],
          "optimizer": OPTIMIZER, "history_size": HISTORY_SIZE, "init": INIT, "seed": SEED,
          "autocast": str(VGG_AUTOCAST), "weights": [CONTENT_WEIGHT, STYLE_WEIGHT, TV_WEIGHT],
          "preserve_colours": PRESERVE_COLOURS}
if in_colab():
    %load_ext tensorboard
    %tensorboard --logdir {RUN_DIR / "tensorboard"}

# %%
def run_main(until: int) -> tuple[StylisedImage, TrainingRun]:
    """Resume the main run from its checkpoint if there is one; continue to `until` iterations."""
    image = StylisedImage(initial_image(content_in, INIT, SEED)).to(DEVICE)
    optimizer = make_optimizer(image, OPTIMIZER, LEARNING_RATE, HISTORY_SIZE)
    run = TrainingRun(history=History(RUN_DIR / "tensorboard"))  # losses, time, iterations done
    state = {"image": image, "optimizer": optimizer, "run": run}
    if CHECKPOINT.is_file():
        load_checkpoint(CHECKPOINT, state, CONFIG, map_location=DEVICE)
        print(f"resumed from the checkpoint at iteration {run.step} "
              f"({run.stopwatch.seconds:.1f} s spent)")
    progress = tqdm(total=until, initial=run.step, desc="Gatys (main run)")
    while run.step < until:
        chunk = min(CHECKPOINT_EVERY - run.step % CHECKPOINT_EVERY, until - run.step)
        with run.stopwatch:  # timed without the checkpoint writes; synchronised, so GPU time counts
            for _ in range(chunk):
                losses = optimisation_step(objective, image, optimizer)
                if run.step % LOG_EVERY == 0:
                    run.history.log(run.step, **losses)  # reads the losses: the only host sync
                run.step += 1
                progress.update()
            synchronize(DEVICE)
        run.stopwatch.count(chunk)
        save_checkpoint(CHECKPOINT, state, run.step, CONFIG)
    progress.close()
    run.history.flush()
    return image, run


image, main_run = run_main(FIRST_SESSION_STEPS)
print(f"first session: {main_run.stopwatch.iterations} iterations; checkpoint {CHECKPOINT.name}, "
      f"{CHECKPOINT.stat().st_size / 2**20:.1f} MiB")

# %% [markdown]
# *Colab disconnected*: the image, the optimizer and the history are gone. Running the same function again finds
# the checkpoint and continues from iteration `FIRST_SESSION_STEPS` (L-BFGS's curvature memory included).

# %%
del image, main_run
image, main_run = run_main(STEPS)
history, watch = main_run.history, main_run.stopwatch
steps_logged, style_values = history.series("style")
assert watch.iterations == STEPS and steps_logged == list(range(0, STEPS, LOG_EVERY)), \
    "resume must continue the same run, without gaps or repeats"
result = image().detach()
if PRESERVE_COLOURS:
    result = keep_colours(result, content)
final = evaluate(objective, image().detach())
print(f"relative style loss: {style_values[0]:.3g} at the white-noise start, {final['style']:.3g} "
      f"after {STEPS} iterations")
assert final["style"] < 0.5 * style_values[0], "the style loss must fall during the optimisation"
ms_per_iteration = 1000 * watch.seconds / watch.iterations
print(f"{STEPS} iterations in {watch.seconds:.1f} s ({ms_per_iteration:.0f} ms per iteration) at "
      f"{w}x{h} px on {describe_device(DEVICE)}")
print("final losses (relative units):", {k: round(v, 4) for k, v in final.items()})

# %% [markdown]
# ## 8. Results
# ### Content | style | result, and the luminance-only variant
# *Colour preservation* (Gatys et al. 2016, "Preserving color in neural artistic style transfer"): transfer on the
# luminance only. Both images go to YIQ; the style's luminance is matched to the content's mean and standard
# deviation; the optimisation runs on the gray luminance images; the result's luminance Y is put back with the
# content's colour channels I and Q. The claim to check: the colours (I, Q) stay the photo's (up to the clipping
# to valid RGB) while the luminance changed.
#
# `run_stylisation` saves each finished image in `RUN_DIR/stylisations`. When you run the notebook again with the
# same settings, it reuses these images instead of computing them again, and says so.

# %%
SAVED_RUNS = RUN_DIR / "stylisations"  # every finished run's image: a second Run all reuses them
runs_done = {"reused": 0, "computed": 0}


def run_stylisation(content_img: Tensor, style_img: Tensor, steps: int, beta: float = STYLE_WEIGHT,
                    seed: int = SEED, feature_targets: Sequence[Tensor] = ()) -> tuple:
    """One Gatys run (DFP run, with feature targets) from a seeded random start: image, losses.
    A run saved in RUN_DIR by an earlier Run all, with the same inputs and settings, is reused."""
    obj = make_objective(content_img, style_img, beta, feature_targets)
    key = run_key(content_img, style_img, *feature_targets, steps=steps, beta=beta, seed=seed,
                  dfp_weight=DFP_WEIGHT, config=CONFIG)
    path = SAVED_RUNS / f"{key}.pt"
    if path.is_file():
        out = torch.load(path, map_location=DEVICE)
        runs_done["reused"] += 1
    else:
        out = stylise(obj, initial_image(content_img, INIT, seed), steps, OPTIMIZER, LEARNING_RATE)
        SAVED_RUNS.mkdir(exist_ok=True)
        torch.save(out.cpu(), path.with_suffix(".part"))
        path.with_suffix(".part").replace(path)  # a run cut short leaves no half file
        runs_done["computed"] += 1
    return out, evaluate(obj, out)


def say_reused() -> None:
    """Print how many runs of the cell were reused from an earlier Run all, then reset the count."""
    if runs_done["reused"]:
        print(f"reusing {runs_done['reused']} finished run(s) saved in {SAVED_RUNS} (same inputs "
              f"and settings, by an earlier Run all or an earlier cell); "
              f"{runs_done['computed']} computed now")
    runs_done.update(reused=0, computed=0)


# %%
gray_content, gray_style_matched = luminance_image(content), luminance_image(style_image, content)
luminance_result, _ = run_stylisation(gray_content, gray_style_matched, SWEEP_STEPS)
say_reused()
colour_kept = keep_colours(luminance_result, content)
yiq_kept, yiq_content = rgb_to_yiq(colour_kept), rgb_to_yiq(content)
chroma_error = float((yiq_kept[:, 1:] - yiq_content[:, 1:]).abs().mean())
luminance_change = float((yiq_kept[:, :1] - yiq_content[:, :1]).abs().mean())
print(f"mean |change| against the photo: colour (I, Q) {chroma_error:.4f}, "
      f"luminance (Y) {luminance_change:.4f} (units of [0, 1] intensity)")
assert chroma_error < 0.02 and luminance_change > 0.05, "colours kept, luminance restyled"
title = "Gatys et al. style transfer" + (" (STAND-IN: random-weight VGG19)" if SMOKE else "")
show_panels({"content": content, f"style: {describe_source(STYLE_IMAGE)}": style_image,
             f"result ({STEPS} iterations)": result, "colours of the content kept": colour_kept},
            title, RUN_DIR / "03_result.png", value_range=(0, 1))

# %% [markdown]
# ### Loss curves of the main run
# Relative units (section 2): content and style losses divided by their value for an all-zero feature map.

# %%
fig, ax = plt.subplots(figsize=(8, 4))
for name in ["total", "content", "style", "tv"]:
    ax.plot(*history.series(name), label=name)
ax.axvline(FIRST_SESSION_STEPS, color="gray", ls=":", label="resumed from the checkpoint")
ax.set(yscale="log", xlabel="L-BFGS iteration" if "lbfgs" in OPTIMIZER else "Adam step",
       ylabel="loss (relative units, log scale)",
       title="Main run: losses during the optimisation" + (" (stand-in VGG)" if SMOKE else ""))
ax.grid(alpha=0.3)
ax.legend()
save_figure(fig, RUN_DIR / "03_loss_curves.png")
plt.show()

# %% [markdown]
# ### Style-weight sweep
# Same content, style, start and number of iterations; only $\beta$ changes (with $\alpha = 1$). Small $\beta$
# keeps the photo, large $\beta$ gives texture with only a trace of its layout: the claim checked below is that
# the largest $\beta$ ends with a lower style loss and a higher content loss than the smallest.

# %%
sweep = {beta: run_stylisation(content, style_image, SWEEP_STEPS, beta)
         for beta in tqdm(SWEEP_STYLE_WEIGHTS, desc="style-weight sweep")}
say_reused()
show_panels({f"beta = {beta:g}\ncontent {m['content']:.2f}, style {m['style']:.3f}": img
             for beta, (img, m) in sweep.items()},
            "Style-weight sweep (alpha = 1; losses in relative units)"
            + (" - STAND-IN VGG" if SMOKE else ""),
            RUN_DIR / "03_style_weight_sweep.png", value_range=(0, 1))
for beta, (_, m) in sweep.items():
    print(f"beta = {beta:>8,.0f}: relative content loss {m['content']:.3f}, "
          f"style loss {m['style']:.4f}")
(_, low), (_, high) = sweep[min(sweep)], sweep[max(sweep)]
assert high["style"] < low["style"] and high["content"] > low["content"], \
    "a larger beta must trade content for style"

# %% [markdown]
# ### The same photo in the style of other paintings
# Nothing in the method is specific to one painting: the same code with the other paintings of `PAINTINGS`
# (`GALLERY_STEPS` iterations each). Each must lower its own style loss from the white-noise start.

# %%
gallery = {}
for note in LEFT_OUT:
    print("left out (see the parameters section):", note)
for key, source in tqdm(GALLERY.items(), desc="other paintings"):
    painting = load_image(source, IMAGE_SIZE, f"style image {key}", DEVICE)
    start = initial_image(content, INIT, SEED)
    image_k, losses_k = run_stylisation(content, painting, GALLERY_STEPS)
    at_start = evaluate(make_objective(content, painting), start)
    assert losses_k["style"] < at_start["style"], f"{key}: the style loss must fall"
    gallery[f"style: {describe_source(source)}"] = painting
    gallery[f"result: relative style loss {losses_k['style']:.3f}"] = image_k
say_reused()
if gallery:
    show_panels(gallery, "The photo in the style of other paintings" + (" (STAND-INS)" * SMOKE),
                RUN_DIR / "03_gallery.png", value_range=(0, 1), size=3.0)

# %% [markdown]
# ## 9. Multi-modal style transfer: deep feature perturbation (DFP, Wang et al. CVPR 2020)
# Plain Gatys runs that differ only in their random start end in nearly the same picture: that is the baseline
# to beat. Transforming the style features spatially does not help either, since Gram matrices ignore *where*
# features are (section 5). DFP gets genuinely different stylisations from ONE style image by perturbing the
# style features in channel space, inside the whitening and colouring transform (WCT, Li et al. 2017). For one
# layer, with content features $f_c$, style features $f_s$ (both $N \times M$), their means $m_c, m_s$ and
# covariance eigen-decompositions $E_c D_c E_c^\top$, $E_s D_s E_s^\top$:
# $$\hat f_c = E_c D_c^{-1/2} E_c^\top (f_c - m_c) \quad\text{(whitening: identity covariance)}$$
# $$f_{cs} = E_s D_s^{1/2} E_s^\top \hat f_c + m_s \quad\text{(colouring: the style's covariance)}$$
# $$f_{cs}^{Z} = E_s D_s^{1/2}\, Z\, E_s^\top \hat f_c + m_s, \qquad Z = U \text{ from the SVD }
# U\Sigma V^\top \text{ of a Gaussian matrix}$$
# Because $ZZ^\top = I$, $\mathrm{cov}(f_{cs}^Z) = E_s D_s^{1/2} Z Z^\top D_s^{1/2} E_s^\top = E_s D_s E_s^\top$:
# the style statistics are untouched while the features themselves change with every draw of $Z$. DFP blends the
# perturbed and plain features with the diversity strength $\lambda$, and the result with the content features
# with the stylisation strength $\alpha_{s}$ (both 0.6 in the DFP paper and code):
# $$t = \alpha_{s}\big[\lambda f^Z_{cs} + (1-\lambda) f_{cs}\big] + (1-\alpha_{s}) f_c .$$

# %% [helpers] style/multimodal: random_orthogonal, covariance_eigen

# %% [helpers] style/multimodal: whitening_colouring

# %% [helpers] style/multimodal: dfp_target, dfp_targets

# %% [markdown]
# The claim $\mathrm{cov}(f^Z_{cs}) = \mathrm{cov}(f_s)$, checked on this notebook's relu1_1 features: the
# perturbed WCT keeps the style's covariance, yet its features differ from the plain WCT's. (The claim needs
# $\hat f_c$ to have the identity covariance, i.e. a content covariance of full rank: more positions than
# channels and no dead channel. At deep layers of small images that fails, and the match is approximate.)

# %%
fc, fs = (dict(zip(vgg.layers, vgg(x)))["relu1_1"] for x in (content, style_image))
z_draw = torch.Generator().manual_seed(SEED)
plain, perturbed = (whitening_colouring(fc, fs, z) for z in
                    (None, lambda k: random_orthogonal(k, z_draw)))
cov_style = feature_covariance(fs)
cov_error = ((feature_covariance(perturbed) - cov_style).norm() / cov_style.norm()).item()
feature_change = ((perturbed - plain).norm() / plain.norm()).item()
print(f"perturbed WCT: covariance off by {cov_error:.1e} of the style's; features moved by "
      f"{feature_change:.2f} of their norm")
assert cov_error < 1e-3 and feature_change > 0.1

# %% [markdown]
# **Our departure.** DFP plugs into feed-forward WCT methods, whose trained decoders turn $t$ into an image. We
# have no such decoders (they would need training), so we decode by optimisation: the image minimises the Gatys
# loss *plus* a feature-reconstruction term towards the DFP targets at the style layers,
# $$\mathcal{L}_{DFP} = \mathcal{L}_{Gatys} + \gamma\,\frac{1}{L}\sum_l
# \frac{\overline{(F^l - t_l)^2}}{\overline{t_l^2}} .$$
# The Gram matrix of $t_l$ is close to the style's whatever $Z$, so $Z$ can only reach the image through a loss on
# the features themselves, not their Gram matrices: that is why the extra term is needed.
#
# **Diversity**, as in the DFP paper, is the mean over the $K(K-1)/2$ pairs of outputs of a distance: in VGG
# feature space, $d(x_i, x_j) = \frac1L \sum_l \overline{\lVert \hat\phi_l(x_i) - \hat\phi_l(x_j) \rVert^2}$ with
# features unit-normalised per position (LPIPS without its learned layer weights, on our VGG19, so it runs
# offline too); the mean absolute pixel difference; and in full mode the real LPIPS (torchmetrics, AlexNet). The
# baseline: $K$ plain Gatys runs that differ only in their random start; the DFP set uses the same $K$ starts,
# each with its own $Z$. For scale: the DFP paper reports a mean pairwise LPIPS of 0.431 for UST + DFP against
# 0.163-0.175 for earlier diversified methods; with our optimisation in place of UST's decoders (and another
# content/style pair), our LPIPS numbers (full mode only) are indicative, not a reproduction.

# %%
dfp_runs, seed_runs = [], []
for k in tqdm(range(K), desc="DFP and seeds-only runs"):
    targets = dfp_targets(vgg, content, style_image, DFP_LAYERS, seed=SEED + k, lam=DFP_LAMBDA,
                          alpha=DFP_ALPHA)
    dfp_runs.append(run_stylisation(content, style_image, MULTI_STEPS, seed=SEED + k,
                                    feature_targets=targets))
    seed_runs.append(run_stylisation(content, style_image, MULTI_STEPS, seed=SEED + k))
say_reused()
sets = {name: torch.cat([img for img, _ in runs])
        for name, runs in (("dfp", dfp_runs), ("seeds_only", seed_runs))}
diversity = {name: {"vgg": feature_diversity(images, vgg), "pixel": pixel_diversity(images)}
             for name, images in sets.items()}
mean_losses = {name: {key: sum(m[key] for _, m in runs) / K for key in ("content", "style")}
               for name, runs in (("dfp", dfp_runs), ("seeds_only", seed_runs))}


# %%
def load_lpips():
    """torchmetrics' LPIPS (AlexNet), or None with the reason when its weights cannot be had."""
    if LPIPS_NET is None:
        return None, "LPIPS diversity skipped in smoke mode (its AlexNet weights need a download)"
    try:
        cache_torchvision_weights(AlexNet_Weights.IMAGENET1K_V1, "AlexNet weights for LPIPS")
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        lpips = LearnedPerceptualImagePatchSimilarity(net_type=LPIPS_NET, normalize=True)
        return lpips.to(DEVICE), ""
    except (DownloadError, OSError, RuntimeError, ImportError) as err:
        return None, f"LPIPS diversity skipped: its weights did not load ({err})"


lpips, LPIPS_NOTE = load_lpips()
if lpips is None:
    print(LPIPS_NOTE)
    if not SMOKE:
        STAND_INS.append(LPIPS_NOTE)
for name, images in sets.items():
    if lpips is not None:
        diversity[name]["lpips"] = lpips_diversity(images, lpips)
show_image_table(torch.cat([sets["dfp"], sets["seeds_only"]]).cpu(),
                 [f"DFP (VGG div. {diversity['dfp']['vgg']:.3f})",
                  f"seeds only ({diversity['seeds_only']['vgg']:.3f})"],
                 [str(k + 1) for k in range(K)],
                 f"From one style image: K = {K} DFP draws vs K random starts"
                 + (" (STAND-IN VGG19, not meaningful)" if SMOKE else ""),
                 RUN_DIR / "03_multimodal.png", xlabel="draw", ylabel="")

# %% [markdown]
# ### Diversity bought at what cost
# Higher diversity is better; the content and style losses (relative units, same objective for both sets) say
# what the diversity costs in fidelity to the photo and to the style. With ImageNet weights (full mode) the claim
# of the method is checked: the DFP set is more diverse than the seeds-only set. With the random-weight stand-in
# that comparison means nothing, so smoke mode only prints the table.

# %%
print(f"{'set':12s} {'VGG diversity':>14s} {'pixel diversity':>16s} {'LPIPS diversity':>16s} "
      f"{'content loss':>13s} {'style loss':>11s}")
for name, d in diversity.items():
    lpips_text = f"{d['lpips']:16.4f}" if "lpips" in d else f"{'-':>16s}"
    print(f"{name:12s} {d['vgg']:14.4f} {d['pixel']:16.4f} {lpips_text} "
          f"{mean_losses[name]['content']:13.4f} {mean_losses[name]['style']:11.4f}")
print("(diversity: mean over pairs, higher = more different, unitless; losses: relative units, "
      "mean over the K runs)")
if PRETRAINED:
    for measure in diversity["dfp"]:
        assert diversity["dfp"][measure] > diversity["seeds_only"][measure], \
            f"DFP must be more diverse than random starts alone ({measure})"
else:
    print("(stand-in VGG19 with random weights: these numbers only show that the code runs)")

# %% [markdown]
# ## 10. Speed: the optimiser, side by side
# The same objective, image size and number of iterations with `torch.optim.LBFGS` (which reads values back to
# the host on every iteration) and with `SyncFreeLBFGS`; on the GPU path also with VGG in mixed precision
# (float16 on a T4, bfloat16 on newer GPUs). `time_per_step` warms up first (`TIMING_WARMUP` iterations fill the
# L-BFGS memory, whose length sets the cost of an iteration), then times `TIMING_ITERATIONS` iterations with the
# device synchronised around them. Each variant's final loss is measured in float32. On a CPU there is nothing
# to synchronise, so the two optimisers should take about the same time. `experiments/bench_style.py` (`make bench`)
# measures the same at the full-mode size against a plain tutorial-style loop.

# %%
def time_variant(optimizer_name: str, autocast: torch.dtype | None = None) -> dict:
    """Time one optimiser on the main run's objective; its final loss, evaluated in float32."""
    obj = make_objective(content, style_image, autocast=autocast)
    image_t = StylisedImage(initial_image(content, INIT, SEED)).to(DEVICE)
    opt = make_optimizer(image_t, optimizer_name, LEARNING_RATE, HISTORY_SIZE)
    timing = time_per_step(lambda: optimisation_step(obj, image_t, opt), DEVICE, TIMING_ITERATIONS,
                           TIMING_WARMUP)
    return {**timing, "final_loss": evaluate(objective_fp32, image_t().detach())["total"]}


objective_fp32 = make_objective(content, style_image, autocast=None)
variants = {"torch.optim.LBFGS, fp32": ("torch_lbfgs", None),
            "SyncFreeLBFGS, fp32": ("lbfgs", None)}
if CHOICES.amp_dtype is not None:
    variants[f"SyncFreeLBFGS, VGG in {str(CHOICES.amp_dtype)[6:]}"] = ("lbfgs", CHOICES.amp_dtype)
timings = {label: time_variant(*args) for label, args in tqdm(variants.items(), desc="timing")}
reference = timings["torch.optim.LBFGS, fp32"]
for label, t in timings.items():
    ratio, loss_change = (t[key] / reference[key] for key in ("ms_per_step", "final_loss"))
    print(f"{label:28s} {t['ms_per_step']:8.1f} ms per iteration ({ratio:.2f}x torch's) | "
          f"final loss {t['final_loss']:.4f} ({100 * (loss_change - 1):+.2f} % against torch's)")
if CHOICES.emulated and not CHOICES.cuda:
    print("(T4 emulation: a CPU computes float16 slowly in software, so that row's time says "
          "nothing about a GPU)")

# %% [markdown]
# ### Does SyncFreeLBFGS take torch's steps?
# Both versions compute the same formulas, but not in the same order: torch adds `step * direction` to the
# pixels in one operation, ours multiplies and then adds, so the last bit of some pixels differs. L-BFGS
# amplifies such tiny differences: after about a hundred iterations two runs can differ by a few percent, even
# two runs of the same optimiser whose starts differ in one bit. So the claim checked here is twofold:
#
# 1. In the first `LOCKSTEP_STEPS` iterations, both take the same steps: no pixel differs by more than
#    `LOCKSTEP_TOLERANCE` of the largest change one iteration makes to a pixel.
# 2. After the timing runs above, SyncFreeLBFGS's final loss is at most `LOSS_MARGIN` above torch's.

# %%
differences, largest_step = lockstep_differences(objective_fp32, initial_image(content, INIT, SEED),
                                                 LOCKSTEP_STEPS, LEARNING_RATE, HISTORY_SIZE)
for step, difference in enumerate(differences, 1):
    print(f"iteration {step}: largest pixel difference {difference:.2e} "
          f"({difference / largest_step:.1e} of the largest pixel change, {largest_step:.3f})")
assert max(differences) <= LOCKSTEP_TOLERANCE * largest_step, "the two L-BFGS versions must agree"
same_steps = timings["SyncFreeLBFGS, fp32"]["final_loss"] / reference["final_loss"]
print(f"after {TIMING_WARMUP + TIMING_ITERATIONS} iterations: SyncFreeLBFGS's final loss is "
      f"{100 * (same_steps - 1):+.2f} % against torch's "
      f"(allowed: at most +{100 * LOSS_MARGIN:.0f} %)")
assert same_steps <= 1 + LOSS_MARGIN, "SyncFreeLBFGS must not end much worse than torch.optim.LBFGS"

# %% [markdown]
# ### Does SyncFreeLBFGS ever make the host wait?
# Reading a tensor's value on the host (`.item()`, `float(...)`, `if tensor:`) waits for the GPU to finish
# all its queued work. `HostReadCounter` counts such reads during a few iterations of each optimiser. The count
# is the same on any device, so this check runs on a CPU too. On a real GPU, torch's sync debug mode also turns
# any hidden wait of SyncFreeLBFGS into an error.

# %%
host_reads = {}
for name in ("lbfgs", "torch_lbfgs"):
    image_r = StylisedImage(initial_image(content, INIT, SEED)).to(DEVICE)
    opt = make_optimizer(image_r, name, LEARNING_RATE, HISTORY_SIZE)
    for _ in range(2):  # the first iteration allocates the memory; the second stores a pair
        optimisation_step(objective_fp32, image_r, opt)
    with HostReadCounter() as counter:
        for _ in range(3):
            optimisation_step(objective_fp32, image_r, opt)
    host_reads[name] = counter.reads / 3
    if name == "lbfgs" and CHOICES.cuda:
        synchronize(DEVICE)
        torch.cuda.set_sync_debug_mode("error")  # any host sync now raises
        try:
            optimisation_step(objective_fp32, image_r, opt)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        print("CUDA sync debug mode: SyncFreeLBFGS made no host sync")
    elif name == "lbfgs" and CHOICES.emulated:
        CHOICES.skip("torch.cuda.set_sync_debug_mode", "the count of host reads below")
print(f"host reads per iteration: SyncFreeLBFGS {host_reads['lbfgs']:.0f}, "
      f"torch.optim.LBFGS {host_reads['torch_lbfgs']:.0f}")
assert host_reads["lbfgs"] == 0 and host_reads["torch_lbfgs"] > 0

# %% [markdown]
# ### Mixed precision for VGG: what it does to the gradient
# Mixed precision runs VGG's convolutions in 16-bit floats: faster on a GPU's tensor cores, but with fewer
# digits. float16 keeps about 3 decimal digits and bfloat16 about 2. Below, the gradient of the objective at the
# white-noise start is computed with VGG in each format and compared with the float32 gradient. A *loss scale*
# (multiply the loss before the backward pass, divide the gradient after it) rescues gradients that are too
# small for float16. It cannot add digits, so if it does not shrink the error, the error comes from rounding.

# %%
start_image = initial_image(content, INIT, SEED)
formats = [(torch.float16, 1.0), (torch.float16, LOSS_SCALE), (torch.bfloat16, 1.0)]
if CHOICES.gpu_path and CHOICES.capability < (8, 0):  # a T4 (or its emulation) has no bfloat16
    formats = formats[:2]
    print(f"bfloat16 skipped: it needs compute capability 8.0 (this path: "
          f"{CHOICES.capability[0]}.{CHOICES.capability[1]})")
gradient_error = {}
for dtype, scale in formats:
    label = f"VGG in {str(dtype)[6:]}" + (f", loss scale {scale:g}" if scale != 1 else "")
    obj = make_objective(content, style_image, autocast=dtype)
    gradient_error[label] = autocast_gradient_error(obj, objective_fp32, start_image, scale)
    print(f"{label:32s} gradient off by {100 * gradient_error[label]:.2f} % of its norm")
print("VGG stays in float32 in this notebook (VGG_AUTOCAST = None): L-BFGS builds its steps from "
      "differences of gradients, so errors of this size change its path.")

# %% [markdown]
# ## 11. Reload the result in a fresh model and re-measure
# A fresh `StylisedImage` loads the checkpoint; it must hold exactly the pixels of the run, and a freshly built
# VGG19 (same weights: ImageNet, or the same seed for the stand-in) must give the same final losses.

# %%
fresh = StylisedImage(torch.zeros_like(content_in))
saved = load_checkpoint(CHECKPOINT, {"image": fresh}, config=CONFIG, map_location=DEVICE)
assert saved["step"] == STEPS and torch.equal(fresh.pixels.detach(), image.pixels.detach())
seed_everything(SEED)
fresh_vgg = VGG19Features([*CONTENT_LAYERS, *STYLE_LAYERS], PRETRAINED, POOLING).to(DEVICE)
again = evaluate(make_objective(content_in, style_in, extractor=fresh_vgg), fresh().detach())
for key in ("content", "style", "total"):
    assert math.isclose(again[key], final[key], rel_tol=1e-4, abs_tol=1e-6), (key, again[key])
print("reloaded image identical; losses re-measured with a fresh VGG19 (relative units):",
      {k: round(v, 4) for k, v in again.items()})

# %% [markdown]
# ## 12. metrics.json

# %%
quality = {
    "ms_per_iteration": round(ms_per_iteration, 2), "resolution": f"{w}x{h}",
    "content_loss_rel": final["content"], "style_loss_rel": final["style"],
    "style_loss_rel_at_start": style_values[0], "colour_kept_iq_error": chroma_error,
    "sweep": {str(beta): {"content": m["content"], "style": m["style"]}
              for beta, (_, m) in sweep.items()},
    "diversity": diversity, "mean_losses": mean_losses,
    "timing_ms_per_iteration": {label: t["ms_per_step"] for label, t in timings.items()},
    "timing_final_loss": {label: t["final_loss"] for label, t in timings.items()},
    "lockstep_difference_of_largest_step": max(differences) / largest_step,
    "host_reads_per_iteration": host_reads,
    "autocast_gradient_error": gradient_error,
}
path = write_metrics(RUN_DIR, NOTEBOOK, SMOKE, DEVICE, iterations=STEPS, seconds=watch.seconds,
                     throughput={"it_per_s": watch.throughput()["it_per_s"]}, quality=quality,
                     stand_ins=STAND_INS, seconds_per_image=watch.seconds,
                     image_size=IMAGE_SIZE, optimizer=OPTIMIZER, k=K, multi_steps=MULTI_STEPS,
                     style_image=STYLE_IMAGE, channels_last=CHANNELS_LAST,
                     autocast=str(VGG_AUTOCAST), gpu_path=CHOICES.describe(),
                     left_out_of_gallery=LEFT_OUT)
print(path.read_text())

# %% [markdown]
# ## What to take away
# * Style transfer by optimisation needs no training: a fixed VGG19 defines "content" (deep features) and "style"
#   (Gram matrices of several layers), and the pixels of one image are optimised to match both.
# * A Gram matrix ignores where features are; that is why it captures texture, and why spatial transforms of the
#   style features cannot diversify a stylisation. DFP's random orthogonal matrix changes the features in channel
#   space while keeping their covariance, and gives several stylisations of one painting.
# * $\beta/\alpha$ sets the balance between the photo and the painting; relative units (each loss divided by its
#   value for an all-zero map) make that balance readable and independent of the network's feature scale.
# * On a GPU, an optimisation loop should not read values back to the host on every iteration: keep the losses on
#   the device and read them every few iterations; `torch.optim.LBFGS` does read them, `SyncFreeLBFGS` does not.

# %% [markdown]
# ## What to try next
# * `INIT = "content"` starts from the photo: fewer iterations for a good result, less of the painting's layout.
# * `POOLING = "avg"` (the paper found it slightly better) and `STYLE_LAYERS` without relu5_1 or relu1_1: strokes
#   get smaller or larger.
# * `PRESERVE_COLOURS = True` for the main run, `PAINTING = "great_wave"`, or your own photo by path or URL.
# * Mixed precision for VGG (`VGG_AUTOCAST = torch.float16` or `torch.bfloat16`): section 10 printed how far
#   the gradient moves from float32 in your run. Try it to compare the speed with the final loss, not for
#   the main result.
# * Raise `DFP_LAMBDA` towards 1 (more diversity) or lower `DFP_ALPHA` (more of the photo) and watch the table.
