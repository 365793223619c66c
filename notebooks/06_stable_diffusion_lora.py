# %% [markdown]
# # 06 · Stable Diffusion + LoRA / QLoRA: fine-tune a text-to-image model on your own captioned images
#
# {{BADGE}}
#
# **What you get:** a Stable Diffusion 1.5 pipeline generating a prompt × seed grid; a **LoRA** adapter (rank 4 on
# the UNet's attention projections, 0.09 % of its weights) trained with `peft` + `accelerate` on a captioned image
# set (the Naruto BLIP captions, or your own folder), with the adapter, the loss, the training step and the loop as
# cells you can edit; checkpoints that resume after a disconnect; the adapter saved on its own (a 3.2 MB
# `safetensors` file with its rank and alpha), reloaded into a fresh pipeline and checked against the trained model;
# a before/after grid with the same seeds, a LoRA-scale sweep, the CLIP score; and the UNet in **4-bit (QLoRA)**
# when a CUDA GPU is present, with its speed and memory beside LoRA's.
#
# **Run time.** Colab T4, full mode: *not measured yet*; 45–65 min, derived as follows. Training, 300 steps of
# 2 × 2 images at 512 px: the UNet part of this step runs at 3.29 steps/s on an H100 (fp16, no gradient
# checkpointing, which a T4 does not need either; experiments/RESULTS.md, section 06); the VAE encoding of the 4
# images and the text encoder add 66 % (FLOPs counted by `experiments/bench_sd_lora.py`: 11.4 TFLOP per step,
# 6.86 of them in the UNet); a T4 is taken to be 10.5–15.2× slower than an H100 SXM (the published fp16 memory
# bandwidth and tensor-core peak: 0.32 vs 3.35 TB/s, 65 vs 989 TFLOP/s), so 5.3–7.7 s per step, 26–38 min for
# 300 steps (training stops at `TIME_LIMIT_MIN` = 40 min in any case). The 37 generated images (25 steps each),
# the 25 steps the resume check trains again and the 12 QLoRA steps, scaled the same way from their FLOPs: 16–23
# min. Downloads: 3.6 GB (fp16 model 2.1 GB, dataset 0.7 GB, CLIP 0.6 GB, bitsandbytes), not timed. The scaling
# is probably pessimistic: the H100 ran this step at about 2 % of its fp16 peak, bound by per-kernel overhead
# that does not grow 15× on a T4. CPU smoke mode (`SMOKE=1`, tiny random model, nothing downloaded): 15–35 s,
# measured on 2 shared CPU cores at load 5–7, with the newest packages and with Colab's versions.
#
# This is the "Stable Diffusion" part of seed 004 (text-to-image with a latent diffusion model, with the optional
# PEFT: LoRA, QLoRA).

# %% SETUP

# %% [markdown]
# ## 1. Parameters
#
# Every knob is in the parameters cell below the imports, the full value beside the smaller one smoke mode
# (CI) uses. The LoRA settings are those of diffusers' `train_text_to_image_lora.py`; where this notebook
# departs from them, the comment says so.

# %%
# QLoRA (section 10) needs bitsandbytes, which Colab lacks and only a CUDA GPU can use. diffusers
# and peft look for it once, when imported: so it is installed here, before them, with a GPU only.
import importlib.util

import torch

if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is None:
    %pip install -q bitsandbytes

# %%
import dataclasses
import gc
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from helpers.environment import (describe_device, gpu_choices, in_colab, pick_device, run_dir,
                                 seed_everything, smoke_mode, use_drive_for_runs)
from helpers.plotting import (plot_losses, save_figure, show_grid, show_image_table,
                              show_over_iterations)
from helpers.clip import STAND_IN_CLIP_ID, clip_image_embeddings, clip_score, load_clip
from helpers.sd_lora import data as sd_data, evaluate as sd_eval, lora as sd_adapter
from helpers.sd_lora import memory as sd_memory, pipeline as sd_pipeline
from helpers.sd_lora.data import micro_batch
from helpers.sd_lora.lora import LORA_WEIGHT_FILE, LoraParameters
from helpers.sd_lora.train import MixedPrecision, lora_checkpoints, mixed_precision
from helpers.training import (History, TrainingRun, count_parameters, load_checkpoint,
                              peak_memory_mb, save_checkpoint, time_per_step, write_metrics)

diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

# %%
SMOKE = smoke_mode()                     # SMOKE=1 in the environment: tiny CI run, no downloads
NOTEBOOK = "06_stable_diffusion_lora"
RUN_DIR_ON_DRIVE = False                 # True in Colab: runs on Google Drive, so a re-run resumes
SEED = 0

# Model: a Stable Diffusion 1.x checkpoint on the Hub (its fp16 files, no safety checker: 2.1 GB) or
# a local folder with model_index.json. Smoke mode builds a tiny random one (SD_MODEL_ID overrides).
FULL_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MODEL_ID = os.environ.get("SD_MODEL_ID") or (sd_pipeline.TINY_MODEL_ID if SMOKE else FULL_MODEL_ID)
RESOLUTION = 32 if SMOKE else 512            # training and generation size in pixels (SD 1.5: 512)

# Inference: a prompt x seed grid, and the before/after comparison on the same prompts and seeds.
PROMPTS = ["a portrait of a man with glasses and a beard", "a girl with long blue hair, smiling",
           "a cat sitting on a wooden table"][: 2 if SMOKE else 3]
SEEDS = [0, 1]
INFERENCE_STEPS = 2 if SMOKE else 25         # DPM-Solver++ steps
GUIDANCE_SCALE = 7.5                         # classifier-free guidance weight s

# Data: a Hub dataset of (image, caption) rows, or your own folder (images + captions: section 4).
DATASET = "lambdalabs/naruto-blip-captions"
IMAGE_FOLDER = os.environ.get("SD_IMAGE_FOLDER")   # a folder path: train on your own images
SMOKE_IMAGES = 8                             # smoke: generated captioned images of mixed sizes
RANDOM_FLIP = True

# LoRA and its training (diffusers' train_text_to_image_lora.py defaults, except min-SNR: on here)
RANK = 4
LORA_ALPHA = 4                               # the update is scaled by LORA_ALPHA / RANK
LEARNING_RATE = 1e-2 if SMOKE else 1e-4     # smoke: large, so 4 steps change the model visibly
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 1e-2
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
SNR_GAMMA = 5.0                          # min-SNR weighting; None = plain MSE (the script's)
BATCH_SIZE = 1 if SMOKE else 2               # images per micro-batch (per GPU)
GRAD_ACCUM = 2                               # micro-batches per optimizer step
TRAIN_STEPS = 4 if SMOKE else 300        # optimizer steps: 26-38 min on a T4 (derived: see the top)
TIME_LIMIT_MIN = math.inf if SMOKE else 40  # training stops here, checkpointed; re-run to go on
CHECKPOINT_EVERY = 2 if SMOKE else 25        # steps between checkpoints
KEEP_CHECKPOINTS = 2                     # only the newest are kept (the resume check needs 2)
SAMPLE_EVERY = 2 if SMOKE else 50            # steps between sample snapshots
GRADIENT_CHECKPOINTING = None            # None: on only if free GPU memory needs it; or True/False

# Adapters, metrics, QLoRA
LORA_SCALES = [0.0, 0.5, 1.0] if SMOKE else [0.0, 0.25, 0.5, 0.75, 1.0]
CLIP_MODEL_ID = STAND_IN_CLIP_ID if SMOKE else "openai/clip-vit-base-patch16"
CLIP_CAPTIONS = 2 if SMOKE else 8            # training captions scored before/after
QLORA_STEPS = 2 if SMOKE else 10         # timed 4-bit UNet training steps (after 2 warm-up steps)

use_drive_for_runs(RUN_DIR_ON_DRIVE)         # mounts Drive and sets $RUN_DIR there (Colab only)
RUN_DIR = run_dir(NOTEBOOK)              # $RUN_DIR/<notebook>: checkpoints, adapter, figures
CHECKPOINT_DIR = RUN_DIR / "checkpoints"
ADAPTER_DIR = RUN_DIR / "lora-adapter"

# %%
# Device, precision and the accelerate launcher (one GPU here; `accelerate launch` for several).
DEVICE = pick_device()
CHOICES = gpu_choices(DEVICE)              # fp16 on a T4, bf16 on A100/H100, fp32 on a CPU
MIXED_PRECISION = CHOICES.mixed_precision  # accelerate's name for it: "fp16", "bf16" or "no"
WEIGHT_DTYPE = CHOICES.amp_dtype or torch.float32  # the frozen weights; LoRA's stay fp32
accelerator = Accelerator(mixed_precision=MIXED_PRECISION, cpu=DEVICE.type == "cpu")
DEVICE = accelerator.device
PRECISION = mixed_precision(accelerator, CHOICES)  # autocast and loss scaler of the step
seed_everything(SEED)
STAND_INS = []
if MODEL_ID == sd_pipeline.TINY_MODEL_ID:
    STAND_INS.append(sd_pipeline.TINY_PIPELINE_NOTE)
    print("STAND-IN:", sd_pipeline.TINY_PIPELINE_NOTE)
print(f"mode: {'smoke' if SMOKE else 'full'} | device: {describe_device(DEVICE)} | frozen "
      f"weights in {WEIGHT_DTYPE} | run dir: {RUN_DIR}")
print(f"training step: {PRECISION.description}")

# %% [markdown]
# ## 2. Theory
#
# ### Latent diffusion (Rombach et al. 2022)
#
# ```
#  caption ──CLIP text encoder τ──► c (77 × 768)──────────────┐ cross-attention (K, V)
#                                                             ▼
#  image x ──VAE encoder E──► z₀ (4 × 64 × 64) ──+noise──► z_t ──UNet ε_θ(z_t, t, c)──► predicted noise
#                                                                                      │ scheduler (T → 0)
#  generated image ◄──VAE decoder D── z₀ ◄──────────────────────────────────────────────┘
# ```
#
# **VAE.** Stable Diffusion does not denoise pixels. A frozen autoencoder maps a 512 × 512 × 3 image to a latent
# $z_0 = s\,E(x)$ of shape 4 × 64 × 64 (8× smaller per side, $s = 0.18215$ rescales it to unit variance) and
# $D(z_0 / s)$ maps it back. Denoising 48× fewer values is what makes the model fast enough for one GPU.
#
# **Forward (noising) process.** With a variance schedule $\beta_1, \dots, \beta_T$ ($T = 1000$, "scaled linear"
# from 0.00085 to 0.012), $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t} \alpha_s$:
#
# $$z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1 - \bar\alpha_t}\, \varepsilon, \qquad \varepsilon \sim \mathcal N(0, I).$$
#
# **UNet denoiser and training loss.** A UNet $\varepsilon_\theta$ with ResNet blocks and transformer blocks
# predicts the noise from $z_t$, the timestep $t$ and the text; the loss is the noise-prediction MSE
#
# $$\mathcal L = \mathbb E_{z_0, c, \varepsilon, t}\, \big\| \varepsilon - \varepsilon_\theta(z_t, t, c) \big\|_2^2 .$$
#
# Optionally each item is weighted by min-SNR (Hang et al. 2023): with
# $\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)$, $w_t = \min(\mathrm{SNR}(t), \gamma) / \mathrm{SNR}(t)$,
# $\gamma = 5$, which down-weights the easy, almost noise-free timesteps and speeds up convergence.
#
# **Text conditioning.** The caption is tokenised (77 tokens) and encoded by a frozen CLIP text transformer
# $\tau$ into $c \in \mathbb R^{77 \times 768}$. In every transformer block of the UNet, cross-attention lets the
# image features $\varphi(z_t)$ query the text:
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\Big(\frac{Q K^\top}{\sqrt d}\Big) V, \quad
#   Q = W_Q\, \varphi(z_t),\; K = W_K\, c,\; V = W_V\, c,$$
#
# followed by the output projection $W_O$. These projections are `to_q`, `to_k`, `to_v` and `to_out.0` in diffusers
# (the same names in the self-attention layers, where $K, V$ come from $\varphi(z_t)$).
#
# **Classifier-free guidance.** The UNet is run with the caption and with the empty caption $\varnothing$; the two
# predictions are extrapolated with a guidance scale $s$ (7.5 here):
#
# $$\hat\varepsilon = \varepsilon_\theta(z_t, t, \varnothing)
#   + s\,\big(\varepsilon_\theta(z_t, t, c) - \varepsilon_\theta(z_t, t, \varnothing)\big).$$
#
# **Scheduler.** Sampling starts from $z_T \sim \mathcal N(0, I)$ and a scheduler turns each $\hat\varepsilon$ into
# the next, less noisy latent. Training uses the DDPM schedule with 1,000 steps; for sampling we use
# DPM-Solver++ (Lu et al. 2022), which gives good images in about 20–30 steps instead of 1,000.
#
# ### LoRA (Hu et al. 2021)
#
# Fine-tuning all 860 M UNet weights needs their gradients and two Adam moments: too much for a T4. LoRA freezes
# every pretrained matrix $W \in \mathbb R^{d \times k}$ and learns a low-rank update beside it:
#
# $$h = W x + \frac{\alpha}{r}\, B A\, x, \qquad A \in \mathbb R^{r \times k},\; B \in \mathbb R^{d \times r},
#   \; r \ll \min(d, k).$$
#
# $A$ starts Gaussian and $B$ at zero, so training starts exactly at the pretrained model. Each adapted matrix adds
# $r(d + k)$ parameters; at rank 4 on the four attention projections of the SD 1.5 UNet that is 797,184 parameters
# (0.09 %), 3.19 MB in fp32. At inference the update can be scaled, $W + \lambda \frac{\alpha}{r} BA$:
# $\lambda = 0$ is the base model, $\lambda = 1$ the trained one. The factor $\alpha / r$ is part of the model: an
# adapter file must carry $\alpha$, or a reload silently uses $\alpha = r$.
#
# ### QLoRA (Dettmers et al. 2023)
#
# QLoRA stores the frozen base weights in 4-bit **NormalFloat (NF4)** (bitsandbytes), dequantises them block by
# block to the compute dtype (fp16) inside each matrix product, and trains the LoRA matrices $A, B$ in higher
# precision (fp32 here); gradients flow through the dequantised frozen weights into $A$ and $B$ only:
#
# $$h = \mathrm{dequant}(W^{\mathrm{NF4}})\, x + \frac{\alpha}{r} B A x .$$
#
# bitsandbytes quantises `nn.Linear` layers only. In the SD 1.5 UNet that is 31 % of the weights (the rest are
# convolutions, checked in section 10), so the saving is much smaller than for a language model.

# %% [markdown]
# ## 3. Inference with a pretrained pipeline
#
# `StableDiffusionPipeline` bundles the VAE, the CLIP text encoder and tokenizer, the UNet and a scheduler. In
# full mode it loads the fp16 weight files (`variant="fp16"`, half the download) without the safety checker
# (`safety_checker=None`: 0.6 GB less; check your images yourself). In smoke mode the same pipeline class is built
# from tiny configs (the shapes diffusers' own tests use) and saved to a local folder, so the loading code is the
# one used for the real model.

# %%
MODEL = sd_pipeline.resolve_model_id(MODEL_ID, RUN_DIR)
pipe = sd_pipeline.load_pipeline(MODEL, dtype=WEIGHT_DTYPE, device=DEVICE)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
for part in (unet, vae, text_encoder):
    part.requires_grad_(False)
for name, part in {"UNet": unet, "VAE": vae, "CLIP text encoder": text_encoder}.items():
    print(f"{name:18s} {count_parameters(part):>13,} parameters")

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

# %%
def images_of(pipeline: Any, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
    """Images in [0, 1] for every prompt x seed, with this notebook's steps, guidance and size."""
    return sd_eval.pipeline_images(pipeline, prompts, seeds, INFERENCE_STEPS, GUIDANCE_SCALE,
                                   RESOLUTION)


start = time.perf_counter()
base_images = images_of(pipe, PROMPTS, SEEDS)
print(f"{len(base_images)} images in {time.perf_counter() - start:.1f} s")
assert base_images.shape == (len(PROMPTS) * len(SEEDS), 3, RESOLUTION, RESOLUTION)
show_image_table(base_images, PROMPTS, SEEDS, f"Base model: prompt x seed ({INFERENCE_STEPS} "
                 f"steps, guidance {GUIDANCE_SCALE})", RUN_DIR / "base_prompt_seed_grid.png")

# %% [markdown]
# ## 4. Data: a small captioned image set
#
# Full mode downloads `lambdalabs/naruto-blip-captions` (1,221 Naruto-style images with BLIP captions, 0.7 GB).
# To train on your own images, set `IMAGE_FOLDER` (or the `SD_IMAGE_FOLDER` environment variable) to a folder
# holding the images and, for each, a caption: `cat.png` + `cat.txt`, or a `metadata.jsonl` with lines
# `{"file_name": "cat.png", "text": "a cat on a sofa"}`. Images of any size are resized (shorter side to
# `RESOLUTION`) and centre-cropped; images without captions are refused with a message naming them. Smoke mode
# writes eight small captioned images of coloured shapes, of four different sizes.

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
show_grid(torch.stack([item["pixel_values"] for item in preview]), f"Training images, resized and "
          f"cropped to {RESOLUTION} px (first {len(preview)})", RUN_DIR / "training_images.png",
          nrow=4)

# %%
# Bad input gets a message that names it and says what to do: an uncaptioned image, a missing model.
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
# ## 5. The LoRA adapter
#
# `unet.add_adapter(LoraConfig(...))` (diffusers' peft integration) wraps each `to_q`, `to_k`, `to_v`,
# `to_out.0` linear layer with the two small matrices $A$ (`lora_A`, Gaussian) and $B$ (`lora_B`, zeros).
# Everything else stays frozen; the frozen weights stay in fp16 on a GPU while the LoRA weights are cast to fp32
# (`cast_training_params`), because fp16 weights lose Adam's small updates. The cell below is the code the
# notebook runs: change the targets (e.g. add `"proj_in", "proj_out"`) and re-run to adapt more layers.

# %% [helpers] sd_lora/lora: LORA_TARGET_MODULES, lora_config, add_lora

# %%
unet_params_before = count_parameters(unet)
fingerprints_before = sd_adapter.parameter_fingerprints(unet)
unet = add_lora(unet, RANK, LORA_ALPHA)
trainable, total = count_parameters(unet, trainable_only=True), count_parameters(unet)
expected_lora, _ = sd_adapter.lora_parameter_count(unet.config, RANK, LORA_TARGET_MODULES)
assert trainable == expected_lora and total == unet_params_before + trainable
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
# The same count for the real SD 1.5 UNet, built from its config on PyTorch's `meta` device (shapes without
# weights, no download), and how the adapter grows with the rank: linearly, $r(d + k)$ per adapted matrix.

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
save_figure(fig, RUN_DIR / "sd15_lora_size_vs_rank.png")
plt.show()

# %% [markdown]
# ## 6. The loss and the training step
#
# One training example: encode the image to $z_0$ with the frozen VAE and the caption to $c$ with the frozen text
# encoder, draw $\varepsilon$ and $t$, noise $z_0$ to $z_t$ (`noise_scheduler.add_noise`), and compare the UNet's
# prediction with $\varepsilon$ (for a v-prediction model the target is
# $v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\, z_0$):
#
# $$\mathcal L = \frac1B \sum_i w_i \,\big\| \varepsilon_i - \varepsilon_\theta(z_{t_i}, t_i, c_i) \big\|^2_{\text{mean}},
#   \qquad w_i = \frac{\min(\mathrm{SNR}(t_i), \gamma)}{\mathrm{SNR}(t_i)} \;\text{(min-SNR, } \gamma = 5\text{)}.$$
#
# Departure from diffusers' script: its default is plain MSE (`snr_gamma=None`); we switch min-SNR on with the
# recommended $\gamma = 5$ (set `SNR_GAMMA = None` for the plain loss). The loss as a formula:

# %% [helpers] sd_lora/losses: diffusion_snr, noise_prediction_loss

# %% [markdown]
# and around it, the frozen encoders and the noising of one batch:

# %% [helpers] sd_lora/train: encode_batch, unet_diffusion_loss

# %% [markdown]
# **The training step.** A micro-batch of `BATCH_SIZE` images is what fits the GPU at once; `GRAD_ACCUM`
# micro-batches make one optimizer step of `BATCH_SIZE × GRAD_ACCUM` images: each loss is divided by their number
# and back-propagated, the gradients add up, then AdamW steps once. On a GPU the forward pass runs under
# fp16/bf16 autocast (`PRECISION.autocast`). In fp16, small gradients round to zero ("underflow"). So the loss
# is first multiplied by a large scale, and the gradients are divided by it again before the step: this is the
# GradScaler. `accelerate` does both on a GPU. It turns fp16 off on a CPU, so there (`EMULATE_T4=1`) the step
# builds its own. The gradient norm is clipped at `MAX_GRAD_NORM`.

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
# ## 7. Training
#
# ### Gradient checkpointing only where memory needs it
#
# Gradient checkpointing recomputes activations in the backward pass instead of storing them: less memory, more
# time. On an H100 the SD 1.5-sized UNet step (512 px, batch 2 × 2, fp16) ran at 1.54 steps/s and 2.26 GB with
# it, 3.29 steps/s and 3.96 GB without (experiments/RESULTS.md, section 06): it halves the speed to save 1.7 GB.
# A T4 has 15 GB, so it is switched on only when the free GPU memory is smaller than the step's need without it,
# scaled from that measurement to this batch and resolution. The free memory is read with
# `torch.cuda.mem_get_info` after `torch.cuda.empty_cache()`: PyTorch keeps freed memory in a cache, and the GPU
# counts it as used.

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
# ### The loop
#
# The loop logs every step's loss to TensorBoard, keeps a sample of `PROMPTS[0]` every `SAMPLE_EVERY` steps and
# writes a checkpoint every `CHECKPOINT_EVERY` steps: the LoRA weights only (a 3 MB view of the trainable
# parameters, not the 1.7 GB UNet), AdamW, the random generators, the loss history, the stopwatch, the snapshots
# and, under fp16, the loss scaler; only the newest `KEEP_CHECKPOINTS` are kept. **Re-running the training cell
# resumes** from the newest checkpoint (Colab disconnects; set `RUN_DIR_ON_DRIVE = True` to survive a runtime
# reset). The same loop runs on several GPUs when exported to a script and started with `accelerate launch`:
# `prepare` then wraps the UNet in DistributedDataParallel and each process takes its own slice of the batch.

# %% [helpers] sd_lora/train: LoraPlan

# %% [helpers] sd_lora/train: training_state

# %% [helpers] sd_lora/train: step_batches

# %% [helpers] sd_lora/train: train_lora

# %%
if in_colab():
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


run = TrainingRun(History(RUN_DIR / "tensorboard"))
if DEVICE.type == "cuda":
    torch.cuda.reset_peak_memory_stats(DEVICE)
reached = train_lora(unet, optimizer, dataset, pipe, noise_scheduler, accelerator, PRECISION, run,
                     plan, snapshot)
LORA_PEAK_MB = peak_memory_mb(DEVICE)
steps_per_s = run.stopwatch.throughput()["it_per_s"]
print(f"step {reached} of {TRAIN_STEPS}: {run.stopwatch.iterations} steps in "
      f"{run.stopwatch.seconds:.1f} s = {steps_per_s:.2f} steps/s; peak memory "
      f"{LORA_PEAK_MB:,.0f} MiB ({'CUDA allocator' if DEVICE.type == 'cuda' else 'process RSS'})")
if reached < TRAIN_STEPS:
    print(f"stopped at TIME_LIMIT_MIN = {TIME_LIMIT_MIN} min; re-run this cell to continue")

# %%
plot_losses(run.history, ["loss"], f"LoRA training loss (rank {RANK}, "
            f"{'min-SNR' if SNR_GAMMA else 'plain'} MSE)", RUN_DIR / "loss_curve.png",
            xlabel="optimizer step", ylabel="noise-prediction loss", smooth=1 if SMOKE else 20)
show_over_iterations({k: v.float() / 127.5 - 1 for k, v in run.snapshots.items()},
                     f"'{PROMPTS[0]}', seed {SEEDS[0]}, during training",
                     RUN_DIR / "samples_over_training.png", nrow=1)

# %% [markdown]
# ### Checks: only the LoRA weights changed, and a resumed run continues where it stopped
#
# The fingerprints (SHA-1 of each tensor's bytes) taken before `add_adapter` must be unchanged for every frozen
# weight, and every LoRA $B$ must have moved.

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
# Then a disconnect, simulated through the real resume path: the previous checkpoint is copied into an empty
# folder and `train_lora` resumes from it (weights, AdamW, random generators) up to the same step. Its update
# since that checkpoint must equal the uninterrupted run's: bit for bit on a CPU; on a GPU, where reductions are
# not deterministic, within 10 % of the update's norm (a run that restored nothing would draw other noise and
# timesteps, and differ by about as much as the update itself).

# %%
saved = lora_checkpoints(CHECKPOINT_DIR)
assert len(saved) >= 2, f"the resume check needs 2 checkpoints: train over {CHECKPOINT_EVERY} steps"
previous, final_checkpoint = saved[-2:]
final_lora = sd_adapter.lora_weights(unet)
check_dir = RUN_DIR / "resume-check"
shutil.rmtree(check_dir, ignore_errors=True)
check_dir.mkdir()
shutil.copy(previous, check_dir / previous.name)
check_plan = dataclasses.replace(plan, folder=check_dir, steps=reached, time_limit_s=math.inf)
train_lora(unet, optimizer, dataset, pipe, noise_scheduler, accelerator, PRECISION,
           TrainingRun(History()), check_plan, lambda: torch.zeros(0, dtype=torch.uint8))
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
# ## 8. Adapters: save, reload into a fresh pipeline, compare
#
# Only the LoRA weights are saved: peft's state dict → diffusers' key names → `save_lora_weights` writes
# `pytorch_lora_weights.safetensors`, with the adapter's config (rank, **alpha**, targets) as metadata. Without
# the metadata a reload assumes $\alpha = r$, which is wrong whenever `LORA_ALPHA != RANK`. Loading names the file
# (`weight_name`), so it also works offline. A fresh pipeline plus `load_lora` must reproduce the trained model;
# `set_adapters(..., adapter_weights=[λ])` scales the update ($\lambda = 0$ is the base model).
#
# Here `LORA_ALPHA = RANK`, so the scale $\alpha / r$ is 1, and a reload that ignored $\alpha$ would still look
# right. So the same update is also saved a second way: with $\alpha / 2$ and every $B$ doubled. The product
# $\frac{\alpha/2}{r}\,(2B)\,A$ is unchanged. Only a reload that reads $\alpha / 2$ from the file gives the
# trained model; one that took $\alpha = r$ would double the adapter's effect.

# %% [helpers] sd_lora/lora: save_lora, load_lora

# %%
adapter_file = save_lora(accelerator.unwrap_model(unet), ADAPTER_DIR)
ADAPTER_BYTES = adapter_file.stat().st_size
header_bytes, data_bytes = sd_adapter.safetensors_layout(adapter_file)
print(f"saved {adapter_file.name}: {ADAPTER_BYTES / 1e6:.3f} MB = {header_bytes:,} bytes of "
      f"header and metadata + {data_bytes:,} bytes of weights; the UNet is "
      f"{unet_params_before * 2 / 1e6:,.1f} MB in fp16")
assert data_bytes == trainable * 4, "the file must hold exactly the LoRA weights, in fp32"

HALF_ALPHA_DIR = RUN_DIR / "lora-adapter-half-alpha"
save_lora(accelerator.unwrap_model(unet), HALF_ALPHA_DIR, alpha=LORA_ALPHA / 2)  # 2B, alpha / 2

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
load_lora(fresh, HALF_ALPHA_DIR, "half-alpha")
assert fresh.unet.peft_config["half-alpha"].lora_alpha == LORA_ALPHA / 2

# %% [markdown]
# The claims, checked on the fixed UNet input of section 3: the trained adapter changes the prediction; both
# reloaded adapters reproduce the trained model's prediction, and at scale 0 the base model's. In fp32 they must
# be exact. In fp16 each number is rounded, so they must agree within 5 % of the adapter's effect plus 4 fp16
# rounding steps of the prediction's size.

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
fresh.delete_adapters("half-alpha")

# %%
fresh.set_adapters(["trained"], adapter_weights=[1.0])
after_images = images_of(fresh, PROMPTS, SEEDS)
pairs = torch.stack([base_images.view(len(PROMPTS), len(SEEDS), *base_images.shape[1:]),
                     after_images.view(len(PROMPTS), len(SEEDS), *after_images.shape[1:])], dim=2)
columns = [f"{s} {tag}" for s in SEEDS for tag in ("before", "after")]
show_image_table(pairs.flatten(0, 2), PROMPTS, columns,
                 "Before (base) and after (LoRA) with the same seeds", RUN_DIR / "before_after.png")

sweep = []
for scale in LORA_SCALES:
    if scale in (0.0, 1.0):  # generated above: the base model (λ = 0, checked) and the adapter
        sweep.append((base_images if scale == 0.0 else after_images)[:1])
        continue
    fresh.set_adapters(["trained"], adapter_weights=[scale])
    sweep.append(images_of(fresh, PROMPTS[:1], SEEDS[:1]))
show_image_table(torch.cat(sweep), PROMPTS[:1], LORA_SCALES, f"LoRA scale sweep (seed {SEEDS[0]})",
                 RUN_DIR / "lora_scale_sweep.png", xlabel="LoRA scale λ")

# %% [markdown]
# ## 9. CLIP score before and after, on training captions
#
# The CLIP score (Hessel et al. 2021, as torchmetrics computes it) is
# $\max\big(100 \cdot \overline{\cos}(E_I(x), E_T(y)),\, 0\big)$: the mean cosine similarity of the
# image/caption pairs, times 100, with OpenAI's CLIP ViT-B/16. Each image is prepared as CLIP was trained: its
# shorter side is resized to 224 px (bicubic, antialiased), the centre is cropped, the colours are normalised. We generate one image per training caption with
# the base model ($\lambda = 0$) and with the adapter ($\lambda = 1$), same seed. Two claims are checked in full
# mode: the adapted model still follows the text (its images score higher with their own captions than with
# another image's caption), and it has learnt the training images' look (its images are closer to the training
# images in CLIP's image space than the base model's). The score itself may go either way: the captions describe
# the content, not the style. In smoke mode the CLIP model is a tiny random stand-in: its numbers mean nothing
# and nothing is asserted about them.

# %%
captions = dataset.captions[:CLIP_CAPTIONS]
fresh.set_adapters(["trained"], adapter_weights=[0.0])
clip_before_images = images_of(fresh, captions, SEEDS[:1])
fresh.set_adapters(["trained"], adapter_weights=[1.0])
clip_after_images = images_of(fresh, captions, SEEDS[:1])
clip_model, clip_tokenizer = load_clip(CLIP_MODEL_ID, RUN_DIR, DEVICE)
CLIP_STAND_IN = CLIP_MODEL_ID == STAND_IN_CLIP_ID
if CLIP_STAND_IN:
    STAND_INS.append("tiny random CLIP model for the CLIP score (not meaningful)")
    print("STAND-IN:", STAND_INS[-1])
shuffled = captions[1:] + captions[:1]
CLIP_BEFORE = clip_score(clip_model, clip_tokenizer, clip_before_images, captions)
CLIP_AFTER = clip_score(clip_model, clip_tokenizer, clip_after_images, captions)
CLIP_AFTER_SHUFFLED = clip_score(clip_model, clip_tokenizer, clip_after_images, shuffled)
training_images = torch.stack([dataset[i]["pixel_values"] for i in range(len(captions))]) / 2 + 0.5
reference = clip_image_embeddings(clip_model, training_images).mean(0)
STYLE_BEFORE, STYLE_AFTER = (
    F.cosine_similarity(clip_image_embeddings(clip_model, x), reference[None]).mean().item()
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
# ## 10. QLoRA: the UNet in 4-bit NF4
#
# The UNet is loaded again with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
# bnb_4bit_compute_dtype=fp16)`, a LoRA adapter of the same rank goes on top, and `QLORA_STEPS` training steps
# (after 2 warm-up steps, with the same batches, VAE and text encoder; the fp16 UNet is moved to the CPU first)
# measure its speed and peak memory beside LoRA's. bitsandbytes needs a CUDA GPU; elsewhere this section says
# why it is skipped. With `EMULATE_T4=1` on a CPU it runs the same steps on the UNet in fp16, not quantised.
# First, how much of the UNet it can quantise at all: only `nn.Linear` weights.

# %%
with torch.device("meta"):
    sd15_unet = UNet2DConditionModel.from_config(sd_pipeline.SD15_UNET_CONFIG)
linear = sum(m.weight.numel() for m in sd15_unet.modules() if isinstance(m, nn.Linear))
LINEAR_SHARE = linear / sum(p.numel() for p in sd15_unet.parameters())
print(f"SD 1.5 UNet: {linear:,} of its weights are in nn.Linear layers "
      f"({100 * LINEAR_SHARE:.1f} %); the rest (convolutions, norms) stay in fp16 under QLoRA")
assert round(100 * LINEAR_SHARE) == 31, "the theory section quotes 31 %"

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
    q_timing = time_per_step(lambda: lora_training_step(
        q_unet, q_optimizer, step_batches(pipe, dataset, 0, plan, accelerator), noise_scheduler,
        accelerator, PRECISION, SNR_GAMMA, MAX_GRAD_NORM), DEVICE, iterations=QLORA_STEPS, warmup=2)
    q_weights_mb = sum(p.numel() * p.element_size() for p in q_unet.parameters()) / 2**20
    qlora_metrics = {**qlora_metrics, "steps_per_s": q_timing["it_per_s"],
                     "peak_memory_mb": q_timing["peak_memory_mb"], "quantized": QUANTIZED,
                     "gradient_checkpointing": q_checkpointing, "steps": QLORA_STEPS,
                     "unet_weights_mb": q_weights_mb,
                     "trainable_parameters": count_parameters(q_unet, trainable_only=True)}
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
# ## 11. Results
#
# This run's numbers beside H100 measurements (SD 1.5-sized UNet with random weights, 512 px, rank 4, fp16,
# batch 2 × 2, UNet step only; experiments/RESULTS.md, section 06):
#
# | H100 | steps/s | peak GPU memory |
# |---|---|---|
# | LoRA, gradient checkpointing | 1.54 | 2.26 GB |
# | LoRA | 3.29 | 3.96 GB |
# | QLoRA (NF4), gradient checkpointing | 1.22 | 2.01 GB |
# | QLoRA (NF4) | not measured | 4.17 GB |
#
# **When QLoRA saves memory, and when it does not.** It shrinks the frozen UNet weights (1.25 GB in 4-bit against
# 1.64 GB in fp16 there: only the 31 % in `nn.Linear` layers are quantised) but not the activations, which
# dominate a training step at 512 px. With gradient checkpointing it used 0.25 GB less than LoRA (2.01 vs
# 2.26 GB) at 79 % of the speed; without checkpointing it used *more* (4.17 vs 3.96 GB). On a 15 GB T4, SD 1.5
# LoRA fits without either, so plain LoRA is the faster choice. QLoRA pays off when the frozen weights are most of
# the memory: larger models (SDXL's 2.6 B-parameter UNet, language models) or smaller GPUs.

# %%
rows = [
    ("trainable LoRA parameters", f"{trainable:,} ({TRAINABLE_PERCENT:.3f} % of the UNet)"),
    ("adapter file", f"{ADAPTER_BYTES / 1e6:.3f} MB"),
    ("LoRA training", f"{steps_per_s:.2f} steps/s ({BATCH_SIZE * GRAD_ACCUM} images/step, gradient "
                      f"checkpointing {'on' if USE_CHECKPOINTING else 'off'}), {reached} steps"),
    ("peak memory, LoRA", f"{LORA_PEAK_MB:,.0f} MiB"),
    ("QLoRA training", "skipped (no CUDA GPU or bitsandbytes)" if not QLORA_RUNS else
     f"{qlora_metrics['steps_per_s']:.2f} steps/s"
     + (f", peak {qlora_metrics['peak_memory_mb']:,.0f} MiB" if CHOICES.cuda else "")
     + ("" if QUANTIZED else " (fp16 UNet, not quantised)")),
    ("CLIP score before / after",
     f"{CLIP_BEFORE:.2f} / {CLIP_AFTER:.2f}" + (" (stand-in)" if CLIP_STAND_IN else "")),
    (f"SD 1.5 at rank {RANK} (from its config)",
     f"{sd15_lora:,} parameters, {sd15_lora * 4 / 1e6:.2f} MB fp32"),
]
for label, value in rows:
    print(f"{label:38s} {value}")

# %%
quality = {"clip_score_before": CLIP_BEFORE, "clip_score_after": CLIP_AFTER,
           "clip_score_after_shuffled_captions": CLIP_AFTER_SHUFFLED,
           "clip_image_cosine_to_training_before": STYLE_BEFORE,
           "clip_image_cosine_to_training_after": STYLE_AFTER, "clip_model": CLIP_MODEL_ID,
           "clip_captions": len(captions), "adapter_effect_max": lora_effect,
           "reload_gap_max": reload_gap}
path = write_metrics(
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
# * LoRA trains 0.09 % of the SD 1.5 UNet (rank 4 on the attention projections) and leaves every other weight
#   untouched: the adapter is a 3.2 MB file that you can load into any copy of the base model, scale with λ and
#   switch off again.
# * An adapter is its weights **and** its $\alpha / r$: save the config with it (diffusers' metadata), or a
#   reload silently scales the update differently.
# * The training step is the noise-prediction loss of section 6 with gradient accumulation; everything a resume
#   needs fits in a checkpoint of about 15 MB (LoRA weights 3.2 MB, AdamW's two moments 6.4 MB, random
#   generators, history, sample snapshots), not the 1.7 GB UNet.
# * Gradient checkpointing and 4-bit weights trade speed for memory: turn them on when memory is short, not by
#   default. On a T4, SD 1.5 LoRA at 512 px needs neither (by the memory estimate of section 7).

# %% [markdown]
# ## What to try next
# * Train on your own images: set `IMAGE_FOLDER` to a folder of 20–100 captioned images of one style or subject.
# * Raise `RANK` (8, 16) or `LORA_ALPHA`, or add `"proj_in", "proj_out"` to `LORA_TARGET_MODULES` in section 5,
#   and compare the before/after grids and the adapter size.
# * Turn min-SNR off (`SNR_GAMMA = None`) and compare the loss curves and samples at the same step.
# * Load two adapters into one pipeline (`load_lora` twice, then `set_adapters([...], adapter_weights=[...])`)
#   and blend them.
# * `accelerate launch` the loop on several GPUs: export the cells to a script and keep `prepare`.
