# %% [markdown]
# # 05 · Pix2PixHD: from a label map to a photo
#
# {{BADGE}}
#
# A *label map* colours every pixel by what it shows: wall, window, door, sky. Pix2PixHD (Wang et al. 2018) is
# a conditional GAN that turns such a map into a photo. Conditional means that both networks see the map. You
# will build its networks and losses as cells, train them on photos of building fronts, and test which parts
# matter.
#
# You will learn:
# * how a coarse-to-fine generator splits the work between a global generator and a local enhancer
# * why three discriminators judge the image at three sizes
# * how feature matching and a VGG loss help the GAN loss
# * how to train in two stages that survive a disconnect
# * what PSNR and SSIM measure, and what they miss
#
# ⏱ A full run takes about 25 to 45 min on a Colab T4 (estimated). The tiny CPU test run takes 10 to 30 s.

# %% SETUP

# %%
import math, os, pandas as pd, torch, torch.nn.functional as F
from functools import partial
from typing import Sequence
from IPython.display import Markdown
from torch import Tensor, nn
from torch.utils.data import DataLoader
from helpers import environment as env, metrics, plotting as plots, training as tr, vgg as vgg19
from helpers.pix2pixhd import data as p2p
from helpers.pix2pixhd.data import check_image_size
from helpers.pix2pixhd.fast_path import FastPath

# %% [markdown]
# ## 1. Settings
#
# The defaults are the **Colab configuration**. It uses the paper's networks at half the official generator
# width, on smaller images than the paper. An *epoch* is one pass over the training pairs.
#
# * `RUN_DIR_ON_DRIVE`: `True` keeps the run on Google Drive. A re-run after a Colab reset then resumes it.
# * `SEED`: the random seed. The same seed gives the same run.
# * `DATASET`: `"cmp_facades"` downloads photos of building fronts with their label maps. `"procedural"` draws
#   toy street scenes offline. `"procedural_sketch"` gives the same scenes as black-on-white sketches.
# * `IMAGE_SIZE`: the side of the images, in pixels. Stage 1 trains at half this size.
# * `BATCH_SIZE`: how many images each training step sees.
# * `NGF_LOCAL`: the width of the local enhancer, in channels. The global generator is twice as wide.
# * `NDF`: the width of each discriminator, in channels.
# * `LAMBDA_FEAT`, `LAMBDA_VGG`: the weights of the feature-matching loss and of the VGG loss.
# * `GLOBAL_EPOCHS`, `LOCAL_EPOCHS`: the length of each stage. The first number counts epochs at a constant
#   learning rate, the second the epochs of its linear decay.
# * `FIX_GLOBAL_EPOCHS`: how many epochs stage 2 keeps the global generator frozen at its start.
#
# The advanced settings hold the other knobs: the depth of the networks, the learning rate and the ablation's
# variants. *Smoke mode* (`SMOKE=1`) is the tiny run that the project's automatic tests use.

# %%
# Settings you may change
RUN_DIR_ON_DRIVE = False     # True in Colab: the run lives on Google Drive, so a re-run resumes
SEED = 0                     # random seed
DATASET = "cmp_facades"      # or "procedural" / "procedural_sketch": offline toy streets
IMAGE_SIZE = 256             # pixels; stage 1 trains at half this size
BATCH_SIZE = 4               # images per training step (official: 1)
NGF_LOCAL = 16               # local enhancer width; the global generator gets twice (official: 32)
NDF = 64                     # discriminator width (official: 64)
LAMBDA_FEAT = 10.0           # weight of the feature-matching loss (the paper's 10)
LAMBDA_VGG = 10.0            # weight of the VGG loss (the paper's 10)
GLOBAL_EPOCHS = (20, 20)     # stage 1: epochs at a constant learning rate, then epochs of decay
LOCAL_EPOCHS = (10, 10)      # stage 2, the same (official: 100 + 100 in each stage)
FIX_GLOBAL_EPOCHS = 5        # stage 2 starts with the global generator frozen (official: 10)

# %%
#@title Advanced settings
SMOKE = env.smoke_mode()      # SMOKE=1 in the environment: CI's tiny run, nothing downloaded
NOTEBOOK = "{{NOTEBOOK}}"
N_TRAIN, N_TEST = 800, 100    # procedural data only: scenes for training and held out
N_TEST_FACADES = 50           # the last 50 facades (sorted by name) are held out
NUM_WORKERS = 2               # processes that load the data
# Architecture. Official: 4 downsamplings, 9 + 3 residual blocks; D: 3 layers at 3 scales
N_DOWNSAMPLE_GLOBAL = 4
N_BLOCKS_GLOBAL = 9
N_BLOCKS_LOCAL = 3
N_LAYERS_D = 3
NUM_D = 3                     # the paper's 3 scales
VGG_PRETRAINED = True         # False: a random-weight VGG19 (the offline stand-in)
LR, BETAS = 2e-4, (0.5, 0.999)
COMPILE = False               # torch.compile G and D on a GPU (minutes of compiling)
SNAPSHOT_IMAGES = 4           # held-out maps drawn after every SNAPSHOT_EVERY epochs
SNAPSHOT_EVERY = 10
LPIPS_NET = "alex"            # LPIPS needs AlexNet weights (download); None skips it
TIMED_STEPS, WARMUP_STEPS = 20, 5  # steps per row of the speed comparison (section 9)
if SMOKE:  # CI's tiny run: you can ignore this
    DATASET, IMAGE_SIZE, N_TRAIN, N_TEST, BATCH_SIZE, NUM_WORKERS = "procedural", 32, 2, 4, 1, 0
    NGF_LOCAL, N_DOWNSAMPLE_GLOBAL, N_BLOCKS_GLOBAL, N_BLOCKS_LOCAL, NDF = 4, 3, 2, 1, 8
    GLOBAL_EPOCHS, LOCAL_EPOCHS, FIX_GLOBAL_EPOCHS, SNAPSHOT_EVERY = (0, 2), (1, 1), 1, 1
    VGG_PRETRAINED, LPIPS_NET, TIMED_STEPS, WARMUP_STEPS = False, None, 2, 1
DATASET = os.environ.get("PIX2PIXHD_DATASET", DATASET)  # for longer offline runs
N_TRAIN = int(os.environ.get("PIX2PIXHD_N_TRAIN", N_TRAIN))
N_TEST = int(os.environ.get("PIX2PIXHD_N_TEST", N_TEST))

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
print(f"mode: {'smoke (tiny sizes, nothing downloaded)' if SMOKE else 'full'}")

# %%
env.use_drive_for_runs(RUN_DIR_ON_DRIVE)  # mounts Drive and sets $RUN_DIR there (Colab only)
DEVICE = env.pick_device()
RUN_DIR = env.run_dir(NOTEBOOK)       # $RUN_DIR/<notebook>: checkpoints, TensorBoard, figures
FAST = FastPath.for_device(DEVICE, compile=COMPILE)
torch.set_flush_denormal(True)        # CPU: tiny activations otherwise slow the convolutions ~10x
env.seed_everything(SEED)
print(f"device: {env.describe_device(DEVICE)} | run dir: {RUN_DIR}")
print(f"data: {DATASET}, {IMAGE_SIZE}x{IMAGE_SIZE} (stage 1: {IMAGE_SIZE // 2}), "
      f"batch {BATCH_SIZE}")
print(f"training step: {FAST.describe()}")

# %% [markdown]
# ## 2. Data
#
# **The CMP Facade Database** (Tyleček & Šára 2013) holds 378 photos of building fronts. The notebook downloads
# it from [its authors' page](https://cmp.felk.cvut.cz/~tylecr1/facade/), with no login. Beside each photo lies a
# label map saved as a PNG of class numbers. The classes are background, facade, window, door, cornice, sill,
# balcony, blind, deco, molding, pillar and shop.
#
# The pix2pix "facades" set comes from the same photos, but it stores the labels as JPEG colour pictures. A map
# of class numbers is exactly what Pix2PixHD reads. The class numbers start at 1, and class 0 stays unused. Any
# other value stops the data loader with an error that names the file. The last 50 facades are held out for
# evaluation.
#
# **Offline and in smoke mode: toy streets.** The notebook draws each scene itself, with six classes: sky, ground,
# building, window, tree and sun. An *instance map* gives every building, tree and sun its own number. The photo
# follows from the two maps: class colours, a sky and ground gradient, shaded trees, and a dark outline where two
# buildings meet. Only the instance map shows where one building ends and the next begins. A small model can
# learn these scenes on a CPU. The facades have no instance maps.

# %%
if DATASET in ("procedural", "procedural_sketch"):
    train_set = p2p.ProceduralLabelImages(N_TRAIN, IMAGE_SIZE, seed=SEED)
    test_set = p2p.ProceduralLabelImages(N_TEST, IMAGE_SIZE, seed=SEED + 1)
    SKETCH = DATASET == "procedural_sketch"  # label_nc 0: the RGB sketch feeds G directly
    LABEL_NC, USE_INSTANCE = (0, False) if SKETCH else (train_set.label_nc, True)
    CLASS_NAMES = train_set.class_names
    kind = "sketches" if SKETCH else "label maps"
    STAND_INS.append(f"procedural toy-street {kind} ({N_TRAIN} train / {N_TEST} test) instead of "
                     "CMP Facades")
    print("STAND-IN:", STAND_INS[-1])
elif DATASET == "cmp_facades":
    folder = p2p.download_cmp_facades(env.data_dir())
    names = sorted(p.stem for p in folder.glob("*.jpg"))
    LABEL_NC, USE_INSTANCE = len(p2p.CMP_FACADES_CLASSES), False
    CLASS_NAMES = p2p.CMP_FACADES_CLASSES
    pairs = partial(p2p.PairedFolderDataset, folder, folder, IMAGE_SIZE, LABEL_NC)
    train_set, test_set = pairs(names=names[:-N_TEST_FACADES]), pairs(names=names[-N_TEST_FACADES:])
else:
    raise ValueError(f"DATASET={DATASET!r} is not known; use 'cmp_facades' (download), "
                     "'procedural' or 'procedural_sketch' (offline)")
IN_NC = p2p.input_channels(LABEL_NC, USE_INSTANCE)
check_image_size(IMAGE_SIZE, IMAGE_SIZE, 32, "IMAGE_SIZE")
train_loader = DataLoader(train_set, BATCH_SIZE, shuffle=True, num_workers=NUM_WORKERS,
                          drop_last=True)
test_loader = DataLoader(test_set, BATCH_SIZE, shuffle=False, num_workers=NUM_WORKERS)
encode = partial(p2p.encode_pair_batch, label_nc=LABEL_NC, use_instance=USE_INSTANCE,
                 device=DEVICE)
print(f"{len(train_set)} training pairs, {len(test_set)} held-out pairs, {len(CLASS_NAMES)} "
      f"classes ({', '.join(CLASS_NAMES)}), generator input: {IN_NC} channels")

# %%
def input_picture(batch: dict) -> torch.Tensor:
    """What G gets, as a picture: the label map in class colours, or the sketch itself."""
    if LABEL_NC == 0:
        return encode(batch, batch["image"].shape[-1])[0].cpu()
    return p2p.colorize_labels(batch["label"], LABEL_NC)


preview = next(iter(DataLoader(test_set, 6)))
what_g_gets = "input (label map: colours = classes)" if LABEL_NC else "input (RGB sketch)"
panels = {what_g_gets: input_picture(preview)}
if USE_INSTANCE:
    panels["instance edges"] = p2p.instance_edges(preview["instance"]).repeat(1, 3, 1, 1) * 2 - 1
panels["photo (target)"] = preview["image"]
fig = plots.show_panels(panels, f"{DATASET}: what the generator sees and what it must draw",
                        RUN_DIR / "data_preview.png", nrow=3)
assert preview["image"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
assert preview["label"].dtype == torch.long

# %% [markdown]
# The generator reads a *one-hot* encoding of the map: one plane per class, set to 1 where a pixel has that
# class and 0 elsewhere. With instance maps, one more plane marks the edges between instances. It is 1 wherever
# a pixel's instance differs from one of its four neighbours. A sketch has no classes, so `label_nc = 0`, and its
# three RGB planes feed the generator as they are.

# %%
x_demo = encode({k: v[:2] for k, v in preview.items()}, IMAGE_SIZE)[0].cpu()
assert x_demo.shape == (2, IN_NC, IMAGE_SIZE, IMAGE_SIZE)
assert LABEL_NC == 0 or torch.all(x_demo[:, :LABEL_NC].sum(1) == 1)  # exactly one class per pixel
sketch_demo = p2p.label_sketch(preview["label"][:2])
assert p2p.encode_input(sketch_demo, 0).shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)  # the sketch path
print(f"generator input for 2 maps: {tuple(x_demo.shape)} (batch, channels, height, width)")

# %% [markdown]
# ## 3. The generator
#
# Pix2PixHD draws the photo from coarse to fine. The **global generator** $G_1$ works at half size and gets the
# layout right. The **local enhancer** $G_2$ works at full size and adds the detail. Together they form the
# generator $G = \{G_1, G_2\}$.
#
# $G_1$ is a residual network. The paper writes it as `c7s1-64, d128, d256, d512, d1024, R1024×9, u512, u256,
# u128, u64, c7s1-3`:
# * `c7s1-64` is a 7×7 convolution with 64 output channels.
# * `d128` … `d1024` are four stride-2 convolutions. Each halves the size and doubles the channels.
# * `R1024×9` is nine residual blocks $x \mapsto x + \mathrm{IN}(\mathrm{conv}(\mathrm{ReLU}(\mathrm{IN}(
#   \mathrm{conv}(x)))))$.
# * `u512` … `u64` are four transposed convolutions that bring the image back to full size.
# * `c7s1-3` is a last convolution of the same kind, to the three RGB channels, followed by $\tanh$.
#
# IN is *instance norm*: it scales each channel of each image to mean 0 and variance 1. Here it has no learned
# parameters. Every convolution pads by reflecting the image at its border, and every activation is a ReLU.
#
# The building blocks come first. They are the convolution with instance norm and ReLU, the transposed
# convolution that doubles the size, and the RGB head. Then come the official initialisation
# $\mathcal{N}(0, 0.02)$ and the average pooling that halves an image between scales.

# %% [helpers] pix2pixhd/model: init_weights, conv_block, up_block, to_rgb, downsample

# %% [markdown]
# The residual block and the global generator $G_1$. Its `forward` refuses sizes that its downsamplings cannot
# undo.

# %% [helpers] pix2pixhd/model: ResnetBlock, GlobalGenerator

# %% [markdown]
# The local enhancer $G_2$ is `c7s1-32, d64, R64×3, u32, c7s1-3` in the same notation. Its front end
# $G_2^{(F)}$ halves the full-size input. $G_1$ runs on the input shrunk by average pooling, and stops before its
# RGB head. The two feature maps have the same shape, and they are **added**. The back end $G_2^{(B)}$ turns
# the sum into the image with three residual blocks, one upsampling and an RGB head:
#
# $$G(x) = G_2^{(B)}\big(G_2^{(F)}(x) + G_1^{\text{feat}}(\downarrow x)\big).$$
#
# ```
#  x (full size) ──► G2 front: c7s1-32, d64 ─────────────┐
#                                                        (+)──► R64×3 ─► u32 ─► c7s1-3, tanh ─► G(x)
#  ↓x (half size) ─► G1: c7s1-64 … d1024, R1024×9 … u64 ──┘
# ```
#
# In the cell, `global_features` is $G_1$ without its head, at twice $G_2$'s width. `load_global` copies a
# trained $G_1$ in, and `freeze_global` freezes it for the first epochs of stage 2.

# %% [helpers] pix2pixhd/model: LocalEnhancer

# %% [markdown]
# This run's generator, built from the settings. Before training, it draws noise-like images: this is where
# training starts. To train your own version, edit the cells above and re-run from here.

# %%
def build_generator(stage: str) -> nn.Module:
    """This run's G1 + G2 for the "local" stage, else G1 alone (width 2 * NGF_LOCAL), on DEVICE."""
    if stage == "local":
        g = LocalEnhancer(IN_NC, 3, NGF_LOCAL, N_DOWNSAMPLE_GLOBAL, N_BLOCKS_GLOBAL, N_BLOCKS_LOCAL)
    else:
        g = GlobalGenerator(IN_NC, 3, 2 * NGF_LOCAL, N_DOWNSAMPLE_GLOBAL, N_BLOCKS_GLOBAL)
    return g.to(DEVICE)


g_check = build_generator("local").cpu()
with torch.no_grad():
    fake_check = g_check(x_demo)
assert fake_check.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
fig = plots.show_rows({"input": input_picture(preview)[:2], "untrained G(s)": fake_check,
                       "target photo": preview["image"][:2]},
                      "The generator before training: input | output | target",
                      RUN_DIR / "untrained_generator.png", xlabel="held-out example")

# %% [markdown]
# ## 4. The discriminators
#
# A **PatchGAN** does not give one score per image. It gives a grid of scores, one for each patch of the image,
# so it judges local texture. Each score sees a patch of 70×70 pixels. The paper writes it as
# `C64-C128-C256-C512`: 4×4 convolutions, instance norm on all but the first, and leaky ReLUs. There is no
# pooling.
#
# Pix2PixHD uses three identical PatchGANs $D_1, D_2, D_3$. Each sees the input map stacked with an image, at full,
# half and quarter size. The smallest copy judges the layout, the largest one the detail. Each returns the outputs
# of all five blocks, $D_k^{(1)}, \dots, D_k^{(5)}$. The last one is the grid of scores. The others feed feature
# matching in section 5, so the cell returns them all.

# %% [helpers] pix2pixhd/model: NLayerDiscriminator

# %% [helpers] pix2pixhd/model: MultiscaleDiscriminator

# %% [markdown]
# **Parameter counts at the official sizes.** The official Cityscapes model reads 35 classes and an edge channel.
# The cell builds it on PyTorch's `meta` device, which knows shapes but allocates no memory. A unit test checks
# these counts against counts worked out by hand.

# %%
with torch.device("meta"):
    official = {
        "global generator G1 (ngf 64, 9 blocks)": GlobalGenerator(36),
        "G1 + local enhancer G2 (ngf 32, 3 blocks)": LocalEnhancer(36),
        "one PatchGAN (ndf 64, 3 layers)": NLayerDiscriminator(36 + 3),
        "multi-scale D (3 PatchGANs)": MultiscaleDiscriminator(36 + 3),
    }
OFFICIAL_PARAMS = {name: tr.count_parameters(model) for name, model in official.items()}
for name, n in OFFICIAL_PARAMS.items():
    print(f"{name:45s} {n:>13,d} parameters")
assert list(OFFICIAL_PARAMS.values()) == [182_546_755, 182_857_059, 2_801_601, 8_404_803]

# %% [markdown]
# This run's discriminator, and a check of the size of each scale's grid of scores.

# %%
def build_discriminator() -> MultiscaleDiscriminator:
    """This run's multi-scale discriminator on (input map, image) pairs, on DEVICE."""
    return MultiscaleDiscriminator(IN_NC + 3, NDF, N_LAYERS_D, NUM_D).to(DEVICE)


def patch_map_size(size: int) -> int:
    """k4 p2 convs map n pixels to n // stride + 1; strides 2 (N_LAYERS_D times), 1, 1."""
    for stride in [2] * N_LAYERS_D + [1, 1]:
        size = size // stride + 1
    return size


d_check = build_discriminator().cpu()
RUN_PARAMS = {"G1 + G2": tr.count_parameters(g_check),
              "G1 inside it": tr.count_parameters(g_check.global_features),
              "multi-scale D": tr.count_parameters(d_check)}
for name, n in RUN_PARAMS.items():
    print(f"this run: {name:20s} {n:>12,d} parameters")
with torch.no_grad():
    d_out = d_check(x_demo, fake_check)
assert len(d_out) == NUM_D and all(len(scale) == N_LAYERS_D + 2 for scale in d_out)
patch_maps = [tuple(scale[-1].shape[-2:]) for scale in d_out]
assert patch_maps == [(patch_map_size(IMAGE_SIZE // 2**k),) * 2 for k in range(NUM_D)]
print("patch maps per scale:", patch_maps)

# %% [markdown]
# ## 5. Losses
#
# The discriminators learn with the least-squares GAN loss, *LSGAN* (Mao et al. 2017). A real pair should score
# 1 and a fake pair 0. Here $s$ is the input map and $x$ the real photo, and the three scales are summed:
#
# $$\mathcal{L}_D = \tfrac12 \sum_{k=1}^{3} \mathbb{E}\big[(D_k(s, x) - 1)^2\big] + \tfrac12 \sum_{k=1}^{3}
#   \mathbb{E}\big[D_k(s, G(s))^2\big].$$
#
# The generator's loss has three terms. The adversarial term pushes the fake pair's scores towards 1.
# **Feature matching** compares what the discriminators see inside, for the real and the fake pair. It uses the
# $T = n_\text{layers}+1 = 4$ intermediate layers of every scale. The **VGG loss** compares the two images in
# the features of VGG19, a network trained on ImageNet photos. It uses $N = 5$ layers, relu1_1 … relu5_1, with
# weights $w = \frac1{32}, \frac1{16}, \frac18, \frac14, 1$:
#
# $$\mathcal{L}_\text{GAN} = \sum_{k} \mathbb{E}\big[(D_k(s, G(s)) - 1)^2\big], \qquad
#   \mathcal{L}_\text{FM} = \sum_{k=1}^{3} \sum_{i=1}^{T} \frac{1}{3}\cdot\frac{4}{n_\text{layers}+1}\,
#   \big\| D_k^{(i)}(s, x) - D_k^{(i)}(s, G(s)) \big\|_1,$$
#
# $$\mathcal{L}_\text{VGG} = \sum_{i=1}^{N} w_i \big\| F^{(i)}(x) - F^{(i)}(G(s)) \big\|_1, \qquad
#   \mathcal{L}_G = \mathcal{L}_\text{GAN} + \lambda_\text{feat}\,\mathcal{L}_\text{FM} + \lambda_\text{VGG}\,
#   \mathcal{L}_\text{VGG}, \quad \lambda_\text{feat} = \lambda_\text{VGG} = 10.$$
#
# Here $\|\cdot\|_1$ is the mean absolute difference. The paper weights each layer by $\frac{1}{N_i}$. The
# official code weights every layer by $\frac{1}{\text{num}_D}\cdot\frac{4}{n_\text{layers}+1}$, and we follow
# it.
#
# A check by hand, for one scale with $D(s, x) = 0.9$ and $D(s, G(s)) = 0.2$:
# $\mathcal{L}_D = \tfrac12[(0.9-1)^2 + 0.2^2] = 0.025$ and $\mathcal{L}_\text{GAN} = (0.2 - 1)^2 = 0.64$.

# %% [helpers] losses: _as_list, lsgan_discriminator_loss, lsgan_generator_loss

# %% [markdown]
# Feature matching and the VGG loss. Each term is a mean absolute difference, weighted as above.

# %% [helpers] pix2pixhd/losses: feature_matching_loss

# %% [helpers] pix2pixhd/losses: PIX2PIXHD_VGG_LAYERS, PIX2PIXHD_VGG_WEIGHTS, vgg_loss

# %% [helpers] pix2pixhd/losses: pix2pixhd_generator_loss

# %% [markdown]
# VGG19 stays frozen. As in the official code, it gets the raw image in $[-1, 1]$, without ImageNet's
# normalisation. The cell below checks the claims above: the LSGAN values computed by hand, and the weights of
# feature matching. These weights make $\mathcal{L}_\text{FM}$ independent of the number of scales and layers.
# A difference of 0.3 in every matched layer gives $\lambda_\text{feat} \cdot 4 \cdot 0.3 = 12$, both with three
# scales of four layers and with one scale of one layer.

# %%
vgg = vgg19.VGG19Features(list(PIX2PIXHD_VGG_LAYERS), pretrained=VGG_PRETRAINED,
                          normalize_input=False).to(DEVICE)
if not VGG_PRETRAINED:
    print("STAND-IN:", vgg19.STAND_IN_NOTE)
    STAND_INS.append(vgg19.STAND_IN_NOTE)
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
# The training code uses a few tools of the shared core: checkpoints, the run record with its loss history, and
# mixed precision.

# %%
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable
from tqdm.auto import tqdm
from helpers.environment import autocast
from helpers.training import History, TrainingRun, load_checkpoint, save_checkpoint, synchronize
from helpers.pix2pixhd.train import (Trained, TrainingSetup, linear_decay_lr, saved_epochs, set_lr,
                                     snapshot)

# %% [markdown]
# ### The step
# Each iteration follows the official code:
# * $G$ draws fake images from the maps.
# * $D$ scores the real pair and the fake pair. The fake pair's scores feed $\mathcal{L}_\text{GAN}$ and
#   $\mathcal{L}_\text{FM}$, so their gradients reach $G$ through $D$.
# * $D$ scores the fake pair again, detached from $G$, for $\mathcal{L}_D$.
# * Adam updates $G$, then $D$.
#
# On a GPU the step runs in *mixed precision* with `torch.autocast`. Most operations then use a 16-bit number
# format: bf16 where the GPU has it, fp16 on a T4. On a CPU the step runs in plain fp32. `EMULATE_T4=1`
# makes any device take a T4's choices, so a CPU can run the fp16 path too.
#
# A **loss scaler** keeps small fp16 gradients from rounding to 0. It multiplies the loss by a scale $s$ before
# the backward pass, and divides the gradients by $s$ before Adam. The largest fp16 number is 65,504. When a
# gradient overflows, the scaler skips the step and halves $s$. Here $s$ starts at $2^8$. At torch's default of
# $2^{16}$, every gradient above 1 would overflow, and this model's first steps would be lost.

# %% [helpers] pix2pixhd/train: pix2pixhd_train_step

# %% [markdown]
# ### An epoch, the two stages, a variant
# An epoch runs the step over all the training pairs. The losses stay on the device until the epoch ends,
# because reading a loss at every step would make the CPU wait for the GPU each time.
#
# The **two-stage schedule** trains the generator from coarse to fine:
# * Stage 1 trains $G_1$ alone at half size.
# * Stage 2 builds $G_1 + G_2$ at full size and copies the trained $G_1$ in. For the first `FIX_GLOBAL_EPOCHS`
#   epochs $G_1$ stays frozen and only $G_2$ learns. Then all of $G$ trains, with a new Adam optimiser.
#
# The discriminator carries over from one stage to the next. In each stage the learning rate stays constant,
# then falls linearly towards zero.

# %% [helpers] pix2pixhd/train: pix2pixhd_train_epoch

# %% [helpers] pix2pixhd/train: Stage, two_stage_plan

# %% [markdown]
# Every epoch ends with a *checkpoint* in `RUN_DIR/checkpoints`: a file that holds $G$, $D$, both Adam states,
# the loss scaler and the run record. The run record keeps the losses, the time, the iterations, the epoch and
# the sample pictures. Calling `train_variant` again resumes from the checkpoint, so a Colab disconnect costs at
# most one epoch. In the Colab configuration a checkpoint takes about 0.65 GB, and each variant keeps two. Mind
# the space when `RUN_DIR` is on Google Drive.

# %% [helpers] pix2pixhd/train: train_stage

# %% [helpers] pix2pixhd/train: train_variant

# %% [markdown]
# ### The runs
# The ablation of section 8 trains three variants. They differ only in the loss weights and the plan, so one
# function trains, resumes or loads any of them.

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
    env.seed_everything(SEED)
    variant = VARIANTS[key]
    setup = replace(BASE_SETUP, lambda_feat=variant["lambda_feat"],
                    lambda_vgg=variant["lambda_vgg"])
    return train_variant(key, plan_for(variant), build_generator, build_discriminator(), setup,
                         RUN_DIR, {**CONFIG, "variant": key}, stop_after)

# %% [markdown]
# ### Train the main variant
# If Colab disconnects, re-run the cell: it resumes from the last checkpoint, and the output says "resuming".
# Run the notebook again with the same `RUN_DIR` and the cell loads the finished run instead of training it
# again: the output says "reusing the finished run". Section 9 shows a stop and a resume on a short run.
#
# ⏱ About 6 to 12 min on a T4 (estimated). Re-run this cell to continue.

# %%
if env.in_colab():
    %load_ext tensorboard
    %tensorboard --logdir {RUN_DIR / "tensorboard"}
if DEVICE.type == "cuda":
    torch.cuda.reset_peak_memory_stats(DEVICE)

TOTAL_EPOCHS = sum(GLOBAL_EPOCHS) + sum(LOCAL_EPOCHS)
main = run_variant(MAIN_VARIANT)  # trains, resumes from its last checkpoint, or reuses it
assert main.complete
steps, _ = main.run.history.series("G/total")
assert steps == list(range(1, len(steps) + 1)), "the resumed history must continue without gaps"
assert main.run.stopwatch.iterations == TOTAL_EPOCHS * len(train_loader)
TRAINED_HERE = main.saved_before < TOTAL_EPOCHS  # False: an earlier Run all trained it
MAIN_PEAK_MB = tr.peak_memory_mb(DEVICE) if DEVICE.type == "cuda" and TRAINED_HERE else None
seconds_per_iteration = main.run.stopwatch.seconds / main.run.stopwatch.iterations
print(f"main run: {main.run.stopwatch.iterations} iterations in {main.run.stopwatch.seconds:.1f} s "
      f"({seconds_per_iteration:.2f} s/iteration, data loading included)")
if MAIN_PEAK_MB is None:
    why = "no GPU here" if DEVICE.type != "cuda" else "this Run all reused the finished run"
    print(f"peak GPU memory: not measured ({why})")
else:
    print(f"peak GPU memory of the main run: {MAIN_PEAK_MB:,.0f} MiB (CUDA allocator)")
    if not SMOKE:  # the Colab configuration fits a T4 (14.6 GiB usable)
        assert MAIN_PEAK_MB < 14.5 * 1024, f"{MAIN_PEAK_MB:,.0f} MiB would not fit a T4"

# %% [markdown]
# The loss curves and the held-out maps drawn through training. Compare the sizes of the generator's loss terms:
# which ones carry most of $\mathcal{L}_G$?

# %%
smooth = max(1, main.run.stopwatch.iterations // 60)  # moving average over ~1/60 of the run
plots.plot_losses(main.run.history, ["G/total", "G/gan", "G/fm", "G/vgg"],
                  "Generator loss terms (main run)", RUN_DIR / "losses_generator.png",
                  smooth=smooth)
plots.plot_losses(main.run.history, ["D/loss"], "Discriminator LSGAN loss (main run)",
                  RUN_DIR / "losses_discriminator.png", smooth=smooth)
plots.plot_losses(main.run.history, ["lr"], "Learning rate: constant, then linear decay, per stage",
                  RUN_DIR / "learning_rate.png", ylabel="learning rate")
lrs = main.run.history.series("lr")[1]
assert lrs[0] == LR and min(lrs) < LR  # the decay happened
plots.show_over_iterations(main.run.snapshots, "Held-out label maps through training (stage 1 at "
                           "half size, then stage 2)", RUN_DIR / "samples_over_iterations.png",
                           nrow=2)

# %% [markdown]
# ## 7. Results on held-out pairs
#
# Two pixel measures compare each output with its real photo:
# * **PSNR**, the peak signal-to-noise ratio, is $10\log_{10}\frac{1}{\text{MSE}}$ in dB. MSE is the mean squared
#   error between the two images. Higher is better.
# * **SSIM**, the structural similarity (Wang et al. 2004), compares brightness, contrast and structure in a
#   small Gaussian window. A score of 1 means identical.
#
# Both read images mapped from $[-1, 1]$ to $[0, 1]$. This matters for SSIM, because its brightness term
# $\frac{2\mu_x\mu_y + C_1}{\mu_x^2 + \mu_y^2 + C_1}$ changes when both images shift. Take a mid-grey wall, whose
# mean $\mu$ is near 0 on $[-1, 1]$, and the same wall 5 % brighter. On $[-1, 1]$ they would score 0.04 instead
# of 0.995.
#
# Many facades fit one label map, so a conditional GAN does not try to reproduce the exact photo. PSNR and SSIM
# reward a blurry average as much as a realistic photo. So we add **LPIPS** where its AlexNet weights load.
# LPIPS is a learned perceptual distance: it compares two images in the features of a trained network. Lower is
# better.

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
        scores["PSNR (dB)"] += metrics.psnr(fake01, real01).tolist()
        scores["SSIM"] += metrics.ssim(fake01, real01).tolist()
        if LPIPS_MODEL is not None:
            scores["LPIPS"] += [LPIPS_MODEL(f[None], r[None]).item() for f, r in zip(fake, real)]
    return {name: sum(v) / len(v) for name, v in scores.items() if v}

# %%
@torch.no_grad()
def outputs_for(g: nn.Module, batch: dict) -> torch.Tensor:
    """G's images (on the CPU) for a batch of maps."""
    g.eval()
    return g(FAST.tensor(encode(batch, IMAGE_SIZE)[0])).float().cpu()


def described(s: dict[str, float]) -> str:
    """One variant's scores in words."""
    lpips = f", LPIPS {s['LPIPS']:.3f}" if "LPIPS" in s else ""
    return f"PSNR {s['PSNR (dB)']:.2f} dB, SSIM {s['SSIM']:.3f}{lpips}"


scores = {MAIN_VARIANT: evaluate(main.G)}
assert all(math.isfinite(v) for v in scores[MAIN_VARIANT].values())
display(Markdown(f"**Your main run** on {len(test_set)} held-out pairs: "
                 f"{described(scores[MAIN_VARIANT])}."))
fig = plots.show_rows({"input": input_picture(preview), "output G(s)": outputs_for(main.G, preview),
                       "target photo": preview["image"]},
                      f"{VARIANTS[MAIN_VARIANT]['title']}: input | output | target (held-out)",
                      RUN_DIR / "input_output_target.png", xlabel="held-out example")

# %% [markdown]
# ## 8. Ablation: which parts matter?
#
# An *ablation* removes one part at a time and measures what is lost. All three variants get the same data, the
# same seed and the same number of epochs, so the same number of generator updates:
# * **G1 + G2, GAN + FM + VGG** is the main run above.
# * **G1 only** trains the global generator alone, at full size, for all the epochs. There is no local enhancer
#   and no two-stage schedule. It has about as many parameters, but it needs more compute, because every epoch
#   runs at full size.
# * **G1 + G2, GAN only** sets $\lambda_\text{feat} = \lambda_\text{VGG} = 0$, so only the LSGAN term is left.
#
# In smoke mode each variant trains for a few iterations only. Its table proves that the code runs, and its
# numbers mean nothing.
#
# ⏱ About 19 to 34 min on a T4 (estimated). Re-run this cell to continue.

# %%
results = {MAIN_VARIANT: main}
for key in VARIANTS:
    if key not in results:
        results[key] = run_variant(key)
        scores[key] = evaluate(results[key].G)
ablation = pd.DataFrame([
    {"variant": VARIANTS[k]["title"], **{m: round(v, 4) for m, v in scores[k].items()},
     "G params": tr.count_parameters(r.G), "iterations": r.run.stopwatch.iterations,
     "train s": round(r.run.stopwatch.seconds, 1)}
    for k, r in results.items()
]).set_index("variant")
display(ablation)
(RUN_DIR / "ablation.txt").write_text(ablation.to_string() + "\n")
budgets = {r.run.stopwatch.iterations for r in results.values()}
assert len(budgets) == 1, f"every variant gets the same budget, got {budgets} iterations"
rows = {"input": input_picture(preview),
        **{VARIANTS[k]["title"]: outputs_for(r.G, preview) for k, r in results.items()},
        "target photo": preview["image"]}
fig = plots.show_rows(rows, "Ablation on held-out label maps (same budget)",
                      RUN_DIR / "ablation_grid.png", xlabel="held-out example")

# %%
main_scores, g1_scores, gan_scores = (scores[k] for k in VARIANTS)
local_gain = main_scores["PSNR (dB)"] - g1_scores["PSNR (dB)"]
gan_only_change = gan_scores["PSNR (dB)"] - main_scores["PSNR (dB)"]
display(Markdown(
    f"**Your ablation** ({DATASET}, {IMAGE_SIZE}×{IMAGE_SIZE} pixels, {next(iter(budgets)):,} "
    f"generator updates per variant, {len(test_set)} held-out pairs):\n\n"
    + "\n".join(f"* {VARIANTS[k]['title']}: {described(scores[k])}" for k in VARIANTS)
    + f"\n\nThe local enhancer with the two-stage schedule changes PSNR by {local_gain:+.2f} dB "
    f"over G1 alone. Dropping feature matching and the VGG loss changes it by "
    f"{gan_only_change:+.2f} dB."))

# %% [markdown]
# ### Reference results of a smoke-sized run
# *Toy streets at 32×32 pixels, smoke-sized models, 1,024 generator updates per variant, one seed, a two-core
# CPU, random-weight VGG19.* The facades, the default data set, have no reference run yet. The model sizes and
# the command are in experiments/RESULTS.md.
#
# | variant (same budget) | PSNR (dB) ↑ | SSIM ↑ | G parameters | training time (s) |
# |---|---|---|---|---|
# | G1 + G2, GAN + FM + VGG | **17.52** | **0.519** | 202,739 | 195 |
# | G1 only, GAN + FM + VGG | 14.86 | 0.319 | 200,195 | 210 |
# | G1 + G2, GAN only | 16.71 | 0.431 | 202,739 | 62 |
#
# At this toy size the local enhancer with the two-stage schedule matters most. It adds 2.7 dB and 0.20 SSIM
# over G1 trained at full size, whose outputs stay noisy and checkered. Dropping feature matching and the VGG
# term costs 0.8 dB and 0.09 SSIM. With a random-weight VGG, feature matching does most of that work. This is
# one seed with tiny models, so small differences are within the noise from run to run.
#
# The GAN-only variant trains three times faster here, because it skips VGG19, the most expensive part of an
# iteration at this size. Computed on $[-1, 1]$, SSIM would read 0.435, 0.256 and 0.355 for the same outputs.
#
# > **Departures from the paper.** The course brief writes the generator's LSGAN term with a ½. We follow the
# > official code, which has none: the ½ acts like doubling both λ. We train for fewer than the paper's 200
# > epochs per stage, with a half-width generator and one local enhancer, on facades, not 2048×1024 street
# > scenes. GPUs use `torch.autocast`, not apex.

# %% [markdown]
# ## 9. Under the hood (optional)
#
# These cells check the machinery behind the lessons. You can skip them.
#
# ### Bad inputs stop with a message that says what to do

# %%
for bad_call in (lambda: p2p.one_hot_labels(torch.full((1, 4, 4), 9), 6),
                 lambda: p2p.encode_input(torch.full((1, 3, 4, 4), 255.0), 0),
                 lambda: check_image_size(250, 256)):
    try:
        bad_call()
        raise AssertionError("bad input was accepted")
    except ValueError as err:
        print("ValueError:", err)

# %% [markdown]
# ### What a checkpoint holds
# Each stage has one checkpoint file, rewritten after every epoch. Resuming reads it back: the weights, both
# Adam states, the loss scaler, the losses so far and the epoch counter. The cell shows what the main run's files
# hold, and how many steps each Adam took. With fp16 the loss scaler skips a step whose gradients overflowed.
# If Adam took many fewer steps than there were iterations, training would have been lost.

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

# %% [markdown]
# ### Stop and resume
# A disconnect stops a run after some epoch. The cell trains a short copy of the main variant on a few training
# pairs, in a temporary folder. It stops the run once, inside the frozen-$G_1$ epoch of stage 2, as a disconnect
# would. Then it calls the same function again, which resumes from the checkpoint. The loss history must go on
# without a gap.

# %%
import shutil, tempfile
from torch.utils.data import Subset

drill_pairs = Subset(train_set, range(min(len(train_set), 2 * BATCH_SIZE)))
drill_setup = replace(BASE_SETUP, loader=DataLoader(drill_pairs, BATCH_SIZE, shuffle=True,
                                                    drop_last=True))
drill_plan = two_stage_plan(IMAGE_SIZE, (1, 0), (1, 1), fix_global=1)  # 1 epoch, then 2 (G1 frozen)
drill_dir = Path(tempfile.mkdtemp(prefix="pix2pixhd-resume-drill-"))  # fresh for every run
STOP_AFTER = 2  # epochs: the first epoch of stage 2, with G1 frozen


def drill(stop_after: int | None) -> Trained:
    """The main variant's short copy: train, or resume from drill_dir."""
    return train_variant("drill", drill_plan, build_generator, build_discriminator(), drill_setup,
                         drill_dir, {**CONFIG, "variant": "drill"}, stop_after)


env.seed_everything(SEED)
stopped = drill(STOP_AFTER)
n = len(drill_setup.loader)
assert not stopped.complete and stopped.run.stopwatch.iterations == STOP_AFTER * n
print(f"stopped after epoch {STOP_AFTER} of 3 ({STOP_AFTER * n} iterations), as a disconnect would")
resumed = drill(None)
assert resumed.complete and resumed.saved_before == STOP_AFTER
steps, _ = resumed.run.history.series("G/total")
assert steps == list(range(1, 3 * n + 1)), "the resumed history must continue without gaps"
assert resumed.run.stopwatch.iterations == 3 * n
shutil.rmtree(drill_dir / "checkpoints")  # free the disk: the drill's checkpoints are large
del stopped, resumed

# %% [markdown]
# ### Speed: the plain step and the fast path
# The cell times the same step in two ways, at this run's full size. The first is the plain step in fp32, as a
# student would write it. The second is the *fast path* this device gets, with mixed precision and a fused Adam.
# Each timing warms up first, then waits for the GPU to finish. `make bench` does the same at the official size,
# one row per option.
#
# On a CPU the fast path is the plain step, so there is one row. With `EMULATE_T4=1` the CPU also times a T4's
# fast path. fp16 is slower on a CPU, so that row proves that the code runs, not that it pays.

# %%
def step_to_time(fast: FastPath) -> Callable[[], object]:
    """One training step of fresh main-configuration models at full size with the options `fast`."""
    env.seed_everything(SEED)
    G, D = fast.prepare(build_generator("local")), fast.prepare(build_discriminator())
    opt_g, opt_d = fast.adam(G.parameters(), LR, BETAS), fast.adam(D.parameters(), LR, BETAS)
    scaler = fast.grad_scaler(DEVICE)
    x, real = (fast.tensor(t) for t in encode(next(iter(train_loader)), IMAGE_SIZE))
    return lambda: pix2pixhd_train_step(G, D, vgg, opt_g, opt_d, scaler, x, real, LAMBDA_FEAT,
                                        LAMBDA_VGG, fast.amp_dtype)


paths = {"eager fp32": FastPath()}
if FAST != FastPath():
    paths[f"fast path: {FAST.describe()}"] = FAST
timings = {name: tr.time_per_step(step_to_time(fast), DEVICE, TIMED_STEPS, warmup=WARMUP_STEPS)
           for name, fast in paths.items()}
for name, t in timings.items():
    memory = f", peak {t['peak_memory_mb']:,.0f} MiB" if t["peak_memory_mb"] is not None else ""
    print(f"{name}: {t['ms_per_step']:,.1f} ms/step ({t['it_per_s']:.2f} steps/s{memory})")
if DEVICE.type == "cuda" and not SMOKE and len(timings) == 2:  # the claim: the fast path pays
    eager_ms, fast_ms = (t["ms_per_step"] for t in timings.values())
    assert fast_ms < eager_ms, f"fast path {fast_ms:.1f} ms/step, eager {eager_ms:.1f} ms/step"

# %% [markdown]
# ### Reload the weights and generate
# A fresh generator, built from the settings, loads the last checkpoint of the main run. It must hold the same
# weights as the trained one and draw the same images, bit for bit. On a GPU, cuDNN may pick another algorithm
# for the same layer from one call to the next. Some algorithms add numbers in a varying order, which changes the
# rounding. So the comparison asks cuDNN for deterministic algorithms.

# %%
import contextlib


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
plots.show_grid(torch.cat([input_picture(preview), reloaded]),
                "Reloaded generator: label maps (top) and its images (bottom)",
                RUN_DIR / "reloaded_samples.png", nrow=len(reloaded))

# %% [markdown]
# ### metrics.json
# Everything above lands in `metrics.json`: the quality of each variant, the training time and speed, the step
# timings, the peak GPU memory and the stand-ins this run used. A *stand-in* replaces something the run could not
# download, such as the toy streets instead of the facades.

# %%
total_iterations = sum(r.run.stopwatch.iterations for r in results.values())
total_seconds = sum(r.run.stopwatch.seconds for r in results.values())
metrics_path = tr.write_metrics(
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
# * Pix2PixHD is a conditional GAN made of plain parts: residual generators with instance norm, a split from
#   coarse to fine, and three PatchGANs that judge the image at three sizes. The global generator sees the
#   half-size map, and the local enhancer adds the detail at full size.
# * Most of its generator loss is *not* adversarial. Feature matching and the VGG loss carry the content, and
#   the LSGAN term the realism. Compare the sizes of the loss terms in the plot of section 6.
# * Training in stages is ordinary code: a plan of stages, one checkpoint per epoch, and a resume that goes on
#   exactly where it stopped.
# * PSNR and SSIM reward the average photo for a map. Compute SSIM on images in $[0, 1]$, or it is wrong.
# * A speed option is only a hope until you time it beside the plain step, and check it. With channels-last
#   tensors, torch's InstanceNorm on a CPU returns wrong gradients at batch 1, and a unit test shows it. So the
#   fast path here leaves channels-last off.

# %%
display(Markdown(
    f"* In your run, the main variant reached {described(main_scores)} on {len(test_set)} held-out "
    f"pairs. G1 alone reached PSNR {g1_scores['PSNR (dB)']:.2f} dB, and the GAN loss alone "
    f"{gan_scores['PSNR (dB)']:.2f} dB, after the same number of updates."))

# %% [markdown]
# ## Check your understanding
#
# * Why does this notebook compute SSIM on images in $[0, 1]$ and not in $[-1, 1]$?
#
#    <details><summary>Answer</summary>
#
#    SSIM's brightness term changes when both images shift. A mid-grey wall has a mean near zero on $[-1, 1]$,
#    and the term then divides small numbers by small numbers. So a slightly brighter copy of the wall scores
#    far too low. In the reference run, SSIM on $[-1, 1]$ read 0.435 instead of 0.519 for the same images.
#    </details>
#
# * G1 alone has about as many parameters as G1 + G2, and it trains for the same number of updates. Why can it
#    do worse?
#
#    <details><summary>Answer</summary>
#
#    The two-stage schedule splits the problem. G1 first learns the layout at half size, where an update is
#    cheap and each convolution sees more of the scene. G2 then only adds the detail on top of a trained G1. G1
#    alone must learn layout and detail at once, at full size. In the reference run it lost 2.7 dB of PSNR,
#    and its outputs stayed noisy and checkered. Compare the two rows of your own ablation.
#    </details>
#
# * Why does the loss scaler start at $2^8$ instead of torch's default $2^{16}$?
#
#    <details><summary>Answer</summary>
#
#    fp16 overflows above 65,504. With a scale of $2^{16}$, every gradient above 1 overflows. The scaler then
#    skips the step and halves the scale, again and again, so the first steps of training are lost. A smaller
#    start avoids that. The cell "What a checkpoint holds" checks that almost no steps were skipped.
#    </details>

# %% [markdown]
# ## What to try next
# * Train the main variant at the official widths, `NGF_LOCAL = 32` and `NDF = 64`, on a larger GPU, or at
#   twice the image size.
# * Set `DATASET = "procedural_sketch"`: the same scenes as black-on-white sketches, with an RGB input.
# * Change `FIX_GLOBAL_EPOCHS`, where 0 means no frozen phase. Compare the held-out SSIM and the samples over
#   iterations.
# * Replace instance norm by group norm in the cells of sections 3 and 4, and compare quality and speed.
# * Set `COMPILE = True` on a GPU and compare the two rows of the speed test in section 9, and `make bench`'s
#   table.
# * Add the paper's instance-wise feature encoder, from section 3.4 of the paper, for varied outputs from one
#   map.
