# %% [markdown]
# # {{NUMBER}} · {{TITLE}}
#
# {{BADGE}}
#
# {{INTRO}}
#
# **What you get:** the fully-connected GAN of the course's seed document, trained with binary cross-entropy;
# TensorBoard logs; loss curves; the seed's "samples over iterations" figure; a saved generator reloaded in a fresh
# model; 10,000 generated samples (`samples.npz`) scored by an offline quality measure; and a measured answer to the
# question *which checkpoint should I keep: the one with the lowest generator loss, or the one with the best samples?*
#
# **Run time:** full mode (200 epochs, the seed's ~187,000 iterations on the 60,000 training images) is estimated at
# 15–30 min on a Colab T4 (not yet measured there); on 2 CPU cores this network trains at 65–80 iterations/s at
# batch 64 (measured, see the README). Smoke mode (`SMOKE=1`, what CI runs) takes under a minute.

# %% SETUP

# %% [markdown]
# ## 1. Parameters
# Every knob is here. Each line shows the full value and, beside it, the smaller value smoke mode (CI) uses.
# The seed's settings are Adam with learning rate 2·10⁻⁴ and β₁ = 0.5, batch 64 and 100-d noise: the values of the
# classic PyTorch GAN examples the seed follows.

# %%
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from torch import Tensor, nn
from tqdm.auto import tqdm

from helpers import data, metrics, mnist_gan, plotting
from helpers.environment import (data_dir, describe_device, in_colab, pick_device, run_dir,
                                 seed_everything, smoke_mode, use_drive_for_runs)
from helpers.mnist_gan import IMAGE_PIXELS, IMAGE_SHAPE, GanRun, batches, sample
from helpers.training import (History, count_parameters, load_checkpoint, save_checkpoint,
                              write_metrics)

SMOKE = smoke_mode()                      # SMOKE=1 in the environment: tiny CI run, nothing downloaded
NOTEBOOK = "{{NOTEBOOK}}"
DATASET = "{{DATASET}}"                   # "MNIST" or "FashionMNIST"
RUN_DIR_ON_DRIVE = False                  # True in Colab: runs on Google Drive, so a re-run resumes
SEED = 0
LATENT_DIM = 100                          # size of the noise vector z
G_HIDDEN = (128, 256, 512, 1024)          # generator's hidden widths
D_HIDDEN = (512, 256)                     # discriminator's hidden widths
LEARNING_RATE = 2e-4
BETAS = (0.5, 0.999)                      # Adam's β1, β2
BATCH_SIZE = 64
EPOCHS = 2 if SMOKE else 200              # 200 epochs x 937 iterations ≈ the seed's 187,000 iterations
TRAIN_LIMIT = 4_000 if SMOKE else None    # training images used (None: all of them)
SNAPSHOT_STEPS = (10, 30, 60) if SMOKE else (1_000, 10_000, 20_000, 30_000, 40_000, 50_000)
LOG_EVERY = 10 if SMOKE else 100          # iterations between logged losses
QUALITY_SAMPLES = 500 if SMOKE else 2_000  # samples scored after every epoch to rank checkpoints
N_SAMPLES = 1_000 if SMOKE else 10_000    # samples saved to samples.npz and scored at the end
CLASSIFIER_EPOCHS = 1 if SMOKE else 3     # training of the small classifier behind the quality measure
TIME_LIMIT_MIN = float(os.environ.get("TIME_LIMIT_MIN", "inf"))  # stop at an epoch end after this

use_drive_for_runs(RUN_DIR_ON_DRIVE)      # mounts Drive and sets $RUN_DIR there (Colab only)

DEVICE = pick_device()
DATA_DIR = data_dir()                     # $DATA_DIR, default data/ in the repository
RUN_DIR = run_dir(NOTEBOOK)               # $RUN_DIR/<notebook>: checkpoints, TensorBoard, figures, metrics.json
seed_everything(SEED)
print(f"mode: {'smoke' if SMOKE else 'full'} | device: {describe_device(DEVICE)} | run dir: {RUN_DIR}")

# %% [markdown]
# ## 2. The model: a generator and a discriminator that play a game
#
# ```
# noise z ──► Generator ──► fake image ──► Discriminator ──► P(real) ──► loss ──► backpropagation
#                              real image ──┘
# ```
#
# The **generator** $G$ maps a noise vector $z \sim \mathcal{N}(0, I)$ to an image; the **discriminator** $D$ maps an
# image to the probability that it is real. Goodfellow et al. (2014) write the game as
#
# $$\min_G \max_D \; V(D, G) = \mathbb{E}_{x \sim p_\text{data}}[\log D(x)] + \mathbb{E}_{z \sim p_z}[\log(1 - D(G(z)))].$$
#
# Because $D$ solves a binary classification, both players use the **binary cross-entropy**
# $\text{BCE}(p, y) = -[y \log p + (1-y) \log(1-p)]$, averaged over the batch. Following the seed document:
#
# $$\text{real\_loss} = \text{BCE}(D(x), 1), \qquad \text{fake\_loss} = \text{BCE}(D(G(z)), 0), \qquad
# d\_loss = \frac{\text{real\_loss} + \text{fake\_loss}}{2}$$
#
# $$g\_loss = \text{BCE}(D(G(z)), 1) = -\mathbb{E}_z[\log D(G(z))]$$
#
# The generator's loss labels its fakes as *real*: this "non-saturating" form gives strong gradients early in
# training, when $D$ easily rejects the fakes and $\log(1 - D(G(z)))$ would be flat. At the game's equilibrium
# $D(\cdot) = \tfrac12$ everywhere and both losses equal $\ln 2 \approx 0.693$.

# %% [markdown]
# ## 3. Data
# torchvision's `{{DATASET}}` dataset: 28×28 grayscale images. `ToTensor` gives pixels in [0, 1] and
# `Normalize(0.5, 0.5)` maps them to [−1, 1], the range of the generator's `tanh` output. In Colab the dataset
# downloads into `DATA_DIR`; CI uses an offline copy, announced below when it is a stand-in.

# %%
train_set = data.load_mnist_like(DATASET, DATA_DIR, train=True)
test_set = data.load_mnist_like(DATASET, DATA_DIR, train=False)
STAND_INS = [note] if (note := data.stand_in_note(DATA_DIR, DATASET)) else []
for note in STAND_INS:
    print("STAND-IN:", note)

# The whole training set as one tensor in [-1, 1]: the same values the transform gives, without a DataLoader.
train_images, train_labels = data.images_and_labels(train_set, TRAIN_LIMIT)
test_images, test_labels = data.images_and_labels(test_set)
assert torch.allclose(train_images[0], train_set[0][0]), "in-memory copy must equal the dataset's transform"
assert train_images.min() >= -1 and train_images.max() <= 1
train_images = train_images.to(DEVICE)
print(f"{len(train_images):,} training and {len(test_images):,} held-out images of {tuple(train_images.shape[1:])}")
plotting.show_grid(train_images[:64], f"{DATASET}: 64 training images", RUN_DIR / "data_preview.png")

# %% [markdown]
# ## 4. Generator and discriminator
# Both are fully connected, as in the seed. The generator widens the noise through LeakyReLU(0.2) layers with batch
# normalisation to 784 = 28 × 28 outputs, squashed by `tanh` and reshaped into an image. The discriminator flattens
# the image, narrows it through LeakyReLU(0.2) layers and ends in a sigmoid, so its output is a probability.
# The two cells below are the model: edit them and re-run the notebook to train your own variant.

# %% [helpers] mnist_gan: Generator

# %% [helpers] mnist_gan: Discriminator

# %%
G = Generator(LATENT_DIM, G_HIDDEN).to(DEVICE)
D = Discriminator(D_HIDDEN).to(DEVICE)
n_params = {"generator": count_parameters(G), "discriminator": count_parameters(D)}
print({name: f"{n:,} parameters" for name, n in n_params.items()})
probe = G(torch.randn(8, LATENT_DIM, device=DEVICE))
assert probe.shape == (8, 1, 28, 28) and probe.abs().max() <= 1, probe.shape
assert D(probe).shape == (8, 1) and ((D(probe) > 0) & (D(probe) < 1)).all()
if (LATENT_DIM, G_HIDDEN, D_HIDDEN) == (100, (128, 256, 512, 1024), (512, 256)):
    assert n_params == {"generator": 1_510_032, "discriminator": 533_505}  # counted by hand in tests/test_mnist_gan.py

# %% [markdown]
# ## 5. Losses
# The two formulas of section 2, as code. A check by hand: with $D(x) = 0.9$ on a real
# image and $D(G(z)) = 0.2$ on a fake, $d\_loss = \tfrac12[-\ln 0.9 - \ln 0.8] = 0.164$ and $g\_loss = -\ln 0.2 = 1.609$.

# %% [helpers] losses: bce_discriminator_loss, bce_generator_loss

# %%
d_loss_example = bce_discriminator_loss(torch.tensor([0.9]), torch.tensor([0.2])).item()
g_loss_example = bce_generator_loss(torch.tensor([0.2])).item()
print(f"d_loss = {d_loss_example:.3f}, g_loss = {g_loss_example:.3f}")
assert math.isclose(d_loss_example, 0.5 * (-math.log(0.9) - math.log(0.8)), rel_tol=1e-6)
assert math.isclose(g_loss_example, -math.log(0.2), rel_tol=1e-6)

# %% [markdown]
# ## 6. Measuring sample quality offline
# A GAN's losses say who is winning the game, not how good the images are. We score samples the way FID does, but
# in the feature space of a **small CNN classifier trained on {{DATASET}} itself** (Inception's weights are not
# available offline, and Inception features of 28×28 digits are a poor fit anyway):
#
# $$\text{FD} = \lVert \mu_g - \mu_r \rVert^2 + \operatorname{Tr}\big(\Sigma_g + \Sigma_r - 2(\Sigma_g \Sigma_r)^{1/2}\big),$$
#
# the Fréchet distance between Gaussians fitted to the 128-d features of generated ($g$) and held-out real ($r$)
# images: lower is better, 0 for identical statistics. **Class coverage** is the entropy of the histogram of classes the
# classifier predicts for generated images: $\ln 10 = 2.303$ nats when all ten classes appear equally often, lower
# when the generator collapses onto a few classes. FD values are comparable only with each other, not with published FIDs.

# %%
classifier, classifier_accuracy = metrics.train_classifier(
    train_images.cpu(), train_labels, test_images, test_labels,
    cache=DATA_DIR / DATASET / f"classifier-{len(train_images)}-{CLASSIFIER_EPOCHS}ep.pt",
    epochs=CLASSIFIER_EPOCHS, device=DEVICE, seed=SEED)
print(f"feature classifier: {classifier_accuracy:.1%} accuracy on {len(test_images):,} held-out images")
assert classifier_accuracy > 0.5, "the classifier behind the quality measure did not learn"
score = metrics.SampleQuality(classifier, test_images, DEVICE)

real_floor = score.real_vs_real()
noise_score = score(torch.rand(QUALITY_SAMPLES, 1, 28, 28) * 2 - 1)
print(f"reference points: FD(real half vs real half) = {real_floor:.2f}, FD(uniform noise) = {noise_score['fd']:.2f}")
assert real_floor < noise_score["fd"], "noise must score worse than real images"

# %% [markdown]
# ## 7. Training
# Each iteration follows the seed: noise → generator → fakes; the generator steps on its loss (fakes labelled real);
# then the discriminator steps on the mean of its real and fake losses, with the fakes detached so that this step does
# not change the generator.

# %% [helpers] mnist_gan: train_step

# %% [markdown]
# The loop around it logs the losses to TensorBoard every `LOG_EVERY` iterations, keeps a
# grid of the same 64 noise vectors at the snapshot iterations, scores `QUALITY_SAMPLES` samples at the end of every
# epoch, and saves three checkpoints: `last.pt` (models, optimizers, iteration, random-generator state, history:
# everything needed to resume), `best_by_g_loss.pt` (the seed's choice: the epoch with the lowest mean generator loss)
# and `best_by_fd.pt` (the epoch with the lowest FD). **Re-running the cell resumes** from `last.pt`, so a Colab
# disconnect costs at most one epoch; set `RUN_DIR` to a Google Drive folder to keep runs across sessions.
# Mixed precision is not used here on purpose: the model is tiny (the time goes into Python overhead, not
# arithmetic) and `BCELoss` on sigmoid outputs is not autocast-safe.

# %% [helpers] mnist_gan: train_gan, end_epoch

# %%
if in_colab():
    %load_ext tensorboard
    %tensorboard --logdir {RUN_DIR / "tensorboard"}

opt_g = torch.optim.Adam(G.parameters(), lr=LEARNING_RATE, betas=BETAS)
opt_d = torch.optim.Adam(D.parameters(), lr=LEARNING_RATE, betas=BETAS)
CONFIG = {"dataset": DATASET, "image_size": 28, "latent_dim": LATENT_DIM, "g_hidden": list(G_HIDDEN),
          "d_hidden": list(D_HIDDEN), "seed": SEED, "train_images": len(train_images), "batch_size": BATCH_SIZE}
fixed_noise = torch.randn(64, LATENT_DIM, generator=torch.Generator().manual_seed(SEED)).to(DEVICE)


def quality(generator: Generator) -> dict:
    """Score QUALITY_SAMPLES samples of a fixed noise stream."""
    return score(mnist_gan.generate(generator, QUALITY_SAMPLES, DEVICE, seed=SEED + 1))


run = GanRun(History(RUN_DIR / "tensorboard"))
run = train_gan(G, D, opt_g, opt_d, train_images, run, EPOCHS, BATCH_SIZE, RUN_DIR, CONFIG,
                fixed_noise, SNAPSHOT_STEPS, quality, LOG_EVERY, TIME_LIMIT_MIN * 60)
speed = run.stopwatch.throughput()
print(f"{run.epoch} epochs, {run.step:,} iterations in {run.stopwatch.seconds:.1f} s of training: "
      f"{speed['it_per_s']:.1f} it/s, {speed['img_per_s']:.0f} images/s at batch {BATCH_SIZE}")
assert run.step == run.epoch * (len(train_images) // BATCH_SIZE)
assert run.epoch_quality[-1]["fd"] < noise_score["fd"], "after training, samples must score better than noise"

# %% [markdown]
# ## 8. Results
# ### Loss curves
# Per-iteration losses (moving average) and, per epoch, the mean generator loss beside the FD of that epoch's samples.

# %%
plotting.plot_losses(run.history, ["loss/generator", "loss/discriminator"], f"{DATASET} GAN: losses",
                     RUN_DIR / "loss.png", smooth=5 if SMOKE else 20)

# %%
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

epochs = range(1, run.epoch + 1)
fig, ax_loss = plt.subplots(figsize=(8, 4))
ax_loss.plot(epochs, run.epoch_g_loss, "o-", color="tab:blue", label="mean generator loss")
ax_loss.set_xlabel("epoch")
ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
ax_loss.set_ylabel("generator loss (BCE)", color="tab:blue")
ax_fd = ax_loss.twinx()
ax_fd.plot(epochs, [q["fd"] for q in run.epoch_quality], "s-", color="tab:red", label="FD (lower is better)")
ax_fd.set_ylabel("Fréchet distance in classifier features", color="tab:red")
for best, color in ((run.best_by_g_loss, "tab:blue"), (run.best_by_quality, "tab:red")):
    ax_loss.axvline(best["epoch"], color=color, ls="--", alpha=0.6)
ax_loss.set_title(f"{DATASET}: generator loss vs sample quality per epoch (dashed: each criterion's best epoch)")
plotting.save_figure(fig, RUN_DIR / "epoch_loss_vs_fd.png")
plt.show()

# %% [markdown]
# ### Samples over iterations
# The seed's table as one figure: the same 64 noise vectors decoded by the generator at several iterations.

# %%
plotting.show_over_iterations(run.snapshots, f"{DATASET}: the same noise over training", RUN_DIR / "over_iterations.png")

# %% [markdown]
# ## 9. Which checkpoint to keep?
# The seed picks the epoch where the generator loss is lowest. But a low generator loss only means that $D$ was
# fooled *at that moment*: it says nothing about variety or realism. We load both candidates into fresh generators,
# draw the same `N_SAMPLES` noise vectors for each, and compare FD and class coverage.

# %%
candidates = {"lowest generator loss (seed)": "best_by_g_loss.pt", "lowest FD": "best_by_fd.pt"}
rows, samples, grids = [], {}, {}
for label, filename in candidates.items():
    fresh = Generator(LATENT_DIM, G_HIDDEN).to(DEVICE)
    info = load_checkpoint(RUN_DIR / filename, {"G": fresh}, restore_rng=False)["extra"]
    images = mnist_gan.generate(fresh, N_SAMPLES, DEVICE, seed=SEED + 2)
    scores = score(images)
    samples[label], grids[label] = metrics.model_output_to_uint8(images), images[:64]
    rows.append((label, info["epoch"], info["g_loss"], scores["fd"], scores["coverage_nats"]))
table = "\n".join(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.2f} | {r[4]:.3f} |" for r in rows)
display(Markdown("| checkpoint | epoch | mean G loss | FD ↓ | coverage (nats, max 2.303) ↑ |\n|---|---|---|---|---|\n"
                 + table))
plotting.show_panels(grids, f"{DATASET}: the two checkpoint choices, same noise", RUN_DIR / "checkpoint_choice.png")
(by_loss, by_fd) = rows
verdict = ("the same epoch: both criteria agree" if by_loss[1] == by_fd[1] else
           f"the FD choice (epoch {by_fd[1]}) scores FD {by_fd[3]:.2f} against {by_loss[3]:.2f} for the "
           f"lowest-loss choice (epoch {by_loss[1]})")
print(f"Measured on {N_SAMPLES:,} samples each: {verdict}.")
skip = max(1, run.epoch // 10)  # a fairer reading of the seed: ignore the first 10% of epochs
if run.epoch > skip:
    late = min(range(skip, run.epoch), key=lambda e: run.epoch_g_loss[e])
    print(f"Lowest G loss after the first {skip} epoch(s): epoch {late + 1}, FD {run.epoch_quality[late]['fd']:.2f} "
          f"on {QUALITY_SAMPLES:,} samples (the FD choice had {run.best_by_quality['fd']:.2f} on the same count).")

# %% [markdown]
# We keep the checkpoint with the lower FD. Its `N_SAMPLES` samples (and those of the seed's choice, for comparison)
# are saved as uint8 28×28 arrays in `samples.npz`; the final quality figures are computed from exactly those arrays.

# %%
chosen = min(rows, key=lambda r: r[3])[0]
np.savez_compressed(RUN_DIR / "samples.npz", images=samples[chosen], images_by_g_loss=samples[rows[0][0]])
saved = np.load(RUN_DIR / "samples.npz")
assert saved["images"].dtype == np.uint8 and saved["images"].shape == (N_SAMPLES, 28, 28)
final_quality = score(metrics.uint8_to_model_input(saved["images"]))
print(f"samples.npz: {(RUN_DIR / 'samples.npz').stat().st_size / 1e6:.2f} MB; chosen '{chosen}': "
      f"FD {final_quality['fd']:.2f}, coverage {final_quality['coverage_nats']:.3f} nats")

# %% [markdown]
# ## 10. Resume after a disconnect
# Colab can disconnect at any time. Here we simulate a fresh session: new models and optimizers, restored from
# `last.pt`. The weights, the iteration counter and the random-generator state must come back exactly, so that
# re-running the training cell continues where it stopped.

# %%
G2, D2 = Generator(LATENT_DIM, G_HIDDEN).to(DEVICE), Discriminator(D_HIDDEN).to(DEVICE)
opt_g2 = torch.optim.Adam(G2.parameters(), lr=LEARNING_RATE, betas=BETAS)
opt_d2 = torch.optim.Adam(D2.parameters(), lr=LEARNING_RATE, betas=BETAS)
run2 = GanRun(History())
resumed = load_checkpoint(RUN_DIR / "last.pt", {"G": G2, "D": D2, "opt_g": opt_g2, "opt_d": opt_d2,
                                                "run": run2}, config=CONFIG)
assert resumed["step"] == run.step and run2.epoch == run.epoch and run2.step == run.step
assert all(torch.equal(a, b) for a, b in zip(G.state_dict().values(), G2.state_dict().values()))
assert all(torch.equal(a, b) for a, b in zip(D.state_dict().values(), D2.state_dict().values()))
assert opt_g2.state_dict()["state"][0]["step"] == opt_g.state_dict()["state"][0]["step"]
print(f"resume check passed: iteration {resumed['step']:,}, epoch {run2.epoch}")

# %% [markdown]
# ## 11. Generate with the saved generator
# What a reader does later: build a fresh generator, load the kept weights, draw noise, get images.

# %%
generator = Generator(LATENT_DIM, G_HIDDEN).to(DEVICE)
load_checkpoint(RUN_DIR / candidates[chosen], {"G": generator}, restore_rng=False)
z = torch.randn(64, LATENT_DIM, generator=torch.Generator().manual_seed(2024)).to(DEVICE)
new_images = sample(generator, z)
assert torch.allclose(new_images, sample(generator, z)), "eval-mode sampling must be deterministic"
plotting.show_grid(new_images, f"{DATASET}: 64 new samples from the reloaded generator", RUN_DIR / "samples.png")

# %% [markdown]
# ## 12. Metrics
# Inception FID (torchmetrics) is added in full mode when its weights can be downloaded; on 28×28 grayscale images it
# is a weak measure, so the classifier-feature FD above stays the main figure. Everything lands in `metrics.json`.

# %%
quality_report = {"fd": final_quality["fd"], "coverage_nats": final_quality["coverage_nats"],
                  "coverage_share": final_quality["coverage_share"], "fd_real_vs_real": real_floor,
                  "fd_uniform_noise": noise_score["fd"], "classifier_accuracy": classifier_accuracy,
                  "chosen_checkpoint": chosen,
                  "by_g_loss": {"epoch": rows[0][1], "fd": rows[0][3], "coverage_nats": rows[0][4]},
                  "by_fd": {"epoch": rows[1][1], "fd": rows[1][3], "coverage_nats": rows[1][4]}}
if not SMOKE:
    real_uint8 = metrics.model_output_to_uint8(test_images)
    quality_report["inception_fid"], fid_note = metrics.inception_fid(saved["images"], real_uint8, DEVICE)
    print(fid_note)
path = write_metrics(RUN_DIR, NOTEBOOK, SMOKE, DEVICE, run.step, run.stopwatch.seconds, speed, quality_report,
                     STAND_INS, epochs=run.epoch, batch_size=BATCH_SIZE, parameters=n_params)
print(path.read_text())

# %% [markdown]
# ## What to take away
# * {{TAKEAWAY}}; the samples-over-iterations figure shows shapes first, then
#   strokes and details.
# * The generator loss is a poor guide for choosing a checkpoint: it measures the state of the game, not the images.
#   Score samples (here: a classifier-feature Fréchet distance and class coverage) and keep the best-scoring epoch.
# * Everything you need to resume, compare and report is in `RUN_DIR`: `last.pt`, `best_by_*.pt`, `samples.npz`,
#   `metrics.json`, the PNG figures and the TensorBoard logs.
