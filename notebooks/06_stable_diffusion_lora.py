# %% [markdown]
# # 06 · Stable Diffusion + LoRA / QLoRA: fine-tune a text-to-image model on your own captioned images
#
# {{BADGE}}
#
# What you get: a Stable Diffusion 1.5 pipeline generating a prompt × seed grid; a **LoRA** adapter (rank 4 on the
# UNet's attention projections, about 0.09 % of its weights) trained with `peft` + `accelerate` on a captioned image
# set (the Naruto BLIP captions, or your own folder); the same with the UNet in **4-bit (QLoRA)** when a CUDA GPU is
# present; the adapter saved on its own (a 3 MB `safetensors` file), reloaded into a fresh pipeline, a before/after
# grid with the same seeds, a LoRA-scale sweep, and the CLIP score before and after.
#
# Expected run time: Colab T4, full mode: about 45–60 min (download 5 GB, 1,000 LoRA steps, QLoRA measurement;
# an estimate, not measured on a T4 here). CPU smoke mode (`SMOKE=1`, tiny random model, nothing downloaded): about
# a minute.
#
# This is the "Stable Diffusion" part of seed 004 (text-to-image with a latent diffusion model, with the optional
# PEFT: LoRA, QLoRA).

# %% SETUP

# %%
import gc
import logging
import os
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from helpers import sd_lora
from helpers.environment import in_colab, pick_device, run_dir, seed_everything, smoke_mode
from helpers.losses import diffusion_snr, noise_prediction_loss
from helpers.plotting import plot_losses, save_figure, show_grid, show_image_table, show_over_iterations, show_source
from helpers.metrics import clip_score
from helpers.training import (History, Stopwatch, count_parameters, load_checkpoint, peak_memory_mb,
                              save_checkpoint, write_metrics)

diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)

# %%
# Parameters: every knob in one place; smoke values (CI, CPU, offline) beside the full ones.
SMOKE = smoke_mode()
NOTEBOOK = "06_stable_diffusion_lora"
SEED = 0

# Model: a Stable Diffusion 1.x checkpoint on the Hub (fp16 fits a T4), or a local folder with model_index.json.
# Smoke mode builds a tiny random pipeline from configs instead (an offline stand-in; SD_MODEL_ID overrides both).
FULL_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MODEL_ID = os.environ.get("SD_MODEL_ID") or (sd_lora.TINY_MODEL_ID if SMOKE else FULL_MODEL_ID)
RESOLUTION = 32 if SMOKE else 512            # training and generation size in pixels (SD 1.5: 512)

# Inference: a prompt x seed grid, and the before/after comparison on the same prompts and seeds.
PROMPTS = ["a portrait of a man with glasses and a beard", "a girl with long blue hair, smiling",
           "a cat sitting on a wooden table"][: 2 if SMOKE else 3]
SEEDS = [0, 1] if SMOKE else [0, 1, 2]
INFERENCE_STEPS = 2 if SMOKE else 30         # DPM-Solver++ steps
GUIDANCE_SCALE = 7.5                         # classifier-free guidance weight s

# Data: a Hub dataset of (image, caption) rows, or your own folder (images + same-name .txt captions or metadata.jsonl).
DATASET = "lambdalabs/naruto-blip-captions"
IMAGE_FOLDER = os.environ.get("SD_IMAGE_FOLDER")   # set to a folder path to train on your own images
SMOKE_IMAGES = 8                             # smoke: generated captioned images of mixed sizes
RANDOM_FLIP = True

# LoRA (diffusers' train_text_to_image_lora.py defaults)
RANK = 4
LORA_ALPHA = 4
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LEARNING_RATE = 1e-4
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 1e-2
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
SNR_GAMMA = 5.0                              # min-SNR weighting; None = plain MSE (the script's default)
BATCH_SIZE = 1 if SMOKE else 2               # images per micro-batch (per GPU)
GRAD_ACCUM = 2                               # micro-batches per optimizer step
TRAIN_STEPS = 4 if SMOKE else 1000           # optimizer steps
CHECKPOINT_EVERY = 2 if SMOKE else 100       # steps between checkpoints (the last two are kept)
SAMPLE_EVERY = 2 if SMOKE else 250           # steps between sample snapshots
GRADIENT_CHECKPOINTING = True

# Adapters, metrics, QLoRA
LORA_SCALES = [0.0, 0.5, 1.0] if SMOKE else [0.0, 0.25, 0.5, 0.75, 1.0]
CLIP_MODEL_ID = sd_lora.TINY_MODEL_ID if SMOKE else "openai/clip-vit-base-patch16"
CLIP_CAPTIONS = 2 if SMOKE else 8            # training captions scored before/after
QLORA_STEPS = 2 if SMOKE else 50             # 4-bit UNet training steps, for speed and memory only

RUN_DIR = run_dir(NOTEBOOK)
CHECKPOINT_DIR = RUN_DIR / "checkpoints"
ADAPTER_DIR = RUN_DIR / "lora-adapter"

# %%
# Device, precision and the accelerate launcher (one GPU in a notebook; `accelerate launch` for several).
DEVICE = pick_device()
MIXED_PRECISION = sd_lora.mixed_precision_for(DEVICE)      # fp16 on a T4, bf16 on A100/H100, none on CPU
WEIGHT_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[MIXED_PRECISION]
accelerator = Accelerator(mixed_precision=MIXED_PRECISION, cpu=DEVICE.type == "cpu")
DEVICE = accelerator.device
seed_everything(SEED)
STAND_INS = []
if MODEL_ID == sd_lora.TINY_MODEL_ID:
    STAND_INS.append(sd_lora.STAND_IN_NOTE)
    print("STAND-IN:", sd_lora.STAND_IN_NOTE)
print(f"device {DEVICE}, mixed precision {MIXED_PRECISION}, frozen weights in {WEIGHT_DTYPE}, run dir {RUN_DIR}")

# %% [markdown]
# ## 1. Theory
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
# Optionally each item is weighted by min-SNR (Hang et al. 2023): with $\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)$,
# $w_t = \min(\mathrm{SNR}(t), \gamma) / \mathrm{SNR}(t)$, $\gamma = 5$, which down-weights the easy, almost
# noise-free timesteps and speeds up convergence.
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
# $$\hat\varepsilon = \varepsilon_\theta(z_t, t, \varnothing) + s\,\big(\varepsilon_\theta(z_t, t, c) - \varepsilon_\theta(z_t, t, \varnothing)\big).$$
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
# $$h = W x + \frac{\alpha}{r}\, B A\, x, \qquad A \in \mathbb R^{r \times k},\; B \in \mathbb R^{d \times r},\; r \ll \min(d, k).$$
#
# $A$ starts Gaussian and $B$ at zero, so training starts exactly at the pretrained model. Each adapted matrix adds
# $r(d + k)$ parameters; at rank 4 on the four attention projections of the SD 1.5 UNet that is 797,184 parameters
# (0.09 %), 3.19 MB in fp32. At inference the update can be scaled, $W + \lambda \frac{\alpha}{r} BA$: $\lambda = 0$
# is the base model, $\lambda = 1$ the trained one.
#
# ### QLoRA (Dettmers et al. 2023)
#
# QLoRA stores the frozen base weights in 4-bit **NormalFloat (NF4)** (bitsandbytes), dequantises them block by
# block to the compute dtype (fp16) inside each matrix product, and trains the LoRA matrices $A, B$ in higher
# precision (fp32 here); gradients flow through the dequantised frozen weights into $A$ and $B$ only:
#
# $$h = \mathrm{dequant}(W^{\mathrm{NF4}})\, x + \frac{\alpha}{r} B A x .$$
#
# bitsandbytes quantises `nn.Linear` layers only. In the SD 1.5 UNet that is about 31 % of the weights (the rest
# are convolutions), so the saving is much smaller than for a language model; section 6 measures it.

# %% [markdown]
# ## 2. Inference with a pretrained pipeline
#
# `StableDiffusionPipeline` bundles the VAE, the CLIP text encoder and tokenizer, the UNet and a scheduler. In
# smoke mode the same pipeline class is built from tiny configs (the shapes diffusers' own tests use) and saved to
# a local folder, so the loading code is the one used for the real model.

# %%
MODEL = sd_lora.resolve_model_id(MODEL_ID, RUN_DIR)
pipe = sd_lora.load_pipeline(MODEL, dtype=WEIGHT_DTYPE, device=DEVICE)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
vae.requires_grad_(False)
text_encoder.requires_grad_(False)
unet.requires_grad_(False)
for name, part in {"UNet": unet, "VAE": vae, "CLIP text encoder": text_encoder}.items():
    print(f"{name:18s} {count_parameters(part):>13,} parameters")

LATENT_SCALE = 2 ** (len(vae.config.block_out_channels) - 1)
with torch.no_grad():
    probe = torch.zeros(1, 3, RESOLUTION, RESOLUTION, device=DEVICE, dtype=WEIGHT_DTYPE)
    latent = vae.encode(probe).latent_dist.mean
    tokens = tokenizer(PROMPTS[:1], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids.to(DEVICE)
    text_states = text_encoder(tokens)[0]
    noise_pred = unet(latent, torch.tensor([10], device=DEVICE), text_states, return_dict=False)[0]
assert latent.shape == (1, unet.config.in_channels, RESOLUTION // LATENT_SCALE, RESOLUTION // LATENT_SCALE), latent.shape
assert text_states.shape == (1, tokenizer.model_max_length, unet.config.cross_attention_dim), text_states.shape
assert noise_pred.shape == latent.shape
print(f"image {RESOLUTION}x{RESOLUTION} -> latent {tuple(latent.shape[1:])}, caption -> text states "
      f"{tuple(text_states.shape[1:])}, UNet output {tuple(noise_pred.shape[1:])}")

# %%
start = time.perf_counter()
base_images = sd_lora.generate(pipe, PROMPTS, SEEDS, INFERENCE_STEPS, GUIDANCE_SCALE, RESOLUTION)
print(f"{len(base_images)} images in {time.perf_counter() - start:.1f} s")
assert base_images.shape == (len(PROMPTS) * len(SEEDS), 3, RESOLUTION, RESOLUTION)
show_image_table(base_images, PROMPTS, SEEDS, f"Base model: prompt x seed ({INFERENCE_STEPS} steps, "
                         f"guidance {GUIDANCE_SCALE})", RUN_DIR / "base_prompt_seed_grid.png")

# %% [markdown]
# ## 3. Data: a small captioned image set
#
# Full mode downloads `lambdalabs/naruto-blip-captions` (1,221 Naruto-style images with BLIP captions). To train on
# your own images, set `IMAGE_FOLDER` (or the `SD_IMAGE_FOLDER` environment variable) to a folder holding the images
# and, for each, a caption: `cat.png` + `cat.txt`, or a `metadata.jsonl` with lines
# `{"file_name": "cat.png", "text": "a cat on a sofa"}`. Images of any size are resized (shorter side to
# `RESOLUTION`) and centre-cropped; images without captions are refused with a message naming them. Smoke mode
# writes eight small captioned images of coloured shapes, of four different sizes.

# %%
if SMOKE and IMAGE_FOLDER is None:
    IMAGE_FOLDER = sd_lora.make_shape_images(RUN_DIR / "shapes", SMOKE_IMAGES, seed=SEED)
    STAND_INS.append(f"{SMOKE_IMAGES} generated images of coloured shapes instead of {DATASET}")
if IMAGE_FOLDER is not None:
    dataset = sd_lora.CaptionedImages.from_folder(IMAGE_FOLDER, RESOLUTION, RANDOM_FLIP)
    raw_sizes = sorted({sd_lora.image_size(p) for p in dataset.images[:100]})
    print(f"{len(dataset)} images from '{IMAGE_FOLDER}', original sizes (w, h): {raw_sizes}")
else:
    dataset = sd_lora.CaptionedImages.from_hub(DATASET, RESOLUTION, RANDOM_FLIP)
    print(f"{len(dataset)} images from the Hub dataset {DATASET!r}")
preview = [dataset[i] for i in range(min(8, len(dataset)))]
assert all(item["pixel_values"].shape == (3, RESOLUTION, RESOLUTION) for item in preview)
for i, item in enumerate(preview[:4]):
    print(f"caption {i}: {item['caption']}")
show_grid(torch.stack([item["pixel_values"] for item in preview]), f"Training images, resized and cropped to "
          f"{RESOLUTION} px (first {len(preview)})", RUN_DIR / "training_images.png", nrow=4)

# %%
# Bad input gets a message that names it and says what to do: an image without a caption, a model that cannot load.
bad_folder = sd_lora.make_shape_images(RUN_DIR / "bad-input", 2, seed=1)
(bad_folder / "shape_01.txt").unlink()
for name, attempt, error in [
    ("image without a caption", lambda: sd_lora.CaptionedImages.from_folder(bad_folder, RESOLUTION),
     sd_lora.MissingCaptionError),
    ("model that cannot load", lambda: sd_lora.load_pipeline(str(RUN_DIR / "no-model-here")), sd_lora.ModelLoadError),
]:
    try:
        attempt()
    except error as err:
        print(f"{name} -> {type(err).__name__}: {err}\n")
    else:
        raise AssertionError(f"a {name} was accepted")

# %% [markdown]
# ## 4. LoRA fine-tuning
#
# ### Attaching the adapter
#
# `unet.add_adapter(LoraConfig(...))` (diffusers' peft integration) wraps each `to_q`, `to_k`, `to_v`, `to_out.0`
# linear layer with the two small matrices $A$ (`lora_A`, Gaussian) and $B$ (`lora_B`, zeros). Everything else stays
# frozen; the frozen weights stay in fp16 on a GPU while the LoRA weights are cast to fp32 (`cast_training_params`),
# because fp16 master weights lose small Adam updates.

# %%
show_source(sd_lora.add_lora)

# %%
unet_params_before = count_parameters(unet)
fingerprints_before = sd_lora.parameter_fingerprints(unet)
unet = sd_lora.add_lora(unet, RANK, LORA_ALPHA, TARGET_MODULES)
trainable, total = count_parameters(unet, trainable_only=True), count_parameters(unet)
expected_lora, _ = sd_lora.lora_parameter_count(unet.config, RANK, TARGET_MODULES)
assert trainable == expected_lora and total == unet_params_before + trainable
assert all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
TRAINABLE_PERCENT = 100 * trainable / unet_params_before
print(f"trainable LoRA parameters: {trainable:,} = {TRAINABLE_PERCENT:.3f} % of the UNet's {unet_params_before:,}")

layer = unet.get_submodule(next(n for n, _ in unet.named_modules() if n.endswith("attn2.to_k")))
a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
assert a.shape == (RANK, layer.in_features) and b.shape == (layer.out_features, RANK) and not b.any()
print(f"one cross-attention to_k: W {layer.out_features}x{layer.in_features} (frozen, {layer.base_layer.weight.dtype}), "
      f"A {tuple(a.shape)} + B {tuple(b.shape)} = r(d + k) = {a.numel() + b.numel():,} trainable ({a.dtype})")
print(layer)

sd15_lora, sd15_total = sd_lora.lora_parameter_count(sd_lora.SD15_UNET_CONFIG, RANK, TARGET_MODULES)
print(f"for reference, SD 1.5's UNet at rank {RANK} (built on the meta device from its config, no download): "
      f"{sd15_lora:,} LoRA parameters = {100 * sd15_lora / sd15_total:.3f} % of {sd15_total:,}, "
      f"{sd15_lora * 4 / 1e6:.2f} MB in fp32")

RANKS = [1, 2, 4, 8, 16, 32, 64, 128]
per_rank = sd15_lora // RANK                 # LoRA size is linear in r: r(d + k) per adapted matrix
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.bar([str(r) for r in RANKS], [r * per_rank * 4 / 1e6 for r in RANKS], color="tab:blue")
for i, r in enumerate(RANKS):
    ax.annotate(f"{100 * r * per_rank / sd15_total:.2f} %", (i, r * per_rank * 4 / 1e6), ha="center", va="bottom",
                fontsize=8)
ax.set_xlabel("LoRA rank r")
ax.set_ylabel("adapter size (MB, fp32)")
ax.set_title("SD 1.5 UNet, LoRA on to_q/to_k/to_v/to_out.0: adapter size and share of the UNet")
save_figure(fig, RUN_DIR / "sd15_lora_size_vs_rank.png")
plt.show()

# %% [markdown]
# ### The loss
#
# One training example: encode the image to $z_0$ with the frozen VAE, draw $\varepsilon$ and $t$, noise $z_0$ to
# $z_t$ (`noise_scheduler.add_noise`), encode the caption, and compare the UNet's prediction with $\varepsilon$
# (for a v-prediction model the target is $v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\, z_0$):
#
# $$\mathcal L = \frac1B \sum_i w_i \,\big\| \varepsilon_i - \varepsilon_\theta(z_{t_i}, t_i, c_i) \big\|^2_{\text{mean}},
#   \qquad w_i = \frac{\min(\mathrm{SNR}(t_i), \gamma)}{\mathrm{SNR}(t_i)} \;\text{(min-SNR, } \gamma = 5\text{)}.$$
#
# Departure from diffusers' script: its default is plain MSE (`snr_gamma=None`); we switch min-SNR on with the
# recommended $\gamma = 5$ (set `SNR_GAMMA = None` for the plain loss).

# %%
show_source(noise_prediction_loss)

# %%
noise_scheduler = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")
PREDICTION_TYPE = noise_scheduler.config.prediction_type


def encode_captions(captions: list[str]) -> torch.Tensor:
    """Caption strings -> CLIP text states c (B, 77, cross_attention_dim)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(DEVICE)
    return text_encoder(ids)[0]


def diffusion_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Noise-prediction loss of one batch {'pixel_values', 'caption'} (min-SNR weighted if SNR_GAMMA is set)."""
    with torch.no_grad():
        pixels = batch["pixel_values"].to(DEVICE, WEIGHT_DTYPE)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        text_states = encode_captions(batch["caption"])
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=DEVICE)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if PREDICTION_TYPE == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    with accelerator.autocast():
        pred = model(noisy_latents, timesteps, text_states, return_dict=False)[0]
    snr = diffusion_snr(noise_scheduler.alphas_cumprod, timesteps) if SNR_GAMMA else None
    return noise_prediction_loss(pred, target, snr, SNR_GAMMA, PREDICTION_TYPE)


def get_batch(index: int) -> dict:
    """Micro-batch number `index` for this process (a seeded permutation per epoch, sharded across GPUs)."""
    global_batch = BATCH_SIZE * accelerator.num_processes
    indices = sd_lora.batch_indices(index, global_batch, len(dataset), SEED)
    items = [dataset[i] for i in indices[accelerator.process_index::accelerator.num_processes]]
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]), "caption": [it["caption"] for it in items]}


with torch.no_grad():
    first_loss = diffusion_loss(unet, get_batch(0))
assert first_loss.dim() == 0 and torch.isfinite(first_loss)
print(f"loss of one batch before training: {first_loss.item():.4f} ({PREDICTION_TYPE} prediction)")

# %% [markdown]
# ### Training loop
#
# `accelerate` prepares the UNet and the optimizer: on a GPU it runs the forward pass under fp16/bf16 autocast and
# scales the loss against fp16 underflow. The same loop runs on several GPUs when started with
# `accelerate.notebook_launcher` (or exported to a script and run with `accelerate launch`): `prepare` then wraps the
# UNet in DistributedDataParallel and `get_batch` gives each process its own slice of the global batch.
#
# Gradient checkpointing recomputes activations in the backward pass instead of storing them (slower, much less
# memory). A checkpoint (LoRA weights only, AdamW state, random generators, loss history, snapshots) is written every
# `CHECKPOINT_EVERY` steps to `RUN_DIR`; re-running the training cell resumes from the newest one (Colab
# disconnects; point `RUN_DIR` at Google Drive to survive a runtime reset).

# %%
if GRADIENT_CHECKPOINTING:
    unet.enable_gradient_checkpointing()
lora_params = [p for p in unet.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(lora_params, lr=LEARNING_RATE, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)
unet, optimizer = accelerator.prepare(unet, optimizer)
CHECKPOINT_CONFIG = {"model": MODEL_ID, "rank": RANK, "alpha": LORA_ALPHA, "targets": TARGET_MODULES,
                     "resolution": RESOLUTION, "batch": BATCH_SIZE, "grad_accum": GRAD_ACCUM, "lr": LEARNING_RATE}
history = History(RUN_DIR / "tensorboard")
snapshots: dict[int, torch.Tensor] = {}
stopwatch = Stopwatch()


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, params: list, step: int) -> float:
    """One AdamW step on GRAD_ACCUM micro-batches; returns the mean loss."""
    total = 0.0
    for micro in range(GRAD_ACCUM):
        loss = diffusion_loss(model, get_batch(step * GRAD_ACCUM + micro))
        accelerator.backward(loss / GRAD_ACCUM)
        total += loss.item() / GRAD_ACCUM
    accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def checkpoint_path(step: int) -> Path:
    """RUN_DIR/checkpoints/step-000123.pt"""
    return CHECKPOINT_DIR / f"step-{step:06d}.pt"


def save_training_state(step: int) -> None:
    """Checkpoint the LoRA weights (only), AdamW, RNGs, loss scaler, history, snapshots and timing."""
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    save_checkpoint(checkpoint_path(step), {"lora": sd_lora.LoraParameters(accelerator.unwrap_model(unet)),
                    "adamw": optimizer}, step, CHECKPOINT_CONFIG,
                    extra={"history": history.state_dict(), "snapshots": snapshots, "scaler": scaler,
                           "timing": (stopwatch.seconds, stopwatch.iterations, stopwatch.images)})


def load_training_state(path: Path) -> int:
    """Restore everything `save_training_state` wrote; returns the step to continue from."""
    state = load_checkpoint(path, {"lora": sd_lora.LoraParameters(accelerator.unwrap_model(unet)),
                            "adamw": optimizer}, CHECKPOINT_CONFIG, map_location=DEVICE)
    history.load_state_dict(state["extra"]["history"])
    snapshots.clear()
    snapshots.update(state["extra"]["snapshots"])
    stopwatch.seconds, stopwatch.iterations, stopwatch.images = state["extra"]["timing"]
    if accelerator.scaler is not None and state["extra"]["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["extra"]["scaler"])
    return state["step"]


def train_lora(start: int, end: int, record: bool = True) -> None:
    """Optimizer steps start..end-1 with a progress bar; with `record`, log, snapshot and checkpoint."""
    watch = stopwatch if record else Stopwatch()
    unet.train()
    for step in tqdm(range(start, end), desc="LoRA training", unit="step", initial=start, total=end):
        with watch:
            loss = optimizer_step(unet, optimizer, lora_params, step)
        watch.count(1, BATCH_SIZE * GRAD_ACCUM * accelerator.num_processes)
        if not record:
            continue
        history.log(step + 1, loss=loss)
        if (step + 1) % SAMPLE_EVERY == 0 or step + 1 == end:
            with torch.no_grad(), accelerator.autocast():
                images = sd_lora.generate(pipe, PROMPTS[:1], SEEDS[:2], INFERENCE_STEPS, GUIDANCE_SCALE, RESOLUTION)
            snapshots[step + 1] = (images * 255).round().to(torch.uint8)
        if ((step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == end) and accelerator.is_main_process:
            save_training_state(step + 1)
            for old in sorted(CHECKPOINT_DIR.glob("step-*.pt"))[:-2]:
                old.unlink()
    unet.eval()
    history.flush()

# %% [markdown]
# Run (or resume) the training. Re-running this cell after an interruption continues from the newest checkpoint.

# %%
if in_colab():
    %load_ext tensorboard
    %tensorboard --logdir {RUN_DIR}/tensorboard

saved = sorted(CHECKPOINT_DIR.glob("step-*.pt"))
start_step = load_training_state(saved[-1]) if saved else 0
print(f"resuming from {saved[-1].name} (step {start_step})" if saved else "no checkpoint yet: training from step 0")
if DEVICE.type == "cuda":
    torch.cuda.reset_peak_memory_stats(DEVICE)
train_lora(start_step, TRAIN_STEPS)
LORA_PEAK_MB = peak_memory_mb(DEVICE)
steps_per_s = stopwatch.throughput()["it_per_s"]
print(f"{stopwatch.iterations} steps in {stopwatch.seconds:.1f} s = {steps_per_s:.2f} steps/s; "
      f"peak memory {LORA_PEAK_MB:,.0f} MiB ({'CUDA allocator' if DEVICE.type == 'cuda' else 'process RSS'})")

# %%
plot_losses(history, ["loss"], f"LoRA training loss (rank {RANK}, {'min-SNR' if SNR_GAMMA else 'plain'} MSE)",
            RUN_DIR / "loss_curve.png", xlabel="optimizer step", ylabel="noise-prediction loss",
            smooth=1 if SMOKE else 20)
show_over_iterations({k: v.float() / 127.5 - 1 for k, v in snapshots.items()}, f"'{PROMPTS[0]}', seeds {SEEDS[:2]}, during "
                     "training", RUN_DIR / "samples_over_training.png", nrow=2)

# %% [markdown]
# ### Checks: only the LoRA weights changed, and a resumed run continues exactly
#
# The fingerprints (SHA-1 of each tensor's bytes) taken before `add_adapter` must be unchanged for every frozen
# weight, and the LoRA weights must have moved. Then we simulate a disconnect: restore the previous checkpoint
# (weights, AdamW state, random generators) and train the last `CHECKPOINT_EVERY` steps again; the result must match
# the uninterrupted run (bit for bit on a CPU; up to GPU non-determinism on CUDA).

# %%
fingerprints_after = sd_lora.parameter_fingerprints(accelerator.unwrap_model(unet))
changed = {n for n, h in fingerprints_after.items() if fingerprints_before.get(n) != h}
frozen_changed = [n for n in changed if "lora_" not in n]
lora_b = [n for n in fingerprints_after if "lora_B" in n]
assert not frozen_changed, f"frozen weights changed: {frozen_changed[:3]}"
assert set(lora_b) <= changed, "some LoRA B matrices did not move"
print(f"{len(changed)} tensors changed, all LoRA; {len(fingerprints_after) - len(changed):,} frozen tensors identical")

final_lora = sd_lora.lora_weights(accelerator.unwrap_model(unet))
resume_from = max(0, TRAIN_STEPS - CHECKPOINT_EVERY)
if checkpoint_path(resume_from).is_file():
    step = load_training_state(checkpoint_path(resume_from))
    train_lora(step, TRAIN_STEPS, record=False)
    load_training_state(checkpoint_path(TRAIN_STEPS))
    resumed_lora = sd_lora.lora_weights(accelerator.unwrap_model(unet))
    worst = max((resumed_lora[k] - final_lora[k]).abs().max().item() for k in final_lora)
    assert worst <= (0.0 if DEVICE.type == "cpu" else 1e-2), worst
    print(f"resumed from step {step} and retrained to {TRAIN_STEPS}: largest LoRA weight difference {worst:.2e}")
else:
    print(f"no checkpoint at step {resume_from} in this run dir: resume check skipped")

# %% [markdown]
# ## 5. Adapters: save, reload into a fresh pipeline, compare
#
# Only the LoRA weights are saved: peft's state dict → diffusers' key names → `save_lora_weights` writes
# `pytorch_lora_weights.safetensors`. A fresh pipeline from the Hub plus `load_lora_weights` reproduces the trained
# model; `set_adapters(..., adapter_weights=[λ])` scales the update ($\lambda = 0$ is the base model).

# %%
trained_unet = accelerator.unwrap_model(unet, keep_fp32_wrapper=False)   # plain forward again, for inference
adapter_file = sd_lora.save_lora(trained_unet, ADAPTER_DIR)
ADAPTER_BYTES = adapter_file.stat().st_size
print(f"saved {adapter_file.name}: {ADAPTER_BYTES / 1e6:.3f} MB ({trainable:,} fp32 weights = "
      f"{trainable * 4 / 1e6:.3f} MB + header); the full UNet would be {unet_params_before * 2 / 1e6:,.1f} MB in fp16")
assert ADAPTER_BYTES < trainable * 4 * 1.2 + 65536

fresh = sd_lora.load_pipeline(MODEL, dtype=WEIGHT_DTYPE, device=DEVICE)
fresh.scheduler = DPMSolverMultistepScheduler.from_config(fresh.scheduler.config)
fresh.load_lora_weights(ADAPTER_DIR, adapter_name="trained")
loaded_dtype = next(p.dtype for n, p in fresh.unet.named_parameters() if "lora_" in n)
for param in trained_unet.parameters():   # the same precision as the reloaded adapter, for an exact comparison
    if param.requires_grad:
        param.data = param.data.to(loaded_dtype)
reloaded, trained_w = sd_lora.lora_weights(fresh.unet), sd_lora.lora_weights(trained_unet)
assert set(reloaded) == set(trained_w) and all(torch.equal(reloaded[k], trained_w[k]) for k in trained_w)

trained_images = sd_lora.generate(pipe, PROMPTS, SEEDS, INFERENCE_STEPS, GUIDANCE_SCALE, RESOLUTION)
fresh.set_adapters(["trained"], adapter_weights=[1.0])
after_images = sd_lora.generate(fresh, PROMPTS, SEEDS, INFERENCE_STEPS, GUIDANCE_SCALE, RESOLUTION)
fresh.set_adapters(["trained"], adapter_weights=[0.0])
scale0_images = sd_lora.generate(fresh, PROMPTS, SEEDS, INFERENCE_STEPS, GUIDANCE_SCALE, RESOLUTION)
TOLERANCE = 1e-5 if WEIGHT_DTYPE == torch.float32 else 2e-2
reload_gap = (after_images - trained_images).abs().max().item()
scale0_gap = (scale0_images - base_images).abs().max().item()
lora_effect = (after_images - base_images).abs().max().item()
assert reload_gap <= TOLERANCE, f"the reloaded adapter does not reproduce the trained model ({reload_gap})"
assert scale0_gap <= TOLERANCE, f"LoRA scale 0 does not reproduce the base model ({scale0_gap})"
assert lora_effect > reload_gap, "the adapter has no effect on the images"
print(f"reloaded adapter vs trained model: max |diff| {reload_gap:.1e}; scale 0 vs base model: {scale0_gap:.1e}; "
      f"adapter vs base model: {lora_effect:.3f} (images in [0, 1])")

# %%
before_after = torch.stack([base_images.view(len(PROMPTS), len(SEEDS), *base_images.shape[1:]),
                            after_images.view(len(PROMPTS), len(SEEDS), *after_images.shape[1:])], dim=2)
show_image_table(before_after.flatten(0, 2), PROMPTS, [f"{s} {tag}" for s in SEEDS for tag in ("before", "after")],
                         "Before (base) and after (LoRA) with the same seeds", RUN_DIR / "before_after.png")

sweep = []
for scale in LORA_SCALES:
    fresh.set_adapters(["trained"], adapter_weights=[scale])
    sweep.append(sd_lora.generate(fresh, PROMPTS[:1], SEEDS[:1], INFERENCE_STEPS, GUIDANCE_SCALE, RESOLUTION))
show_image_table(torch.cat(sweep), PROMPTS[:1], LORA_SCALES, f"LoRA scale sweep (seed {SEEDS[0]})",
                         RUN_DIR / "lora_scale_sweep.png", xlabel="LoRA scale λ")
assert torch.allclose(sweep[0], base_images[:1], atol=TOLERANCE)

# %% [markdown]
# ### CLIP score before and after, on training captions
#
# The CLIP score (Hessel et al. 2021, in torchmetrics' form) is $100 \cdot \max(\cos(E_I(x), E_T(y)), 0)$ averaged
# over image/caption pairs, with OpenAI's CLIP ViT-B/16. We generate one image per training caption with the base
# model ($\lambda = 0$) and with the adapter ($\lambda = 1$), same seed. A higher score after training means the
# images match their captions better; a style adapter may also lower it a little (the captions do not mention the
# style). In smoke mode the CLIP model is a tiny random stand-in: its numbers mean nothing.

# %%
captions = dataset.captions[:CLIP_CAPTIONS]
fresh.set_adapters(["trained"], adapter_weights=[0.0])
clip_before_images = sd_lora.generate(fresh, captions, SEEDS[:1], INFERENCE_STEPS, GUIDANCE_SCALE, RESOLUTION)
fresh.set_adapters(["trained"], adapter_weights=[1.0])
clip_after_images = sd_lora.generate(fresh, captions, SEEDS[:1], INFERENCE_STEPS, GUIDANCE_SCALE, RESOLUTION)
clip_model, clip_tokenizer = sd_lora.load_clip(CLIP_MODEL_ID, RUN_DIR, DEVICE)
if CLIP_MODEL_ID == sd_lora.TINY_MODEL_ID:
    STAND_INS.append("tiny random CLIP model for the CLIP score (not meaningful)")
CLIP_BEFORE = clip_score(clip_model, clip_tokenizer, clip_before_images, captions)
CLIP_AFTER = clip_score(clip_model, clip_tokenizer, clip_after_images, captions)
assert 0 <= CLIP_BEFORE <= 100 and 0 <= CLIP_AFTER <= 100
print(f"CLIP score on {len(captions)} training captions: before {CLIP_BEFORE:.2f}, after {CLIP_AFTER:.2f}"
      + (" (stand-in CLIP model: not meaningful)" if CLIP_MODEL_ID == sd_lora.TINY_MODEL_ID else ""))
del clip_model, fresh
gc.collect()

# %% [markdown]
# ## 6. QLoRA: the UNet in 4-bit NF4
#
# The UNet is loaded again with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
# bnb_4bit_compute_dtype=fp16)`, a LoRA adapter of the same rank goes on top, and a few training steps measure
# speed and peak memory against plain LoRA (same batch, VAE and text encoder; the fp16 UNet is moved to the CPU
# first). bitsandbytes needs a CUDA GPU; elsewhere this section says why it is skipped.

# %%
QLORA_SKIPPED = sd_lora.qlora_unavailable_reason()
qlora_metrics: dict = {}
if QLORA_SKIPPED:
    print("QLoRA skipped:", QLORA_SKIPPED)
    qlora_metrics = {"skipped": QLORA_SKIPPED}
else:
    trained_unet.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    q_unet = sd_lora.add_lora(sd_lora.load_unet_4bit(MODEL, compute_dtype=WEIGHT_DTYPE), RANK, LORA_ALPHA, TARGET_MODULES)
    if GRADIENT_CHECKPOINTING:
        q_unet.enable_gradient_checkpointing()
    q_params = [p for p in q_unet.parameters() if p.requires_grad]
    q_optimizer = torch.optim.AdamW(q_params, lr=LEARNING_RATE, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)
    q_optimizer = accelerator.prepare(q_optimizer)   # the 4-bit UNet stays as loaded (on the GPU)
    q_unet.train()
    q_losses, q_start = [], time.perf_counter()
    for step in tqdm(range(QLORA_STEPS), desc="QLoRA training", unit="step"):
        q_losses.append(optimizer_step(q_unet, q_optimizer, q_params, step))
    q_seconds = time.perf_counter() - q_start
    q_weights_mb = sum(p.numel() * p.element_size() for p in q_unet.parameters()) / 2**20
    assert all(torch.isfinite(torch.tensor(q_losses)))
    qlora_metrics = {"steps": QLORA_STEPS, "steps_per_s": QLORA_STEPS / q_seconds,
                     "peak_memory_mb": peak_memory_mb(DEVICE), "unet_weights_mb": q_weights_mb,
                     "trainable_parameters": count_parameters(q_unet, trainable_only=True)}
    print(f"QLoRA: {qlora_metrics['steps_per_s']:.2f} steps/s (LoRA {steps_per_s:.2f}), peak memory "
          f"{qlora_metrics['peak_memory_mb']:,.0f} MiB (LoRA {LORA_PEAK_MB:,.0f} MiB), 4-bit UNet weights "
          f"{q_weights_mb:,.0f} MiB (fp16: {unet_params_before * 2 / 2**20:,.0f} MiB)")
    del q_unet, q_optimizer
    gc.collect()
    torch.cuda.empty_cache()

# %% [markdown]
# ## 7. Results

# %%
sd15_share = 100 * sd15_lora / sd15_total
rows = [
    ("trainable LoRA parameters", f"{trainable:,} ({TRAINABLE_PERCENT:.3f} % of the UNet)"),
    ("adapter file", f"{ADAPTER_BYTES / 1e6:.3f} MB"),
    ("training speed", f"{steps_per_s:.2f} steps/s ({BATCH_SIZE * GRAD_ACCUM} images/step)"),
    ("peak memory, LoRA", f"{LORA_PEAK_MB:,.0f} MiB"),
    ("peak memory, QLoRA", f"{qlora_metrics['peak_memory_mb']:,.0f} MiB" if "peak_memory_mb" in qlora_metrics
     else "skipped (no CUDA)"),
    ("CLIP score before / after", f"{CLIP_BEFORE:.2f} / {CLIP_AFTER:.2f}" + (" (stand-in)" if SMOKE else "")),
    (f"SD 1.5 at rank {RANK} (from its config)", f"{sd15_lora:,} parameters ({sd15_share:.3f} %), "
     f"{sd15_lora * 4 / 1e6:.2f} MB fp32"),
]
for name, value in rows:
    print(f"{name:38s} {value}")

path = write_metrics(
    RUN_DIR, NOTEBOOK, SMOKE, DEVICE, iterations=stopwatch.iterations, seconds=stopwatch.seconds,
    throughput=stopwatch.throughput(), quality={"clip_score_before": CLIP_BEFORE, "clip_score_after": CLIP_AFTER,
                                                "clip_model": CLIP_MODEL_ID, "clip_captions": len(captions)},
    stand_ins=STAND_INS, model=MODEL_ID, rank=RANK, lora_alpha=LORA_ALPHA,
    trainable_parameters=trainable, trainable_percent_of_unet=round(TRAINABLE_PERCENT, 4),
    adapter_file_bytes=ADAPTER_BYTES, training_steps_per_s=round(steps_per_s, 4),
    peak_memory_mb_lora=round(LORA_PEAK_MB, 1),
    qlora=qlora_metrics, sd15_reference={"rank": RANK, "lora_parameters": sd15_lora, "unet_parameters": sd15_total,
                                         "percent": round(sd15_share, 4), "fp32_mb": round(sd15_lora * 4 / 1e6, 3)},
)
print("wrote", path)
