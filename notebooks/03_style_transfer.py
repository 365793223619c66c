# %% [markdown]
# # 03 · Neural style transfer: a photo in the style of a painting
#
# {{BADGE}}
#
# You will repaint a photo in the style of a famous painting. A network trained on photos, VGG19, tells
# what the *content* of an image is and what its *style* is. Then the pixels of one image change, step by
# step, until it has the photo's content and the painting's style (Gatys et al. 2016). Last, one painting
# gives several different stylisations of the photo (DFP, Wang et al. 2020).
#
# You will learn:
# * how deep features describe content, and Gram matrices describe style,
# * how to optimise the pixels of an image with L-BFGS, and resume after a disconnect,
# * how one weight trades the photo against the painting,
# * how a random rotation of features gives different stylisations of one painting.
#
# ⏱ A full run takes about 5 min on a Colab T4 (estimated), plus a one-time 0.8 GB download. The CPU smoke run
# takes about 1 min (measured).

# %% SETUP

# %%
import math, os
from typing import Callable, Sequence
import matplotlib.pyplot as plt, torch, torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from helpers import downloads, environment as env, plotting, training
from helpers.style import data as sdata, evaluate as sev, multimodal as smm, optim as sopt
from helpers.style.model import check_objective_layers, keep_colours, luminance_image, rgb_to_yiq
from helpers.style.optim import make_optimizer
from helpers.vgg import STAND_IN_NOTE, VGG19Features

# %% [markdown]
# ## 1. Settings
# * `RUN_DIR_ON_DRIVE`: in Colab, keep the run on Google Drive. A new session then resumes it.
# * `SEED`: the random seed of the white-noise start.
# * `PAINTING`: the style, such as `"great_wave"`. `sdata.PAINTINGS` lists the public-domain ones.
# * `CONTENT_IMAGE`, `STYLE_IMAGE`: your own pictures, as a file path, a web address or `skimage:NAME`. An
#   empty `STYLE_IMAGE` means the painting above.
# * `IMAGE_SIZE`: the longer side of the images in pixels.
# * `STYLE_WEIGHT`: how much painting and how little photo. Section 8 tries four values.
# * `PRESERVE_COLOURS`: keep the photo's colours and take only the light and dark from the painting.
# * `INIT`: start from white noise, as the paper does, or from the photo.
# * `STEPS`: iterations of the main run.
# * `K`, `DFP_LAMBDA`: how many different stylisations section 9 makes, and how different they should be.

# %%
# Settings you may change
RUN_DIR_ON_DRIVE = False               # True in Colab: keep the run on Google Drive
SEED = 0                               # random seed: the same seed gives the same start
PAINTING = "starry_night"              # the style: a key of sdata.PAINTINGS
CONTENT_IMAGE = os.environ.get("CONTENT_IMAGE", "skimage:chelsea")  # path, URL or skimage:NAME
STYLE_IMAGE = os.environ.get("STYLE_IMAGE", "")  # your own style image; empty: PAINTING
IMAGE_SIZE = 512                       # longer side in pixels (the cat photo: 512x341)
STYLE_WEIGHT = 400.0                   # beta: larger = more painting, less photo
PRESERVE_COLOURS = False               # True: keep the photo's colours
INIT = "noise"                         # "noise" (the paper) or "content" (start from the photo)
STEPS = 300                            # iterations of the main run
K = 4                                  # stylisations of one painting in section 9
DFP_LAMBDA = 0.6                       # how different they are, from 0 to 1 (the DFP paper: 0.6)

# %%
#@title Advanced settings
SMOKE = env.smoke_mode()               # SMOKE=1: CI's tiny run (you can ignore this)
NOTEBOOK = "03_style_transfer"
GRAY_STYLE_IMAGE = "skimage:gravel"    # a grayscale texture, to show the gray -> RGB conversion
PRETRAINED = True                      # ImageNet VGG19 (downloads once); False: random weights
OFFLINE = False                        # True: download nothing, stand-in pictures for the paintings
POOLING = "max"                        # "avg": slightly better in the paper; VGG19 trained with max
CONTENT_LAYERS = ["relu4_2"]           # the paper's conv4_2: torchvision names it after its ReLU
STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]  # conv1_1 ... conv5_1
STYLE_LAYER_WEIGHTS = [1 / 5] * 5      # w_l of the paper
CONTENT_WEIGHT = 1.0                   # alpha, in relative units (section 6)
TV_WEIGHT = 10.0                       # total-variation weight (0 = the paper): less pixel noise
OPTIMIZER = "lbfgs"                    # the paper's L-BFGS (sync-free); "torch_lbfgs"; "adam"
HISTORY_SIZE = 100                     # L-BFGS memory: curvature pairs kept (torch's default)
LOG_EVERY = 10                         # iterations between reads of the losses (a read waits)
CHECKPOINT_EVERY = 100                 # a checkpoint holds the L-BFGS memory: ~420 MB at 512 px
SWEEP_STYLE_WEIGHTS = [4.0, 40.0, 400.0, 4_000.0]  # beta values of the style-weight sweep
SWEEP_STEPS, GALLERY_STEPS, MULTI_STEPS = 300, 200, 300  # iterations per run, sections 8 and 9
DFP_ALPHA = 0.6                        # stylisation strength alpha (the DFP code's default)
DFP_LAYERS = STYLE_LAYERS              # layers whose features are perturbed and matched
LPIPS_NET = "alex"                     # LPIPS backbone (downloads AlexNet); None: skipped
TIMING_WARMUP = HISTORY_SIZE           # timing warm-up: fill the L-BFGS memory first
TIMING_ITERATIONS = 20                 # timed iterations per optimiser
LOCKSTEP_STEPS = 3                     # first iterations in which both L-BFGS versions must agree
LOCKSTEP_TOLERANCE = 1e-4              # ... to this fraction of an iteration's largest change
LOSS_MARGIN = 0.20                     # SyncFreeLBFGS's final loss: at most 20 % above torch's
LOSS_SCALE = 2.0**7                    # the loss scale tried with fp16 in section 10
VGG_AUTOCAST = None                    # float32; section 10 shows what fp16/bf16 do to the gradient
if SMOKE:  # CI's tiny run: you can ignore this
    IMAGE_SIZE, STEPS, K, PRETRAINED, OFFLINE, LPIPS_NET = 48, 10, 3, False, True, None
    LOG_EVERY, CHECKPOINT_EVERY, SWEEP_STEPS, GALLERY_STEPS, MULTI_STEPS = 1, 5, 5, 5, 5
    TIMING_WARMUP, TIMING_ITERATIONS = 2, 3
FIRST_SESSION_STEPS = STEPS // 2       # the main run stops here once, to show resume
LEARNING_RATE = {"lbfgs": 1.0, "torch_lbfgs": 1.0, "adam": 0.02}[OPTIMIZER]
DFP_WEIGHT = STYLE_WEIGHT              # gamma: weight of matching the DFP feature targets
STAND_IN_TAG = "" if PRETRAINED else " (STAND-IN: random-weight VGG19, not meaningful)"

# %%
env.use_drive_for_runs(RUN_DIR_ON_DRIVE)  # mounts Drive and sets $RUN_DIR there (Colab only)
DEVICE = env.pick_device()
RUN_DIR = env.run_dir(NOTEBOOK)        # $RUN_DIR/<notebook>: checkpoint, figures, metrics.json
CHECKPOINT = RUN_DIR / "gatys_checkpoint.pt"
CHOICES = env.gpu_choices(DEVICE)      # the GPU path's decisions (a T4's with EMULATE_T4=1)
CHANNELS_LAST = CHOICES.channels_last  # the memory layout that fast GPU convolutions prefer
if CHOICES.cuda:
    torch.backends.cudnn.benchmark = True  # one image size throughout: autotune the kernels
elif CHOICES.emulated:
    CHOICES.skip("cuDNN autotuning (torch.backends.cudnn.benchmark)", "the CPU's convolutions")
STAND_INS = [] if PRETRAINED else [STAND_IN_NOTE]
env.seed_everything(SEED)
print(f"mode: {'smoke' if SMOKE else 'full'} | device: {env.describe_device(DEVICE)} | "
      f"run: {RUN_DIR}")
print("GPU path:", CHOICES.describe(), "| VGG in float32" if VGG_AUTOCAST is None else "")

# %% [markdown]
# ## 2. Theory: content and style (Gatys et al. 2016)
#
# VGG19 is a network trained to recognise objects in ImageNet photos. It turns an image into feature maps,
# layer after layer. At layer $l$ there are $N_l$ feature maps of $M_l = H_l W_l$ positions. We write them as a
# matrix $F^l \in \mathbb{R}^{N_l \times M_l}$ for the image $\vec{x}$ being made, $P^l$ for the content photo
# $\vec{p}$ and $S^l$ for the style image $\vec{a}$.
#
# **Content.** Deep layers keep *what* is where, such as objects and their layout, but not the exact pixels.
# The content loss compares the features directly, at one deep layer. The paper uses conv4_2:
# $$\mathcal{L}_{content}(\vec{p}, \vec{x}) = \tfrac12 \sum_{i,j} \big(F^l_{ij} - P^l_{ij}\big)^2 .$$
#
# **Style.** The *Gram matrix* of a layer holds the correlations between its feature maps, summed over all
# positions. It keeps textures, colours and strokes, but it forgets where they are:
# $$G^l_{ij} = \sum_k F^l_{ik} F^l_{jk}, \qquad
# E_l = \frac{1}{4 N_l^2 M_l^2} \sum_{i,j}\big(G^l_{ij} - A^l_{ij}\big)^2,
# \qquad \mathcal{L}_{style}(\vec{a}, \vec{x}) = \sum_l w_l E_l ,$$
# with $A^l$ the Gram matrix of the style image and $w_l = 1/5$ on conv1_1, conv2_1, conv3_1, conv4_1, conv5_1.
# Shallow layers match colours and fine grain. Deeper layers add larger, more coherent strokes. So content and
# style can be separated: the deep content layer fixes the layout, and the Gram matrices paint a texture over it.
#
# **Total loss.** The image $\vec{x}$ itself is the variable. Starting from white noise, the optimiser L-BFGS
# lowers
# $$\mathcal{L}_{total} = \alpha\,\mathcal{L}_{content} + \beta\,\mathcal{L}_{style}
# \;(+\;\tau\,\mathrm{TV}(\vec{x})),
# \qquad \mathrm{TV}(\vec{x}) = \overline{(x_{i+1,j}-x_{i,j})^2} + \overline{(x_{i,j+1}-x_{i,j})^2}.$$
# The *total variation* TV is the mean squared difference of neighbouring pixels. A small TV term removes pixel
# noise. The ratio $\alpha/\beta$ sets the balance between the photo and the painting.
#
# In the code, the layers have torchvision's names: `relu4_2` is the paper's conv4_2, and `relu1_1` ...
# `relu5_1` are its style layers.

# %% [markdown]
# ## 3. Data: the photo and the painting
# Each painting is downloaded once into `DATA_DIR/paintings`. A gallery painting that fails to download is
# left out with a message. Smoke mode downloads nothing and uses scikit-image pictures as *stand-ins*, pictures
# that take the paintings' place.

# %%
def painting_source(key: str) -> str:
    """The painting's file (downloaded once); offline, its stand-in, listed in STAND_INS."""
    if OFFLINE:
        STAND_INS.append(f"style: {sdata.PAINTING_STAND_INS[key]} stands in for the painting "
                         f"'{sdata.PAINTINGS[key].title}' (smoke mode downloads nothing)")
        return sdata.PAINTING_STAND_INS[key]
    return str(sdata.fetch_painting(key, env.data_dir() / "paintings"))


STYLE_IMAGE = STYLE_IMAGE or painting_source(PAINTING)
GALLERY, LEFT_OUT = {}, []             # the other paintings, for section 8
for key in sdata.PAINTINGS:
    if key != PAINTING:
        try:
            GALLERY[key] = painting_source(key)
        except downloads.DownloadError as err:
            print(f"LEFT OUT of the gallery: {err}")
            LEFT_OUT.append(f"{sdata.PAINTINGS[key].title}: download failed")
for note in STAND_INS:
    print("STAND-IN:", note)

# %% [markdown]
# `load_image` reads a file, a web address or `skimage:NAME`. It turns any image into RGB colour. It resizes
# the longer side to `IMAGE_SIZE` and keeps the aspect ratio. A bad input gets an error that names the input
# and says what to do. Section 10 shows five of them.

# %%
content = sdata.load_image(CONTENT_IMAGE, IMAGE_SIZE, "content image", DEVICE)
style_image = sdata.load_image(STYLE_IMAGE, IMAGE_SIZE, "style image", DEVICE)
gray_style = sdata.load_image(GRAY_STYLE_IMAGE, IMAGE_SIZE, "style image", DEVICE)
h, w = content.shape[-2:]
assert content.shape[:2] == (1, 3) and max(h, w) == IMAGE_SIZE
print(f"content {w}x{h} px: {sdata.describe_source(CONTENT_IMAGE)}")
print(f"style   {style_image.shape[-1]}x{style_image.shape[-2]} px: "
      f"{sdata.describe_source(STYLE_IMAGE)}")
plotting.show_panels({f"content: {sdata.describe_source(CONTENT_IMAGE)}": content,
                      f"style: {sdata.describe_source(STYLE_IMAGE)}": style_image,
                      f"grayscale style: {sdata.describe_source(GRAY_STYLE_IMAGE)}": gray_style},
                     "Inputs: the content photo and the style images" + " (STAND-INS)" * OFFLINE,
                     RUN_DIR / "inputs.png", value_range=(0, 1))

# %% [markdown]
# ## 4. Model: a frozen VGG19 feature extractor
# Only the layers up to relu5_1 are built, and all of them are frozen. The only trainable parameters in this
# notebook are the pixels of the image being stylised.

# %%
env.seed_everything(SEED)  # the random-weight stand-in is rebuilt identically for the reload check
vgg = VGG19Features([*CONTENT_LAYERS, *STYLE_LAYERS], PRETRAINED, POOLING).to(DEVICE)
if CHANNELS_LAST:
    vgg = vgg.to(memory_format=torch.channels_last)
n_params = training.count_parameters(vgg)
n_trainable = training.count_parameters(vgg, trainable_only=True)
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
# Dividing by $M$ keeps it from growing with the image size.

# %% [helpers] style/losses: gram_matrix

# %% [markdown]
# **Content loss** at the content layer: $\mathrm{mean}(F-P)^2$. This is the paper's $\tfrac12\sum(F-P)^2$
# divided by $N M / 2$, so it has the same minimum. **Style loss**: per layer $E_l = \frac14\,\mathrm{mean}(G-A)^2$,
# which equals the paper's $\frac{1}{4N^2M^2}\sum(\hat G - \hat A)^2$ for the unnormalised Grams $\hat G = M G$.
# Then the layers are summed with their weights, $\sum_l w_l E_l$. **Total variation**: the mean squared
# difference of neighbouring pixels, down and across.

# %% [helpers] style/losses: content_loss, style_layer_loss, style_loss

# %% [helpers] style/losses: total_variation_loss

# %% [markdown]
# A check by hand, on one image with two channels at two positions, $F = \begin{pmatrix}1&2\\3&4\end{pmatrix}$.
# The Gram matrix is $\hat G = FF^\top = \begin{pmatrix}5&11\\11&25\end{pmatrix}$, so $G = \hat G / 2$.
# Against a zero target, $E = (25 + 121 + 121 + 625)/(4 \cdot 2^2 \cdot 2^2) = 13.9375$.
# The content loss against zero is $(1 + 4 + 9 + 16)/4 = 7.5$. The image
# $\begin{pmatrix}0&1\\2&4\end{pmatrix}$ has $\mathrm{TV} = \frac{2^2 + 3^2}{2} + \frac{1^2 + 2^2}{2} = 9$.

# %%
F_example = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
assert torch.equal(gram_matrix(F_example), torch.tensor([[[2.5, 5.5], [5.5, 12.5]]]))
assert math.isclose(style_layer_loss(F_example, torch.zeros(1, 2, 2)).item(), 13.9375, rel_tol=1e-6)
assert math.isclose(content_loss(F_example, torch.zeros_like(F_example)).item(), 7.5, rel_tol=1e-6)
tv_example = total_variation_loss(torch.tensor([[0.0, 1.0], [2.0, 4.0]]).view(1, 1, 2, 2)).item()
assert math.isclose(tv_example, 9.0, rel_tol=1e-6)
print("hand-computed values: E = 13.9375, content = 7.5, TV = 9.0: all reproduced")

# %% [markdown]
# ## 6. The objective: content, style and TV in relative units
# The paper's ratio $\alpha/\beta = 10^{-3}$ only holds for the paper's own network. Torchvision's VGG19 has
# other feature scales. So we divide each loss by its value for an all-zero feature map, which is
# $\overline{P^2}$ for the content and $\frac14\overline{A_l^2}$ for style layer $l$. A loss in these *relative
# units* says what fraction of the target's energy is missing. A relative content loss of 0.4 means that the
# features are off by 40 % of their energy. The objective is
# $$\mathcal{L} = \alpha\,\frac{\mathcal{L}_{content}}{\overline{P^2}}
# + \beta \sum_l w_l \frac{E_l}{\frac14 \overline{A_l^2}} + \tau\,\mathrm{TV}.$$
# The defaults $\alpha = 1$ and $\beta = 400$ are a starting point, not a tuned optimum.
#
# `StyleObjective` computes the targets once: the content's features and the style's Gram matrices. The
# optional `feature_targets` term is for DFP in section 9.

# %% [helpers] style/model: energy, features_by_name, relative_feature_loss

# %% [helpers] style/model: StyleObjective

# %% [markdown]
# The claim of the relative units, checked. Feature maps at half the content's give a relative content loss of
# $\overline{(P/2 - P)^2}/\overline{P^2} = 1/4$. Half the style's features give Gram matrices $A_l/4$. So each
# style layer scores $w_l \cdot \tfrac14\overline{(A_l/4 - A_l)^2} / \tfrac14\overline{A_l^2} = (3/4)^2\,w_l$.

# %%
def make_objective(content_img: Tensor, style_img: Tensor, beta: float = STYLE_WEIGHT,
                   feature_targets: Sequence[Tensor] = (),
                   autocast: torch.dtype | None = VGG_AUTOCAST,
                   extractor: VGG19Features = vgg) -> StyleObjective:
    """StyleObjective with the settings' layers and weights."""
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
# The image's pixels are the only parameters. One iteration computes the objective at the current image, takes
# one optimiser step and clamps the pixels to $[0, 1]$.
#
# **L-BFGS** remembers the last 100 steps $s_k = x_{k+1} - x_k$ and the gradient changes
# $y_k = \nabla_{k+1} - \nabla_k$. From them it estimates how the loss curves, and it takes the step $-H\nabla$.
# Here $H$ estimates the inverse of the Hessian, the matrix of second derivatives. So L-BFGS takes Newton-like
# steps without a Hessian.
#
# The losses stay on the device as tensors. Reading one, for example to print it, makes the computer wait for
# the GPU. So the loop reads them only every `LOG_EVERY` iterations. `torch.optim.LBFGS` reads numbers in every
# iteration, about 200 once its memory is full. `SyncFreeLBFGS` takes the same steps without reading any, and
# `OPTIMIZER = "lbfgs"` picks it.

# %% [helpers] style/optim: StylisedImage, optimisation_step

# %% [helpers] style/optim: stylise

# %% [markdown]
# ### The main run, with checkpoints and resume
# Every `CHECKPOINT_EVERY` iterations, a checkpoint is written to `RUN_DIR`. It holds the pixels, the L-BFGS
# memory, the history of the losses and the time spent. Re-running the cell resumes from it, for example after
# Colab disconnects. To show this, the first call stops at `FIRST_SESSION_STEPS`, and the second call starts
# from the saved state. The losses also go to TensorBoard.

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
if env.in_colab():
    %load_ext tensorboard
    %tensorboard --logdir {RUN_DIR / "tensorboard"}

# %%
def run_main(until: int) -> tuple[StylisedImage, training.TrainingRun]:
    """Resume the main run from its checkpoint if there is one; continue to `until` iterations."""
    image = StylisedImage(sopt.initial_image(content_in, INIT, SEED)).to(DEVICE)
    optimizer = make_optimizer(image, OPTIMIZER, LEARNING_RATE, HISTORY_SIZE)
    run = training.TrainingRun(history=training.History(RUN_DIR / "tensorboard"))
    state = {"image": image, "optimizer": optimizer, "run": run}
    if CHECKPOINT.is_file():
        training.load_checkpoint(CHECKPOINT, state, CONFIG, map_location=DEVICE)
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
            training.synchronize(DEVICE)
        run.stopwatch.count(chunk)
        training.save_checkpoint(CHECKPOINT, state, run.step, CONFIG)
    progress.close()
    run.history.flush()
    return image, run


image, main_run = run_main(FIRST_SESSION_STEPS)
print(f"first session: {main_run.stopwatch.iterations} iterations; checkpoint {CHECKPOINT.name}, "
      f"{CHECKPOINT.stat().st_size / 2**20:.1f} MiB")

# %% [markdown]
# *Colab disconnected*: everything in memory is gone. The same function finds the checkpoint and continues,
# with L-BFGS's memory.

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
final = sev.evaluate(objective, image().detach())
ms_per_iteration = 1000 * watch.seconds / watch.iterations
print(f"{STEPS} iterations in {watch.seconds:.1f} s ({ms_per_iteration:.0f} ms per iteration) at "
      f"{w}x{h} px on {env.describe_device(DEVICE)}")
plotting.show_panels({"content": content,
                      f"style: {sdata.describe_source(STYLE_IMAGE)}": style_image,
                      f"result ({STEPS} iterations)": result},
                     "Gatys et al. style transfer" + STAND_IN_TAG, RUN_DIR / "03_result.png",
                     value_range=(0, 1))

# %% [markdown]
# ## 8. Results
# ### Your run
# The numbers below come from your run. The losses are in relative units, as in section 6.

# %%
from IPython.display import Markdown, display

assert final["style"] < 0.5 * style_values[0], "the style loss must fall during the optimisation"
display(Markdown(
    f"- The relative style loss fell from **{style_values[0]:.3g}** at the white-noise start to "
    f"**{final['style']:.3g}** after {STEPS} iterations.\n"
    f"- The relative content loss ended at **{final['content']:.3g}**: the features of the photo "
    f"are off by {100 * final['content']:.0f} % of their energy.\n"
    f"- {STEPS} iterations took {watch.seconds:.1f} s, {ms_per_iteration:.0f} ms per iteration, at "
    f"{w}x{h} px on {env.describe_device(DEVICE)}." + STAND_IN_TAG))
print("final losses (relative units):", {k: round(v, 4) for k, v in final.items()})

# %% [markdown]
# There is no reference run with ImageNet weights yet, so there are no reference numbers to compare with.
#
# ### Loss curves of the main run

# %%
fig, ax = plt.subplots(figsize=(8, 4))
for name in ["total", "content", "style", "tv"]:
    ax.plot(*history.series(name), label=name)
ax.axvline(FIRST_SESSION_STEPS, color="gray", ls=":", label="resumed from the checkpoint")
ax.set(yscale="log", xlabel="L-BFGS iteration" if "lbfgs" in OPTIMIZER else "Adam step",
       ylabel="loss (relative units, log scale)",
       title="Main run: losses during the optimisation" + STAND_IN_TAG)
ax.grid(alpha=0.3)
ax.legend()
plotting.save_figure(fig, RUN_DIR / "03_loss_curves.png")
plt.show()

# %% [markdown]
# ### Keeping the photo's colours
# Gatys et al. also showed how to transfer the style to the luminance only, the light and dark of an image.
# Both images go to the YIQ colour space. Y is the luminance, and I and Q hold the colour. The style's
# luminance is matched to the content's mean and standard deviation. The optimisation runs on the two gray
# luminance images. Then the result's Y is put back with the photo's I and Q. The claim to check: the colours
# stay the photo's, up to clipping to valid RGB, while the luminance changes.
#
# `run_stylisation` saves each finished image in `RUN_DIR/stylisations`. When you run the notebook again with
# the same settings, it reuses these images instead of computing them again, and says so.

# %%
SAVED_RUNS = RUN_DIR / "stylisations"  # every finished run's image: a second Run all reuses them
runs_done = {"reused": 0, "computed": 0}


def run_stylisation(content_img: Tensor, style_img: Tensor, steps: int, beta: float = STYLE_WEIGHT,
                    seed: int = SEED, feature_targets: Sequence[Tensor] = ()) -> tuple:
    """One Gatys run (DFP run, with feature targets) from a seeded random start: image, losses.
    A run saved in RUN_DIR by an earlier Run all, with the same inputs and settings, is reused."""
    obj = make_objective(content_img, style_img, beta, feature_targets)
    key = sopt.run_key(content_img, style_img, *feature_targets, steps=steps, beta=beta, seed=seed,
                       dfp_weight=DFP_WEIGHT, config=CONFIG)
    path = SAVED_RUNS / f"{key}.pt"
    if path.is_file():
        out = torch.load(path, map_location=DEVICE)
        runs_done["reused"] += 1
    else:
        out = stylise(obj, sopt.initial_image(content_img, INIT, seed), steps, OPTIMIZER,
                      LEARNING_RATE)
        SAVED_RUNS.mkdir(exist_ok=True)
        torch.save(out.cpu(), path.with_suffix(".part"))
        path.with_suffix(".part").replace(path)  # a run cut short leaves no half file
        runs_done["computed"] += 1
    return out, sev.evaluate(obj, out)


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
plotting.show_panels({"content": content, f"result ({STEPS} iterations)": result,
                      "colours of the content kept": colour_kept},
                     "Luminance-only transfer keeps the photo's colours" + STAND_IN_TAG,
                     RUN_DIR / "03_colours_kept.png", value_range=(0, 1))

# %% [markdown]
# ### Style-weight sweep
# Same content, style, start and number of iterations. Only $\beta$ changes, with $\alpha = 1$. A small $\beta$
# keeps the photo. A large $\beta$ gives texture with only a trace of the photo's layout. The check below: the
# largest $\beta$ ends with a lower style loss and a higher content loss than the smallest.

# %%
sweep = {beta: run_stylisation(content, style_image, SWEEP_STEPS, beta)
         for beta in tqdm(SWEEP_STYLE_WEIGHTS, desc="style-weight sweep")}
say_reused()
plotting.show_panels({f"beta = {beta:g}\ncontent {m['content']:.2f}, style {m['style']:.3f}": img
                      for beta, (img, m) in sweep.items()},
                     "Style-weight sweep (alpha = 1; losses in relative units)" + STAND_IN_TAG,
                     RUN_DIR / "03_style_weight_sweep.png", value_range=(0, 1))
for beta, (_, m) in sweep.items():
    print(f"beta = {beta:>8,.0f}: relative content loss {m['content']:.3f}, "
          f"style loss {m['style']:.4f}")
(_, low), (_, high) = sweep[min(sweep)], sweep[max(sweep)]
assert high["style"] < low["style"] and high["content"] > low["content"], \
    "a larger beta must trade content for style"

# %% [markdown]
# ### The same photo in the style of other paintings
# Nothing in the method belongs to one painting. The same code runs with the other paintings of
# `sdata.PAINTINGS`, for `GALLERY_STEPS` iterations each. Each run must lower its own style loss from the white-noise start.

# %%
gallery = {}
for note in LEFT_OUT:
    print("left out (see section 3):", note)
for key, source in tqdm(GALLERY.items(), desc="other paintings"):
    painting = sdata.load_image(source, IMAGE_SIZE, f"style image {key}", DEVICE)
    start = sopt.initial_image(content, INIT, SEED)
    image_k, losses_k = run_stylisation(content, painting, GALLERY_STEPS)
    at_start = sev.evaluate(make_objective(content, painting), start)
    assert losses_k["style"] < at_start["style"], f"{key}: the style loss must fall"
    gallery[f"style: {sdata.describe_source(source)}"] = painting
    gallery[f"result: relative style loss {losses_k['style']:.3f}"] = image_k
say_reused()
if gallery:
    plotting.show_panels(gallery, "The photo in the style of other paintings" + STAND_IN_TAG,
                         RUN_DIR / "03_gallery.png", value_range=(0, 1), size=3.0)

# %% [markdown]
# > **Where this differs from the paper.** The losses are in relative units, so $\beta = 400$ is not the paper's
# > ratio. A small TV term smooths the pixels, which the paper does not have. The pixels are clamped to $[0, 1]$
# > after each step. VGG uses max pooling, while the paper found average pooling slightly better.

# %% [markdown]
# ## 9. Many stylisations from one painting: deep feature perturbation (DFP, Wang et al. 2020)
# Plain Gatys runs that differ only in their random start end in nearly the same picture. That is the baseline
# to beat.
#
# **Why not move the style features around?** A Gram matrix forgets where features are. Shuffling, flipping
# or rotating the positions of a feature map leaves $G = FF^\top/M$ unchanged. A permutation $\Pi$ of the
# positions gives $F\Pi\Pi^\top F^\top = FF^\top$. So spatial transforms of the style features give *no* new
# style targets.

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
# DFP gets truly different stylisations from ONE style image. It changes the style features in channel space,
# inside the *whitening and colouring transform* (WCT, Li et al. 2017).
#
# Take one layer, with content features $f_c$ and style features $f_s$, both $N \times M$. Let $m_c, m_s$ be their
# means and $E_c D_c E_c^\top$, $E_s D_s E_s^\top$ the eigen-decompositions of their covariances. Whitening
# removes the content's covariance, and colouring gives it the style's:
# $$\hat f_c = E_c D_c^{-1/2} E_c^\top (f_c - m_c) \quad\text{(whitening: identity covariance)}$$
# $$f_{cs} = E_s D_s^{1/2} E_s^\top \hat f_c + m_s \quad\text{(colouring: the style's covariance)}$$
# $$f_{cs}^{Z} = E_s D_s^{1/2}\, Z\, E_s^\top \hat f_c + m_s, \qquad Z = U \text{ from the SVD }
# U\Sigma V^\top \text{ of a Gaussian matrix}$$
# Here $Z$ is a random *orthogonal* matrix, a random rotation, with $ZZ^\top = I$. So
# $\mathrm{cov}(f_{cs}^Z) = E_s D_s^{1/2} Z Z^\top D_s^{1/2} E_s^\top = E_s D_s E_s^\top$. The style statistics
# stay the same, while the features change with every draw of $Z$. DFP blends the perturbed and plain features
# with the diversity strength $\lambda$. Then it blends the result with the content features, with the
# stylisation strength $\alpha_{s}$. Both are 0.6 in the DFP paper:
# $$t = \alpha_{s}\big[\lambda f^Z_{cs} + (1-\lambda) f_{cs}\big] + (1-\alpha_{s}) f_c .$$

# %% [helpers] style/multimodal: random_orthogonal, covariance_eigen

# %% [helpers] style/multimodal: whitening_colouring

# %% [helpers] style/multimodal: dfp_target, dfp_targets

# %% [markdown]
# The claim $\mathrm{cov}(f^Z_{cs}) = \mathrm{cov}(f_s)$, checked on the relu1_1 features: the perturbed WCT keeps
# the style's covariance, yet its features differ from the plain WCT's. The claim needs a content covariance of
# full rank: more positions than channels, and no dead channel. At deep layers of small images that fails, and
# the match is only approximate.

# %%
fc, fs = (dict(zip(vgg.layers, vgg(x)))["relu1_1"] for x in (content, style_image))
z_draw = torch.Generator().manual_seed(SEED)
plain, perturbed = (whitening_colouring(fc, fs, z) for z in
                    (None, lambda k: random_orthogonal(k, z_draw)))
cov_style = smm.feature_covariance(fs)
cov_error = ((smm.feature_covariance(perturbed) - cov_style).norm() / cov_style.norm()).item()
feature_change = ((perturbed - plain).norm() / plain.norm()).item()
print(f"perturbed WCT: covariance off by {cov_error:.1e} of the style's; features moved by "
      f"{feature_change:.2f} of their norm")
assert cov_error < 1e-3 and feature_change > 0.1

# %% [markdown]
# **From targets to an image.** The DFP paper uses trained decoders that turn the targets $t$ into an image. We
# find the image by optimisation instead. It lowers the Gatys loss *plus* a term that pulls the features of the
# style layers towards the DFP targets:
# $$\mathcal{L}_{DFP} = \mathcal{L}_{Gatys} + \gamma\,\frac{1}{L}\sum_l
# \frac{\overline{(F^l - t_l)^2}}{\overline{t_l^2}} .$$
# The Gram matrix of $t_l$ is close to the style's, whatever $Z$ is. So $Z$ can only reach the image through a
# loss on the features themselves. That is why the extra term is needed.
#
# **Diversity** is the mean distance over all pairs of the $K$ outputs, as in the DFP paper. We measure it three
# ways. The first is a distance of VGG features, normalised at each position. The second is the mean absolute
# pixel difference. The third, in full mode only, is *LPIPS*, a learned distance between images that matches
# human judgement. The baseline is $K$ plain Gatys runs that differ only in their random start. The DFP set
# uses the same $K$ starts, each with its own $Z$.
#
# ⏱ About 3 min on a T4 (estimated). Re-run this cell to continue: finished runs are reused.

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
diversity = {name: {"vgg": sev.feature_diversity(images, vgg), "pixel": sev.pixel_diversity(images)}
             for name, images in sets.items()}
mean_losses = {name: {key: sum(m[key] for _, m in runs) / K for key in ("content", "style")}
               for name, runs in (("dfp", dfp_runs), ("seeds_only", seed_runs))}


# %%
def load_lpips():
    """torchmetrics' LPIPS (AlexNet), or None with the reason when its weights cannot be had."""
    if LPIPS_NET is None:
        return None, "LPIPS diversity skipped in smoke mode (its AlexNet weights need a download)"
    try:
        from torchvision.models import AlexNet_Weights
        downloads.cache_torchvision_weights(AlexNet_Weights.IMAGENET1K_V1,
                                            "AlexNet weights for LPIPS")
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        lpips = LearnedPerceptualImagePatchSimilarity(net_type=LPIPS_NET, normalize=True)
        return lpips.to(DEVICE), ""
    except (downloads.DownloadError, OSError, RuntimeError, ImportError) as err:
        return None, f"LPIPS diversity skipped: its weights did not load ({err})"


lpips, LPIPS_NOTE = load_lpips()
if lpips is None:
    print(LPIPS_NOTE)
    if LPIPS_NET is not None:
        STAND_INS.append(LPIPS_NOTE)
for name, images in sets.items():
    if lpips is not None:
        diversity[name]["lpips"] = sev.lpips_diversity(images, lpips)
plotting.show_image_table(torch.cat([sets["dfp"], sets["seeds_only"]]).cpu(),
                          [f"DFP (VGG div. {diversity['dfp']['vgg']:.3f})",
                           f"seeds only ({diversity['seeds_only']['vgg']:.3f})"],
                          [str(k + 1) for k in range(K)],
                          f"From one style image: K = {K} DFP draws vs K random starts"
                          + STAND_IN_TAG,
                          RUN_DIR / "03_multimodal.png", xlabel="draw", ylabel="")

# %% [markdown]
# ### Diversity bought at what cost
# Higher diversity is better. The content and style losses say what the diversity costs in fidelity to the
# photo and to the painting. Both sets use the same objective. With ImageNet weights, the claim of the method is
# checked: the DFP set is more diverse than the seeds-only set. With the random-weight stand-in that comparison
# means nothing, so smoke mode only prints the table.

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
# For scale, the DFP paper reports a mean LPIPS of 0.431 between its outputs, on other images and with trained
# decoders. Our LPIPS is a rough guide, not a reproduction.
#
# > **Where this differs from the paper.** DFP plugs into fast methods whose trained decoders turn features into
# > an image. We have no such decoder, so we find the image by optimisation, with the extra feature term above.
# > Diversity in VGG features uses our VGG19 instead of LPIPS's learned weights, so it also runs offline.

# %% [markdown]
# ## 10. Under the hood (optional)
# This section checks the code more closely. You can skip it on a first reading.
#
# ### Bad inputs get clear errors
# A missing file, a text file with an image's name, an address that does not answer, an unknown scikit-image
# name and an image too small for VGG19 each get an error. The error names the input and says what to do.
# The last one is too small because VGG19's four poolings must leave relu5_1 at least 2 x 2 positions.

# %%
not_an_image = RUN_DIR / "notes.jpg"
not_an_image.write_text("a text file with an image's name")
for bad_source, size in [("my_photo.jpg", IMAGE_SIZE), (not_an_image, IMAGE_SIZE),
                         ("http://127.0.0.1:9/style.jpg", IMAGE_SIZE),
                         ("skimage:starry", IMAGE_SIZE), (CONTENT_IMAGE, 24)]:
    try:
        sdata.load_image(bad_source, size, "style image")
        raise AssertionError(f"{bad_source} should have been refused")
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        print(f"{type(err).__name__}: {err}\n")

# %% [markdown]
# ### Speed: the two L-BFGS versions side by side
# The same objective, image size and number of iterations, first with `torch.optim.LBFGS`, then with
# `SyncFreeLBFGS`. On a GPU, VGG also runs in mixed precision, with 16-bit numbers.
# `time_per_step` first fills the L-BFGS memory with `TIMING_WARMUP` iterations, since its length sets the cost
# of an iteration. Then it times `TIMING_ITERATIONS` iterations. Each version's final loss is measured in
# float32. A CPU never waits for a GPU, so there both versions should take about the same time.

# %%
def time_variant(optimizer_name: str, autocast: torch.dtype | None = None) -> dict:
    """Time one optimiser on the main run's objective; its final loss, evaluated in float32."""
    obj = make_objective(content, style_image, autocast=autocast)
    image_t = StylisedImage(sopt.initial_image(content, INIT, SEED)).to(DEVICE)
    opt = make_optimizer(image_t, optimizer_name, LEARNING_RATE, HISTORY_SIZE)
    timing = training.time_per_step(lambda: optimisation_step(obj, image_t, opt), DEVICE,
                                    TIMING_ITERATIONS, TIMING_WARMUP)
    return {**timing, "final_loss": sev.evaluate(objective_fp32, image_t().detach())["total"]}


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
# Both versions compute the same formulas, but not in the same order. Torch adds `step * direction` to the
# pixels in one operation. Ours multiplies and then adds, so the last bit of some pixels differs. L-BFGS makes
# such tiny differences grow. After about a hundred iterations, two runs can differ by a few percent. This even
# happens with one optimiser, from two starts that differ in one bit. So the check has two parts:
#
# 1. In the first `LOCKSTEP_STEPS` iterations, both take the same steps. No pixel differs by more than
#    `LOCKSTEP_TOLERANCE` of the largest change that one iteration makes to a pixel.
# 2. After the timing runs above, SyncFreeLBFGS's final loss is at most `LOSS_MARGIN` above torch's.

# %%
differences, largest_step = sopt.lockstep_differences(
    objective_fp32, sopt.initial_image(content, INIT, SEED), LOCKSTEP_STEPS, LEARNING_RATE,
    HISTORY_SIZE)
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
# ### Does SyncFreeLBFGS ever make the computer wait?
# Reading a tensor's value, for example with `.item()` or `float(...)`, waits until the GPU has finished all its
# queued work. `HostReadCounter` counts such reads during a few iterations of each optimiser. The count is the
# same on any device, so this check runs on a CPU too. On a real GPU, torch's sync debug mode also turns any
# hidden wait of SyncFreeLBFGS into an error.

# %%
host_reads = {}
for name in ("lbfgs", "torch_lbfgs"):
    image_r = StylisedImage(sopt.initial_image(content, INIT, SEED)).to(DEVICE)
    opt = make_optimizer(image_r, name, LEARNING_RATE, HISTORY_SIZE)
    for _ in range(2):  # the first iteration allocates the memory; the second stores a pair
        optimisation_step(objective_fp32, image_r, opt)
    with sopt.HostReadCounter() as counter:
        for _ in range(3):
            optimisation_step(objective_fp32, image_r, opt)
    host_reads[name] = counter.reads / 3
    if name == "lbfgs" and CHOICES.cuda:
        training.synchronize(DEVICE)
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
# Mixed precision runs VGG's convolutions with 16-bit numbers. That is faster on a GPU, but with fewer digits.
# float16 keeps about 3 decimal digits, and bfloat16 about 2.
#
# Below, the gradient at the white-noise start is computed with VGG in each format and compared with the
# float32 gradient. A *loss scale* multiplies the loss before the backward pass and divides the gradient after
# it. It rescues gradients that are too small for float16. It cannot add digits. So if it does not shrink the
# error, the error comes from rounding. Even with VGG in 16 bits, `StyleObjective` turns the feature maps back
# to 32-bit floats before any loss.

# %%
start_image = sopt.initial_image(content, INIT, SEED)
formats = [(torch.float16, 1.0), (torch.float16, LOSS_SCALE), (torch.bfloat16, 1.0)]
if CHOICES.gpu_path and CHOICES.capability < (8, 0):  # a T4 (or its emulation) has no bfloat16
    formats = formats[:2]
    print(f"bfloat16 skipped: it needs compute capability 8.0 (this path: "
          f"{CHOICES.capability[0]}.{CHOICES.capability[1]})")
gradient_error = {}
for dtype, scale in formats:
    label = f"VGG in {str(dtype)[6:]}" + (f", loss scale {scale:g}" if scale != 1 else "")
    obj = make_objective(content, style_image, autocast=dtype)
    gradient_error[label] = sopt.autocast_gradient_error(obj, objective_fp32, start_image, scale)
    print(f"{label:32s} gradient off by {100 * gradient_error[label]:.2f} % of its norm")
print("VGG stays in float32 in this notebook (VGG_AUTOCAST = None): L-BFGS builds its steps from "
      "differences of gradients, so errors of this size change its path.")

# %% [markdown]
# ### Reload the result in a fresh model and re-measure
# A fresh `StylisedImage` loads the checkpoint. It must hold exactly the pixels of the run. A freshly built
# VGG19 with the same weights must give the same final losses. For the stand-in, the same seed rebuilds the
# same random weights.

# %%
fresh = StylisedImage(torch.zeros_like(content_in))
saved = training.load_checkpoint(CHECKPOINT, {"image": fresh}, config=CONFIG, map_location=DEVICE)
assert saved["step"] == STEPS and torch.equal(fresh.pixels.detach(), image.pixels.detach())
env.seed_everything(SEED)
fresh_vgg = VGG19Features([*CONTENT_LAYERS, *STYLE_LAYERS], PRETRAINED, POOLING).to(DEVICE)
again = sev.evaluate(make_objective(content_in, style_in, extractor=fresh_vgg), fresh().detach())
for key in ("content", "style", "total"):
    assert math.isclose(again[key], final[key], rel_tol=1e-4, abs_tol=1e-6), (key, again[key])
print("reloaded image identical; losses re-measured with a fresh VGG19 (relative units):",
      {k: round(v, 4) for k, v in again.items()})

# %% [markdown]
# ### metrics.json
# Every run writes its numbers to `RUN_DIR/metrics.json`, so that runs can be compared later.

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
path = training.write_metrics(
    RUN_DIR, NOTEBOOK, SMOKE, DEVICE, iterations=STEPS, seconds=watch.seconds,
    throughput={"it_per_s": watch.throughput()["it_per_s"]}, quality=quality, stand_ins=STAND_INS,
    seconds_per_image=watch.seconds, image_size=IMAGE_SIZE, optimizer=OPTIMIZER, k=K,
    multi_steps=MULTI_STEPS, style_image=STYLE_IMAGE, channels_last=CHANNELS_LAST,
    autocast=str(VGG_AUTOCAST), gpu_path=CHOICES.describe(), left_out_of_gallery=LEFT_OUT)
print(path.read_text())

# %% [markdown]
# ## What to take away

# %%
(_, low_run), (_, high_run) = sweep[min(sweep)], sweep[max(sweep)]
display(Markdown(
    "- Style transfer by optimisation needs no training. A fixed VGG19 defines content, with deep "
    "features, and style, with Gram matrices. The pixels of one image change until they match "
    "both. "
    f"In your run the style loss fell from {style_values[0]:.3g} to {final['style']:.3g}.\n"
    "- A Gram matrix ignores where features are. That is why it captures texture. It is also why "
    "shuffling the style features gives no new target. DFP's random rotation changes the features "
    "in channel space and keeps their covariance, so it gives several stylisations of one "
    "painting. "
    f"In your run the VGG diversity was {diversity['dfp']['vgg']:.3f} with DFP and "
    f"{diversity['seeds_only']['vgg']:.3f} with random starts alone.\n"
    "- The style weight sets the balance between the photo and the painting. In your sweep, "
    f"beta = {min(sweep):g} kept a content loss of {low_run['content']:.2f}, and "
    f"beta = {max(sweep):g} raised it to {high_run['content']:.2f}.\n"
    "- On a GPU, a loop should not read values back on every iteration. In your run, "
    f"`torch.optim.LBFGS` read {host_reads['torch_lbfgs']:.0f} values per iteration, and "
    f"`SyncFreeLBFGS` read {host_reads['lbfgs']:.0f}." + STAND_IN_TAG))

# %% [markdown]
# ## Check your understanding
# 1. Section 9 shuffled the positions of a style feature map. Why did its Gram matrix not change, while its
#    content loss did?
#
#    <details><summary>Answer</summary>
#    A Gram matrix sums products of two channels over all positions. A sum does not depend on the order of its
#    terms, so moving positions around leaves it unchanged. The content loss compares each position with the
#    same position of the target, so it sees the shuffle.
#    </details>
#
# 2. In the style-weight sweep, the content loss grew with $\beta$. Why?
#
#    <details><summary>Answer</summary>
#    The optimiser lowers the weighted sum of both losses. A larger $\beta$ makes the style term count more,
#    so the optimiser gives up some of the photo's features to match the painting's Gram matrices better.
#    </details>
#
# 3. Why can `torch.optim.LBFGS` be slow on a GPU, although it takes the same steps as `SyncFreeLBFGS`?
#
#    <details><summary>Answer</summary>
#    It reads numbers back from the GPU in every iteration to take its decisions, about 200 with a full
#    memory. Each read makes the computer wait until the GPU has finished its queued work. `SyncFreeLBFGS`
#    keeps every number on the GPU, so the work never stops. Section 10 counted the reads in your run.
#    </details>

# %% [markdown]
# ## What to try next
# * `INIT = "content"` starts from the photo. A good result needs fewer iterations, and the image keeps more of
#   the photo's layout.
# * `POOLING = "avg"`, which the paper found slightly better. Or leave relu5_1 or relu1_1 out of
#   `STYLE_LAYERS`: the strokes get smaller or larger.
# * `PRESERVE_COLOURS = True` for the main run, `PAINTING = "great_wave"`, or your own photo by path or URL.
# * Mixed precision for VGG, with `VGG_AUTOCAST = torch.float16` or `torch.bfloat16`. Section 10 printed how
#   far the gradient moves from float32 in your run. Compare the speed with the final loss.
# * Raise `DFP_LAMBDA` towards 1 for more diversity, or lower `DFP_ALPHA` for more of the photo, and watch the
#   table of section 9.
