# %% [markdown]
# # 04 · Text to image: a matching-aware DCGAN conditioned on sentences
#
# {{BADGE}}
#
# You will build a GAN that draws a picture from a sentence, such as "this flower has large pink petals". It
# follows Reed et al. (2016), *Generative Adversarial Text to Image Synthesis*. The discriminator also learns to
# reject a real image paired with the wrong sentence. You train it on flowers with a GPU, or on simple shapes
# with a CPU.
#
# ![One caption, eight noise vectors: generated shapes above, real shapes below](https://raw.githubusercontent.com/genimg-notebooks/genimg-notebooks/main/images/04_noise_per_caption.png)
# *One caption, eight noise vectors: generated shapes above real ones, from a CPU run.*
#
# You will learn:
# * how a sentence becomes a vector that both networks read,
# * why the discriminator must also see real images with wrong captions,
# * how to measure whether an image follows its caption,
# * how to check that the generator uses its noise.
#
# ⏱ Colab T4, full run on flowers: about 10 to 25 minutes (estimated). CPU smoke run: about 20 seconds.

# %% SETUP

# %%
import math, os, textwrap, warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from torch import Tensor, nn
from tqdm.auto import tqdm

# %%
from helpers import environment as env, plotting
from helpers.clip import STAND_IN_CLIP_ID, clip_score, load_clip
from helpers.environment import autocast, smoke_mode
from helpers.t2i import classifier as attribute_classifier, evaluate, flowers, shapes
from helpers.t2i.data import sample_batch
from helpers.t2i.evaluate import images_from_text, images_per_caption, mean_and_spread, seeded_noise
from helpers.t2i.model import dcgan_init, feature_map_widths, text_projection
from helpers.t2i.text import DEFAULT_ENCODER, LOCAL_ENCODER_ENV, EmbeddingCache, TextEncoder
from helpers.training import (History, Stopwatch, TrainingRun, count_parameters, load_checkpoint,
                              save_checkpoint, write_metrics)

# %% [markdown]
# ## 1. Settings
# * `DATASET`: `"flowers"` is the paper's data and needs a GPU. `"shapes"` is a small set of drawn shapes. It
#   trains on a CPU in a few minutes and needs no download.
# * `RECIPE`: `"improved"` adds four measured changes to the paper. `"paper"` trains Reed et al.'s recipe as
#   published. Section 9 compares the two.
# * `ITERATIONS`: training steps. Each step shows the networks one batch.
# * `BATCH_SIZE`: real images per step.
# * `TEXT_ENCODER`: the language model that turns a sentence into a vector.
# * `SEED`: the random seed. The same seed gives the same run.
# * `RUN_DIR_ON_DRIVE`: in Colab, keep the run on Google Drive, so that a new session continues it.
# * `MY_SENTENCES`, `INTERPOLATE`: your own captions for section 10.
#
# The collapsed cell after the settings holds everything else: sizes, learning rate, evaluation sizes.

# %%
# Settings you may change
DATASET = os.environ.get("T2I_DATASET", "flowers")  # "flowers" (GPU) or "shapes" (CPU, no download)
RECIPE = os.environ.get("T2I_RECIPE", "improved")   # or "paper": Reed et al. as published
ITERATIONS = 30_000 if DATASET == "flowers" else 6000  # training steps (on flowers: as the paper)
ITERATIONS = int(os.environ.get("T2I_ITERATIONS", ITERATIONS))
BATCH_SIZE = 64                         # real images per training step (the paper: 64)
TEXT_ENCODER = DEFAULT_ENCODER          # or "bert-base-uncased", "openai/clip-vit-base-patch32"
SEED = 0                                # random seed: the same seed gives the same run
RUN_DIR_ON_DRIVE = False                # True in Colab: keep the run on Google Drive
MY_SENTENCES = {                        # your own captions, one list per data set
    "flowers": ["this flower has large pink petals and a yellow center",
                "a white flower with many thin petals", "a purple flower with a long stem",
                "the petals are bright orange with dark spots"],
    "shapes": ["a big green square in the bottom left", "a tiny red triangle at the top right",
               "a large yellow circle in the top left corner", "a small blue circle, bottom right"]}
INTERPOLATE = {                         # two captions to walk between, one pair per data set
    "flowers": ("this flower is bright yellow with round petals",
                "this flower is deep red with pointed petals"),
    "shapes": ("a large red circle in the top left", "a large blue circle in the bottom right")}

# %%
#@title Advanced settings
SMOKE = smoke_mode()                            # SMOKE=1 in the environment: CI's tiny run
NOTEBOOK = "04_text_to_image_dcgan"
LOCAL_ENCODER = os.environ.get(LOCAL_ENCODER_ENV)  # a local copy of the default encoder (offline)
SHAPES_TRAIN_IMAGES = 4000                      # rendered training images (shapes set)
SHAPES_TEST_FRACTION = 0.2                      # attribute combinations held out of training
FLOWERS_TEST_CLASSES = 20                       # class-disjoint split 82 / 20, as the paper
Z_DIM = 100                                     # the paper: z of 100, text projected to 128
PROJECTED_DIM = 128
LR, BETAS = 2e-4, (0.5, 0.999)                  # the paper: Adam 2e-4, beta1 0.5
LOG_EVERY = 50                                  # iterations per logged mean of the losses
SNAPSHOT_EVERY, CHECKPOINT_EVERY = (5000, 2000) if DATASET == "flowers" else (1000, 500)
CLASSIFIER_IMAGES, CLASSIFIER_STEPS = 3000, 1000  # attribute classifier (shapes set)
EVAL_IMAGES = 500                               # generated images per split (accuracy, CLIP score)
NOISE_SEEDS = (10, 11, 12)                      # one noise vector per image, one draw per seed
SPREAD_CAPTIONS, NOISE_PER_CAPTION = 16, 8      # the noise-spread measure
CLIP_MODEL = "openai/clip-vit-base-patch32"     # CLIP score backbone (flowers)
INTERPOLATION_STEPS = 8
if SMOKE:  # CI's tiny run: you can ignore this
    DATASET = os.environ.get("T2I_DATASET", "shapes")
    ITERATIONS = int(os.environ.get("T2I_ITERATIONS", 60))
    SHAPES_TRAIN_IMAGES, BATCH_SIZE, LOG_EVERY = 600, 32, 5
    SNAPSHOT_EVERY, CHECKPOINT_EVERY = 20, 30
    CLASSIFIER_IMAGES, CLASSIFIER_STEPS, EVAL_IMAGES = 600, 300, 96
    SPREAD_CAPTIONS, NOISE_PER_CAPTION = 4, 4
CPU_RUN = DATASET == "shapes" and not SMOKE     # the CPU-sized full run
CHECK_QUALITY = not SMOKE                       # the quality asserts need a full-length run
SCORE_CLIP = DATASET == "flowers" or SMOKE      # smoke: the CLIP code on a tiny random CLIP
IMAGE_SIZE = 64 if DATASET == "flowers" else 32  # the paper: 64; the shapes are drawn at 32 px
NGF = NDF = 16 if SMOKE or CPU_RUN else 64      # feature maps at the finest level (the paper: 64)
LR_HALVING_EVERY = 11_000 if DATASET == "flowers" else 10**9  # the paper: halve every 100 epochs
RECIPES = {  # model options and loss weights; section 9 measures each change
    "paper": {"model": {}, "loss": {"gan_int": 1.0}},
    "improved": {"model": {"conditional_bn": True, "projection": True, "auxiliary": True,
                           "pack": 2},
                 "loss": {"gan_int": 1.0 if DATASET == "flowers" else 0.0, "auxiliary": 1.0}},
}
if DATASET not in ("shapes", "flowers"):
    raise ValueError(f"T2I_DATASET={DATASET!r}; use 'flowers' (full) or 'shapes' (offline, CPU)")
if RECIPE not in RECIPES:
    raise ValueError(f"T2I_RECIPE={RECIPE!r}; use one of {sorted(RECIPES)}")
PACK = RECIPES[RECIPE]["model"].get("pack", 1)  # images per caption that D judges together
my_sentences, interpolate_ends = MY_SENTENCES[DATASET], INTERPOLATE[DATASET]

# %%
env.use_drive_for_runs(RUN_DIR_ON_DRIVE)        # mounts Drive and sets $RUN_DIR there (Colab only)
env.seed_everything(SEED)
DEVICE = env.pick_device()
RUN_DIR = env.run_dir(NOTEBOOK)
CHOICES = env.gpu_choices(DEVICE)               # GPU path: autocast, GradScaler, channels-last
AMP_DTYPE = CHOICES.amp_dtype                   # float16 on a T4 (+ GradScaler), bfloat16 from A100
MEMORY_FORMAT = torch.channels_last if CHOICES.channels_last else torch.contiguous_format
torch.backends.cudnn.benchmark = CHOICES.cuda   # let cuDNN time its convolution kernels once
if CHOICES.emulated and not CHOICES.cuda:
    CHOICES.skip("cuDNN autotuning (torch.backends.cudnn.benchmark)",
                 "the CPU's own convolution kernels")
STAND_INS = []
print(f"mode: {'smoke' if SMOKE else 'full'} | dataset: {DATASET} | recipe: {RECIPE} | "
      f"device: {env.describe_device(DEVICE)} | run dir: {RUN_DIR}")
print(f"speed and precision: {CHOICES.describe()}")
if DEVICE.type == "cpu":
    print("no GPU: training on the CPU" + ("" if DATASET == "shapes" else
          " (flowers at the paper's size is meant for a GPU; T2I_DATASET=shapes is the CPU run)"))

# %% [markdown]
# ## 2. Sentences become vectors
# A network cannot read words, so a language model first turns each caption $s$ into a vector
# $\varphi(s) \in \mathbb{R}^{D}$. We use `all-MiniLM-L6-v2`, a small model of the BERT family. It gives one
# vector $h_i$ per token, a word or a piece of a word. We average them over the $T$ real tokens, which is called
# **mean pooling**:
#
# $$\varphi(s) = \frac{1}{T}\sum_{i=1}^{T} h_i, \qquad D = 384 .$$
#
# Captions that mean the same thing should get vectors that point the same way. The **cosine similarity** of
# two vectors measures this: 1 means the same direction, 0 means unrelated.

# %%
local = LOCAL_ENCODER if TEXT_ENCODER == DEFAULT_ENCODER else None
encoder = TextEncoder(TEXT_ENCODER, local_path=local, device=DEVICE)
if local:
    print(f"stand-in: {TEXT_ENCODER} loaded from a local copy at {local} ({LOCAL_ENCODER_ENV}); "
          "same weights, no download")
    STAND_INS.append(f"text encoder: local copy of {TEXT_ENCODER} ({LOCAL_ENCODER_ENV})")
print(f"{TEXT_ENCODER}: {encoder.dim}-d sentence vectors ({encoder.pooling} pooling), "
      f"reads at most {encoder.max_length} tokens")
probe = encoder.encode(["a small red circle in the top left", "a tiny red circle at the top left",
                        "a large blue square in the bottom right"])
similar, different = (F.cosine_similarity(probe[0], probe[k], dim=0).item() for k in (1, 2))
print(f"cosine(similar captions) = {similar:.3f}, cosine(different captions) = {different:.3f}")
assert probe.shape == (3, encoder.dim) and similar > different, "paraphrases must be closer"

# %% [markdown]
# ## 3. The data: images with captions
# **Flowers**, the default. The Oxford-102 Flowers set has 8,189 photos of 102 kinds of flower. Reed et al.
# wrote ten captions for each photo. We train on 82 kinds and test on the other 20, as the paper does. So the
# test captions describe flowers the generator has never seen. Each photo is stored at 76 px and randomly
# cropped to 64 px and flipped, as in the paper.
#
# **Shapes**, the CPU run. Each image shows one filled shape on white. It has four **attributes**: colour, shape,
# size and position. Each image has five captions, written from different templates and synonyms. A caption does
# not fix the image: the shape moves a little and changes size a little. So one caption fits many images, and the
# noise has something to choose. 19 of the 96 combinations of attributes never appear in training. They play
# the role of the paper's held-out kinds of flower.
#
# Because the shapes' attributes are known, a small classifier can later check whether a generated image shows
# what its caption says.

# %%
if DATASET == "shapes":
    train_combos, test_combos = shapes.split_combinations(SHAPES_TEST_FRACTION, seed=SEED)
    train_data = shapes.make_shapes(SHAPES_TRAIN_IMAGES, train_combos, IMAGE_SIZE, seed=SEED)
    all_captions = [shapes.describe(c, k) for c in shapes.all_combinations()
                    for k in range(len(shapes.TEMPLATES))]
    STAND_INS.append("dataset: generated captioned shapes instead of Oxford-102 Flowers")
    print(f"shapes: {len(train_data):,} training images of {len(train_combos)} combinations "
          f"({len(test_combos)} held out), {len(train_data.captions):,} distinct training captions")

# %% [markdown]
# ⏱ On the first run this cell downloads the photos and the captions: a few minutes on Colab (estimated).

# %%
if DATASET == "flowers":
    caption_folder = flowers.download_flowers_captions(env.data_dir())
    flower_captions = flowers.load_flowers_captions(caption_folder)
    train_classes, test_classes = flowers.flowers_class_split(caption_folder, FLOWERS_TEST_CLASSES,
                                                              SEED)
    train_data = flowers.FlowersWithCaptions(env.data_dir(), train_classes, flower_captions,
                                             IMAGE_SIZE)
    test_data = flowers.FlowersWithCaptions(env.data_dir(), test_classes, flower_captions,
                                            IMAGE_SIZE, train=False)
    assert not set(train_data.labels) & set(test_data.labels), "train and test classes must differ"
    all_captions = train_data.captions + test_data.captions
    print(f"flowers: {len(train_data):,} training images ({len(train_classes)} classes), "
          f"{len(test_data):,} test images ({len(test_classes)} classes), "
          f"{len(all_captions):,} captions")

# %%
def show_captioned(images: Tensor, captions: list[str], title: str, path: Path,
                   ncol: int = 4) -> None:
    """Images in [-1, 1], each under its (wrapped) caption."""
    nrow = -(-len(images) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.0 * ncol, 2.4 * nrow), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow((image * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(textwrap.fill(caption, 32), fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    plotting.save_figure(fig, path)
    plt.show()


preview_images, preview_ids, _, _ = sample_batch(train_data, 8, torch.Generator().manual_seed(SEED))
show_captioned(preview_images, [train_data.captions[i] for i in preview_ids],
               f"{DATASET}: real training images, each with one of its captions",
               RUN_DIR / "real_images.png")
assert preview_images.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)

# %% [markdown]
# **Each caption is embedded once.** The vectors go into a cache file, `text_cache.pt`. Training then looks up
# a table instead of running the language model at every step. A later session can draw from cached captions
# without loading the language model at all.

# %%
cache = EmbeddingCache(RUN_DIR / "text_cache.pt", TEXT_ENCODER)
with Stopwatch() as embed_watch:
    cache.embed(all_captions, encoder)
cache.save()
train_table = cache.embed(train_data.captions).to(DEVICE)   # row i = embedding of caption id i
print(f"{len(cache):,} captions embedded in {embed_watch.seconds:.1f} s, cache: {cache.path} "
      f"({cache.path.stat().st_size / 2**20:.1f} MiB)")
assert train_table.shape == (len(train_data.captions), encoder.dim)


def batch_at(step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Iteration `step`'s (images, right and wrong embeddings, class labels), seeded by the step:
    a resumed run sees the batches a straight run would."""
    rng = torch.Generator().manual_seed(SEED * 1_000_003 + step)
    images, right, wrong, labels = sample_batch(train_data, BATCH_SIZE // PACK, rng, PACK)
    return (images.to(DEVICE, non_blocking=True), train_table[right.to(DEVICE)],
            train_table[wrong.to(DEVICE)], labels.to(DEVICE))

# %% [markdown]
# ## 4. The generator and the discriminator
# **The generator** $G(z, \varphi(t))$ draws an image for caption $t$. A fully connected layer shrinks the
# caption's vector to 128 numbers, $\hat c$. These are joined to a noise vector $z \sim \mathcal{N}(0, I_{100})$.
# Transposed convolutions then grow the picture, $4 \to 8 \to 16 \to 32 \to 64$ pixels. Each is followed by
# BatchNorm and a ReLU. The last layer is a tanh, so pixels lie in $[-1, 1]$.
#
# **The discriminator** $D(x, \varphi(t))$ scores an image $x$ with a caption $t$. Strided convolutions shrink
# the image to a $512 \times 4 \times 4$ map of features. The caption's 128 numbers are copied to each of the
# $4 \times 4$ positions and joined to it. A $1 \times 1$ convolution mixes image and text, and a $4 \times 4$
# convolution gives one score. Its layers use BatchNorm and a LeakyReLU with slope 0.2.
#
# ```
# text ─ encoder ─ φ(t) ─ FC→128 ─┐                           φ(t) ─ FC→128 ─ replicate 4×4 ─┐
#                                 ├─ [z;ĉ] ─ ConvT 4→…→64 ─ x̂ ─ conv 64→…→4 (512×4×4) ──────┴─ 1×1 ─ 4×4 ─ score
# z ~ N(0, I) (100) ──────────────┘
# ```
#
# The improved recipe turns on four switches. Section 9 measures each one.
# - `conditional_bn`: each BatchNorm layer of $G$ takes its scale and shift from $[z; \hat c]$. So text and
#   noise act at every resolution, not only at the first layer. BigGAN does the same.
# - `projection`: $D$'s score gets an extra term, $\langle W\hat c, \sum_{ij} f_{ij}(x) \rangle$, from the
#   projection discriminator of Miyato & Koyama (2018). It measures directly how well image and text agree.
# - `n_classes`: **label heads**. $D$ also guesses the labels of an image from its features alone, as in
#   TAC-GAN (Dash et al. 2017). The labels are the flower's kind, or a shape's four attributes. $G$ is trained
#   so that its images get the labels of their caption.
# - `pack`: $D$ judges two images of one caption at once, stacked on the colour channels, as in PacGAN
#   (Lin et al. 2018). Two real images of one caption differ. So two identical fakes give themselves away, and
#   $G$ must use its noise.
#
# The cells below are the model. Edit them and re-run the notebook to train your own version.

# %% [helpers] t2i/model: ConditionalBatchNorm2d

# %% [helpers] t2i/model: Generator

# %% [helpers] t2i/model: Discriminator

# %% [helpers] t2i/model: packed

# %% [markdown]
# Before any training, the generator draws only noise. Here are its first pictures:

# %%
def build_models() -> tuple[Generator, Discriminator]:
    """A fresh generator and discriminator with this notebook's parameters and recipe."""
    options = RECIPES[RECIPE]["model"]
    g = Generator(encoder.dim, Z_DIM, PROJECTED_DIM, NGF, IMAGE_SIZE,
                  conditional_bn=options.get("conditional_bn", False))
    d = Discriminator(encoder.dim, PROJECTED_DIM, NDF, IMAGE_SIZE,
                      projection=options.get("projection", False),
                      n_classes=train_data.class_counts if options.get("auxiliary") else (),
                      pack=PACK)
    return g.to(DEVICE, memory_format=MEMORY_FORMAT), d.to(DEVICE, memory_format=MEMORY_FORMAT)


G, D = build_models()
print(f"{RECIPE} recipe: generator {count_parameters(G):,} parameters | "
      f"discriminator {count_parameters(D):,} parameters")
with torch.no_grad():
    text = train_table[:4]
    fake = G(torch.randn(4 * PACK, Z_DIM, device=DEVICE), text.repeat(PACK, 1))
    score, features = D(packed(fake, PACK), text)
print(f"G: z {(4 * PACK, Z_DIM)} + text -> images {tuple(fake.shape)}; D reads {PACK} per caption: "
      f"image features {tuple(features.shape)} -> scores {tuple(score.shape)}")
assert fake.shape == (4 * PACK, 3, IMAGE_SIZE, IMAGE_SIZE) and score.shape == (4,)
assert features.shape == (4, NDF * IMAGE_SIZE // 8, 4, 4)
show_captioned(fake[:4].float().cpu(), train_data.captions[:4], "The untrained generator",
               RUN_DIR / "untrained.png")

# %%
paper_G, paper_D = Generator(encoder.dim).eval(), Discriminator(encoder.dim).eval()
with torch.no_grad():
    paper_fake = paper_G(torch.randn(1, 100), torch.randn(1, encoder.dim))
    _, paper_features = paper_D(paper_fake, torch.randn(1, encoder.dim))
print(f"at the paper's size (64 px, 64 feature maps): generator {count_parameters(paper_G):,} "
      f"parameters, discriminator {count_parameters(paper_D):,}, "
      f"D's image features {tuple(paper_features.shape[1:])}")
assert paper_fake.shape == (1, 3, 64, 64) and paper_features.shape[1:] == (512, 4, 4)
del paper_G, paper_D

# %% [markdown]
# ## 5. The losses
# **GAN-CLS, the matching-aware discriminator.** $D$ sees three kinds of pair, and gives a probability for each:
# - $s_r = D(x, h)$ for a real image with the right text,
# - $s_w = D(x, \hat h)$ for a real image with the wrong text,
# - $s_f = D(G(z, h), h)$ for a fake image with the right text.
#
# The two losses are:
#
# $$\mathcal{L}_D = -\log s_r - \tfrac{1}{2}\left[\log(1 - s_w) + \log(1 - s_f)\right], \qquad
# \mathcal{L}_G = -\log s_f .$$
#
# The wrong-text term is the new idea. A real image is not enough to win: it must also fit the sentence. So $D$,
# and through it $G$, learns that image and sentence must *match*.
#
# **GAN-INT.** $G$ also trains on points between two captions, $h_{int} = \beta h_1 + (1-\beta) h_2$ with
# $\beta = 0.5$, and adds $-\log D(G(z, h_{int}), h_{int})$ to $\mathcal{L}_G$. $D$ never sees these points.
# They fill the gaps between captions, so $G$ sees many more "captions" than the data has.
#
# In code, each term is a binary cross-entropy (BCE) on the logits, the scores before the sigmoid. This is safer
# than taking a log of a sigmoid. When every logit is zero, every BCE is $\ln 2$, so
# $\mathcal{L}_D = 2\ln 2 \approx 1.386$. The cell after the losses checks this.

# %% [helpers] t2i/losses: gan_cls_discriminator_loss, gan_cls_generator_loss, interpolate_embeddings

# %%
zero = torch.zeros(3)
loss_at_zero = gan_cls_discriminator_loss(zero, zero, zero).item()
print(f"L_D at zero logits = {loss_at_zero:.4f} (2 ln 2 = {2 * math.log(2):.4f})")
assert math.isclose(loss_at_zero, 2 * math.log(2), rel_tol=1e-6)  # a few float32 roundings
print("h_int of (2, 4) and (0, 8) at beta 0.5:", interpolate_embeddings(
    torch.tensor([2.0, 4.0]), torch.tensor([0.0, 8.0])).tolist())

# %% [markdown]
# **Optional terms.** The course brief, the plan this notebook follows, asks for feature matching and L1. We add
# mode seeking. Each has a weight in `TextToImageRecipe`, and 0 turns it off. The improved recipe uses none.
# - Feature matching: the squared distance between the mean features of fakes and of reals in $D$,
#   $\lambda_{FM}\,\|\overline{f(G(z,h))} - \overline{f(x)}\|^2$. Both come from the updated $D$ of the step.
# - L1: the pixel distance to the real image of the caption, $\lambda_{L1}\lVert G(z,h) - x\rVert_1$.
# - Mode seeking, from Mao et al. (2019): two noise vectors should give different images,
#   $\lambda_{MS} / (\frac{\lVert G(z_1,h) - G(z_2,h)\rVert_1}{\lVert z_1 - z_2 \rVert_1} + \epsilon)$.

# %% [helpers] t2i/losses: feature_matching_mse, l1_image_loss, mode_seeking_loss

# %% [markdown]
# **Label heads.** $D$'s heads learn the labels of real images. $G$ is trained so that its images get the
# labels of their caption. The loss has one cross-entropy (CE) per label:
# $\lambda_{aux} \sum_k \mathrm{CE}(\text{head}_k(f(x)), y_k)$. This needs labels, which the paper's GAN-CLS
# does not use.

# %% [helpers] t2i/losses: auxiliary_class_loss

# %% [markdown]
# ## 6. Training
# One iteration has two steps. First, $D$ takes one step on GAN-CLS. With label heads, it also learns the labels
# of the real images. Then $G$ takes one step against the *updated* $D$, on GAN-CLS and the recipe's extra terms.
# Each fake comes from fresh noise. Section 11 explains the speed and precision choices on a GPU.

# %% [helpers] t2i/train: TextToImageRecipe

# %% [helpers] t2i/train: gan_cls_discriminator_step

# %% [helpers] t2i/train: gan_cls_generator_step

# %% [helpers] t2i/train: gan_cls_train_step

# %% [markdown]
# **The loop** saves a checkpoint every `CHECKPOINT_EVERY` iterations: the models, the optimisers, the history
# and the random state. If Colab disconnects, **re-run the cell and it continues** from the last checkpoint. A
# second *Run all* finds the finished run and prints "reusing the finished run" instead of training again. Each
# batch is drawn from a random generator seeded by the iteration number. So a continued run sees the same
# batches as a straight one.

# %% [helpers] t2i/train: TextToImageSchedule

# %% [helpers] t2i/train: train_text_to_image

# %% [markdown]
# ⏱ About 6 to 15 minutes on a Colab T4 for flowers (estimated), about 4 minutes for shapes on a CPU.
# Re-run this cell to continue.

# %%
CHECKPOINT = RUN_DIR / f"checkpoint-{DATASET}-{RECIPE}.pt"
CONFIG = {"dataset": DATASET, "recipe": RECIPE, "encoder": TEXT_ENCODER, "image_size": IMAGE_SIZE,
          "ngf": NGF, "ndf": NDF, "z_dim": Z_DIM, "projected_dim": PROJECTED_DIM,
          "batch_size": BATCH_SIZE}
fixed_captions = train_data.captions[:: max(1, len(train_data.captions) // 8)][:8]
fixed = (seeded_noise(len(fixed_captions), Z_DIM, SEED, DEVICE),
         cache.embed(fixed_captions).to(DEVICE))
recipe = TextToImageRecipe(**RECIPES[RECIPE]["loss"])
print(f"{RECIPE} recipe: {recipe}, D judges {PACK} image(s) per caption at a time")
if env.in_colab():
    %load_ext tensorboard
    %tensorboard --logdir {RUN_DIR}/tensorboard


def training_state(log_dir: Path | None = RUN_DIR / "tensorboard") -> dict:
    """Fresh models, optimisers, GradScaler and run record: what a checkpoint holds."""
    g, d = build_models()
    fused = CHOICES.fused_adam                  # Adam's update as one kernel on the GPU path
    return {"G": g, "D": d, "opt_g": torch.optim.Adam(g.parameters(), LR, betas=BETAS, fused=fused),
            "opt_d": torch.optim.Adam(d.parameters(), LR, betas=BETAS, fused=fused),
            "scaler": CHOICES.grad_scaler(),   # enabled with float16 autocast (a T4), else off
            "run": TrainingRun(History(log_dir))}


def schedule_of(iterations: int) -> TextToImageSchedule:
    return TextToImageSchedule(iterations, LR, LR_HALVING_EVERY, SNAPSHOT_EVERY, CHECKPOINT_EVERY,
                               LOG_EVERY)


state = training_state()
run = train_text_to_image(state, batch_at, recipe, schedule_of(ITERATIONS), CHECKPOINT, CONFIG,
                          fixed, AMP_DTYPE)
G, D = state["G"], state["D"]
steps, _ = run.history.series("loss/D")
assert steps == sorted(set(steps)) and steps[-1] == ITERATIONS, "resume must continue, not restart"
throughput = run.stopwatch.throughput()
print(f"{run.stopwatch.iterations:,} iterations, {run.stopwatch.seconds:.1f} s of training: "
      f"{throughput['it_per_s']:.2f} it/s, {throughput['img_per_s']:.1f} images/s "
      f"on {env.describe_device(DEVICE)}")

# %% [markdown]
# ## 7. Losses and samples over training
# The curves show the two losses and $D$'s average belief for each kind of pair. A working GAN-CLS keeps its
# belief in "real image, wrong text" low. The grid shows the same noise and captions as training went on.

# %%
smooth = max(1, ITERATIONS // 50 // LOG_EVERY)  # points in a moving average over 2 % of training
plotting.plot_losses(run.history, ["loss/D", "loss/G"], "GAN-CLS losses", RUN_DIR / "losses.png",
                     smooth=smooth)
plotting.plot_losses(run.history, ["D/real_right", "D/real_wrong", "D/fake"],
                     "Discriminator: mean P(real) per pair", RUN_DIR / "d_beliefs.png",
                     ylabel="mean sigmoid(D)", smooth=smooth)
plotting.show_over_iterations(run.snapshots, "Fixed noise and captions over training",
                              RUN_DIR / "over_iterations.png", nrow=4)
for caption in fixed_captions[:4]:
    print(f"  caption: {caption}")
late = run.history.series("D/real_wrong")[1][-max(1, len(steps) // 10):]  # means over LOG_EVERY
wrong_belief = sum(late) / len(late)
print(f"D's mean P(real) for (real image, wrong text), last 10 % of iterations: {wrong_belief:.3f}")
if CHECK_QUALITY:
    assert wrong_belief < 0.5, "a matching-aware D must reject real images with the wrong text"

# %% [markdown]
# ## 8. Does the noise matter?
# For one caption, different noise vectors should give different images. They should differ about as much as
# the real images that fit that caption. We measure the **spread** of a set of images: the mean distance between
# two of them. The distance is the root mean square (RMS) of their pixel differences, with pixels in $[0, 1]$.
# A generator that ignores its noise has spread 0.
#
# For each of `SPREAD_CAPTIONS` captions we draw `NOISE_PER_CAPTION` noise vectors, with three noise seeds. We
# compare with as many real images of the same caption. For shapes these are fresh drawings of the caption's
# attributes. For flowers they are test photos of the caption's kind of flower.

# %%
def spread_of_real_images() -> tuple[list[str], Tensor]:
    """SPREAD_CAPTIONS captions and NOISE_PER_CAPTION real images of each (caption, K, 3, H, W)."""
    if DATASET == "shapes":
        pick = torch.randperm(len(train_combos), generator=torch.Generator().manual_seed(SEED))
        combos = [train_combos[i] for i in pick[:SPREAD_CAPTIONS].tolist()]
        real = shapes.real_images_per_combination(combos, NOISE_PER_CAPTION, IMAGE_SIZE,
                                                  seed=SEED + 5)
        return [shapes.describe(c) for c in combos], real
    classes = test_data.groups.unique()[:SPREAD_CAPTIONS].tolist()
    members = [(test_data.groups == c).nonzero().flatten()[:NOISE_PER_CAPTION] for c in classes]
    captions = [test_data.captions[test_data.caption_ids[int(m[0])][0]] for m in members]
    return captions, torch.stack([test_data.image_batch(m) for m in members])


spread_captions, real_sets = spread_of_real_images()
spread_text = cache.embed(spread_captions, encoder).to(DEVICE)
fake_sets = {s: images_per_caption(G, spread_text, NOISE_PER_CAPTION, s) for s in NOISE_SEEDS}
real_spread = evaluate.within_caption_spread(real_sets).mean().item()
fake_spread, fake_spread_sd = mean_and_spread(
    [evaluate.within_caption_spread(images).mean().item() for images in fake_sets.values()])
print(f"spread across noise: generated {fake_spread:.4f} ± {fake_spread_sd:.4f} (mean ± sd over "
      f"{len(NOISE_SEEDS)} noise seeds) | real images of the same caption {real_spread:.4f} | "
      f"ratio {fake_spread / real_spread:.2f}")

# %%
rows = []
for caption, fakes, reals in list(zip(spread_captions, fake_sets[NOISE_SEEDS[0]], real_sets))[:3]:
    rows += [(f"generated: {caption}", fakes), (f"real: {caption}", reals)]
plotting.show_rows(rows, f"{RECIPE} recipe: one caption, {NOISE_PER_CAPTION} noise vectors "
                   f"(generated) and {NOISE_PER_CAPTION} real images (spread {fake_spread:.3f} vs "
                   f"{real_spread:.3f})", RUN_DIR / "noise_per_caption.png",
                   xlabel="columns: different noise vectors / different real images")
if CPU_RUN and RECIPE == "improved":
    assert fake_spread > 0.5 * real_spread, "the improved recipe must use its noise"
if CPU_RUN and RECIPE == "paper":
    assert fake_spread < 0.5 * real_spread, "the paper's recipe ignores most of its noise here"

# %% [markdown]
# ## 9. Does the image follow the caption?
# **Caption accuracy, on shapes.** A small convolutional network, trained on *real* shapes, names the four
# attributes of an image. We draw one image per caption, each with its own noise vector. Then we count how often
# the network's answer equals the caption's attributes. This is the **matching** score.
#
# We also score the same images against another caption's attributes. This is the **shuffled** score. A
# generator that ignored its text would get the same on both, so the gap is the text at work. Real images give
# the ceiling, which tells how good the classifier is. The "unseen" rows use the combinations held out of
# training. Each number is a mean ± standard deviation (sd) over three noise seeds.

# %%
def shapes_caption_accuracy() -> dict[str, dict[str, tuple[float, float]]]:
    """Per split: attribute accuracy of real and generated images (matching, shuffled)."""
    rows = {}
    for split, combos in (("seen", train_combos), ("unseen", test_combos)):
        data = shapes.make_shapes(EVAL_IMAGES, combos, IMAGE_SIZE, seed=SEED + 2)
        pick = torch.randint(len(shapes.TEMPLATES), (EVAL_IMAGES,),
                             generator=torch.Generator().manual_seed(SEED))
        captions = [data.captions[ids[k]] for ids, k in zip(data.caption_ids, pick.tolist())]
        text = cache.embed(captions, encoder).to(DEVICE)
        scores = evaluate.caption_accuracy(G, classifier, text, data.attributes, NOISE_SEEDS)
        real = attribute_classifier.attribute_accuracy(classifier, data.images, data.attributes)
        rows[f"real images ({split})"] = {k: (v, 0.0) for k, v in real.items()}
        for kind, per_seed in scores.items():
            rows[f"generated, {kind} ({split})"] = {
                k: mean_and_spread([s[k] for s in per_seed]) for k in per_seed[0]}
    return rows


if DATASET == "shapes":
    classifier_data = shapes.make_shapes(CLASSIFIER_IMAGES, shapes.all_combinations(), IMAGE_SIZE,
                                         seed=SEED + 1)
    classifier = attribute_classifier.train_attribute_classifier(
        classifier_data, CLASSIFIER_STEPS, device=DEVICE, seed=SEED)
    accuracy = shapes_caption_accuracy()
    print(f"{'caption accuracy, % (mean ± sd, 3 seeds)':40s}"
          + "".join(f"{k:>14s}" for k in [*shapes.ATTRIBUTES, "all four"]))
    for name, scores in accuracy.items():
        print(f"{name:40s}" + "".join(f"{100 * m:9.1f} ± {100 * s:3.1f}"
                                      for m, s in scores.values()))

# %%
if DATASET == "shapes":
    real = {k: m for k, (m, _) in accuracy["real images (seen)"].items()}
    assert real["colour"] > 0.9 and real["position"] > 0.9, f"the classifier must work: {real}"
    if CHECK_QUALITY:
        assert real["all"] > 0.9, f"the classifier must know real shapes: {real}"
        for split in ("seen", "unseen"):
            matching = accuracy[f"generated, matching ({split})"]["all"][0]
            shuffled = accuracy[f"generated, shuffled ({split})"]["all"][0]
            assert matching > shuffled + 0.15, f"a trained G must follow its captions ({split})"
    if CPU_RUN and RECIPE == "improved" and ITERATIONS >= 6000:
        assert accuracy["generated, matching (seen)"]["all"][0] >= 0.7, "the goal: >= 70 % on seen"

# %% [markdown]
# **The CLIP score, on flowers.** CLIP is a model trained on image–caption pairs from the web. It turns an image
# into a vector $E_I(x)$ and a caption into a vector $E_T(t)$ in one shared space. The CLIP score is 100 times
# their mean cosine over the $N$ pairs, floored at 0:
#
# $$\text{CLIP score} = \max\left(100 \cdot \frac{1}{N}\sum_{i=1}^{N} \cos(E_I(x_i), E_T(t_i)),\ 0\right).$$
#
# We score generated test images with their captions. Real images give the ceiling. Generated images with
# shuffled captions give the floor: the part of the score that has nothing to do with the caption. The shapes
# run uses caption accuracy instead, so it needs no CLIP download. In smoke mode the same code runs on a tiny
# CLIP with random weights, whose numbers mean nothing.

# %%
def clip_scores(model, tokenizer, images: Tensor, captions: list[str]) -> dict[str, tuple]:
    """CLIP score of real images, of generated ones with right and shuffled captions (mean ± sd)."""
    text = cache.embed(captions, encoder).to(DEVICE)
    order = evaluate.derangement(len(captions), torch.Generator().manual_seed(SEED))
    shuffled = [captions[i] for i in order]
    right, wrong = [], []
    for seed in NOISE_SEEDS:
        noise = seeded_noise(len(captions), Z_DIM, seed, DEVICE)
        fakes = images_from_text(G, noise, text) * 0.5 + 0.5
        right.append(clip_score(model, tokenizer, fakes, captions))
        wrong.append(clip_score(model, tokenizer, fakes, shuffled))
    real = clip_score(model, tokenizer, images * 0.5 + 0.5, captions)
    return {"real": (real, 0.0), "generated": mean_and_spread(right),
            "generated_shuffled": mean_and_spread(wrong)}


if SCORE_CLIP:
    clip_id = CLIP_MODEL if DATASET == "flowers" else STAND_IN_CLIP_ID
    clip_model, clip_tokenizer = load_clip(clip_id, RUN_DIR, DEVICE)
    if DATASET == "flowers":
        order = torch.randperm(len(test_data), generator=torch.Generator().manual_seed(SEED))
        idx = order[:EVAL_IMAGES]
        images = test_data.image_batch(idx)
        captions = [test_data.captions[test_data.caption_ids[i][0]] for i in idx.tolist()]
    else:
        STAND_INS.append("CLIP score: tiny random CLIP from a config (smoke; numbers mean nothing)")
        images, captions = preview_images, [train_data.captions[i] for i in preview_ids]
    clip = clip_scores(clip_model, clip_tokenizer, images, captions)
    print(f"CLIP score ({clip_id}, {len(captions)} captions): " + " | ".join(
        f"{name} {m:.2f} ± {s:.2f}" for name, (m, s) in clip.items()))
    if DATASET == "flowers":
        assert clip["generated"][0] > clip["generated_shuffled"][0], "right captions score higher"
        assert clip["real"][0] > clip["generated"][0], "real images are the ceiling"

# %% [markdown]
# ### Your results

# %%
run_note = "" if CHECK_QUALITY else " This was a tiny test run: its numbers mean nothing."
lines = [f"**Your run:** the {RECIPE} recipe on {DATASET}, {ITERATIONS:,} iterations.{run_note}"]
if DATASET == "shapes":
    seen, unseen = (accuracy[f"generated, matching ({s})"]["all"] for s in ("seen", "unseen"))
    shuffled = accuracy["generated, shuffled (seen)"]["all"][0]
    hardest = min(shapes.ATTRIBUTES, key=lambda k: accuracy["generated, matching (seen)"][k][0])
    lines += [f"- All four attributes right: {100 * seen[0]:.1f} ± {100 * seen[1]:.1f} % of images "
              f"on seen combinations, {100 * unseen[0]:.1f} ± {100 * unseen[1]:.1f} % on unseen "
              "ones.",
              f"- Against another caption: {100 * shuffled:.1f} %. Real images: "
              f"{100 * accuracy['real images (seen)']['all'][0]:.1f} %.",
              f"- The hardest attribute for your generator: {hardest}."]
if DATASET == "flowers":
    lines += [f"- CLIP score: {clip['generated'][0]:.2f} with the right captions, "
              f"{clip['generated_shuffled'][0]:.2f} with shuffled ones, {clip['real'][0]:.2f} for "
              "real photos."]
lines.append(f"- Spread across noise: {fake_spread:.3f}, real images {real_spread:.3f}.")
display(Markdown("\n".join(lines)))

# %% [markdown]
# ### Reference results
# *Reference run: shapes set, 6,000 iterations per recipe, 2 CPU cores, one training run each.*
#
# **Flowers has no reference run yet.** On flowers, your numbers are the first.
#
# | recipe | all four attributes right, seen / unseen combinations | shuffled captions, seen / unseen | spread across noise (real: 0.144) | training |
# |---|---|---|---|---|
# | paper (GAN-CLS + GAN-INT) | 33.2 ± 0.9 % / 26.1 ± 1.0 % | 0.7 % / 2.5 % | 0.033 ± 0.001 | 6.5 min |
# | improved | **87.5 ± 2.3 %** / **83.6 ± 1.4 %** | 1.3 % / 4.5 % | 0.125 ± 0.004 | 4.0 min |
#
# In that run the classifier read 99.2 % of real images fully right, so it was not the limit. Colour, size and
# position were nearly always right. The shape was the hard part.
#
# **Is the race fair?** Not quite. The improved recipe's label heads are trained on colour, shape, size and
# position. These are the same four attributes that caption accuracy reads. So the improved generator is taught
# directly what the measure checks, and caption accuracy favours it. Two checks are fairer. The unseen
# combinations were never shown together in training. The CLIP score on flowers reads no labels at all.
#
# **Each change, one at a time.** `experiments/ablate_t2i.py` trains each step from the paper's recipe to the
# improved one, on shapes for 6,000 iterations each. It uses its own classifier and test images, so its numbers
# differ a little from the table above.
#
# | variant | all four right, seen | unseen | shuffled (seen) | spread across noise (real: 0.144) |
# |---|---|---|---|---|
# | paper | 34.9 ± 1.3 % | 25.4 ± 0.8 % | 1.0 % | 0.022 |
# | paper without GAN-INT | 43.7 ± 0.4 % | 34.8 ± 0.4 % | 1.1 % | 0.008 |
# | + conditional batch norm | 48.8 ± 1.3 % | 38.9 ± 0.6 % | 1.3 % | 0.015 |
# | + projection term | 54.9 ± 0.8 % | 33.4 ± 0.7 % | 1.1 % | 0.013 |
# | + label heads (auxiliary classifier) | 87.3 ± 0.3 % | 42.1 ± 0.6 % | 1.5 % | 0.013 |
# | + packing 2 images per caption: **improved** | **89.1 ± 1.6 %** | **83.8 ± 0.3 %** | 1.3 % | **0.136** |
#
# Each change raises accuracy on the seen combinations. The label heads do most of it, partly because they learn
# the measured attributes. Alone, they learn the seen combinations but not the unseen ones. Like every row before
# them, they also ignore the noise. Packing makes $G$ use its noise, with a spread near the real one. It also
# lifts the unseen combinations to almost the seen ones.
#
# GAN-INT costs accuracy on shapes. A likely reason: the attributes are discrete, so a caption halfway between
# two others describes no image. On flowers it stays on, as in the paper. Feature matching, L1 and mode seeking
# stay off, and this table does not measure them.
#
# > **Where we depart from the paper.** Sentences come from MiniLM, not the paper's char-CNN-RNN. The improved
# > recipe adds conditional BatchNorm, the projection term, label heads and packing. The shapes set is ours, for
# > CPUs, and turns GAN-INT off. Flowers keeps the paper's sizes and GAN-INT.

# %% [markdown]
# ## 10. Your own sentences, and a walk between two captions
# Edit `MY_SENTENCES` and `INTERPOLATE` in the settings. A new sentence goes through the language model once and
# is added to the cache. The walk moves from one caption's vector to the other's with the noise fixed:
#
# $$h(\beta) = (1-\beta) h_1 + \beta h_2, \qquad \beta \text{ from 0 to 1}.$$
#
# This is exactly what GAN-INT trained the generator on.

# %%
my_text = cache.embed(my_sentences, encoder).to(DEVICE)
mine = images_per_caption(G, my_text, NOISE_PER_CAPTION, SEED + 4)
plotting.show_rows(list(zip(my_sentences, mine)),
                   "Your sentences (columns: different noise vectors)",
                   RUN_DIR / "my_sentences.png", xlabel="noise vector")

ends = cache.embed(list(interpolate_ends), encoder).to(DEVICE)
betas = torch.linspace(0, 1, INTERPOLATION_STEPS)
path = torch.stack([interpolate_embeddings(ends[1], ends[0], float(b)) for b in betas])
noises = seeded_noise(2, Z_DIM, SEED, DEVICE)
walks = [images_from_text(G, z.expand(INTERPOLATION_STEPS, -1), path) for z in noises]
plotting.show_rows([(f"noise {k + 1}: β = 0 → 1", walk) for k, walk in enumerate(walks)],
                   f"'{interpolate_ends[0]}' → '{interpolate_ends[1]}'",
                   RUN_DIR / "interpolation.png",
                   xlabel=f"β from 0 to 1 in {INTERPOLATION_STEPS} steps")
cache.save()
ends_alone = images_from_text(G, noises[:1].expand(2, -1), ends)  # the two captions, noise 1
assert torch.allclose(walks[0][[0, -1]], ends_alone, atol=1e-5), "β = 0 and 1 are the two captions"

# %% [markdown]
# ## 11. Under the hood (optional)
# **Bad input to the text encoder.** An empty caption is an error. A caption longer than the encoder reads is
# cut, with a warning. An unknown encoder name is an error that lists the known ones.

# %%
try:
    encoder.encode(["a red circle", "  "])
    raise AssertionError("an empty caption must fail")
except ValueError as err:
    print(f"empty caption -> ValueError: {err}")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    encoder.encode(["a red circle " * 200])
truncation = [str(w.message) for w in caught if "truncated" in str(w.message)]
assert truncation, "an over-long caption must warn"
print(f"over-long caption -> warning: {truncation[0]}")
try:
    TextEncoder("gpt-17")
    raise AssertionError("an unknown encoder id must fail")
except ValueError as err:
    print(f"unknown encoder id -> ValueError: {err}")

# %% [markdown]
# **The sentence vectors.** We skip the final L2 normalisation of sentence-transformers, because the BatchNorm
# after the text projection rescales anyway. With CLIP's text tower as the encoder, we take CLIP's own sentence
# vector.
#
# **The flowers download.** The photos, labels and splits come from the Visual Geometry Group at Oxford. Each
# file is checked against its known md5 sum. The captions are Reed et al.'s `cvpr2016_flowers.tar.gz`, a Google
# Drive file. The notebook tries two Drive addresses. If both fail, the error says what to download by hand. Point
# `T2I_FLOWERS_CAPTIONS` to it: an archive, a folder or the address of a copy. Every download gives up after 60 s
# without data.
#
# The file `text_c10/class_XXXXX/image_NNNNN.txt` holds the captions of
# `jpg/image_NNNNN.jpg`. The split into 82 and 20 kinds is Reed's own when the archive has it, else a seeded one.
#
# **Speed and precision on a GPU.** On a T4 the training step runs under float16 autocast, which does most
# arithmetic in 16-bit floats. A GradScaler multiplies the loss before the backward pass, so that small gradients
# do not round to zero in float16. It divides them again before the update. From an A100 on, the step uses
# bfloat16, which needs no scaler. Every GPU also gets the channels-last memory layout and fused Adam. A CPU
# computes in float32. `EMULATE_T4=1` makes a CPU take a T4's choices, to test that path without a GPU.
#
# The losses stay on the GPU and are summed. The history gets their mean over every `LOG_EVERY` iterations.
# Reading a number from a GPU makes the CPU wait until the GPU has finished. So the loop reads once per window,
# not ten times per iteration.
#
# **A resume drill.** The cell below trains a short separate run, stops it halfway and throws its models away.
# Fresh models then continue from the checkpoint, as after a Colab disconnect. The history must go on from where
# it stopped, not start again.

# %%
drill_checkpoint = RUN_DIR / "resume-drill.pt"
drill_checkpoint.unlink(missing_ok=True)                                 # a new drill every time
drill_length = 4 * LOG_EVERY
train_text_to_image(training_state(None), batch_at, recipe, schedule_of(drill_length // 2),
                    drill_checkpoint, CONFIG, fixed, AMP_DTYPE)          # stops halfway
drill = train_text_to_image(training_state(None), batch_at, recipe, schedule_of(drill_length),
                            drill_checkpoint, CONFIG, fixed, AMP_DTYPE)  # a fresh session resumes
drill_steps, _ = drill.history.series("loss/D")
assert drill_steps == sorted(set(drill_steps)) and drill_steps[-1] == drill_length, (
    "resume must continue, not restart")
assert drill.stopwatch.iterations == drill_length, "the stopwatch must count both halves"
print(f"drill: {drill_length // 2} iterations, stopped, resumed to {drill.step}; "
      f"losses logged at {len(drill_steps)} points without a gap")
drill_checkpoint.unlink()                                                # keep the run folder small

# %% [markdown]
# **Reload in a fresh session.** A later session needs only the checkpoint and the text cache. We build a new
# generator, load the weights and open the cache *without* a language model. The same noise and captions must
# give the same images.

# %%
fresh_G, _ = build_models()
saved = load_checkpoint(CHECKPOINT, {"G": fresh_G}, CONFIG, restore_rng=False, map_location=DEVICE)
fresh_cache = EmbeddingCache(RUN_DIR / "text_cache.pt", TEXT_ENCODER)
print(f"reloaded G at iteration {saved['step']:,}; {len(fresh_cache):,} cached captions")
again = images_per_caption(fresh_G, fresh_cache.embed(spread_captions).to(DEVICE),
                           NOISE_PER_CAPTION, NOISE_SEEDS[0])
assert torch.allclose(again, fake_sets[NOISE_SEEDS[0]], atol=1e-5), "reloaded G: same images"
assert torch.equal(fresh_cache.embed(my_sentences), cache.embed(my_sentences))
try:
    fresh_cache.embed(["a sentence nobody has embedded yet"])
    raise AssertionError("a caption that is not in the cache must fail without an encoder")
except KeyError as err:
    print(f"a new sentence without the encoder -> {err}")
plotting.show_rows(list(zip(spread_captions[:2], again[:2])),
                   "Reloaded generator (same noise, same captions)", RUN_DIR / "reloaded.png",
                   xlabel="noise vector")

# %% [markdown]
# **metrics.json.** Every run writes its numbers to one file in the run folder.

# %%
quality = {"recipe": RECIPE, "noise_seeds": list(NOISE_SEEDS),
           "spread_generated": [round(fake_spread, 4), round(fake_spread_sd, 4)],
           "spread_real": round(real_spread, 4)}
if DATASET == "shapes":
    quality["caption_accuracy_all_four"] = {   # [mean, sd] over the noise seeds
        name: [round(scores["all"][0], 4), round(scores["all"][1], 4)]
        for name, scores in accuracy.items()}
if SCORE_CLIP:
    quality["clip_score" + ("" if DATASET == "flowers" else "_stand_in")] = {
        name: [round(m, 3), round(s, 3)] for name, (m, s) in clip.items()}
metrics_path = write_metrics(
    RUN_DIR, NOTEBOOK, SMOKE, DEVICE, iterations=ITERATIONS, seconds=run.stopwatch.seconds,
    throughput=throughput, quality=quality, stand_ins=STAND_INS, dataset=DATASET,
    text_encoder=TEXT_ENCODER, image_size=IMAGE_SIZE, batch_size=BATCH_SIZE,
    parameters={"G": count_parameters(G), "D": count_parameters(D)})
print(metrics_path.read_text())

# %% [markdown]
# ## What to take away
# * A text-to-image GAN is a conditional GAN whose condition is a sentence vector. The same vector tells $G$
#   what to draw and asks $D$ whether the image fits the text.
# * Whether an image follows its caption can be measured when the attributes are known. Always compare with
#   shuffled captions: the gap is the text at work.
# * A conditional GAN can learn to ignore its noise and draw one image per caption. Measure the spread across
#   noise beside the spread of real images. Packing fixes it, because two identical fakes give themselves away.
# * One draw of the noise is not a measurement. Every number here is a mean ± sd over three noise seeds.
#
# Your run's numbers:

# %%
verdict = ("It learned to judge the text, not only the realism." if wrong_belief < 0.5 else
           "It has not yet learned to reject the wrong text: train longer.")
takeaways = [f"- GAN-CLS: in the last 10 % of training, $D$'s belief in a real image with the "
             f"wrong text was {wrong_belief:.2f}. {verdict}"]
if DATASET == "shapes":
    takeaways.append(f"- Caption accuracy, {RECIPE} recipe: {100 * seen[0]:.1f} % seen, "
                     f"{100 * unseen[0]:.1f} % unseen, {100 * shuffled:.1f} % with shuffled "
                     "captions.")
if DATASET == "flowers":
    takeaways.append(f"- CLIP score: {clip['generated'][0]:.2f} with the right captions, "
                     f"{clip['generated_shuffled'][0]:.2f} with shuffled ones.")
takeaways.append(f"- Spread across noise: {fake_spread:.3f} generated, {real_spread:.3f} real."
                 + run_note)
display(Markdown("\n".join(takeaways)))

# %% [markdown]
# ## Check your understanding
# 1. With shuffled captions, caption accuracy falls to a few per cent. Why is this the number to compare with?
#
#    <details><summary>Answer</summary> A generator that ignored its text would score the same with the right
#    and the shuffled captions. The gap between the two is what the text does. A high matching score alone
#    could come from a generator that draws the most common attributes.</details>
#
# 2. In the reference run, the paper's recipe draws almost the same image for every noise vector. Why does
#    packing fix this?
#
#    <details><summary>Answer</summary> With packing, $D$ sees two images of one caption at once. Two real
#    images of one caption always differ a little. Two identical fakes are then easy to spot, so $G$ must make
#    its images differ, and the only way is to use its noise.</details>
#
# 3. Why is caption accuracy not a fair race between the two recipes?
#
#    <details><summary>Answer</summary> The improved recipe's label heads are trained on the same four
#    attributes that caption accuracy reads. The generator is taught what the measure checks. The unseen
#    combinations and the CLIP score on flowers are fairer checks.</details>
#
# ## What to try next
# - Switch `TEXT_ENCODER` to `"bert-base-uncased"` or `"openai/clip-vit-base-patch32"`. The cache keeps one
#   file per encoder. A port that used MiniLM on flowers reports a CLIP cosine of about 0.29 with ViT-B/32. It
#   found that stronger encoders made $G$ ignore the noise. Compare the spread of section 8.
# - Set `RECIPE = "paper"`, then switch the improved recipe's changes on one at a time in `RECIPES`.
# - Turn off GAN-INT (`gan_int = 0`) or the wrong-text term. Watch caption accuracy on *unseen* combinations and
#   $D$'s belief in "real image, wrong text".
# - Raise `l1` in the recipe. L1 pulls $G$ towards one image per caption and lowers the spread across noise.
# - Set `JITTER["turn"] = 1` in `helpers/t2i/shapes.py`. The shapes then turn by a random angle, a much harder
#   task.
