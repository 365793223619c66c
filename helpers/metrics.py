"""Quality measures of the collection: sample quality for MNIST-like GANs (offline Fréchet distance, class
coverage, torchmetrics' FID where Inception loads) and PSNR and SSIM of paired images
(the CLIP score is in helpers.clip).

The Fréchet distance here is FID's formula, d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}), computed in the
128-d penultimate features of a small CNN classifier trained on the same dataset (not Inception: numbers are
comparable only with each other, never with published FIDs). Class coverage is the entropy of the histogram of
classes the classifier predicts for generated images: ln(10) = 2.303 nats when every class is equally frequent.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .training import load_checkpoint, save_checkpoint


class MnistClassifier(nn.Module):
    """Small CNN for 1x28x28 images in [-1, 1]: two conv blocks, a 128-d feature layer, 10 logits."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: Tensor) -> Tensor:
        """The 128-d features the Fréchet distance is computed in."""
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits."""
        return self.head(self.body(images))


def uint8_to_model_input(images: np.ndarray | Tensor) -> Tensor:
    """(N, 28, 28) uint8 images -> (N, 1, 28, 28) floats in [-1, 1]."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return (images.float() / 127.5 - 1.0).reshape(-1, 1, 28, 28)


def model_output_to_uint8(images: Tensor) -> np.ndarray:
    """Generator output in [-1, 1] -> (N, 28, 28) uint8, the format samples.npz stores."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(-1, 28, 28).numpy()


@torch.no_grad()
def _batched(fn, images: Tensor, device: torch.device, batch: int = 1000) -> Tensor:
    return torch.cat([fn(images[i:i + batch].to(device)).cpu() for i in range(0, len(images), batch)])


def train_classifier(train_images: Tensor, train_labels: Tensor, test_images: Tensor, test_labels: Tensor,
                     cache: str | os.PathLike, epochs: int = 2, device: torch.device = torch.device("cpu"),
                     seed: int = 0) -> tuple[MnistClassifier, float]:
    """Train (or load from `cache`) the feature classifier; return it with its test accuracy."""
    model = MnistClassifier().to(device)
    config = {"n_train": len(train_images), "epochs": epochs, "seed": seed}
    cache = Path(cache)
    if cache.exists():
        extra = load_checkpoint(cache, {"classifier": model}, config=config, restore_rng=False)["extra"]
        return model.eval(), extra["test_accuracy"]
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_images), generator=generator)
        for i in range(0, len(order), 128):
            idx = order[i:i + 128]
            loss = F.cross_entropy(model(train_images[idx].to(device)), train_labels[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    predictions = _batched(model, test_images, device).argmax(1)
    accuracy = (predictions == test_labels).float().mean().item()
    save_checkpoint(cache, {"classifier": model}, config=config, extra={"test_accuracy": accuracy})
    return model, accuracy


def frechet_distance_from_stats(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2}), via the eigenvalues of S_a S_b (float64)."""
    mu_a, mu_b, cov_a, cov_b = (t.double() for t in (mu_a, mu_b, cov_a, cov_b))
    eigenvalues = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0)
    trace_sqrt = eigenvalues.sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


def mean_and_covariance(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean vector and (unbiased) covariance matrix of row features."""
    if len(features) < 2:
        raise ValueError("need at least two feature vectors for a covariance")
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between two sets of feature vectors, each modelled as a Gaussian."""
    return frechet_distance_from_stats(*mean_and_covariance(features_a), *mean_and_covariance(features_b))


def class_coverage(predicted: Tensor, num_classes: int = 10) -> float:
    """Entropy (nats) of the predicted-class histogram; ln(num_classes) means every class equally often."""
    counts = torch.bincount(predicted.flatten(), minlength=num_classes).double()
    p = counts / counts.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


class SampleQuality:
    """Scores generated images against held-out real ones in the classifier's feature space."""

    def __init__(self, classifier: MnistClassifier, real_images: Tensor, device: torch.device) -> None:
        self.classifier = classifier.eval()
        self.device = device
        self.real_features = _batched(classifier.features, real_images, device)
        self.real_stats = mean_and_covariance(self.real_features)

    def real_vs_real(self) -> float:
        """FD between the two halves of the real set: the floor that sampling noise alone gives."""
        half = len(self.real_features) // 2
        return frechet_distance(self.real_features[:half], self.real_features[half:2 * half])

    def __call__(self, images: Tensor) -> dict[str, float]:
        """FD to the real set, class coverage (nats) and its share of the maximum ln(10)."""
        features = _batched(self.classifier.features, images, self.device)
        predicted = self.classifier.head(features.to(self.device)).argmax(1).cpu()
        coverage = class_coverage(predicted)
        return {"fd": frechet_distance_from_stats(*mean_and_covariance(features), *self.real_stats),
                "coverage_nats": coverage, "coverage_share": coverage / math.log(10)}


def inception_fid(fake_uint8: np.ndarray, real_uint8: np.ndarray, device: torch.device) -> tuple[float | None, str]:
    """torchmetrics' FID (Inception-v3, 2048-d) when its weights load; else None and the reason."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        fid = FrechetInceptionDistance(feature=2048).to(device)
    except Exception as err:  # missing torch-fidelity or no internet for the weights
        return None, f"Inception FID unavailable here ({type(err).__name__}: {str(err)[:120]})"
    for images, real in ((real_uint8, True), (fake_uint8, False)):
        for i in range(0, len(images), 500):
            batch = torch.as_tensor(images[i:i + 500]).unsqueeze(1).repeat(1, 3, 1, 1)
            resized = F.interpolate(batch.float(), size=299, mode="bilinear").round().clamp(0, 255)
            fid.update(resized.to(torch.uint8).to(device), real=real)
    return float(fid.compute()), "Inception FID (torchmetrics, 2048-d)"


# --- paired-image metrics (notebook 05): on images in [0, data_range], like torchmetrics and the SSIM paper --------


def check_unit_range(images: Tensor, what: str, data_range: float = 1.0) -> None:
    """Raise a ValueError unless `images` lie in [0, data_range] (SSIM's luminance term is not shift-invariant)."""
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > data_range:
        raise ValueError(f"{what} takes images in [0, {data_range:g}], got values in [{low:.2f}, {high:.2f}]; "
                         "map images in [-1, 1] with (x + 1) / 2 first")


def psnr(fake: Tensor, real: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB, 10 log10(data_range^2 / MSE), for images in [0, data_range]."""
    if fake.shape != real.shape:
        raise ValueError(f"PSNR needs images of the same shape, got {tuple(fake.shape)} and {tuple(real.shape)}")
    check_unit_range(fake, "PSNR", data_range)
    check_unit_range(real, "PSNR", data_range)
    mse = (fake.float() - real.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """(size, size) Gaussian weights summing to 1, SSIM's standard window."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(fake: Tensor, real: Tensor, data_range: float = 1.0, window: int = 11) -> Tensor:
    """Per-image SSIM (Wang et al. 2004) of images in [0, data_range]: the local SSIM map (Gaussian window 11,
    sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2) averaged over the valid region, as the authors' reference code
    (torchmetrics instead pads by reflection and averages the whole map)."""
    if fake.shape != real.shape:
        raise ValueError(f"SSIM needs images of the same shape, got {tuple(fake.shape)} and {tuple(real.shape)}")
    if min(fake.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {tuple(fake.shape[-2:])}")
    check_unit_range(fake, "SSIM", data_range)
    check_unit_range(real, "SSIM", data_range)
    channels = fake.shape[1]
    kernel = gaussian_window(window).to(fake.device).expand(channels, 1, window, window)
    x, y = fake.float(), real.float()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = (blur(x * x) - mu_x**2).clamp_min(0), (blur(y * y) - mu_y**2).clamp_min(0)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)
