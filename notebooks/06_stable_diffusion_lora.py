# %% [markdown]
# # 06 · Stable Diffusion + LoRA: fine-tune a text-to-image model on your own images
#
# {{BADGE}}
#
# You will fine-tune Stable Diffusion 1.5, a pretrained text-to-image model, on a small set of captioned
# images. You train only a small **LoRA adapter** beside the frozen model. You save it as a file of a
# few megabytes, load it into a fresh model and compare images before and after. This is the Stable
# Diffusion part of the course brief.
#
# ![The size of a LoRA adapter for the SD 1.5 UNet at each rank](https://raw.githubusercontent.com/genimg-notebooks/genimg-notebooks/main/images/06_sd15_lora_size_vs_rank.png)
#
# You will learn:
# * how a latent diffusion model turns a caption into an image,
# * how LoRA trains a small update beside each frozen weight matrix,
# * how to train, resume, save and reload an adapter,
# * how to judge an adapter with fixed seeds and the CLIP score,
# * when a 4-bit model (QLoRA) saves memory, and when it does not.
#
# ⏱ Full run on a Colab T4: about 45–65 min (estimated), plus the downloads. CPU smoke run: about 1 min.

# %% SETUP

# %%
import dataclasses, gc, importlib.util, math, os, shutil, time, warnings
import torch
if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is None:
    %pip install -q bitsandbytes  # QLoRA (section 9): before diffusers looks for it
import matplotlib.pyplot as plt
from IPython.display import Markdown, display
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from helpers import clip as hclip, environment as env, plotting as hplot, training as ht
from helpers.sd_lora import data as sd_data, evaluate as sd_eval, lora as sd_adapter
from helpers.sd_lora import memory as sd_memory, pipeline as sd_pipeline, train as sd_train

# %% [markdown]
# ## 1. Settings
#
# The settings you may change, in plain words:
# * `RUN_DIR_ON_DRIVE`: save the run on Google Drive, so that a new Colab session resumes it.
# * `IMAGE_FOLDER`: train on your own captioned images instead of the Naruto set. Section 3 says how.
# * `PROMPTS` and `SEEDS`: the captions and random seeds of the image grid. A seed fixes the starting
#   noise, so an image before training and after it can be compared.
# * `INFERENCE_STEPS`: the denoising steps that make one image.
# * `GUIDANCE_SCALE`: how strongly an image follows its caption (section 2).
# * `RANK` and `LORA_ALPHA`: the size of the adapter and the scale of its update (section 4).
# * `LEARNING_RATE`, `TRAIN_STEPS`: how fast and how long the adapter trains.
# * `TIME_LIMIT_MIN`: training stops at this time with a checkpoint. Run the cell again to continue.
# * `SNR_GAMMA`: the weighting of the loss (section 5). `None` gives the plain loss.
#
# The collapsed cell after it holds the advanced settings. Most of them are the defaults of diffusers'
# LoRA training script. *Smoke mode* is the tiny test run that CI uses: tiny random models, nothing
# downloaded, a few seconds of training.

# %%
# Settings you may change
RUN_DIR_ON_DRIVE = False   # True in Colab: the run lives on Google Drive, so a re-run resumes
IMAGE_FOLDER = None        # a folder of your own captioned images; None: the Naruto set
PROMPTS = ["a portrait of a man with glasses and a beard", "a girl with long blue hair, smiling",
           "a cat sitting on a wooden table"]  # the rows of the before/after grid
SEEDS = [0, 1]             # the columns: the same random noise before and after training
INFERENCE_STEPS = 25       # denoising steps per generated image
GUIDANCE_SCALE = 7.5       # how strongly an image follows its caption
RANK = 4                   # LoRA rank r: the adapter's size grows with it
LORA_ALPHA = 4             # the update is scaled by LORA_ALPHA / RANK
LEARNING_RATE = 1e-4       # AdamW's step size for the LoRA weights
TRAIN_STEPS = 300          # optimizer steps of training
TIME_LIMIT_MIN = 40        # training stops here with a checkpoint: re-run the cell to go on
SNR_GAMMA = 5.0            # min-SNR weighting of the loss; None: plain mean squared error

# %%
#@title Advanced settings
SMOKE = env.smoke_mode()         # SMOKE=1 in the environment: CI's tiny run, no downloads
NOTEBOOK = "06_stable_diffusion_lora"
SEED = 0                         # the random seed of the weights, the noise and the batch order
# A Stable Diffusion 1.x checkpoint on the Hub (fp16 files, no safety checker: 2.1 GB) or a folder
# with model_index.json
MODEL_ID = os.environ.get("SD_MODEL_ID") or "stable-diffusion-v1-5/stable-diffusion-v1-5"
RESOLUTION = 512                 # training and generation size in pixels
DATASET = "lambdalabs/naruto-blip-captions"  # Hub rows of (image, caption)
IMAGE_FOLDER = os.environ.get("SD_IMAGE_FOLDER") or IMAGE_FOLDER
RANDOM_FLIP = True               # mirror training images at random
# diffusers' train_text_to_image_lora.py defaults (min-SNR is on here: section 5)
ADAM_BETAS, ADAM_EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 1e-2
MAX_GRAD_NORM = 1.0              # gradient clipping
BATCH_SIZE = 2                   # images per micro-batch (per GPU)
GRAD_ACCUM = 2                   # micro-batches per optimizer step
CHECKPOINT_EVERY = 25            # steps between checkpoints
KEEP_CHECKPOINTS = 2             # only the newest are kept (the resume drill needs 2)
SAMPLE_EVERY = 50                # steps between sample snapshots
GRADIENT_CHECKPOINTING = None    # None: on only if free GPU memory needs it; or True/False
LORA_SCALES = [0.0, 0.25, 0.5, 0.75, 1.0]  # the adapter scales of the sweep in section 7
CLIP_MODEL_ID = "openai/clip-vit-base-patch16"
CLIP_CAPTIONS = 8                # training captions scored before and after
QLORA_STEPS = 10                 # timed 4-bit training steps (after 2 warm-up steps)
SMOKE_IMAGES = 8                 # smoke mode: generated captioned images of mixed sizes
LOSS_SMOOTHING = 20              # the loss curve's moving average, in steps
if SMOKE:  # CI's tiny run: you can ignore this
    MODEL_ID = os.environ.get("SD_MODEL_ID") or sd_pipeline.TINY_MODEL_ID
    RESOLUTION, PROMPTS, INFERENCE_STEPS = 32, PROMPTS[:2], 2
    LEARNING_RATE = 1e-2         # large, so that 4 steps change the model visibly
    BATCH_SIZE, TRAIN_STEPS, TIME_LIMIT_MIN = 1, 4, math.inf
    CHECKPOINT_EVERY, SAMPLE_EVERY, LORA_SCALES, LOSS_SMOOTHING = 2, 2, [0.0, 0.5, 1.0], 1
    CLIP_MODEL_ID, CLIP_CAPTIONS, QLORA_STEPS = hclip.STAND_IN_CLIP_ID, 2, 2

env.use_drive_for_runs(RUN_DIR_ON_DRIVE)     # mounts Drive and sets $RUN_DIR there (Colab only)
RUN_DIR = env.run_dir(NOTEBOOK)              # $RUN_DIR/<notebook>: checkpoints, adapter, figures
CHECKPOINT_DIR = RUN_DIR / "checkpoints"
ADAPTER_DIR = RUN_DIR / "lora-adapter"

# %%
# Device, precision and the accelerate launcher (one GPU here; `accelerate launch` for several).
from accelerate import Accelerator
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
DEVICE = env.pick_device()
CHOICES = env.gpu_choices(DEVICE)          # fp16 on a T4, bf16 on newer GPUs, fp32 on a CPU
MIXED_PRECISION = CHOICES.mixed_precision  # accelerate's name for it: "fp16", "bf16" or "no"
WEIGHT_DTYPE = CHOICES.amp_dtype or torch.float32  # the frozen weights; LoRA's stay fp32
accelerator = Accelerator(mixed_precision=MIXED_PRECISION, cpu=DEVICE.type == "cpu")
DEVICE = accelerator.device
PRECISION = sd_train.mixed_precision(accelerator, CHOICES)  # autocast and loss scaler of the step
env.seed_everything(SEED)
STAND_INS = []
if MODEL_ID == sd_pipeline.TINY_MODEL_ID:
    STAND_INS.append(sd_pipeline.TINY_PIPELINE_NOTE)
    print("STAND-IN:", sd_pipeline.TINY_PIPELINE_NOTE)
print(f"mode: {'smoke' if SMOKE else 'full'} | device: {env.describe_device(DEVICE)} | frozen "
      f"weights in {WEIGHT_DTYPE} | run dir: {RUN_DIR}")
print(f"training step: {PRECISION.description}")

# %% [markdown]
# ## 2. Latent diffusion: images from a pretrained model
#
# Stable Diffusion (Rombach et al. 2022) turns a caption into an image with four parts: a text encoder,
# an autoencoder, a denoising network and a scheduler.
#
# ```
#  caption ──CLIP text encoder τ──► c (77 × 768)──────────────┐ cross-attention (K, V)
#                                                             ▼
#  image x ──VAE encoder E──► z₀ (4 × 64 × 64) ──+noise──► z_t ──UNet ε_θ(z_t, t, c)──► predicted noise
#                                                                                      │ scheduler (T → 0)
#  generated image ◄──VAE decoder D── z₀ ◄──────────────────────────────────────────────┘
# ```
#
# **The autoencoder (VAE).** Stable Diffusion does not denoise pixels. A frozen autoencoder maps an
# image $x$ of $512 \times 512 \times 3$ values to a small *latent* $z_0 = s\,E(x)$ of
# $4 \times 64 \times 64$ values. The factor $s = 0.18215$ gives the latent unit variance. The decoder
# maps it back: $x \approx D(z_0 / s)$. Denoising $48\times$ fewer values makes the model fast enough
# for one GPU.
#
# **Adding noise.** A variance schedule $\beta_1, \dots, \beta_T$ with $T = 1000$ steps says how much
# noise each step adds. With $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t} \alpha_s$, the
# noisy latent at step $t$ is
#
# $$z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1 - \bar\alpha_t}\, \varepsilon, \qquad \varepsilon \sim \mathcal N(0, I).$$
#
# **The denoiser.** A UNet $\varepsilon_\theta$ predicts the noise $\varepsilon$ from $z_t$, the step
# $t$ and the caption. A UNet is a network of convolution blocks that shrinks its input and grows it
# again. Here it also holds transformer blocks. It learns by the mean squared error of its prediction:
#
# $$\mathcal L = \mathbb E_{z_0, c, \varepsilon, t}\, \big\| \varepsilon - \varepsilon_\theta(z_t, t, c) \big\|_2^2 .$$
#
# **The caption.** CLIP is a pair of networks trained to match images with their captions. Its frozen
# text encoder $\tau$ turns the caption into $c \in \mathbb R^{77 \times 768}$: one vector per token. In every transformer block of the UNet, *cross-attention* lets the image
# features $\varphi(z_t)$ look up the text:
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\Big(\frac{Q K^\top}{\sqrt d}\Big) V, \quad
#   Q = W_Q\, \varphi(z_t),\; K = W_K\, c,\; V = W_V\, c.$$
#
# An output matrix $W_O$ follows. diffusers names the four matrices `to_q`, `to_k`, `to_v` and
# `to_out.0`. The self-attention layers use the same names, with $K$ and $V$ made from $\varphi(z_t)$.
#
# **Classifier-free guidance.** When it draws an image, the UNet runs twice: with the caption and with
# an empty caption $\varnothing$. The guidance scale $s$ pushes the prediction away from the empty
# caption and towards the text:
#
# $$\hat\varepsilon = \varepsilon_\theta(z_t, t, \varnothing)
#   + s\,\big(\varepsilon_\theta(z_t, t, c) - \varepsilon_\theta(z_t, t, \varnothing)\big).$$
#
# **The scheduler.** Drawing starts from pure noise $z_T \sim \mathcal N(0, I)$. The scheduler turns each
# prediction into the next, less noisy latent. Training uses the DDPM schedule with all $T$ steps. For
# drawing we use DPM-Solver++ (Lu et al. 2022), which needs only a few dozen steps.
#
# `StableDiffusionPipeline` holds all four parts. Full mode downloads the weights in fp16, a 16-bit number
# format that halves the download. It leaves out the safety checker, a filter that blanks images it judges
# unsafe. That saves 0.6 GB, so check your images yourself. Smoke mode builds the same pipeline class from
# tiny configs and saves it to a folder. So the loading code is the same for both.

# %%
MODEL = sd_pipeline.resolve_model_id(MODEL_ID, RUN_DIR)
pipe = sd_pipeline.load_pipeline(MODEL, dtype=WEIGHT_DTYPE, device=DEVICE)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
for part in (unet, vae, text_encoder):
    part.requires_grad_(False)
for name, part in {"UNet": unet, "VAE": vae, "CLIP text encoder": text_encoder}.items():
    print(f"{name:18s} {ht.count_parameters(part):>13,} parameters")

LATENT_SIDE = RESOLUTION // 2 ** (len(vae.config.block_out_channels) - 1)
with torch.no_grad():
    probe_image = torch.zeros(1, 3, RESOLUTION, RESOLUTION, device=DEVICE, dtype=WEIGHT_DTYPE)
    latent = vae.encode(probe_image).latent_dist.mean
    tokens = tokenizer(PROMPTS[:1], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids.to(DEVICE)
    text_states = text_encoder(tokens)[0]
latent_shape = (1, unet.config.in_channels, LATENT_SIDE, LATENT_SIDE)
assert latent.shape == latent_shape, latent.shape
assert text_states.shape == (1, tokenizer.model_max_length, unet.config.cross_attention_dim)
# One fixed UNet input, to compare the base, trained and reloaded models' predictions later
noisy = torch.randn(latent_shape, generator=torch.Generator().manual_seed(SEED))
noisy = noisy.to(DEVICE, WEIGHT_DTYPE)
PROBE = (noisy, torch.tensor([500], device=DEVICE), text_states)
BASE_PREDICTION = sd_eval.predict_noise(unet, PROBE, PRECISION.autocast)
assert BASE_PREDICTION.shape == latent_shape
print(f"image {RESOLUTION}x{RESOLUTION} -> latent {tuple(latent.shape[1:])}, caption -> text "
      f"states {tuple(text_states.shape[1:])}, UNet output {tuple(BASE_PREDICTION.shape[1:])}")

# %% [markdown]
# Now the pretrained model draws each prompt with each seed.
#
# ⏱ About 3 min on a T4 (estimated).

# %%
def images_of(pipeline, prompts: list, seeds: list) -> torch.Tensor:
    """Images in [0, 1] for every prompt x seed, with this notebook's steps, guidance and size."""
    return sd_eval.pipeline_images(pipeline, prompts, seeds, INFERENCE_STEPS, GUIDANCE_SCALE,
                                   RESOLUTION)


start = time.perf_counter()
base_images = images_of(pipe, PROMPTS, SEEDS)
print(f"{len(base_images)} images in {time.perf_counter() - start:.1f} s")
assert base_images.shape == (len(PROMPTS) * len(SEEDS), 3, RESOLUTION, RESOLUTION)
hplot.show_image_table(base_images, PROMPTS, SEEDS, f"Base model: prompt x seed "
                       f"({INFERENCE_STEPS} steps, guidance {GUIDANCE_SCALE})",
                       RUN_DIR / "base_prompt_seed_grid.png")

# %% [markdown]
# ## 3. Data: a small captioned image set
#
# Full mode downloads `lambdalabs/naruto-blip-captions`: about a thousand Naruto-style drawings with
# captions written by BLIP, an image-captioning model. To train on your own images, set `IMAGE_FOLDER`
# to a folder with the images and one caption for each. A caption is either a text file beside its image,
# such as `cat.png` and `cat.txt`, or a line of a `metadata.jsonl` file:
# `{"file_name": "cat.png", "text": "a cat on a sofa"}`. Every image is resized so that its shorter side is
# `RESOLUTION` pixels, then cropped at the centre. Smoke mode draws small captioned images of coloured
# shapes in several sizes.

# %%
if SMOKE and IMAGE_FOLDER is None:
    IMAGE_FOLDER = sd_data.make_shape_images(RUN_DIR / "shapes", SMOKE_IMAGES, seed=SEED)
    STAND_INS.append(f"{SMOKE_IMAGES} generated images of coloured shapes instead of {DATASET}")
    print("STAND-IN:", STAND_INS[-1])
if IMAGE_FOLDER is not None:
    dataset = sd_data.CaptionedImages.from_folder(IMAGE_FOLDER, RESOLUTION, RANDOM_FLIP)
    raw_sizes = sorted({sd_data.image_size(p) for p in dataset.images[:100]})
    print(f"{len(dataset)} images from '{IMAGE_FOLDER}', original sizes (w, h), px: {raw_sizes}")
else:
    dataset = sd_data.CaptionedImages.from_hub(DATASET, RESOLUTION, RANDOM_FLIP)
    print(f"{len(dataset)} images from the Hub dataset {DATASET!r}")
preview = [dataset[i] for i in range(min(8, len(dataset)))]
assert all(item["pixel_values"].shape == (3, RESOLUTION, RESOLUTION) for item in preview)
for i, item in enumerate(preview[:4]):
    print(f"caption {i}: {item['caption']}")
hplot.show_grid(torch.stack([item["pixel_values"] for item in preview]), f"Training images, "
                f"resized and cropped to {RESOLUTION} px (first {len(preview)})",
                RUN_DIR / "training_images.png", nrow=4)

# %% [markdown]
# ## 4. The LoRA adapter
#
# Fine-tuning all the UNet's weights needs, for each weight, a gradient and the two running averages that
# the Adam optimizer keeps. That is too much memory for a T4. LoRA, short for *low-rank adaptation* (Hu et
# al. 2021), freezes every pretrained matrix $W \in \mathbb R^{d \times k}$. Beside it, it learns an
# update made of two thin matrices:
#
# $$h = W x + \frac{\alpha}{r}\, B A\, x, \qquad A \in \mathbb R^{r \times k},\; B \in \mathbb R^{d \times r},
#   \; r \ll \min(d, k).$$
#
# $A$ starts random and $B$ starts at zero. So training starts exactly at the pretrained model. Each adapted
# matrix adds $r(d + k)$ parameters. When the model draws, the update can be scaled by $\lambda$:
# $W + \lambda \frac{\alpha}{r} BA$. $\lambda = 0$ gives the base model and $\lambda = 1$ the trained one.
# The factor $\alpha / r$ is part of the model. An adapter file must store $\alpha$, or a reload quietly
# uses $\alpha = r$.
#
# The code below uses these names from PyTorch and the helpers.

# %%
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from helpers.sd_lora.data import micro_batch
from helpers.sd_lora.lora import LORA_WEIGHT_FILE, LoraParameters
from helpers.sd_lora.train import MixedPrecision, lora_checkpoints
from helpers.training import TrainingRun, load_checkpoint, save_checkpoint

# %% [markdown]
# `add_lora` wraps each `to_q`, `to_k`, `to_v` and `to_out.0` layer with $A$ (`lora_A`) and $B$
# (`lora_B`), through diffusers' `peft` integration. Everything else stays frozen. On a GPU the frozen
# weights stay in fp16, but the LoRA weights are kept in fp32: in fp16, Adam's small updates would round
# away. To adapt more layers, add names such as `"proj_in"` to the list and re-run the cell.

# %% [helpers] sd_lora/lora: LORA_TARGET_MODULES, lora_config, add_lora

# %%
unet_params_before = ht.count_parameters(unet)
fingerprints_before = sd_adapter.parameter_fingerprints(unet)
unet = add_lora(unet, RANK, LORA_ALPHA)
trainable = ht.count_parameters(unet, trainable_only=True)
expected_lora, _ = sd_adapter.lora_parameter_count(unet.config, RANK, LORA_TARGET_MODULES)
assert trainable == expected_lora and ht.count_parameters(unet) == unet_params_before + trainable
assert all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
TRAINABLE_PERCENT = 100 * trainable / unet_params_before
print(f"trainable LoRA parameters: {trainable:,} = {TRAINABLE_PERCENT:.3f} % of the UNet's "
      f"{unet_params_before:,}")

name = next(n for n, _ in unet.named_modules() if n.endswith("attn2.to_k"))
layer = unet.get_submodule(name)
a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
assert a.shape == (RANK, layer.in_features) and b.shape == (layer.out_features, RANK)
assert not b.any(), "B starts at zero: the adapter starts as the identity"
print(f"one cross-attention to_k: W {layer.out_features}x{layer.in_features} (frozen, "
      f"{layer.base_layer.weight.dtype}), A {tuple(a.shape)} + B {tuple(b.shape)} = r(d + k) = "
      f"{a.numel() + b.numel():,} trainable ({a.dtype})")
print(layer)

# %% [markdown]
# The same count for the real SD 1.5 UNet, from its config alone. PyTorch's `meta` device builds the
# shapes without any weights, so nothing is downloaded. The adapter grows linearly with the rank.

# %%
sd15_lora, sd15_total = sd_adapter.lora_parameter_count(sd_pipeline.SD15_UNET_CONFIG, RANK,
                                                        LORA_TARGET_MODULES)
print(f"SD 1.5's UNet at rank {RANK}: {sd15_lora:,} LoRA parameters = "
      f"{100 * sd15_lora / sd15_total:.3f} % of {sd15_total:,}, {sd15_lora * 4 / 1e6:.2f} MB fp32")
RANKS = [1, 2, 4, 8, 16, 32, 64, 128]
per_rank = sd15_lora // RANK
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.bar([str(r) for r in RANKS], [r * per_rank * 4 / 1e6 for r in RANKS], color="tab:blue")
for i, r in enumerate(RANKS):
    ax.annotate(f"{100 * r * per_rank / sd15_total:.2f} %", (i, r * per_rank * 4 / 1e6),
                ha="center", va="bottom", fontsize=8)
ax.set_xlabel("LoRA rank r")
ax.set_ylabel("adapter size (MB, fp32)")
ax.set_title("SD 1.5 UNet, LoRA on to_q/to_k/to_v/to_out.0: adapter size and share of the UNet")
hplot.save_figure(fig, RUN_DIR / "sd15_lora_size_vs_rank.png")
plt.show()

# %% [markdown]
# ## 5. The loss and the training step
#
# One training example goes like this. The frozen VAE encodes the image to $z_0$ and the frozen text
# encoder turns the caption into $c$. We draw noise $\varepsilon$ and a step $t$, and noise $z_0$ to
# $z_t$ with `noise_scheduler.add_noise`. The loss compares the UNet's prediction with $\varepsilon$.
# Some models predict $v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\, z_0$ instead, and
# the code handles both.
#
# Each example can also get a weight, *min-SNR* (Hang et al. 2023). The *signal-to-noise ratio* of step
# $t$ is $\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)$. It is large at the easy steps with
# little noise. The weight caps it at $\gamma$ = `SNR_GAMMA`, so easy steps count less, and training
# converges faster:
#
# $$\mathcal L = \frac1B \sum_i w_i \,\big\| \varepsilon_i - \varepsilon_\theta(z_{t_i}, t_i, c_i) \big\|^2_{\text{mean}},
#   \qquad w_i = \frac{\min(\mathrm{SNR}(t_i), \gamma)}{\mathrm{SNR}(t_i)}.$$
#
# The loss as code:

# %% [helpers] sd_lora/losses: diffusion_snr, noise_prediction_loss

# %% [markdown]
# Around it, the frozen encoders and the noising of one batch:

# %% [helpers] sd_lora/train: encode_batch, unet_diffusion_loss

# %% [markdown]
# **The training step.** A *micro-batch* of `BATCH_SIZE` images is what fits the GPU at once. The step
# runs `GRAD_ACCUM` micro-batches and adds up their gradients. Then AdamW updates the weights once.
# So one step sees `BATCH_SIZE × GRAD_ACCUM` images. The gradient norm is clipped at `MAX_GRAD_NORM`.
#
# On a GPU the forward pass runs under *autocast*, which computes most operations in a 16-bit format, fp16
# or bf16. In fp16, small gradients round to zero. So a *GradScaler* multiplies the loss by a large scale
# first, and divides the gradients by it before the update. `accelerate` does both on a GPU. On a CPU it
# turns fp16 off, so with `EMULATE_T4=1` the step builds its own.

# %% [helpers] sd_lora/train: lora_training_step

# %%
noise_scheduler = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")
PREDICTION_TYPE = noise_scheduler.config.prediction_type
first_batch = encode_batch(pipe, micro_batch(dataset, 0, BATCH_SIZE, SEED))
assert first_batch[0].shape == (BATCH_SIZE, *latent_shape[1:])
with torch.no_grad():
    first_loss = unet_diffusion_loss(unet, *first_batch, noise_scheduler, SNR_GAMMA)
assert first_loss.dim() == 0 and torch.isfinite(first_loss)
print(f"loss of one micro-batch before training: {first_loss.item():.4f} "
      f"({PREDICTION_TYPE} prediction)")

# %% [markdown]
# ## 6. Training
#
# **Gradient checkpointing** recomputes activations in the backward pass instead of storing them. It
# saves memory and costs time. On a large data-centre GPU, the SD 1.5 step ran at half the speed with it,
# to save 1.7 GB (experiments/RESULTS.md, section 06). A T4 has 15 GB. So checkpointing is switched on
# only when the free GPU memory is less than what the step needs without it. That need is scaled from
# the same measurement to your batch and resolution. The free memory is read after
# `torch.cuda.empty_cache()`, because the GPU counts PyTorch's cache of freed memory as used.

# %%
if GRADIENT_CHECKPOINTING is None:
    USE_CHECKPOINTING, why = sd_memory.choose_gradient_checkpointing(CHOICES, BATCH_SIZE,
                                                                     LATENT_SIDE)
else:
    USE_CHECKPOINTING, why = GRADIENT_CHECKPOINTING, "set by GRADIENT_CHECKPOINTING"
print(f"gradient checkpointing {'on' if USE_CHECKPOINTING else 'off'}: {why}")
if USE_CHECKPOINTING:
    unet.enable_gradient_checkpointing()
lora_params = [p for p in unet.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(lora_params, lr=LEARNING_RATE, betas=ADAM_BETAS, eps=ADAM_EPS,
                              weight_decay=WEIGHT_DECAY, fused=CHOICES.fused_adam or None)
print(f"AdamW: {'fused (one kernel for the whole update)' if CHOICES.fused_adam else 'plain'}")
unet, optimizer = accelerator.prepare(unet, optimizer)

# %% [markdown]
# **The loop** logs each step's loss to TensorBoard. It draws `PROMPTS[0]` every `SAMPLE_EVERY` steps and
# writes a checkpoint every `CHECKPOINT_EVERY` steps. A checkpoint holds only what training changes: the
# LoRA weights, AdamW's state, the random generators, the loss history and the snapshots. That is a few
# megabytes, not the whole UNet. Only the newest `KEEP_CHECKPOINTS` are kept.
#
# **Re-running the training cell resumes** from the newest checkpoint, for example after Colab
# disconnects. Set `RUN_DIR_ON_DRIVE = True` to keep the checkpoints when the runtime is reset. The same
# loop runs on several GPUs as a script started with `accelerate launch`. Then `prepare` wraps the UNet
# for data-parallel training, and each process takes its own part of the batch.

# %% [helpers] sd_lora/train: LoraPlan

# %% [helpers] sd_lora/train: training_state

# %% [helpers] sd_lora/train: step_batches

# %% [helpers] sd_lora/train: train_lora

# %% [markdown]
# ⏱ About 30–40 min on a T4 (estimated). Training stops after `TIME_LIMIT_MIN` with a checkpoint.
# Re-run this cell to continue.

# %%
if env.in_colab():
    %load_ext tensorboard
    %tensorboard --logdir {RUN_DIR}/tensorboard

CHECKPOINT_CONFIG = {"model": MODEL_ID, "rank": RANK, "alpha": LORA_ALPHA, "resolution": RESOLUTION,
                     "batch": BATCH_SIZE, "grad_accum": GRAD_ACCUM, "lr": LEARNING_RATE,
                     "mixed_precision": MIXED_PRECISION}
plan = LoraPlan(TRAIN_STEPS, BATCH_SIZE, GRAD_ACCUM, SEED, SNR_GAMMA, MAX_GRAD_NORM,
                CHECKPOINT_DIR, CHECKPOINT_EVERY, KEEP_CHECKPOINTS, SAMPLE_EVERY, CHECKPOINT_CONFIG,
                TIME_LIMIT_MIN * 60)


def snapshot() -> Tensor:
    """The first prompt at the first seed as uint8: the 'samples over training' figure."""
    with torch.no_grad(), PRECISION.autocast():  # the prepared UNet returns fp32 latents
        return (images_of(pipe, PROMPTS[:1], SEEDS[:1]) * 255).round().to(torch.uint8)


run = TrainingRun(ht.History(RUN_DIR / "tensorboard"))
if DEVICE.type == "cuda":
    torch.cuda.reset_peak_memory_stats(DEVICE)
reached = train_lora(unet, optimizer, dataset, pipe, noise_scheduler, accelerator, PRECISION, run,
                     plan, snapshot)
LORA_PEAK_MB = ht.peak_memory_mb(DEVICE)
steps_per_s = run.stopwatch.throughput()["it_per_s"]
print(f"step {reached} of {TRAIN_STEPS}: {run.stopwatch.iterations} steps in "
      f"{run.stopwatch.seconds:.1f} s = {steps_per_s:.2f} steps/s; peak memory "
      f"{LORA_PEAK_MB:,.0f} MiB ({'CUDA allocator' if DEVICE.type == 'cuda' else 'process RSS'})")
if reached < TRAIN_STEPS:
    print(f"stopped at TIME_LIMIT_MIN = {TIME_LIMIT_MIN} min; re-run this cell to continue")

# %%
hplot.plot_losses(run.history, ["loss"], f"LoRA training loss (rank {RANK}, "
                  f"{'min-SNR' if SNR_GAMMA else 'plain'} MSE)", RUN_DIR / "loss_curve.png",
                  xlabel="optimizer step", ylabel="noise-prediction loss",
                  smooth=LOSS_SMOOTHING)
hplot.show_over_iterations({k: v.float() / 127.5 - 1 for k, v in run.snapshots.items()},
                           f"'{PROMPTS[0]}', seed {SEEDS[0]}, during training",
                           RUN_DIR / "samples_over_training.png", nrow=1)

# %% [markdown]
# ## 7. Save the adapter, reload it, compare before and after
#
# Only the LoRA weights are saved, in the file `pytorch_lora_weights.safetensors`. The file also stores
# the adapter's settings as *metadata*: its rank, its targets and its **alpha**. Without them a reload
# assumes $\alpha = r$. That is wrong whenever `LORA_ALPHA` differs from `RANK`. Section 11 checks this
# claim with an adapter saved at half its alpha.
#
# A fresh pipeline then loads the file. `set_adapters(..., adapter_weights=[λ])` sets the scale of the
# update: $\lambda = 0$ is the base model.

# %% [helpers] sd_lora/lora: save_lora, load_lora

# %%
adapter_file = save_lora(accelerator.unwrap_model(unet), ADAPTER_DIR)
ADAPTER_BYTES = adapter_file.stat().st_size
header_bytes, data_bytes = sd_adapter.safetensors_layout(adapter_file)
print(f"saved {adapter_file.name}: {ADAPTER_BYTES / 1e6:.3f} MB = {header_bytes:,} bytes of "
      f"header and metadata + {data_bytes:,} bytes of weights; the UNet is "
      f"{unet_params_before * 2 / 1e6:,.1f} MB in fp16")
assert data_bytes == trainable * 4, "the file must hold exactly the LoRA weights, in fp32"

fresh = sd_pipeline.load_pipeline(MODEL, dtype=WEIGHT_DTYPE, device=DEVICE)
fresh.scheduler = DPMSolverMultistepScheduler.from_config(fresh.scheduler.config)
load_lora(fresh, ADAPTER_DIR, "trained")
assert fresh.unet.peft_config["trained"].lora_alpha == LORA_ALPHA
loaded_dtype = next(p.dtype for n, p in fresh.unet.named_parameters() if "lora_" in n)
reloaded = sd_adapter.lora_weights(fresh.unet)
trained_w = sd_adapter.lora_weights(unet, dtype=loaded_dtype)  # rounded copies; originals stay fp32
assert set(reloaded) == set(trained_w)
assert all(torch.equal(reloaded[k], trained_w[k]) for k in trained_w)
print(f"reloaded LoRA weights ({loaded_dtype}) equal the trained ones rounded to {loaded_dtype}")

# %% [markdown]
# The reloaded adapter draws the same prompts with the same seeds. Then one image at several scales
# $\lambda$.
#
# ⏱ About 4 min on a T4 (estimated).

# %%
fresh.set_adapters(["trained"], adapter_weights=[1.0])
after_images = images_of(fresh, PROMPTS, SEEDS)
pairs = torch.stack([base_images.view(len(PROMPTS), len(SEEDS), *base_images.shape[1:]),
                     after_images.view(len(PROMPTS), len(SEEDS), *after_images.shape[1:])], dim=2)
columns = [f"{s} {tag}" for s in SEEDS for tag in ("before", "after")]
hplot.show_image_table(pairs.flatten(0, 2), PROMPTS, columns,
                       "Before (base) and after (LoRA) with the same seeds",
                       RUN_DIR / "before_after.png")

sweep = []
for scale in LORA_SCALES:
    if scale in (0.0, 1.0):  # generated above: the base model (λ = 0, checked in section 11)
        sweep.append((base_images if scale == 0.0 else after_images)[:1])
        continue
    fresh.set_adapters(["trained"], adapter_weights=[scale])
    sweep.append(images_of(fresh, PROMPTS[:1], SEEDS[:1]))
hplot.show_image_table(torch.cat(sweep), PROMPTS[:1], LORA_SCALES,
                       f"LoRA scale sweep (seed {SEEDS[0]})", RUN_DIR / "lora_scale_sweep.png",
                       xlabel="LoRA scale λ")

# %% [markdown]
# ## 8. CLIP score before and after
#
# The *CLIP score* (Hessel et al. 2021) measures how well an image matches a caption. CLIP's two
# encoders map images and texts into one space. The score is the cosine similarity of an image and its
# caption there, times 100, averaged over the pairs and floored at zero:
# $\max\big(100 \cdot \overline{\cos}(E_I(x), E_T(y)),\, 0\big)$. We use OpenAI's CLIP ViT-B/16 and
# prepare each image as CLIP was trained.
#
# We draw one image per training caption, with the base model ($\lambda = 0$) and with the adapter
# ($\lambda = 1$), from the same seed. Full mode checks two claims:
# * the adapted model still follows the text: its images score higher with their own captions than with
#   another image's caption,
# * it has learnt the look of the training images: in CLIP's image space, its images are closer to them
#   than the base model's.
#
# The score itself may go either way, because the captions describe the content, not the style. In smoke
# mode the CLIP model is a tiny random stand-in, a model with the right shapes but no training. Its
# numbers mean nothing, and nothing is asserted about them.
#
# ⏱ About 7 min on a T4 (estimated).

# %%
captions = dataset.captions[:CLIP_CAPTIONS]
fresh.set_adapters(["trained"], adapter_weights=[0.0])
clip_before_images = images_of(fresh, captions, SEEDS[:1])
fresh.set_adapters(["trained"], adapter_weights=[1.0])
clip_after_images = images_of(fresh, captions, SEEDS[:1])
clip_model, clip_tokenizer = hclip.load_clip(CLIP_MODEL_ID, RUN_DIR, DEVICE)
CLIP_STAND_IN = CLIP_MODEL_ID == hclip.STAND_IN_CLIP_ID
if CLIP_STAND_IN:
    STAND_INS.append("tiny random CLIP model for the CLIP score (not meaningful)")
    print("STAND-IN:", STAND_INS[-1])
shuffled = captions[1:] + captions[:1]
CLIP_BEFORE = hclip.clip_score(clip_model, clip_tokenizer, clip_before_images, captions)
CLIP_AFTER = hclip.clip_score(clip_model, clip_tokenizer, clip_after_images, captions)
CLIP_AFTER_SHUFFLED = hclip.clip_score(clip_model, clip_tokenizer, clip_after_images, shuffled)
training_images = torch.stack([dataset[i]["pixel_values"] for i in range(len(captions))]) / 2 + 0.5
reference = hclip.clip_image_embeddings(clip_model, training_images).mean(0)
STYLE_BEFORE, STYLE_AFTER = (
    F.cosine_similarity(hclip.clip_image_embeddings(clip_model, x), reference[None]).mean().item()
    for x in (clip_before_images, clip_after_images))
print(f"CLIP score on {len(captions)} training captions: before {CLIP_BEFORE:.2f}, after "
      f"{CLIP_AFTER:.2f}, after with shuffled captions {CLIP_AFTER_SHUFFLED:.2f}; cosine to the "
      f"training images in CLIP image space: before {STYLE_BEFORE:.3f}, after {STYLE_AFTER:.3f}"
      + (" (stand-in CLIP model: not meaningful)" if CLIP_STAND_IN else ""))
if not CLIP_STAND_IN:
    assert CLIP_AFTER > CLIP_AFTER_SHUFFLED, "the adapted model no longer follows the captions"
    assert STYLE_AFTER > STYLE_BEFORE, "the adapted images are not closer to the training images"
del clip_model, fresh
gc.collect()

# %% [markdown]
# ## 9. QLoRA: the UNet in 4 bits
#
# QLoRA (Dettmers et al. 2023) stores the frozen base weights in 4 bits, in a format called
# **NormalFloat** (NF4). Inside each matrix product, the bitsandbytes library turns them back into fp16,
# block by block. The LoRA matrices $A$ and $B$ still train in fp32. Gradients flow through the frozen
# weights into $A$ and $B$ only:
#
# $$h = \mathrm{dequant}(W^{\mathrm{NF4}})\, x + \frac{\alpha}{r} B A x .$$
#
# bitsandbytes quantises `nn.Linear` layers only. Most of a UNet's weights are in convolutions, so the
# saving is much smaller than for a language model. The next cell counts the share for SD 1.5.

# %%
with torch.device("meta"):
    sd15_unet = UNet2DConditionModel.from_config(sd_pipeline.SD15_UNET_CONFIG)
linear = sum(m.weight.numel() for m in sd15_unet.modules() if isinstance(m, nn.Linear))
LINEAR_SHARE = linear / sum(p.numel() for p in sd15_unet.parameters())
print(f"SD 1.5 UNet: {linear:,} of its weights are in nn.Linear layers "
      f"({100 * LINEAR_SHARE:.1f} %); the rest (convolutions, norms) stay in fp16 under QLoRA")
assert round(100 * LINEAR_SHARE) == 31, "the results section quotes 31 %"

# %% [markdown]
# The UNet is loaded again in NF4 through `BitsAndBytesConfig`, with a LoRA adapter of the same rank on
# top. The fp16 UNet moves to the CPU first. Then `QLORA_STEPS` training steps on the same batches
# measure speed and peak memory beside LoRA's. bitsandbytes needs a CUDA GPU, and elsewhere the cell says
# why it skips. With `EMULATE_T4=1` on a CPU it runs the same steps on the UNet in fp16, not quantised.
#
# ⏱ About 2 min on a T4 (estimated).

# %%
QLORA_SKIPPED = sd_pipeline.qlora_unavailable_reason()
QUANTIZED = QLORA_SKIPPED is None
QLORA_RUNS = QUANTIZED or CHOICES.gpu_path
if not QLORA_RUNS:
    print("QLoRA skipped:", QLORA_SKIPPED)
else:
    if not QUANTIZED:  # the T4 emulation on a CPU: the same steps, without 4-bit weights
        CHOICES.skip("bitsandbytes' 4-bit QLoRA",
                     "the same QLoRA steps on the UNet in fp16, not quantised")
    accelerator.unwrap_model(unet).to("cpu")
    gc.collect()
    if CHOICES.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(DEVICE)
    q_base = (sd_pipeline.load_unet_4bit(MODEL, compute_dtype=WEIGHT_DTYPE) if QUANTIZED
              else sd_pipeline.load_unet(MODEL, WEIGHT_DTYPE, DEVICE))
    q_unet = add_lora(q_base, RANK, LORA_ALPHA)
    q_checkpointing, q_why = sd_memory.choose_gradient_checkpointing(CHOICES, BATCH_SIZE,
                                                                     LATENT_SIDE, quantized=True)
    print(f"QLoRA gradient checkpointing {'on' if q_checkpointing else 'off'}: {q_why}")
    if q_checkpointing:
        q_unet.enable_gradient_checkpointing()
    q_optimizer = accelerator.prepare(torch.optim.AdamW(
        [p for p in q_unet.parameters() if p.requires_grad], lr=LEARNING_RATE, betas=ADAM_BETAS,
        weight_decay=WEIGHT_DECAY, eps=ADAM_EPS, fused=CHOICES.fused_adam or None))

# %%
qlora_metrics: dict = {"skipped": QLORA_SKIPPED}
if QLORA_RUNS:
    q_unet.train()
    q_timing = ht.time_per_step(lambda: lora_training_step(
        q_unet, q_optimizer, step_batches(pipe, dataset, 0, plan, accelerator), noise_scheduler,
        accelerator, PRECISION, SNR_GAMMA, MAX_GRAD_NORM), DEVICE, iterations=QLORA_STEPS, warmup=2)
    q_weights_mb = sum(p.numel() * p.element_size() for p in q_unet.parameters()) / 2**20
    qlora_metrics = {**qlora_metrics, "steps_per_s": q_timing["it_per_s"],
                     "peak_memory_mb": q_timing["peak_memory_mb"], "quantized": QUANTIZED,
                     "gradient_checkpointing": q_checkpointing, "steps": QLORA_STEPS,
                     "unet_weights_mb": q_weights_mb,
                     "trainable_parameters": ht.count_parameters(q_unet, trainable_only=True)}
    assert qlora_metrics["trainable_parameters"] == trainable
    if QUANTIZED:
        assert q_weights_mb < unet_params_before * 2 / 2**20, "4-bit weights must be smaller"
    print(f"{'QLoRA' if QUANTIZED else 'QLoRA steps, fp16 UNet'}: {q_timing['it_per_s']:.2f} "
          f"steps/s, UNet weights {q_weights_mb:,.1f} MiB")
    del q_base, q_unet, q_optimizer
    gc.collect()
    if CHOICES.cuda:
        torch.cuda.empty_cache()
    accelerator.unwrap_model(unet).to(DEVICE)

# %% [markdown]
# ## 10. Results
#
# Your run's numbers:

# %%
qlora_text = "skipped: no CUDA GPU or no bitsandbytes"
if QLORA_RUNS:
    qlora_text = (f"{qlora_metrics['steps_per_s']:.2f} steps/s"
                  + (f", peak {qlora_metrics['peak_memory_mb']:,.0f} MiB" if CHOICES.cuda else "")
                  + ("" if QUANTIZED else " (fp16 UNet, not quantised)"))
rows = [
    ("trainable LoRA parameters", f"{trainable:,} ({TRAINABLE_PERCENT:.3f} % of the UNet)"),
    ("adapter file", f"{ADAPTER_BYTES / 1e6:.3f} MB"),
    ("LoRA training", f"{steps_per_s:.2f} steps/s ({BATCH_SIZE * GRAD_ACCUM} images/step, gradient "
                      f"checkpointing {'on' if USE_CHECKPOINTING else 'off'}), {reached} steps"),
    ("peak memory, LoRA", f"{LORA_PEAK_MB:,.0f} MiB"),
    ("QLoRA training", qlora_text),
    ("CLIP score before / after",
     f"{CLIP_BEFORE:.2f} / {CLIP_AFTER:.2f}" + (" (stand-in)" if CLIP_STAND_IN else "")),
    (f"SD 1.5 at rank {RANK} (from its config)",
     f"{sd15_lora:,} parameters, {sd15_lora * 4 / 1e6:.2f} MB fp32"),
]
display(Markdown(f"| measure | your run on {env.describe_device(DEVICE)} |\n|---|---|\n"
                 + "\n".join(f"| {label} | {value} |" for label, value in rows)))

# %% [markdown]
# No full run of this notebook has been measured yet. So there are no reference images or CLIP scores to
# compare yours with. What exists is a measurement of the training step alone.
#
# Reference: the UNet training step alone on random inputs, SD 1.5-sized UNet with random weights,
# 512 px, rank 4, fp16, 4 images per step, timed after warm-up on a large data-centre GPU
# (experiments/RESULTS.md, section 06).
#
# | variant | steps/s | peak GPU memory |
# |---|---|---|
# | LoRA, gradient checkpointing | 1.54 | 2.26 GB |
# | LoRA | 3.29 | 3.96 GB |
# | QLoRA (NF4), gradient checkpointing | 1.22 | 2.01 GB |
# | QLoRA (NF4) | not measured | 4.17 GB |
#
# **When QLoRA saves memory, and when it does not.** QLoRA shrinks the frozen UNet weights from 1.64 GB
# in fp16 to 1.25 GB in 4 bits. Only the 31 % of weights in `nn.Linear` layers shrink. QLoRA does not
# shrink the activations, and they fill most of a training step's memory at 512 px. With gradient
# checkpointing, QLoRA used a little less memory than LoRA, at 79 % of its speed. Without checkpointing,
# it used *more*.
#
# On a T4, SD 1.5 LoRA fits without either, so plain LoRA is the faster choice. QLoRA pays off when the
# frozen weights are most of the memory: larger models such as SDXL, language models, or smaller GPUs.
#
# > **Departures from diffusers' LoRA script.** The loss uses min-SNR weighting with $\gamma = 5$. The
# > script leaves it off by default. Set `SNR_GAMMA = None` for its plain loss. Smoke mode trains at a
# > much larger learning rate, so that its few steps change the model visibly.

# %% [markdown]
# ## 11. Under the hood (optional)
#
# These cells check the claims the notebook makes, and fail loudly when one is wrong.
#
# **Bad input** gets a message that names it and says what to do: here an image without a caption and a
# model that cannot load.

# %%
bad_folder = sd_data.make_shape_images(RUN_DIR / "bad-input", 2, seed=1)
(bad_folder / "shape_01.txt").unlink()
for name, attempt, error in [
    ("image without a caption", lambda: sd_data.CaptionedImages.from_folder(bad_folder, RESOLUTION),
     sd_data.MissingCaptionError),
    ("model that cannot load", lambda: sd_pipeline.load_pipeline(str(RUN_DIR / "no-model-here")),
     sd_pipeline.ModelLoadError),
]:
    try:
        attempt()
    except error as err:
        print(f"{name} -> {type(err).__name__}: {err}\n")
    else:
        raise AssertionError(f"a {name} was accepted")

# %% [markdown]
# **Only the LoRA weights changed.** Section 4 took a *fingerprint* of every weight before adding the
# adapter: a SHA-1 hash of its bytes. Every frozen weight must still have the same fingerprint, and every
# LoRA $B$ must have moved.

# %%
fingerprints_after = sd_adapter.parameter_fingerprints(accelerator.unwrap_model(unet))
changed = {n for n, h in fingerprints_after.items() if fingerprints_before.get(n) != h}
frozen_changed = [n for n in changed if "lora_" not in n]
lora_b = [n for n in fingerprints_after if "lora_B" in n]
assert not frozen_changed, f"frozen weights changed: {frozen_changed[:3]}"
assert set(lora_b) <= changed, "some LoRA B matrices did not move"
print(f"{len(changed)} tensors changed, all LoRA; "
      f"{len(fingerprints_after) - len(changed):,} frozen tensors identical")

# %% [markdown]
# **A resume drill.** We simulate a disconnect through the real resume path. The previous checkpoint is
# copied into an empty folder, and `train_lora` resumes from it up to the same step. Its update since
# that checkpoint must equal the uninterrupted run's. On a CPU it must be equal bit for bit. On a GPU
# some sums run in a changing order, so it must agree within 10 % of the update's size. A run that
# restored nothing would draw other noise and other steps, and miss by about the whole update.
#
# ⏱ About 3 min on a T4 (estimated).

# %%
saved = lora_checkpoints(CHECKPOINT_DIR)
assert len(saved) >= 2, f"the resume drill needs 2 checkpoints: train over {CHECKPOINT_EVERY} steps"
previous, final_checkpoint = saved[-2:]
final_lora = sd_adapter.lora_weights(unet)
check_dir = RUN_DIR / "resume-check"
shutil.rmtree(check_dir, ignore_errors=True)
check_dir.mkdir()
shutil.copy(previous, check_dir / previous.name)
check_plan = dataclasses.replace(plan, folder=check_dir, steps=reached, time_limit_s=math.inf)
train_lora(unet, optimizer, dataset, pipe, noise_scheduler, accelerator, PRECISION,
           TrainingRun(ht.History()), check_plan, lambda: torch.zeros(0, dtype=torch.uint8))
resumed_lora = sd_adapter.lora_weights(unet)
load_checkpoint(previous, {"lora": LoraParameters(unet)}, restore_rng=False)
start_lora = sd_adapter.lora_weights(unet)
load_checkpoint(final_checkpoint, training_state(unet, optimizer, run, accelerator, PRECISION),
                CHECKPOINT_CONFIG)
restored = sd_adapter.lora_weights(unet)
assert all(torch.equal(restored[k], final_lora[k]) for k in final_lora), "not restored"


def distance(a: dict, b: dict) -> float:
    """Euclidean distance between two sets of LoRA weights (all tensors together)."""
    return math.sqrt(sum((a[k] - b[k]).pow(2).sum().item() for k in a))


relative = distance(resumed_lora, final_lora) / distance(final_lora, start_lora)
assert relative <= (0.0 if DEVICE.type == "cpu" else 0.1), relative
print(f"resumed from {previous.name} to step {reached}: the update differs from the "
      f"uninterrupted run's by {relative:.2e} of its norm")

# %% [markdown]
# **A reload keeps α.** Here `LORA_ALPHA` equals `RANK`, so $\alpha / r = 1$, and a reload that ignored
# $\alpha$ would still look right. So the same update is also saved a second way: with $\alpha / 2$ and
# every $B$ doubled. The product $\frac{\alpha/2}{r}\,(2B)\,A$ is unchanged. Only a reload that reads
# $\alpha / 2$ from the file gives the trained model. One that took $\alpha = r$ would double the
# adapter's effect. Both files are loaded into a fresh pipeline.

# %%
HALF_ALPHA_DIR = RUN_DIR / "lora-adapter-half-alpha"
save_lora(accelerator.unwrap_model(unet), HALF_ALPHA_DIR, alpha=LORA_ALPHA / 2)  # 2B, alpha / 2
fresh = sd_pipeline.load_pipeline(MODEL, dtype=WEIGHT_DTYPE, device=DEVICE)
load_lora(fresh, ADAPTER_DIR, "trained")
load_lora(fresh, HALF_ALPHA_DIR, "half-alpha")
assert fresh.unet.peft_config["trained"].lora_alpha == LORA_ALPHA
assert fresh.unet.peft_config["half-alpha"].lora_alpha == LORA_ALPHA / 2

# %% [markdown]
# The claims, checked on the fixed UNet input of section 2. The trained adapter changes the prediction.
# Both reloaded adapters give the trained model's prediction, and scale 0 gives the base model's. In
# fp32 they must be exact. In fp16 each number is rounded, so they must agree within 5 % of the
# adapter's effect plus 4 fp16 rounding steps of the prediction's size.

# %%
unet.eval()
trained_prediction = sd_eval.predict_noise(unet, PROBE, PRECISION.autocast)
gaps = {}
for adapter in ("trained", "half-alpha"):
    fresh.set_adapters([adapter], adapter_weights=[1.0])
    reloaded_prediction = sd_eval.predict_noise(fresh.unet, PROBE, PRECISION.autocast)
    gaps[adapter] = (reloaded_prediction - trained_prediction).abs().max().item()
fresh.set_adapters(["trained"], adapter_weights=[0.0])
scale0_prediction = sd_eval.predict_noise(fresh.unet, PROBE, PRECISION.autocast)
lora_effect = (trained_prediction - BASE_PREDICTION).abs().max().item()
reload_gap = max(gaps.values())
scale0_gap = (scale0_prediction - BASE_PREDICTION).abs().max().item()
fp16_rounding = 4 * torch.finfo(WEIGHT_DTYPE).eps * trained_prediction.abs().max().item()
tolerance = 0.0 if WEIGHT_DTYPE == torch.float32 else 0.05 * lora_effect + fp16_rounding
print(f"largest change of the UNet's prediction: adapter vs base {lora_effect:.2e}; reloaded vs "
      f"trained {gaps['trained']:.2e} (alpha {LORA_ALPHA}), {gaps['half-alpha']:.2e} (alpha "
      f"{LORA_ALPHA / 2:g}, B doubled); scale 0 vs base {scale0_gap:.2e}")
assert lora_effect > 0, "the trained adapter does not change the UNet's prediction"
assert reload_gap <= tolerance, f"a reloaded adapter is not the trained model ({gaps})"
assert scale0_gap <= tolerance, f"LoRA scale 0 does not reproduce the base model ({scale0_gap})"
del fresh
gc.collect()

# %% [markdown]
# **metrics.json** records this run: its settings, speed, memory and scores.

# %%
quality = {"clip_score_before": CLIP_BEFORE, "clip_score_after": CLIP_AFTER,
           "clip_score_after_shuffled_captions": CLIP_AFTER_SHUFFLED,
           "clip_image_cosine_to_training_before": STYLE_BEFORE,
           "clip_image_cosine_to_training_after": STYLE_AFTER, "clip_model": CLIP_MODEL_ID,
           "clip_captions": len(captions), "adapter_effect_max": lora_effect,
           "reload_gap_max": reload_gap}
path = ht.write_metrics(
    RUN_DIR, NOTEBOOK, SMOKE, DEVICE, iterations=run.stopwatch.iterations,
    seconds=run.stopwatch.seconds, throughput=run.stopwatch.throughput(), quality=quality,
    stand_ins=STAND_INS, model=MODEL_ID, rank=RANK, lora_alpha=LORA_ALPHA, steps_reached=reached,
    trainable_parameters=trainable, trainable_percent_of_unet=round(TRAINABLE_PERCENT, 4),
    adapter_file_bytes=ADAPTER_BYTES, gradient_checkpointing=USE_CHECKPOINTING,
    peak_memory_mb_lora=round(LORA_PEAK_MB, 1), qlora=qlora_metrics,
    gpu_choices=CHOICES.describe(), training_precision=PRECISION.description,
    sd15_reference={"rank": RANK, "lora_parameters": sd15_lora, "unet_parameters": sd15_total,
                    "linear_share": round(LINEAR_SHARE, 4)},
)
print(path.read_text())

# %% [markdown]
# ## What to take away

# %%
checkpoint_mb = final_checkpoint.stat().st_size / 1e6
full_size_need = sd_memory.training_memory_gb(2, 64, False) + sd_memory.HEADROOM_GB
display(Markdown(f"""
* LoRA trains {TRAINABLE_PERCENT:.3f} % of the UNet's weights and leaves every other weight
  untouched. Your adapter is a {ADAPTER_BYTES / 1e6:.2f} MB file. You can load it into any copy of
  the base model, scale it with λ and switch it off again.
* An adapter is its weights **and** its α / r. Save its settings with it, or a reload scales the
  update differently. In your run the adapter moved the UNet's prediction by {lora_effect:.1e}, and
  the half-alpha reload matched the trained model within {gaps['half-alpha']:.1e}.
* Everything a resume needs fits in a checkpoint of {checkpoint_mb:.2f} MB, not the whole UNet.
* Gradient checkpointing and 4-bit weights trade speed for memory: use them when memory is short.
  By the estimate of section 6, SD 1.5 at 512 px needs about {full_size_need:.1f} GB. A T4 has
  about {sd_memory.T4_FREE_GB:.0f} GB free, so it needs neither.
"""))

# %% [markdown]
# ## Check your understanding
#
# 1. An adapter was saved with half its alpha and every $B$ doubled. Why does a reload that ignores the
#    file's alpha give a different model?
#
#    <details><summary>Answer</summary>
#
#    The update is $\frac{\alpha}{r} BA$. With $\alpha / 2$ and $2B$ the product is unchanged. A reload
#    that ignores the file takes $\alpha = r$. Here $\alpha = r$, so the scale becomes 1 instead of 1/2,
#    and $2B$ is not halved. The adapter's effect doubles. Section 11 checks that the reload reads alpha
#    from the file.
#
#    </details>
#
# 2. Why does this notebook train SD 1.5 on a T4 without gradient checkpointing and without QLoRA?
#
#    <details><summary>Answer</summary>
#
#    The memory estimate of section 6 says the step fits in a T4's free memory without them. Gradient
#    checkpointing would halve the speed. QLoRA shrinks only the weights in `nn.Linear` layers, about a
#    third of the UNet, and not the activations. Without checkpointing it even used more memory.
#
#    </details>
#
# 3. The CLIP score with the training captions may go down after training. Why is that not a failure?
#
#    <details><summary>Answer</summary>
#
#    The captions describe what is in an image, not its style. The adapter learns the style. Section 8
#    therefore checks two other claims: the images still match their own captions better than shuffled
#    ones, and they moved closer to the training images in CLIP's image space.
#
#    </details>

# %% [markdown]
# ## What to try next
# * Train on your own images: set `IMAGE_FOLDER` to a folder of 20 to 100 captioned images of one style
#   or subject.
# * Raise `RANK` or `LORA_ALPHA`, or add `"proj_in", "proj_out"` to `LORA_TARGET_MODULES` in section 4.
#   Compare the before/after grids and the adapter size.
# * Turn min-SNR off with `SNR_GAMMA = None` and compare the loss curves and samples at the same step.
# * Load two adapters into one pipeline: `load_lora` twice, then `set_adapters([...], adapter_weights=[...])`.
#   Blend them.
# * Run the loop on several GPUs with `accelerate launch`: export the cells to a script and keep `prepare`.
