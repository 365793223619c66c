# %% [markdown]
# # Neural style transfer: Gatys et al. on VGG19, and many stylisations from one style image
#
# {{BADGE}}
#
# You get the style transfer of Gatys, Ecker and Bethge (CVPR 2016), explained and implemented: the image itself
# is optimised until its VGG19 features carry the *content* of a photo and the *style* (Gram matrices) of a
# painting. Then **multi-modal** style transfer: from ONE style image, several different stylisations, by the deep
# feature perturbation (DFP) of Wang et al. (CVPR 2020), with its diversity measured against plain Gatys runs that
# differ only in their random start. Any content or style image works, by path or URL; an option keeps the photo's
# colours.
#
# **Run time.** Full mode (ImageNet VGG19 at 512 px, 14 stylisations of 300 L-BFGS iterations): an estimated 5-10
# minutes on a Colab T4, plus a one-time download of VGG19 (550 MB) and AlexNet (for LPIPS, 230 MB). Smoke mode
# (`SMOKE=1`, what CI runs): under 2 minutes on 2 CPU cores, with a random-weight VGG19 as an offline stand-in, so
# its pictures are not meaningful.

# %% SETUP

# %% [markdown]
# ## Imports and parameters
# Every knob is here; the smoke-mode value stands beside the full one. Content and style accept a path or an
# http(s) URL (environment variables `CONTENT_IMAGE` / `STYLE_IMAGE` override the shipped photos).

# %%
import os

import matplotlib.pyplot as plt
import torch
from IPython.display import display
from tqdm.auto import tqdm

from helpers import style
from helpers.environment import describe_device, in_colab, pick_device, run_dir, seed_everything, smoke_mode
from helpers.losses import content_loss, gram_matrix, style_layer_loss, style_loss, total_variation_loss
from helpers.plotting import save_figure, show_panels, show_source
from helpers.training import History, Stopwatch, load_checkpoint, save_checkpoint, write_metrics
from helpers.vgg import STAND_IN_NOTE, VGG19Features

SMOKE = smoke_mode()
SEED = 0
CONTENT_IMAGE = os.environ.get("CONTENT_IMAGE", str(HELPERS_ROOT / "assets" / "chelsea.jpg"))  # path or URL
STYLE_IMAGE = os.environ.get("STYLE_IMAGE", str(HELPERS_ROOT / "assets" / "ihc.jpg"))  # path or URL
GRAY_STYLE_IMAGE = str(HELPERS_ROOT / "assets" / "gravel.jpg")  # a grayscale photo, to show the conversion
IMAGE_SIZE = 48 if SMOKE else 512  # longer side in px, aspect ratio kept
STYLE_SIZE = IMAGE_SIZE  # longer side of the style image

PRETRAINED = not SMOKE  # ImageNet VGG19 (downloads once); smoke: random weights, an offline stand-in
POOLING = "max"  # "avg": the paper found average pooling slightly better; "max" is how VGG19 was trained
CONTENT_LAYERS = ["relu4_2"]  # the paper's conv4_2 (see the theory on conv vs relu names)
STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]  # the paper's conv1_1 ... conv5_1
STYLE_LAYER_WEIGHTS = [1 / 5] * 5  # w_l of the paper
CONTENT_WEIGHT = 1.0  # alpha, on the relative scale explained below
STYLE_WEIGHT = 400.0  # beta: the balance of the former 100, whose style term was 4x too large
TV_WEIGHT = 10.0  # optional total-variation term (0 = the paper); removes leftover pixel noise
PRESERVE_COLOURS = False  # True: transfer luminance only, keep the content's colours (also shown separately below)

OPTIMIZER = "lbfgs"  # the paper's L-BFGS; or "adam"
LEARNING_RATE = {"lbfgs": 1.0, "adam": 0.02}[OPTIMIZER]
INIT = "noise"  # the paper starts from white noise; "content" starts from the photo
STEPS = 10 if SMOKE else 300  # optimizer iterations of the main run
FIRST_SESSION_STEPS = STEPS // 2  # the main run stops here once, to show resume from the checkpoint
CHECKPOINT_EVERY = 5 if SMOKE else 50

SWEEP_STYLE_WEIGHTS = [40.0, 400.0, 4_000.0, 40_000.0]  # beta values of the style-weight sweep
SWEEP_STEPS = 5 if SMOKE else 300

K = 3 if SMOKE else 4  # number of stylisations of the multi-modal set (and of the seed-only baseline)
MULTI_STEPS = 5 if SMOKE else 300
DFP_LAMBDA = 0.6  # diversity strength lambda (the DFP paper's default)
DFP_ALPHA = 0.6  # stylisation strength alpha of the WCT target (the DFP code's default)
DFP_WEIGHT = STYLE_WEIGHT  # gamma: weight of matching the DFP feature targets
DFP_LAYERS = STYLE_LAYERS  # layers whose features are perturbed and matched
LPIPS_NET = None if SMOKE else "alex"  # LPIPS backbone for diversity (downloads AlexNet weights); smoke: skipped

DEVICE = pick_device()
RUN = run_dir("03_style_transfer")
CHECKPOINT = RUN / "gatys_checkpoint.pt"
STAND_INS = [] if PRETRAINED else [STAND_IN_NOTE]
seed_everything(SEED)
if DEVICE.type == "cuda":
    torch.backends.cudnn.benchmark = True
print(f"mode: {'SMOKE (CI-sized)' if SMOKE else 'full'} | device: {describe_device(DEVICE)} | run dir: {RUN}")
for note in STAND_INS:
    print("STAND-IN:", note)

# %% [markdown]
# ## Theory: Gatys et al. (2016)
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
# $$G^l_{ij} = \sum_k F^l_{ik} F^l_{jk}, \qquad E_l = \frac{1}{4 N_l^2 M_l^2} \sum_{i,j}\big(G^l_{ij} - A^l_{ij}\big)^2,
# \qquad \mathcal{L}_{style}(\vec{a}, \vec{x}) = \sum_l w_l E_l ,$$
# with $A^l$ the Gram matrix of the style image and $w_l = 1/5$ on conv1_1, conv2_1, conv3_1, conv4_1, conv5_1.
# Several layers, from shallow to deep, match the style at several scales: conv1_1 alone reproduces colours and
# fine grain, adding deeper layers gives larger, more coherent strokes (the paper's Figure 1). Content and style
# are thus separable: the deep content layer fixes the layout, the Gram matrices the "texture" painted over it.
#
# **Total loss and optimisation.** The image $\vec{x}$ itself is the variable; from white noise, L-BFGS minimises
# $$\mathcal{L}_{total} = \alpha\,\mathcal{L}_{content} + \beta\,\mathcal{L}_{style} \;(+\;\tau\,\mathrm{TV}(\vec{x})),
# \qquad \mathrm{TV}(\vec{x}) = \overline{(x_{i+1,j}-x_{i,j})^2} + \overline{(x_{i,j+1}-x_{i,j})^2},$$
# with $\alpha/\beta$ about $10^{-3}$ in the paper. VGG19 was trained on images normalised by the ImageNet mean and
# standard deviation, so the image in $[0, 1]$ is normalised the same way before VGG (done inside
# `VGG19Features`).
#
# **Where this notebook's code stands against the paper** (all faithful except where said):
# - *Layer names.* The paper's Caffe network applies ReLU in place, so what it calls "conv4_2" is the response
#   after the ReLU; the authors' PyTorch code reads `r42` and `r11 ... r51`. Here: `relu4_2` and
#   `relu1_1 ... relu5_1` of torchvision's VGG19.
# - *Normalisations in `helpers.losses`.* `gram_matrix` divides by $M_l$: $G = F F^\top / M_l$, the mean over
#   positions, so it does not grow with the image size. Then $E_l = \frac14\,\mathrm{mean}_{ij}(G_{ij}-A_{ij})^2$ is
#   *exactly* the paper's $E_l$. `content_loss` is the mean $\frac{1}{N_l M_l}\sum(F-P)^2$, the paper's sum divided by
#   $N_l M_l / 2$: the same minimiser, without growing with the image size.
# - *Unit-free weights.* The paper's $\alpha/\beta = 10^{-3}$ is in units of its Caffe network's features;
#   torchvision's VGG19 has other feature scales, so that ratio does not carry over. We divide each term by its
#   value for an all-zero feature map (the energy of the target: $\overline{P^2}$ for content, $\frac14\overline{A_l^2}$
#   per style layer). A relative content loss of 0.4 then means "features off by 40 % of their energy", and
#   $\alpha = 1$, $\beta = 400$ mean about the same whatever the network's feature scale (if a result keeps too
#   much of the photo, or too little, move $\beta$ along the sweep below):
#   $$\mathcal{L} = \alpha\,\frac{\mathcal{L}_{content}}{\overline{P^2}} + \beta \sum_l w_l \frac{E_l}{\frac14 \overline{A_l^2}}
#   + \tau\,\mathrm{TV}.$$
# - *Pixels* are clamped to $[0, 1]$ after each step (as in the PyTorch tutorial), so VGG always sees a valid image.
# - *No mixed precision.* L-BFGS needs exact gradients and the Gram sums overflow float16, so the run stays in
#   float32 even on CUDA (a departure from the collection's house rule, on purpose).

# %% [markdown]
# ## Data: content and style images
# `style.load_image` reads a path or URL, converts grayscale, palette and RGBA (flattened on white) images to RGB,
# resizes the longer side to `IMAGE_SIZE` with the aspect ratio kept, and checks that VGG19's four poolings leave
# conv5_1 at least 2 x 2 positions. Bad input gets an error naming the input and what to do, for example:

# %%
for bad_source, size in [("assets/missing.jpg", IMAGE_SIZE), (str(HELPERS_ROOT / "requirements.txt"), IMAGE_SIZE),
                         ("http://127.0.0.1:9/style.jpg", IMAGE_SIZE), (CONTENT_IMAGE, 24)]:
    try:
        style.load_image(bad_source, size, "style image")
        raise AssertionError(f"{bad_source} should have been refused")
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        print(f"{type(err).__name__}: {err}\n")

# %%
content = style.load_image(CONTENT_IMAGE, IMAGE_SIZE, "content image", DEVICE)
style_image = style.load_image(STYLE_IMAGE, STYLE_SIZE, "style image", DEVICE)
gray_style = style.load_image(GRAY_STYLE_IMAGE, STYLE_SIZE, "style image", DEVICE)
assert content.shape[:2] == (1, 3) and max(content.shape[-2:]) == IMAGE_SIZE
assert gray_style.shape[1] == 3 and torch.equal(gray_style[:, 0], gray_style[:, 2]), "gray -> 3 equal channels"
print(f"content {tuple(content.shape)} from {CONTENT_IMAGE}\nstyle   {tuple(style_image.shape)} from {STYLE_IMAGE}")
show_panels({f"content ({os.path.basename(CONTENT_IMAGE)})": content,
             f"style ({os.path.basename(STYLE_IMAGE)})": style_image,
             f"grayscale style ({os.path.basename(GRAY_STYLE_IMAGE)})": gray_style},
            "Inputs: content photo and style images (sources and licences: assets/README.md)",
            RUN / "inputs.png", value_range=(0, 1))

# %% [markdown]
# ## Model: a frozen VGG19 feature extractor
# Only the layers up to relu5_1 are needed (12.9 M parameters, all frozen). The only trainable parameters in
# this notebook are the pixels of the image being stylised.

# %%
seed_everything(SEED)  # the random-weight stand-in must be rebuilt identically for the reload check
vgg = VGG19Features([*CONTENT_LAYERS, *STYLE_LAYERS], pretrained=PRETRAINED, pooling=POOLING).to(DEVICE)
n_params = sum(p.numel() for p in vgg.parameters())
n_trainable = sum(p.numel() for p in vgg.parameters() if p.requires_grad)
print(f"VGG19 up to relu5_1: {n_params:,} parameters ({n_trainable} trainable) | weights: "
      f"{'ImageNet' if PRETRAINED else 'RANDOM (stand-in: losses and images not meaningful)'}")
assert n_trainable == 0
assert n_params == 12_944_960  # conv1_1 ... conv5_1: sum of (in * out * 9 + out)
features = vgg(content)
h, w = content.shape[-2:]
expected = {"relu4_2": (512, h // 8, w // 8), "relu1_1": (64, h, w), "relu2_1": (128, h // 2, w // 2),
            "relu3_1": (256, h // 4, w // 4), "relu4_1": (512, h // 8, w // 8), "relu5_1": (512, h // 16, w // 16)}
for name, f in zip(vgg.layers, features):
    assert tuple(f.shape[1:]) == expected[name], (name, f.shape)
    print(f"{name}: {tuple(f.shape[1:])}")

# %% [markdown]
# ## Losses, beside their formulas (`helpers.losses`)
# $G = FF^\top/M$ (mean over positions); $E_l = \frac14\,\mathrm{mean}(G-A)^2$ = the paper's
# $\frac{1}{4N^2M^2}\sum(\hat G - \hat A)^2$; content = $\mathrm{mean}(F-P)^2$; TV = mean squared neighbour differences.

# %%
for loss_function in (gram_matrix, content_loss, style_layer_loss, style_loss, total_variation_loss):
    display(show_source(loss_function))

# %% [markdown]
# The class that puts them together, with the unit-free weights, is `style.StyleObjective`:

# %%
show_source(style.StyleObjective)

# %% [markdown]
# **A Gram matrix forgets where features are.** Shuffling, flipping or rotating the positions of a feature map
# leaves $G = FF^\top/M$ unchanged (a permutation $\Pi$ of positions gives $F\Pi\Pi^\top F^\top = FF^\top$). So
# spatial transforms of the style features give *no* new style targets; diversity has to come from the channel
# space (as DFP does below), from clustering into sub-styles, or from the random start.

# %%
f = style.features_by_name(vgg, style_image)["relu3_1"]
shuffled = f.flatten(2)[..., torch.randperm(f.shape[-2] * f.shape[-1], device=DEVICE)].view_as(f)
for name, moved in [("shuffle", shuffled), ("flip", f.flip(-1)), ("rotate 90", f.rot90(1, (-2, -1)))]:
    change = (gram_matrix(moved) - gram_matrix(f)).abs().max() / gram_matrix(f).abs().max()
    print(f"{name:9s}: largest Gram change {change:.1e} of the largest entry")
    assert change < 1e-4
print(f"content loss of the shuffled map: {float(content_loss(shuffled, f)):.3g} (content is not invariant)")

# %% [markdown]
# ## Training: optimise the image (main run, with checkpoint and resume)
# The loop below is the whole method: evaluate the objective, take one optimizer iteration (for L-BFGS, one
# iteration per `step()` call, so we can log and checkpoint as we go), clamp to $[0, 1]$. Scalars go to TensorBoard
# through `History`. A checkpoint (pixels, optimizer state, history, time spent) is written every
# `CHECKPOINT_EVERY` iterations to `RUN_DIR`; re-running the cell resumes from it (Colab disconnects). To show
# it, the first call stops at `FIRST_SESSION_STEPS` and the second call starts from the saved state.

# %%
show_source(style.optimisation_step)

# %%
if PRESERVE_COLOURS:
    content_in, style_in = style.luminance_image(content), style.luminance_image(style_image, reference=content)
else:
    content_in, style_in = content, style_image
objective = style.StyleObjective(vgg, content_in, style_in, CONTENT_LAYERS, STYLE_LAYERS, STYLE_LAYER_WEIGHTS,
                                 CONTENT_WEIGHT, STYLE_WEIGHT, TV_WEIGHT)
CONFIG = {"content": CONTENT_IMAGE, "style": STYLE_IMAGE, "size": IMAGE_SIZE, "pretrained": PRETRAINED,
          "pooling": POOLING, "optimizer": OPTIMIZER, "init": INIT, "weights": [CONTENT_WEIGHT, STYLE_WEIGHT,
          TV_WEIGHT], "preserve_colours": PRESERVE_COLOURS, "seed": SEED}
if in_colab():
    %load_ext tensorboard
    %tensorboard --logdir {RUN}


def run_main(until: int) -> tuple[style.StylisedImage, History, int, float]:
    """Resume the main run from its checkpoint if there is one, continue to `until` iterations, checkpointing."""
    image = style.StylisedImage(style.initial_image(content_in, INIT, SEED)).to(DEVICE)
    optimizer = style.make_optimizer(image, OPTIMIZER, LEARNING_RATE)
    history, start, seconds = History(RUN / "tensorboard"), 0, 0.0
    if CHECKPOINT.is_file():
        saved = load_checkpoint(CHECKPOINT, {"image": image, "optimizer": optimizer}, CONFIG, map_location=DEVICE)
        history.load_state_dict(saved["extra"]["history"])
        start, seconds = saved["step"], saved["extra"]["seconds"]
        print(f"resumed from the checkpoint at iteration {start} ({seconds:.1f} s spent so far)")
    watch = Stopwatch()
    for step in tqdm(range(start, until), desc="Gatys (main run)", initial=start, total=until):
        with watch:
            losses = style.optimisation_step(objective, image, optimizer)
        history.log(step, **losses)
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == until:
            save_checkpoint(CHECKPOINT, {"image": image, "optimizer": optimizer}, step + 1, CONFIG,
                            extra={"history": history.state_dict(), "seconds": seconds + watch.seconds})
    history.flush()
    return image, history, max(start, until), seconds + watch.seconds


image, history, done, seconds = run_main(FIRST_SESSION_STEPS)
print(f"first session: {done} iterations, checkpoint {CHECKPOINT.name}")

# %% [markdown]
# *Colab disconnected*: the image, optimizer and history are gone. Running the same function again finds the
# checkpoint and continues from iteration `FIRST_SESSION_STEPS` (L-BFGS's curvature memory included).

# %%
del image, history
image, history, done, seconds = run_main(STEPS)
steps_logged, _ = history.series("total")
assert done == STEPS and steps_logged == list(range(STEPS)), "resume must continue the same run without gaps"
result = image().detach()
if PRESERVE_COLOURS:
    result = style.keep_colours(result, content)
final = style.evaluate(objective, image().detach())
assert final["total"] < history.series("total")[1][0], "the optimisation must lower the loss"
seconds_per_image = seconds * STEPS / done
print(f"{STEPS} iterations in {seconds:.1f} s = {seconds_per_image:.1f} s per stylised image at "
      f"{result.shape[-1]}x{result.shape[-2]} px on {describe_device(DEVICE)}")
print("final losses (relative):", {k: round(v, 4) for k, v in final.items()})

# %% [markdown]
# ## Results
# ### Content | style | result, and the luminance-only variant
# *Colour preservation* (Gatys et al. 2016, "Preserving color in neural artistic style transfer"): transfer on the
# luminance only. Both images go to YIQ; the style's luminance is matched to the content's mean and standard
# deviation; the optimisation runs on the gray luminance images; the result's luminance Y is put back with the
# content's colour channels I and Q.

# %%
def run_stylisation(content_img, style_img, steps, style_weight=STYLE_WEIGHT, seed=SEED, feature_targets=None):
    """One Gatys run (or a DFP run, with feature targets) from the seeded random start; returns image, losses."""
    obj = style.StyleObjective(vgg, content_img, style_img, CONTENT_LAYERS, STYLE_LAYERS, STYLE_LAYER_WEIGHTS,
                               CONTENT_WEIGHT, style_weight, TV_WEIGHT, feature_targets, DFP_WEIGHT)
    out = style.stylise(obj, style.initial_image(content_img, INIT, seed), steps, OPTIMIZER, LEARNING_RATE)
    return out, style.evaluate(obj, out)


gray_content, gray_style_matched = style.luminance_image(content), style.luminance_image(style_image, content)
luminance_result, _ = run_stylisation(gray_content, gray_style_matched, SWEEP_STEPS)
colour_kept = style.keep_colours(luminance_result, content)
colour_error = (style.rgb_to_yiq(colour_kept)[:, 1:] - style.rgb_to_yiq(content)[:, 1:]).abs().mean()
assert colour_error < 0.1, f"the content's colours (I, Q) must be kept, mean error {colour_error:.3f}"
title = "Gatys et al. style transfer" + (" (STAND-IN: random-weight VGG19, not meaningful)" if STAND_INS else "")
show_panels({"content": content, "style": style_image, f"result ({STEPS} it.)": result,
             "colours of the content kept": colour_kept}, title, RUN / "03_result.png", value_range=(0, 1))

# %% [markdown]
# ### Loss curves of the main run
# Relative units (see the theory): content and style losses divided by their targets' energy.

# %%
fig, ax = plt.subplots(figsize=(8, 4))
for name in ["total", "content", "style", "tv"]:
    steps_, values = history.series(name)
    ax.plot(steps_, values, label=name)
ax.axvline(FIRST_SESSION_STEPS, color="gray", ls=":", label="resumed from checkpoint")
ax.set(yscale="log", xlabel="L-BFGS iteration" if OPTIMIZER == "lbfgs" else "Adam step",
       ylabel="loss (relative units, log scale)", title="Main run: losses during the optimisation" +
       (" (stand-in VGG)" if STAND_INS else ""))
ax.grid(alpha=0.3)
ax.legend()
save_figure(fig, RUN / "03_loss_curves.png")
plt.show()

# %% [markdown]
# ### Style-weight sweep
# Same content, style, start and number of iterations; only $\beta$ changes (with $\alpha = 1$). Small $\beta$ keeps
# the photo, large $\beta$ gives texture with only a trace of its layout.

# %%
sweep = {}
for beta in tqdm(SWEEP_STYLE_WEIGHTS, desc="style-weight sweep"):
    sweep[beta] = run_stylisation(content, style_image, SWEEP_STEPS, style_weight=beta)
show_panels({f"beta = {beta:g}\ncontent {m['content']:.2f}, style {m['style']:.3f}": img
             for beta, (img, m) in sweep.items()},
            "Style-weight sweep (alpha = 1; losses in relative units)" + (" - STAND-IN VGG" if STAND_INS else ""),
            RUN / "03_style_weight_sweep.png", value_range=(0, 1))
print("relative content loss per beta:", {b: round(m["content"], 3) for b, (_, m) in sweep.items()})
assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for _, m in sweep.values()), "losses must be finite"

# %% [markdown]
# ## Multi-modal style transfer: deep feature perturbation (DFP, Wang et al. CVPR 2020)
# Plain Gatys runs that differ only in their random start end in nearly the same picture: that is the baseline to
# beat. Transforming the style features spatially does not help either, since Gram matrices ignore *where*
# features are (shown above). DFP gets genuinely different stylisations from ONE
# style image by perturbing the style features in channel space, inside the whitening and colouring transform (WCT,
# Li et al. 2017). For one layer, with content features $f_c$, style features $f_s$ (both $N \times M$), their means
# $m_c, m_s$ and covariance eigen-decompositions $E_c D_c E_c^\top$, $E_s D_s E_s^\top$:
# $$\hat f_c = E_c D_c^{-1/2} E_c^\top (f_c - m_c) \quad\text{(whitening: identity covariance)}$$
# $$f_{cs} = E_s D_s^{1/2} E_s^\top \hat f_c + m_s \quad\text{(colouring: the style's covariance)}$$
# $$f_{cs}^{Z} = E_s D_s^{1/2}\, Z\, E_s^\top \hat f_c + m_s, \qquad Z = U \text{ from the SVD } U\Sigma V^\top
# \text{ of a Gaussian matrix}$$
# Because $ZZ^\top = I$, $\mathrm{cov}(f_{cs}^Z) = E_s D_s^{1/2} Z Z^\top D_s^{1/2} E_s^\top = E_s D_s E_s^\top$:
# the style statistics are untouched while the features themselves change with every draw of $Z$. DFP blends the
# perturbed and plain features with the diversity strength $\lambda$, and the result with the content features with
# the stylisation strength $\alpha_{s}$ (both 0.6 in the DFP paper and code):
# $$t = \alpha_{s}\big[\lambda f^Z_{cs} + (1-\lambda) f_{cs}\big] + (1-\alpha_{s}) f_c .$$
#
# **Our departure.** DFP plugs into feed-forward WCT methods, whose trained decoders turn $t$ into an image. We have
# no such decoders (they would need training), so we decode by optimisation: the image minimises the Gatys loss
# *plus* a feature-reconstruction term towards the DFP targets at the style layers,
# $$\mathcal{L}_{DFP} = \mathcal{L}_{Gatys} + \gamma\,\frac{1}{L}\sum_l \frac{\overline{(F^l - t_l)^2}}{\overline{t_l^2}} .$$
# The Gram matrix of $t_l$ is (almost) the style's, whatever $Z$, so $Z$ can only reach the image through a loss on
# the features themselves, not their Gram matrices: that is why the extra term is needed.
#
# **Diversity**, as in the DFP paper, is the mean over the $K(K-1)/2$ pairs of outputs of a distance: in VGG feature
# space, $d(x_i, x_j) = \frac1L \sum_l \overline{\lVert \hat\phi_l(x_i) - \hat\phi_l(x_j) \rVert^2}$ with features
# unit-normalised per position (LPIPS without its learned layer weights, on our VGG19, so it runs offline too); the
# mean absolute pixel difference; and in full mode the real LPIPS (torchmetrics, AlexNet backbone). The baseline:
# $K$ plain Gatys runs that differ only in their random start. The DFP set
# uses the same $K$ starts, each with its own $Z$. For scale: the DFP paper reports a mean pairwise LPIPS of 0.431
# for UST + DFP against 0.163-0.175 for earlier diversified methods; with our optimisation in place of UST's decoders
# (and another content/style pair), our LPIPS numbers (full mode only) are indicative, not a reproduction.

# %%
for function in (style.whitening_colouring, style.dfp_target, style.feature_diversity):
    display(show_source(function))

# %%
dfp_runs, baseline_runs = [], []
for k in tqdm(range(K), desc="DFP and seed-only runs"):
    targets = style.dfp_targets(vgg, content, style_image, DFP_LAYERS, seed=SEED + k, lam=DFP_LAMBDA, alpha=DFP_ALPHA)
    dfp_runs.append(run_stylisation(content, style_image, MULTI_STEPS, seed=SEED + k, feature_targets=targets))
    baseline_runs.append(run_stylisation(content, style_image, MULTI_STEPS, seed=SEED + k))
dfp_images = torch.cat([img for img, _ in dfp_runs])
baseline_images = torch.cat([img for img, _ in baseline_runs])
diversity = {
    "dfp": {"vgg": style.feature_diversity(dfp_images, vgg), "pixel": style.pixel_diversity(dfp_images)},
    "seeds_only": {"vgg": style.feature_diversity(baseline_images, vgg),
                   "pixel": style.pixel_diversity(baseline_images)},
}
mean_losses = {name: {key: sum(m[key] for _, m in runs) / K for key in ("content", "style")}
               for name, runs in (("dfp", dfp_runs), ("seeds_only", baseline_runs))}
if LPIPS_NET:  # the DFP paper's measure; needs ImageNet weights of the backbone (a download)
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    lpips = LearnedPerceptualImagePatchSimilarity(net_type=LPIPS_NET, normalize=True).to(DEVICE)
    for name, images in (("dfp", dfp_images), ("seeds_only", baseline_images)):
        diversity[name]["lpips"] = style.lpips_diversity(images, lpips)
else:
    print("LPIPS diversity skipped in smoke mode (its backbone weights need a download)")
for name in diversity:
    assert all(0.0 <= v < float("inf") for v in diversity[name].values())

fig, axes = plt.subplots(2, K, figsize=(3.2 * K, 2.4 * 2 * content.shape[-2] / content.shape[-1] + 1.2),
                         squeeze=False)
for row, (label, images) in enumerate([("DFP", dfp_images), ("seed only", baseline_images)]):
    for k, ax in enumerate(axes[row]):
        ax.imshow(images[k].permute(1, 2, 0).cpu().numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{label}, draw {k + 1}", fontsize=9)
    name = "dfp" if row == 0 else "seeds_only"
    axes[row][0].set_ylabel(f"{label}\nVGG diversity {diversity[name]['vgg']:.3f}")
fig.suptitle(f"Multi-modal style transfer from one style image: K = {K} DFP draws (top) vs K random starts "
             f"(bottom)" + ("\nSTAND-IN: random-weight VGG19, not meaningful" if STAND_INS else ""), fontsize=10)
fig.tight_layout()
save_figure(fig, RUN / "03_multimodal.png")
plt.show()

# %% [markdown]
# ### Diversity bought at what cost
# Higher diversity is better; the content and style losses (relative units, same objective for both sets) say what
# the diversity costs in fidelity to the photo and to the style.

# %%
print(f"{'set':12s} {'VGG diversity':>14s} {'pixel diversity':>16s} {'LPIPS diversity':>16s} "
      f"{'content loss':>13s} {'style loss':>11s}")
for name in ("dfp", "seeds_only"):
    lpips_text = f"{diversity[name]['lpips']:16.4f}" if "lpips" in diversity[name] else f"{'-':>16s}"
    print(f"{name:12s} {diversity[name]['vgg']:14.4f} {diversity[name]['pixel']:16.4f} {lpips_text} "
          f"{mean_losses[name]['content']:13.4f} {mean_losses[name]['style']:11.4f}")
print("(diversity: mean over pairs, higher = more different; losses: relative units, mean over the K runs)")
if STAND_INS:
    print("(stand-in VGG19 with random weights: these numbers only show that the code runs)")

# %% [markdown]
# ## Reload the result in a fresh model and re-measure
# A fresh `StylisedImage` loads the checkpoint; it must hold exactly the pixels of the run, and a freshly built
# VGG19 (same weights: ImageNet, or the same seed for the stand-in) must give the same final losses.

# %%
fresh = style.StylisedImage(torch.zeros_like(content_in))
saved = load_checkpoint(CHECKPOINT, {"image": fresh}, config=CONFIG, map_location=DEVICE)
assert saved["step"] == STEPS and torch.equal(fresh.pixels.detach(), image.pixels.detach())
seed_everything(SEED)
fresh_vgg = VGG19Features([*CONTENT_LAYERS, *STYLE_LAYERS], pretrained=PRETRAINED, pooling=POOLING).to(DEVICE)
fresh_objective = style.StyleObjective(fresh_vgg, content_in, style_in, CONTENT_LAYERS, STYLE_LAYERS,
                                       STYLE_LAYER_WEIGHTS, CONTENT_WEIGHT, STYLE_WEIGHT, TV_WEIGHT)
again = style.evaluate(fresh_objective, fresh().detach())
for key in ("content", "style", "total"):
    assert abs(again[key] - final[key]) <= 1e-4 * max(1.0, abs(final[key])), (key, again[key], final[key])
print("reloaded image identical; losses re-measured with a fresh VGG19:", {k: round(v, 4) for k, v in again.items()})

# %% [markdown]
# ## metrics.json

# %%
quality = {
    "seconds_per_image": round(seconds_per_image, 3),
    "resolution": f"{result.shape[-1]}x{result.shape[-2]}",
    "content_loss_rel": final["content"],
    "style_loss_rel": final["style"],
    "diversity_dfp_vgg": diversity["dfp"]["vgg"],
    "diversity_seeds_only_vgg": diversity["seeds_only"]["vgg"],
    "diversity_dfp_pixel": diversity["dfp"]["pixel"],
    "diversity_seeds_only_pixel": diversity["seeds_only"]["pixel"],
    "diversity_dfp_lpips": diversity["dfp"].get("lpips"),
    "diversity_seeds_only_lpips": diversity["seeds_only"].get("lpips"),
    "dfp_content_loss_rel": mean_losses["dfp"]["content"],
    "dfp_style_loss_rel": mean_losses["dfp"]["style"],
    "seeds_only_content_loss_rel": mean_losses["seeds_only"]["content"],
    "seeds_only_style_loss_rel": mean_losses["seeds_only"]["style"],
}
path = write_metrics(RUN, "03_style_transfer", SMOKE, DEVICE, iterations=STEPS, seconds=seconds,
                     throughput={"it_per_s": STEPS / seconds, "img_per_s": 1 / seconds_per_image},
                     quality=quality, stand_ins=STAND_INS, image_size=IMAGE_SIZE, optimizer=OPTIMIZER, k=K,
                     multi_steps=MULTI_STEPS)
print(path.read_text())
