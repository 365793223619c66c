# %% [markdown]
# # 07 · Diffusion from scratch: a small Stable Diffusion that trains on a CPU
#
# {{BADGE}}
#
# You will build a diffusion model piece by piece and train it on FashionMNIST. It learns to remove
# noise from images. Then it makes new clothes from pure noise, guided by a sentence such as "a photo of
# a sneaker". The same judge as in the GAN notebooks scores it against the GANs.
#
# ![Prompt to image: six prompts, four samples each](https://raw.githubusercontent.com/genimg-notebooks/genimg-notebooks/main/images/07_prompts.png)
#
# You will learn:
# * how noise is added, and how a network learns to predict it,
# * how DDPM and DDIM turn noise back into images,
# * how classifier-free guidance trades variety for faithfulness,
# * why Stable Diffusion works in a small latent space, and how text enters by cross-attention.
#
# ⏱ {{RUN_TIME}}

# %% SETUP

# %%
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from torch import Tensor, nn
from tqdm.auto import tqdm

# %%
from helpers import data, environment as env, metrics, plotting, training
from helpers.diffusion import data as diffusion_data, evaluate as ev, train as diffusion_train

# %% [markdown]
# ## 1. Settings
# * `RUN_DIR_ON_DRIVE`: in Colab, keep the run on Google Drive, so that a new session resumes it.
# * `SEED`: the random seed. The same seed gives the same run.
# * `SCHEDULE`: the noise schedule, "cosine" or "linear".
# * `AE_STEPS`, `LATENT_STEPS`, `PIXEL_STEPS`: training steps of the autoencoder, the main model and
#   the small pixel model.
# * `BATCH_SIZE`: images per training step.
# * `GUIDANCE`, `DDIM_STEPS`: the guidance scale $w$ and the denoising steps of the final samples.
# * `N_SAMPLES`: images in the final score, as many as the GAN notebooks score.
# * `PROMPTS`: your own sentences for the text-to-image part.
#
# The advanced settings below are collapsed in Colab. Open them to change the network sizes or the
# learning rate.

# %%
# Settings you may change
RUN_DIR_ON_DRIVE = False                   # True in Colab: keep the run on Google Drive
SEED = 0                                   # random seed: the same seed gives the same run
SCHEDULE = "cosine"                        # noise schedule: "cosine" or "linear"
AE_STEPS = 1_000                           # autoencoder training steps
LATENT_STEPS = 3_000                       # main model (latent codes, text) training steps
PIXEL_STEPS = 300                          # the pixel-space model, for comparison
BATCH_SIZE = 128                           # images per training step
GUIDANCE = 1.5                             # guidance scale w of the final samples
DDIM_STEPS = 20                            # denoising steps of the final samples
N_SAMPLES = 10_000                         # images of the final score (as the GAN notebooks)
PROMPTS = ["a photo of a sneaker", "a picture of a handbag", "a long dress",
           "a warm winter coat", "a pair of trousers", "an ankle boot"]

# %%
#@title Advanced settings
import os  # noqa: E402

NOTEBOOK = "{{NOTEBOOK}}"
LATENT_STEPS = int(os.environ.get("DIFFUSION_STEPS", LATENT_STEPS))  # a run script may set it
T = 1000                                   # timesteps of the forward process
LATENT_WIDTHS, PIXEL_WIDTHS = (32, 64), (16, 32, 64)  # U-Net channels per level
LR, P_UNCOND, EMA_DECAY = 1e-3, 0.1, 0.999  # learning rate, label dropout, weight average
AE_BATCH = 64                              # images per autoencoder training step
GUIDANCE_SWEEP = (0.0, 1.0, 1.5, 2.0, 3.0)  # guidance scales compared on the scoreboard
PIXEL_DDIM_STEPS = 10                      # the pixel model's denoising steps on the scoreboard
COMPARE_SAMPLES, CURVE_SAMPLES = 1_000, 500  # images per compared variant, per point of the curve
CURVE_POINTS = 4                           # FD measurements during training
DATASET, TRAIN_LIMIT, CLASSIFIER_EPOCHS = "FashionMNIST", None, 3  # as in notebook 02
SMOKE = env.smoke_mode()                   # set by CI's tests, off in Colab
if SMOKE:  # CI's tiny run: you can ignore this
    AE_STEPS, LATENT_STEPS, PIXEL_STEPS, BATCH_SIZE, AE_BATCH = 10, 20, 4, 16, 16
    N_SAMPLES, COMPARE_SAMPLES, CURVE_SAMPLES, CURVE_POINTS = 50, 50, 50, 2
    TRAIN_LIMIT, CLASSIFIER_EPOCHS, T = 4_000, 1, 100
    GUIDANCE_SWEEP = (0.0, 1.5)

# %% [markdown]
# The device and the run folder. On a GPU this cell picks mixed precision, and it says so.

# %%
env.use_drive_for_runs(RUN_DIR_ON_DRIVE)   # mounts Drive and sets $RUN_DIR there (Colab only)
DEVICE = env.pick_device()
CHOICES = env.gpu_choices(DEVICE)          # fp16 or bf16 autocast on a GPU, fp32 on a CPU
MEMORY = torch.channels_last if CHOICES.channels_last else torch.preserve_format
DATA_DIR, RUN_DIR = env.data_dir(), env.run_dir(NOTEBOOK)
env.seed_everything(SEED)
print(f"device: {CHOICES.describe()} | run folder: {RUN_DIR}")

# %% [markdown]
# ## 2. The data and the judge
# FashionMNIST holds small grayscale pictures of clothes, 28×28 pixels, in ten classes. Its test images
# judge our samples. The judge is the same as in the GAN notebooks: a small classifier trained on the
# training images.
#
# The **Fréchet distance**, FD for short, compares two sets of images. It fits a Gaussian to the
# classifier's features of each set. Then it measures how far apart the two Gaussians are. Lower is
# better. **Class coverage** is the entropy of the predicted classes: it measures how evenly they
# spread. Entropy measured with the natural log is in **nats**. Coverage is highest, about 2.3 nats,
# when all ten classes appear equally often.
#
# ⏱ About 3 min on 2 CPU cores, while the judge trains. A second run reuses the trained judge.

# %%
train_set = data.load_mnist_like(DATASET, DATA_DIR, train=True)
test_set = data.load_mnist_like(DATASET, DATA_DIR, train=False)
train_images, train_labels = data.images_and_labels(train_set, TRAIN_LIMIT)
test_images, test_labels = data.images_and_labels(test_set)
STAND_INS = [note] if (note := data.stand_in_note(DATA_DIR, DATASET)) else []
classifier, accuracy = metrics.train_classifier(
    train_images, train_labels, test_images, test_labels,
    cache=DATA_DIR / DATASET / f"classifier-{len(train_images)}-{CLASSIFIER_EPOCHS}ep.pt",
    epochs=CLASSIFIER_EPOCHS, device=DEVICE, seed=SEED)
score = metrics.SampleQuality(classifier, test_images, DEVICE)
REAL_FLOOR = score.real_vs_real()
CLASS_NAMES = data.CLASS_NAMES[DATASET]
print(f"{len(train_images):,} training images | classifier accuracy {accuracy:.1%} | "
      f"FD of real half against real half: {REAL_FLOOR:.2f}")
assert accuracy > 0.6, "the judge must be far better than chance (10%)"
plotting.show_grid(train_images[:32], "FashionMNIST: 32 training images", RUN_DIR / "data.png")

# %% [markdown]
# ## 3. The forward process: adding noise step by step
# A diffusion model learns to undo a fixed noising process. Step $t$ mixes a little Gaussian noise into the
# image. The amount of noise at step $t$ is $\beta_t$. After $T$ steps nothing of the image is left.
#
# We never need to run the steps one by one. With $\alpha_t = 1 - \beta_t$ and
# $\bar\alpha_t = \prod_{s \le t} \alpha_s$, the noisy image at step $t$ comes in one jump:
#
# $$x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \varepsilon, \qquad
# \varepsilon \sim \mathcal{N}(0, I).$$
#
# $\bar\alpha_t$ is the share of the image's signal that survives. The **linear schedule** of DDPM raises
# $\beta_t$ in a straight line. The **cosine schedule** keeps more signal in the middle steps, so fewer steps
# are wasted on pure noise.

# %% [helpers] diffusion/schedule: linear_betas, cosine_betas

# %% [helpers] diffusion/schedule: NoiseSchedule, q_sample, predict_x0

# %% [markdown]
# A check of the formula. For one image and one $t$ we draw 10,000 noisy versions. Their mean must be
# $\sqrt{\bar\alpha_t}\, x_0$ and their variance $1 - \bar\alpha_t$, up to sampling error.

# %%
schedule = NoiseSchedule(SCHEDULE, T)
x0, t_mid = train_images[:1], torch.tensor([T // 2])
draws = q_sample(schedule, x0.expand(10_000, -1, -1, -1), t_mid.expand(10_000),
                 torch.randn(10_000, *x0.shape[1:], generator=torch.Generator().manual_seed(SEED)))
abar = schedule.alpha_bars[T // 2].item()
mean_gap = (draws.mean(0) - math.sqrt(abar) * x0[0]).abs().max().item()
var_gap = (draws.var(0) - (1 - abar)).abs().max().item()
print(f"alpha_bar at t = {T // 2}: {abar:.3f} | largest error of the mean {mean_gap:.4f}, "
      f"of the variance {var_gap:.4f}")
# 5 standard errors of a mean and of a variance over 10,000 draws, at the worst of 784 pixels
assert mean_gap < 5 * math.sqrt((1 - abar) / 10_000), mean_gap
assert var_gap < 5 * (1 - abar) * math.sqrt(2 / 10_000), var_gap

# %%
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [1, 1.6]})
for kind in ("linear", "cosine"):
    axes[0].plot(NoiseSchedule(kind, T).alpha_bars, label=kind)
axes[0].set(xlabel="timestep t", ylabel="signal kept: alpha_bar", title="Two noise schedules")
axes[0].legend()
steps_shown = torch.linspace(0, T - 1, 8).long()
noisy = q_sample(schedule, x0.expand(8, -1, -1, -1), steps_shown, torch.randn(8, *x0.shape[1:]))
axes[1].imshow(plotting.image_grid(noisy, nrow=8)[0], cmap="gray")
shown = ", ".join(map(str, steps_shown.tolist()))
axes[1].set(xticks=[], yticks=[], title=f"One image at t = {shown}")
plotting.save_figure(fig, RUN_DIR / "forward_process.png")
plt.show()

# %% [markdown]
# ## 4. The denoiser and its loss
# The network $\varepsilon_\theta(x_t, t)$ looks at a noisy image and the step $t$, and predicts the noise
# $\varepsilon$ that was added. Training is regression on that noise (Ho et al. 2020):
#
# $$\mathcal{L} = \mathbb{E}_{x_0, t, \varepsilon}\, \big\lVert \varepsilon -
# \varepsilon_\theta(\sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \varepsilon,\ t) \big\rVert^2.$$
#
# The network is a small **U-Net**. It shrinks the image, then grows it back. **Skip connections** carry
# the fine details across. The step $t$ enters as sines and cosines of $t$ at many frequencies. A class
# label enters as a learned vector.

# %% [helpers] diffusion/model: timestep_embedding, CrossAttention

# %% [helpers] diffusion/model: ResBlock

# %% [helpers] diffusion/model: Denoiser

# %% [markdown]
# One training step: pick a batch, a random step $t$ and random noise per image, and regress the noise.
# A second copy of the weights follows the trained weights slowly. It is an **exponential moving
# average** of them, EMA for short, and it makes the samples. Its memory starts short and grows, so
# that the first random weights do not linger in it. Training replaces the label by "no class" for one
# image in ten. The section on guidance explains why.

# %%
# The training loop keeps its plan, weights and history in a run record, and saves checkpoints.
from helpers.diffusion.train import DenoiserPlan, DenoiserRun
from helpers.training import load_checkpoint, save_checkpoint

# %% [helpers] diffusion/train: diffusion_loss

# %% [helpers] training: ema_update

# %% [helpers] diffusion/train: denoiser_train_step

# %% [helpers] diffusion/train: train_denoiser

# %% [markdown]
# The first model works on pixels. It trains for `PIXEL_STEPS` steps and saves a checkpoint as it goes.
#
# ⏱ About 4 min on 2 CPU cores, under 1 min on a T4 (estimated). Re-run this cell to continue.

# %%
classes = diffusion_data.ClassLabels(10)
pixel_model = Denoiser(1, PIXEL_WIDTHS, num_classes=10).to(DEVICE, memory_format=MEMORY)
pixel_plan = DenoiserPlan(PIXEL_STEPS, BATCH_SIZE, LR, P_UNCOND, EMA_DECAY)
pixel_run = DenoiserRun(pixel_model, pixel_plan, CHOICES)
train_denoiser(pixel_run, schedule, train_images.to(DEVICE), train_labels, classes,
               RUN_DIR / "pixel", {"widths": PIXEL_WIDTHS, "space": "pixel"})
print(f"pixel model: {training.count_parameters(pixel_model):,} parameters, "
      f"{pixel_run.record.step:,} steps in {pixel_run.record.stopwatch.seconds:.0f} s")

# %% [markdown]
# What has the model learned? Below, $t$ grows from left to right. The model's noise prediction gives a
# guess of the clean image: the forward formula, solved for $x_0$.
#
# $$\hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon_\theta(x_t, t)}{\sqrt{\bar\alpha_t}}$$

# %%
x_show = train_images[:8].to(DEVICE)
t_show = torch.linspace(T // 10, T - T // 10, 8).long().to(DEVICE)
noise_show = torch.randn(x_show.shape, generator=torch.Generator().manual_seed(SEED)).to(DEVICE)
x_noisy = q_sample(schedule, x_show, t_show, noise_show)
with torch.no_grad():
    eps_hat = pixel_run.ema.eval()(x_noisy, t_show, **classes.inputs(train_labels[:8].to(DEVICE)))
    guess = predict_x0(schedule, x_noisy, t_show, eps_hat).float().clamp(-1, 1)
exact = predict_x0(schedule, x_noisy, t_show, noise_show)  # the true noise gives x0 back
least_signal = schedule.alpha_bars[t_show.cpu()].min().sqrt()  # the least signal shown
worst = 64 * torch.finfo(torch.float32).eps * x_noisy.abs().max().item() / least_signal.item()
assert (exact - x_show).abs().max() <= worst, "the formula for x0 must invert the forward one"
plotting.show_panels({"clean images": x_show.cpu(), "noisy images": x_noisy.cpu(),
                      "the model's guess of x0": guess.cpu()},
                     "One noise prediction, turned into a guess of the clean image",
                     RUN_DIR / "first_guesses.png")

# %% [markdown]
# At small $t$ the guess is sharp. At large $t$ it is a blurry average of what the image could be.

# %% [markdown]
# ## 5. Sampling: from noise back to an image
# **DDPM** (Ho et al. 2020) walks back through all $T$ steps. Each step removes the predicted noise and adds
# a little fresh noise:
#
# $$x_{t-1} = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,
# \varepsilon_\theta(x_t, t)\Big) + \sigma_t z.$$
#
# **DDIM** (Song et al. 2021) skips steps. From $x_t$ it estimates the clean image
# $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon_\theta)/\sqrt{\bar\alpha_t}$. Then it jumps to an
# earlier step $s$: $x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1-\bar\alpha_s}\,\varepsilon_\theta$.
# With no fresh noise ($\eta = 0$) the same start always gives the same image.
#
# One detail matters in practice. At the noisiest step $\bar\alpha_t$ is almost zero. So $\hat x_0$
# divides a small error by a tiny number. We **clip** $\hat x_0$ to the range of the data. For pixels
# that range is −1 to 1. For the latent codes of the latent diffusion part, it is the range of the
# training codes.

# %% [helpers] diffusion/sample: EpsFn, ddpm_sample

# %% [helpers] diffusion/sample: ddim_timesteps, ddim_sample

# %% [markdown]
# Now the pixel model draws its first images from pure noise: with all of DDPM's $T$ steps, and with
# 20 DDIM steps.

# %%
pixel_ema = pixel_run.ema.eval()
labels16 = torch.arange(16) % 10
start_noise = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(SEED)).to(DEVICE)
cond = classes.inputs(labels16.to(DEVICE))
with torch.no_grad():
    by_ddpm = ddpm_sample(lambda x, t: pixel_ema(x, t, **cond), schedule, start_noise,
                          torch.Generator().manual_seed(SEED)).clamp(-1, 1)
    by_ddim = ddim_sample(lambda x, t: pixel_ema(x, t, **cond), schedule, start_noise, 20, clip=1.0)
plotting.show_panels({f"DDPM, {T} steps": by_ddpm, "DDIM, 20 steps": by_ddim},
                     "The pixel model's first samples", RUN_DIR / "pixel_first_samples.png")

# %% [markdown]
# A check of DDIM. If the network knew the true noise, DDIM with $\eta = 0$ would give back the clean image.

# %%
x_clean, true_noise = train_images[:16], torch.randn(16, 1, 28, 28)
x_start = q_sample(schedule, x_clean, torch.full((16,), T - 1), true_noise)


def true_eps(x: Tensor, t: Tensor) -> Tensor:
    """The noise that turns x_clean into x at step t."""
    abar_t = schedule.at(schedule.alpha_bars, t, x)
    return (x - abar_t.sqrt() * x_clean) / (1 - abar_t).sqrt()


rebuilt = ddim_sample(true_eps, schedule, x_start, 10)
error = (rebuilt - x_clean).abs().max().item()
print(f"DDIM with the true noise: largest pixel error {error:.2e}")
assert error < 1e4 * torch.finfo(torch.float32).eps, error

# %% [markdown]
# ## 6. Classifier-free guidance
# A model trained with and without labels can predict the noise both ways. **Classifier-free guidance**
# (Ho & Salimans 2022) pushes the prediction away from the unconditional one:
#
# $$\tilde\varepsilon = \varepsilon_\theta(x_t, c) + w\,\big(\varepsilon_\theta(x_t, c) -
# \varepsilon_\theta(x_t, \varnothing)\big).$$
#
# With $w = 0$ it is the conditional model. A larger $w$ gives images that match the class better, but less
# varied ones. That is why training dropped the label for some images: it taught the "no class" case.

# %% [helpers] diffusion/sample: guided_eps

# %%
x_probe, t_probe = torch.randn(4, 1, 28, 28).to(DEVICE), torch.full((4,), T // 2).to(DEVICE)
cond4 = classes.inputs(torch.arange(4).to(DEVICE))
null4 = {k: v.to(DEVICE) for k, v in classes.null_inputs(4).items()}
with torch.no_grad():
    same = guided_eps(pixel_ema, cond4, null4, 0.0)(x_probe, t_probe)
    plain = pixel_ema(x_probe, t_probe, **cond4)
    guided = guided_eps(pixel_ema, cond4, null4, 2.0)(x_probe, t_probe)
    by_hand = 3 * plain - 2 * pixel_ema(x_probe, t_probe, **null4)
assert torch.equal(same, plain), "w = 0 must be the conditional prediction"
gap = (guided - by_hand).abs().max().item()
assert gap <= 64 * torch.finfo(torch.float32).eps * by_hand.abs().max().item(), gap
print(f"w = 0 equals the conditional prediction; w = 2 equals 3 cond - 2 uncond (gap {gap:.1e})")

# %% [markdown]
# ## 7. Latent diffusion: denoise a small code instead of pixels
# Pixels are expensive. Every step of the pixel model works on the full image. Stable Diffusion first
# trains an **autoencoder**. Its encoder squeezes an image into a small **latent** code. Its decoder
# turns the code back into an image. Diffusion then runs on the codes. Our code is four times smaller
# than the image: 4 channels of 7×7 numbers.
#
# Every generated image passes through the decoder. So the FD of the decoder's reconstructions of real
# images is the **floor** of this route: the best score it can hope for.

# %% [helpers] diffusion/model: AutoEncoder

# %% [markdown]
# ⏱ About 2 min on 2 CPU cores, a few seconds on a T4 (estimated). A second run reuses the trained
# autoencoder.

# %%
autoencoder = AutoEncoder(4).to(DEVICE, memory_format=MEMORY)
ae_info = diffusion_train.train_autoencoder(autoencoder, train_images.to(DEVICE), AE_STEPS,
                                            AE_BATCH, 2e-3, RUN_DIR, CHOICES, SEED)
autoencoder.eval().requires_grad_(False)
with torch.no_grad():
    codes = torch.cat([autoencoder.encode(train_images[i:i + 2000].to(DEVICE)).float()
                       for i in range(0, len(train_images), 2000)])
    rebuilt = torch.cat([autoencoder(test_images[i:i + 2000].to(DEVICE)).float().cpu()
                         for i in range(0, N_SAMPLES, 2000)])[:N_SAMPLES]
CODE_MEAN, CODE_STD = codes.mean().item(), codes.std().item()
latents = (codes - CODE_MEAN) / CODE_STD  # scaled to unit variance, as Stable Diffusion does
LATENT_CLIP = latents.abs().max().item()  # DDIM's guess of the clean code stays in this range


def decode(z: Tensor) -> Tensor:
    """Scaled latents -> images in [-1, 1]."""
    return autoencoder.decode(z * CODE_STD + CODE_MEAN)


def latent_ddim(eps_fn, schedule: NoiseSchedule, x_T: Tensor, steps: int, **kwargs) -> Tensor:
    """DDIM in the latent space, its guess of x0 clipped to the range of the training codes."""
    return ddim_sample(eps_fn, schedule, x_T, steps, clip=LATENT_CLIP, **kwargs)


ae_floor = score(rebuilt)
print(f"autoencoder: {ae_info['seconds']:.0f} s of training | latents {tuple(latents.shape[1:])} | "
      f"FD of its reconstructions (the floor): {ae_floor['fd']:.2f}")
plotting.show_panels({"test images": test_images[:16], "reconstructions": rebuilt[:16]},
                     "The autoencoder", RUN_DIR / "autoencoder.png")

# %% [markdown]
# ## 8. Text conditioning by cross-attention
# Stable Diffusion reads a sentence. A frozen text encoder splits the sentence into word pieces, called
# **tokens**, and turns each token into a vector. We use the small sentence encoder all-MiniLM-L6-v2, as
# notebook 04 does. Every class gets five captions, such as "a photo of a sneaker" or "a picture of a
# sneaker".
#
# The image reads the text by **cross-attention**. Each position of the feature map asks a question $Q$.
# Each token offers a key $K$ and a value $V$. The position takes a weighted mix of values:
# $\mathrm{softmax}(QK^\top/\sqrt{d})\,V$. The empty caption "" is the "no text" input for guidance.

# %%
# The caption templates, the words for the ten classes, and the call that runs the text encoder.
from helpers.diffusion.data import CAPTION_TEMPLATES, FASHION_WORDS, token_embeddings

# %% [helpers] diffusion/data: CaptionTable

# %%
tokenizer, encoder = diffusion_data.load_sentence_encoder()
if (note := diffusion_data.stand_in_encoder_note()):
    STAND_INS.append(note)
captions = CaptionTable(tokenizer, encoder)
print(f"{len(captions.captions)} classes x {len(captions.captions[0])} captions, "
      f"{captions.length} tokens of {captions.dim} numbers each; e.g. {captions.captions[7][0]!r}")
text_model = Denoiser(4, LATENT_WIDTHS, context_dim=captions.dim).to(DEVICE, memory_format=MEMORY)
print(f"latent text model: {training.count_parameters(text_model):,} parameters "
      f"(pixel model: {training.count_parameters(pixel_model):,})")

# %% [markdown]
# The main model trains on the latent codes. For each image it reads one of its class's captions. Every
# few hundred steps it draws `CURVE_SAMPLES` images and scores them, for the FD curve of the scoreboard.
#
# ⏱ About 7 min on 2 CPU cores, 1 to 3 min on a T4 (estimated). Re-run this cell to continue.

# %%
latent_shape = tuple(latents.shape[1:])


def curve_fd(run: DenoiserRun) -> float:
    """FD of CURVE_SAMPLES guided DDIM samples of the EMA weights (the curve of section 9)."""
    labels = ev.balanced_labels(CURVE_SAMPLES)
    images = ev.diffusion_samples(run.ema, schedule, captions, labels, latent_shape, latent_ddim,
                                  guided_eps, DDIM_STEPS, GUIDANCE, DEVICE, CHOICES, SEED, decode)
    run.model.train()
    return score(images)["fd"]


text_plan = DenoiserPlan(LATENT_STEPS, BATCH_SIZE, LR, P_UNCOND, EMA_DECAY,
                 eval_every=max(1, LATENT_STEPS // CURVE_POINTS))
text_run = DenoiserRun(text_model, text_plan, CHOICES)
train_denoiser(text_run, schedule, latents.to(DEVICE), train_labels, captions,
               RUN_DIR / "latent_text", {"widths": LATENT_WIDTHS, "autoencoder_steps": AE_STEPS},
               curve_fd)
text_record = text_run.record             # its history, stopwatch and step
print(f"latent text model: {text_record.step:,} steps in {text_record.stopwatch.seconds:.0f} s "
      f"({text_record.stopwatch.throughput()['it_per_s']:.1f} steps/s)")
plotting.plot_losses(text_record.history, ["loss/eps_mse"],
                     "Latent text model: noise-prediction loss", RUN_DIR / "loss_latent_text.png")

# %% [markdown]
# Your prompts, four images each, with guidance $w$ = `GUIDANCE` and `DDIM_STEPS` DDIM steps. The model
# has only seen five caption styles. Words it never saw still land near known ones in the encoder's space.

# %%
text_ema = text_run.ema.eval()
prompt_inputs = {k: v.repeat_interleave(4, 0).to(DEVICE) for k, v in
                 captions.prompt_inputs(PROMPTS).items()}
null = {k: v.to(DEVICE) for k, v in captions.null_inputs(4 * len(PROMPTS)).items()}
start = torch.randn(4 * len(PROMPTS), *latent_shape, generator=torch.Generator().manual_seed(SEED))
with torch.no_grad(), CHOICES.autocast():
    z = latent_ddim(guided_eps(text_ema, prompt_inputs, null, GUIDANCE), schedule, start.to(DEVICE),
                    DDIM_STEPS)
    from_prompts = decode(z).float().clamp(-1, 1).cpu()
assert torch.isfinite(from_prompts).all(), "every sample must be finite"
plotting.show_rows([(p, from_prompts[4 * i:4 * i + 4]) for i, p in enumerate(PROMPTS)],
                   "Prompt -> image (latent text model)", RUN_DIR / "prompts.png")

# %% [markdown]
# One DDIM trajectory: the model's guess of the clean image $\hat x_0$ at each DDIM step, decoded.

# %%
trajectory: list[Tensor] = []
with torch.no_grad(), CHOICES.autocast():
    latent_ddim(guided_eps(text_ema, {k: v[:1] for k, v in prompt_inputs.items()},
                           {k: v[:1] for k, v in null.items()}, GUIDANCE),
                schedule, start[:1].to(DEVICE), DDIM_STEPS, trajectory=trajectory)
    path_images = decode(torch.cat(trajectory).to(DEVICE)).float().clamp(-1, 1).cpu()
plotting.show_grid(path_images, f"{PROMPTS[0]!r}: the guess of x0 at each DDIM step",
                   RUN_DIR / "trajectory.png", nrow=10)

# %% [markdown]
# ## 9. The scoreboard: diffusion against the GANs
# The final samples are scored as in the GAN notebooks. The same classifier compares `N_SAMPLES` images
# with the test images. Each of the ten classes is asked for equally often. The other variants use
# `COMPARE_SAMPLES` images each, which is faster. **Class agreement** is the share of images that the
# classifier reads as the class that was asked for. A second run of the notebook reuses the scores saved
# in `scoreboard.json`.

# %%
board_path = RUN_DIR / "scoreboard.json"
settings = {"steps": [AE_STEPS, LATENT_STEPS, PIXEL_STEPS], "n": N_SAMPLES, "w": GUIDANCE, "T": T}
board = ev.load_scoreboard(board_path, settings)
labels_n = ev.balanced_labels(N_SAMPLES)
kept: dict[str, Tensor] = {}


def scored(name: str, make_images, labels: Tensor = labels_n, keep: bool = False) -> dict:
    """A row's scores: from scoreboard.json when this run already scored it, else measured now."""
    if name in board["rows"]:
        return board["rows"][name]
    images = make_images()
    kept.update({name: images} if keep else {})
    board["rows"][name] = ev.score_with_labels(score, images, labels)
    ev.save_scoreboard(board_path, board)
    return board["rows"][name]


def latent_images(steps: int, w: float, n: int = N_SAMPLES) -> Tensor:
    return ev.diffusion_samples(text_ema, schedule, captions, ev.balanced_labels(n), latent_shape,
                       latent_ddim, guided_eps, steps, w, DEVICE, CHOICES, SEED + 1, decode)


# %% [markdown]
# ⏱ About 5 min on 2 CPU cores, under 1 min on a T4 (estimated). Re-run this cell to continue.

# %%
MAIN = f"latent + text, DDIM {DDIM_STEPS}, w {GUIDANCE:g}, {N_SAMPLES:,} images"
scored(MAIN, lambda: latent_images(DDIM_STEPS, GUIDANCE), keep=True)
n, labels_c = COMPARE_SAMPLES, ev.balanced_labels(COMPARE_SAMPLES)
for steps, w in [(s, GUIDANCE) for s in (10, 20, 50)] + [(DDIM_STEPS, w) for w in GUIDANCE_SWEEP]:
    scored(f"latent + text, DDIM {steps}, w {w:g}, {n:,} images",
           lambda: latent_images(steps, w, n), labels_c)
PIXEL = f"pixel + class, DDIM {PIXEL_DDIM_STEPS}, w {GUIDANCE:g}, {n:,} images"
pixel_sampler = lambda f, s, x, k: ddim_sample(f, s, x, k, clip=1.0)  # noqa: E731  x0 in [-1, 1]
scored(PIXEL, lambda: ev.diffusion_samples(pixel_ema, schedule, classes, labels_c, (1, 28, 28),
                                  pixel_sampler, guided_eps, PIXEL_DDIM_STEPS, GUIDANCE, DEVICE,
                                  CHOICES, SEED + 1), labels_c)
gan, gan_caption = ev.gan_rows(RUN_DIR.parent, score)
print(gan_caption)

# %%
rows = {"real test images, one half against the other": {"fd": REAL_FLOOR},
        "autoencoder reconstructions (floor of the latent route)": ae_floor,
        **board["rows"], **gan}
table = "\n".join(f"| {name} | {r['fd']:.2f} | {ev.fmt(r, 'coverage_nats', '.3f')} | "
                  f"{ev.fmt(r, 'agreement', '.1%')} |" for name, r in rows.items())
header = "| row | FD ↓ | coverage (nats) ↑ | class agreement ↑ |\n|---|---|---|---|\n"
display(Markdown(header + table + f"\n\nFD reads higher on {COMPARE_SAMPLES:,} images than on "
                 f"{N_SAMPLES:,}: compare rows of the same size. {gan_caption}."))
main_images = kept.get(MAIN)
if main_images is None:  # scored by an earlier run: the samples are in samples.npz
    main_images = metrics.uint8_to_model_input(np.load(RUN_DIR / "samples.npz")["images"])
    print(f"reusing the scored samples of {board_path.name} and samples.npz")
np.savez_compressed(RUN_DIR / "samples.npz", images=metrics.model_output_to_uint8(main_images),
                    labels=labels_n.numpy())
plotting.show_grid(main_images[:100], f"{MAIN}: ten of each class", RUN_DIR / "samples.png",
                   nrow=10)

# %% [markdown]
# Quality against training time. The line is the latent model's FD during training, on `CURVE_SAMPLES`
# images, counted from the start of the autoencoder's training. The stars are the final scores on
# `N_SAMPLES` images.

# %%
steps_logged, fds = text_run.record.history.series("quality/fd")
_, seconds_logged = text_run.record.history.series("quality/train_seconds")
ae_seconds = ae_info["seconds"]
main, pixel = board["rows"][MAIN], board["rows"][PIXEL]
points = {f"{name}: final": (r["train_seconds"], r["fd"]) for name, r in gan.items()}
points["latent + text: final"] = (ae_seconds + text_run.record.stopwatch.seconds, main["fd"])
points[f"pixel + class: final, {n:,} images"] = (pixel_run.record.stopwatch.seconds, pixel["fd"])
curve = {"latent + text, during training": ([ae_seconds + s for s in seconds_logged], fds)}
ev.plot_fd_against_seconds(curve, points, "FashionMNIST: FD against CPU training time",
                           RUN_DIR / "fd_against_seconds.png")

# %% [markdown]
# Five goals for the model, checked on your run.

# %%
best_gan = gan["improved GAN recipe"]
ddim = {k: board["rows"][f"latent + text, DDIM {k}, w {GUIDANCE:g}, {n:,} images"]["fd"]
        for k in (10, 20, 50)}
train_seconds = ae_seconds + text_run.record.stopwatch.seconds + pixel_run.record.stopwatch.seconds
goals = {
    f"FD {main['fd']:.2f} at most the improved GAN's {best_gan['fd']:.2f}":
        main["fd"] <= best_gan["fd"],
    f"coverage {main['coverage_nats']:.3f} at least the GAN's {best_gan['coverage_nats']:.3f} nats":
        main["coverage_nats"] >= best_gan["coverage_nats"],
    f"class agreement {main['agreement']:.1%} at least 90 %": main["agreement"] >= 0.9,
    f"DDIM 20 FD {ddim[20]:.2f} within 1.5 x the DDIM 50 FD {ddim[50]:.2f}":
        ddim[20] <= 1.5 * ddim[50],
    f"all training within 30 minutes ({train_seconds / 60:.1f} min)": train_seconds <= 1800,
}
display(Markdown("\n".join(f"* {'met' if ok else '**missed**'}: {goal}"
                           for goal, ok in goals.items())))

# %% [markdown]
# **Reference run:** FashionMNIST, the settings above, 12 minutes of training on 2 CPU cores.
#
# | row | FD ↓ | coverage (nats) ↑ | class agreement ↑ |
# |---|---|---|---|
# | latent + text, DDIM 20, w 1.5, 10,000 images | 20.08 | 2.298 | 88.2 % |
# | improved GAN recipe, 10,000 images | 21.70 | 2.288 | – |
# | autoencoder reconstructions, the floor | 5.49 | 2.296 | – |
# | latent + text, DDIM 10 / 20 / 50, 1,000 images | 47.78 / 21.48 / 16.68 | | 79.8 / 88.1 / 91.5 % |
# | guidance w 0 / 1 / 2 / 3, DDIM 20, 1,000 images | 30.05 / 20.04 / 24.02 / 29.52 | | 65.3 / 84.6 / 91.6 / 94.3 % |
# | pixel + class, DDIM 10, 1,000 images | 70.98 | 2.236 | 78.4 % |
#
# In the reference run, the diffusion model beat the improved GAN's FD and covered the classes better.
# Its class agreement fell just short of the goal of 90 %. Stronger guidance, $w$ = 2, reaches the goal,
# but its FD is worse.

# %% [markdown]
# > **How this differs from Stable Diffusion.** Its autoencoder is a VAE: an extra loss, the KL term,
# > keeps the codes close to a Gaussian. Ours has none. Our U-Net has two levels and no
# > self-attention. Our text encoder is MiniLM, not CLIP's. Our captions come from five templates, so the
# > model knows ten kinds of clothes, not open text.

# %% [markdown]
# ## 10. Under the hood (optional)
# ### Resume after a disconnect
# Colab can disconnect at any time. Here a tiny run trains 5 steps and stops. A new model with other random
# weights then resumes it from `last.pt` to 10 steps. On a CPU its weights must equal those of a run that
# never stopped, bit for bit.

# %%
import shutil  # noqa: E402

drill = RUN_DIR / "resume_check"
shutil.rmtree(drill, ignore_errors=True)
few_latents, few_labels = latents[:256].to(DEVICE), train_labels[:256]


def tiny_run(steps: int, seed: int) -> DenoiserRun:
    torch.manual_seed(seed)
    model = Denoiser(4, LATENT_WIDTHS, context_dim=captions.dim).to(DEVICE, memory_format=MEMORY)
    plan = DenoiserPlan(steps, 16, LR, P_UNCOND, EMA_DECAY, checkpoint_every=5)
    return DenoiserRun(model, plan, CHOICES)


straight = train_denoiser(tiny_run(10, SEED), schedule, few_latents, few_labels, captions,
                          drill / "straight", {})
train_denoiser(tiny_run(5, SEED), schedule, few_latents, few_labels, captions, drill / "resumed",
               {})
resumed = train_denoiser(tiny_run(10, SEED + 99), schedule, few_latents, few_labels, captions,
                         drill / "resumed", {})
pairs = [(a, b) for net in ("model", "ema") for a, b in zip(
    getattr(straight, net).state_dict().values(), getattr(resumed, net).state_dict().values())]
gap = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
print(f"resumed at step 5, trained to step {resumed.record.step}: "
      f"largest weight difference {gap:.1e}")
assert resumed.record.step == 10 and gap <= (0 if DEVICE.type == "cpu" else 1e-5), gap

# %% [markdown]
# ### metrics.json
# Everything the run measured, in the collection's common format. `fd`, `coverage_nats` and `agreement`
# are those of the samples in `samples.npz`.

# %%
quality = {"fd": main["fd"], "coverage_nats": main["coverage_nats"], "agreement": main["agreement"],
           "ddim_fd": ddim, "guidance": GUIDANCE, "fd_pixel_model": pixel["fd"],
           "fd_autoencoder_floor": ae_floor["fd"], "fd_real_vs_real": REAL_FLOOR,
           "classifier_accuracy": accuracy, "rows": board["rows"], "gan_rows": gan,
           "gan_rows_source": gan_caption}
seconds = {"autoencoder": ae_seconds, "latent_text": text_run.record.stopwatch.seconds,
           "pixel": pixel_run.record.stopwatch.seconds}
iterations = text_run.record.step + pixel_run.record.step + AE_STEPS
path = training.write_metrics(RUN_DIR, NOTEBOOK, SMOKE, DEVICE, iterations,
                              train_seconds, text_run.record.stopwatch.throughput(), quality,
                              STAND_INS, train_seconds_by_model=seconds,
                              gpu_choices=CHOICES.describe())
print(path.read_text()[:600])

# %% [markdown]
# ## What to take away

# %%
same = board["rows"][f"latent + text, DDIM {PIXEL_DDIM_STEPS}, w {GUIDANCE:g}, {n:,} images"]
display(Markdown(f"""
* A diffusion model learns one simple thing: predict the noise in a noisy image. Sampling repeats
  that prediction from pure noise down to a clean image.
* DDIM needs far fewer steps than DDPM. In your run, 20 steps scored FD {ddim[20]:.1f} and 50 steps
  {ddim[50]:.1f}.
* Working in a latent space is much cheaper than working on pixels. On {n:,} images with
  {PIXEL_DDIM_STEPS} DDIM steps, your latent model scored FD {same['fd']:.1f} and the pixel model
  {pixel['fd']:.1f}. The autoencoder sets a floor of {ae_floor['fd']:.1f}.
* Guidance makes images match their caption: {main['agreement']:.0%} of your images show the class
  that was asked for, at w = {GUIDANCE:g}.
* Against the improved GAN ({best_gan['fd']:.1f}), your diffusion model scored {main['fd']:.1f}
  after {train_seconds / 60:.0f} minutes of training.
"""))

# %% [markdown]
# ## Check your understanding
#
# **Why can training pick a random step $t$ for every image, instead of running the noising chain?**
#
# <details><summary>Answer</summary>
#
# Because the noisy image at step $t$ has a closed form:
# $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$. One multiplication and
# one addition give the noisy image at any step. Section 3 checks this formula on 10,000 draws.
# </details>
#
# **Guidance with a large $w$ raises class agreement. Why can it make the FD worse?**
#
# <details><summary>Answer</summary>
#
# A large $w$ pushes every image towards the most typical look of its class. The images get less varied.
# FD compares the whole spread of features with the real images, so a narrow spread costs FD. The
# guidance sweep on your scoreboard shows both numbers.
# </details>
#
# **Why is the FD of the autoencoder's reconstructions a floor for the latent model?**
#
# <details><summary>Answer</summary>
#
# Every image of the latent model comes out of the same decoder. Even a perfect latent model can only make
# images that the decoder can draw. So it cannot beat the decoder's own reconstructions by much.
# </details>

# %% [markdown]
# ## What to try next
# * Train longer: set `LATENT_STEPS` higher and watch the FD curve go down.
# * Change `SCHEDULE` to "linear" and compare the FD at the same number of steps.
# * Try `GUIDANCE` values from the sweep, and write your own `PROMPTS`.
# * Give the autoencoder 8 latent channels: the floor drops, but the denoiser's job gets harder.
# * Add cross-attention to the pixel model, or a class label to the latent model, and compare.
