"""Neural style transfer (Gatys et al. 2016) and multi-modal stylisation by deep feature perturbation (DFP, 2020).

Image inputs (path or URL, aspect-kept resize, grayscale/RGBA conversion, luminance-only colour preservation), the
objective the stylised image minimises, its optimisation loop, the DFP targets and the diversity measures.
"""
from __future__ import annotations

import io
import itertools
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.transforms.functional import pil_to_tensor

from .losses import content_loss, gram_matrix, style_loss, total_variation_loss
from .vgg import VGG19Features

CONTENT_LAYERS = ("relu4_2",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
MIN_SIDE = 32  # conv5_1 sees the image after 4 poolings (1/16): 32 px leaves it 2 x 2 positions
URL_TIMEOUT_S = 30
YIQ_FROM_RGB = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


# --- Inputs --------------------------------------------------------------------------------------------------------


def is_url(source: str | os.PathLike) -> bool:
    """True for http(s) addresses."""
    return str(source).lower().startswith(("http://", "https://"))


def fetch_url(url: str, role: str = "image", timeout: float = URL_TIMEOUT_S) -> bytes:
    """Download `url`; a failure says which input it was and what to do."""
    request = urllib.request.Request(url, headers={"User-Agent": "genimg-notebooks/1.0"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ConnectionError(
            f"{role} '{url}' could not be downloaded ({getattr(err, 'reason', err)}); check the address and your "
            "internet connection, or download the file and pass its path (e.g. put it in assets/)"
        ) from err


def read_source(source: str | os.PathLike, role: str = "image") -> bytes:
    """The bytes of an image given by path or URL; a missing file names the input and what to do."""
    if is_url(source):
        return fetch_url(str(source), role)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{role} '{source}' not found; put it in assets/ or pass a full path or an http(s) URL")
    return path.read_bytes()


def as_rgb_image(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB version of any PIL image: gray repeated on 3 channels, transparency flattened onto `background`."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, background)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode in ("I", "I;16", "I;16B", "F"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.uint8(values / max(values.max(), 1.0) * 255))
    return image.convert("RGB")


def decode_image(data: bytes, source: str | os.PathLike, role: str = "image") -> Image.Image:
    """Decode image bytes to an RGB PIL image; data that is no image names the input and what to do."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(
            f"{role} '{source}' is not a readable image ({type(err).__name__}: {err}); "
            "pass a JPEG, PNG, BMP or WebP file, or re-save it with an image editor"
        ) from err
    return as_rgb_image(image)


def resize_long_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is `size` px, keeping the aspect ratio (bicubic, antialiased)."""
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image if new_size == image.size else image.resize(new_size, Image.Resampling.BICUBIC)


def check_vgg_size(height: int, width: int, role: str = "image", source: str | os.PathLike = "") -> None:
    """Raise if an image is too small for VGG19's four poolings before conv5_1."""
    if min(height, width) < MIN_SIDE:
        raise ValueError(
            f"{role} '{source}' would be {width}x{height} px, but VGG19 halves the size 4 times before conv5_1, so "
            f"both sides must be at least {MIN_SIDE} px: raise the size in the parameters cell "
            "(IMAGE_SIZE) or crop the image to a less elongated shape"
        )


def load_image(source: str | os.PathLike, size: int, role: str = "image",
               device: torch.device | str = "cpu") -> Tensor:
    """Image by path or URL as a (1, 3, H, W) tensor in [0, 1], its longer side resized to `size` px."""
    image = resize_long_side(decode_image(read_source(source, role), source, role), size)
    check_vgg_size(image.height, image.width, role, source)
    return (pil_to_tensor(image).float() / 255).unsqueeze(0).to(device)


# --- Colour preservation (Gatys et al. 2016, "Preserving color in neural artistic style transfer") ----------------


def rgb_to_yiq(images: Tensor) -> Tensor:
    """RGB (B, 3, H, W) -> YIQ: Y is the luminance, I and Q the colour."""
    return torch.einsum("ij,bjhw->bihw", YIQ_FROM_RGB.to(images), images)


def yiq_to_rgb(images: Tensor) -> Tensor:
    """YIQ (B, 3, H, W) -> RGB."""
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(YIQ_FROM_RGB).to(images), images)


def luminance_image(images: Tensor, reference: Tensor | None = None) -> Tensor:
    """Gray RGB image of the luminance; with `reference`, its mean and std are matched to the reference's luminance."""
    y = rgb_to_yiq(images)[:, :1]
    if reference is not None:
        y_ref = rgb_to_yiq(reference)[:, :1]
        y = (y - y.mean()) / (y.std() + 1e-8) * y_ref.std() + y_ref.mean()
    return y.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def keep_colours(stylised: Tensor, content: Tensor) -> Tensor:
    """The stylised image's luminance Y with the content's colour channels I, Q (luminance-only transfer)."""
    yiq = torch.cat([rgb_to_yiq(stylised)[:, :1], rgb_to_yiq(content)[:, 1:]], dim=1)
    return yiq_to_rgb(yiq).clamp(0, 1)


# --- The objective and its optimisation -----------------------------------------------------------------------------


def energy(target: Tensor) -> float:
    """mean(target^2): the loss an all-zero prediction would have, used to make the loss weights unit-free."""
    return max(float(target.square().mean()), 1e-12)


def features_by_name(vgg: VGG19Features, images: Tensor) -> dict[str, Tensor]:
    """VGG19 feature maps of `images`, keyed by layer name."""
    return dict(zip(vgg.layers, vgg(images)))


class StyleObjective(nn.Module):
    """What the stylised image x minimises: alpha L_c/L_c0 + beta L_s/L_s0 + tau TV (+ gamma L_f/L_f0 for DFP targets).

    L_c, L_s are Gatys et al.'s content and style losses (helpers.losses); each is divided by its value for an
    all-zero feature map (the energy of its target: mean(P^2) and 1/4 mean(A^2) per layer), so alpha, beta, gamma are
    unit-free and do not depend on the feature scale of the network. L_f is the optional feature-reconstruction loss
    to per-layer target feature maps (the DFP targets of multi-modal transfer).
    """

    def __init__(self, vgg: VGG19Features, content: Tensor, style: Tensor,
                 content_layers: Sequence[str] = CONTENT_LAYERS, style_layers: Sequence[str] = STYLE_LAYERS,
                 layer_weights: Sequence[float] | None = None, content_weight: float = 1.0,
                 style_weight: float = 1.0, tv_weight: float = 0.0,
                 feature_targets: Sequence[Tensor] | None = None, feature_weight: float = 0.0) -> None:
        super().__init__()
        missing = [name for name in (*content_layers, *style_layers) if name not in vgg.layers]
        if missing:
            raise ValueError(f"the VGG19Features extractor does not return {missing}; build it with these layers")
        self.vgg = vgg
        self.content_layers, self.style_layers = list(content_layers), list(style_layers)
        self.weights = {"content": content_weight, "style": style_weight, "tv": tv_weight, "feature": feature_weight}
        layer_weights = [1.0 / len(style_layers)] * len(style_layers) if layer_weights is None else list(layer_weights)
        with torch.no_grad():
            content_feats, style_feats = features_by_name(vgg, content), features_by_name(vgg, style)
        self.content_targets = [content_feats[name] for name in self.content_layers]
        self.gram_targets = [gram_matrix(style_feats[name]) for name in self.style_layers]
        self.content_scale = sum(energy(t) for t in self.content_targets) / len(self.content_targets)
        # E_l of an all-zero map is 1/4 mean(A_l^2) (energy(0.25 * A) was mean(A_l^2) / 16: 4x too small)
        self.layer_weights = [w / (0.25 * energy(a)) for w, a in zip(layer_weights, self.gram_targets)]
        self.feature_targets = [t.detach() for t in feature_targets or []]
        self.feature_scales = [energy(t) for t in self.feature_targets]
        if feature_targets is not None and len(self.feature_targets) != len(self.style_layers):
            raise ValueError(f"got {len(self.feature_targets)} feature targets for {len(self.style_layers)} "
                             "style layers; give one per style layer")

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """The relative content, style (and feature) losses, TV and their weighted total for images in [0, 1]."""
        feats = features_by_name(self.vgg, images)
        losses = {
            "content": sum(content_loss(feats[n], t) for n, t in zip(self.content_layers, self.content_targets))
            / len(self.content_layers) / self.content_scale,
            "style": style_loss([feats[n] for n in self.style_layers], self.gram_targets, self.layer_weights),
            "tv": total_variation_loss(images),
        }
        if self.feature_targets:
            terms = [content_loss(feats[n], t) / scale
                     for n, t, scale in zip(self.style_layers, self.feature_targets, self.feature_scales)]
            losses["feature"] = sum(terms) / len(terms)
        losses["total"] = sum(self.weights[name] * value for name, value in losses.items())
        return losses


class StylisedImage(nn.Module):
    """The image being optimised: its pixels, in [0, 1], are the only parameters."""

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.pixels = nn.Parameter(init.detach().clone())

    def forward(self) -> Tensor:
        """The current image (1, 3, H, W)."""
        return self.pixels


def initial_image(content: Tensor, init: str = "noise", seed: int = 0) -> Tensor:
    """Start of the optimisation: white noise in [0, 1] (the paper) or the content image, on the content's device."""
    if init == "content":
        return content.detach().clone()
    if init != "noise":
        raise ValueError(f"init must be 'noise' (the paper) or 'content', got {init!r}")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(content.shape, generator=generator).to(content.device)


def make_optimizer(image: StylisedImage, name: str = "lbfgs", lr: float | None = None,
                   history_size: int = 100) -> torch.optim.Optimizer:
    """L-BFGS (the paper; one iteration per step() call) or Adam over the image's pixels."""
    if name == "lbfgs":
        return torch.optim.LBFGS(image.parameters(), lr=lr or 1.0, max_iter=1, history_size=history_size)
    if name == "adam":
        return torch.optim.Adam(image.parameters(), lr=lr or 0.02)
    raise ValueError(f"optimizer must be 'lbfgs' (the paper's) or 'adam', got {name!r}")


def optimisation_step(objective: StyleObjective, image: StylisedImage,
                      optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One iteration: losses at the current image, a step of the optimizer, pixels clamped back to [0, 1]."""
    losses: dict[str, Tensor] = {}

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses.update(objective(image()))
        losses["total"].backward()
        return losses["total"]

    optimizer.step(closure)
    with torch.no_grad():
        image.pixels.clamp_(0, 1)
    return {name: float(value.detach()) for name, value in losses.items()}


def evaluate(objective: StyleObjective, images: Tensor) -> dict[str, float]:
    """The objective's losses of each image of a batch, averaged, as floats."""
    with torch.no_grad():
        values = [objective(x.unsqueeze(0)) for x in images]
    return {name: sum(float(v[name]) for v in values) / len(values) for name in values[0]}


def stylise(objective: StyleObjective, init: Tensor, steps: int, optimizer: str = "lbfgs", lr: float | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> Tensor:
    """Gatys et al.'s optimisation: from `init`, `steps` optimizer iterations; returns the image (1, 3, H, W)."""
    image = StylisedImage(init)
    opt = make_optimizer(image, optimizer, lr)
    for step in range(steps):
        losses = optimisation_step(objective, image, opt)
        if on_step is not None:
            on_step(step + 1, losses)
    return image().detach()


# --- Multi-modal transfer: deep feature perturbation (DFP, Wang et al. CVPR 2020) ---------------------------------


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A random orthogonal n x n matrix Z (Z Z^T = I): the left singular vectors of a Gaussian matrix."""
    u, _, _ = torch.linalg.svd(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return u


def _eigen(features: Tensor, rel_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, eigenvectors E and eigenvalues D of the covariance of features (N, M), keeping D > rel_eps * max(D)."""
    mean = features.mean(dim=1, keepdim=True)
    centred = features - mean
    values, vectors = torch.linalg.eigh(centred @ centred.T / features.shape[1])
    keep = values > rel_eps * values.max().clamp_min(1e-30)
    return mean, vectors[:, keep], values[keep]


def whitening_colouring(content: Tensor, style: Tensor, z: Tensor | Callable[[int], Tensor] | None = None,
                        rel_eps: float = 1e-5) -> Tensor:
    """WCT of content features (1, N, H, W) to the style's covariance: E_s D_s^1/2 [Z] E_s^T f_c_hat + m_s.

    f_c_hat = E_c D_c^-1/2 E_c^T (f_c - m_c) is the whitened content. `z` is DFP's random orthogonal k x k matrix,
    k the rank of the style covariance (or a function of k giving one); None is plain WCT (Li et al. 2017).
    """
    _, n, h, w = content.shape
    fc = content.reshape(n, h * w).double()
    fs = style.reshape(n, -1).double()
    mc, ec, dc = _eigen(fc, rel_eps)
    ms, es, ds = _eigen(fs, rel_eps)
    whitened = ec @ torch.diag(dc.rsqrt()) @ ec.T @ (fc - mc)
    if callable(z):
        z = z(es.shape[1])
    middle = torch.diag(ds.sqrt()) if z is None else torch.diag(ds.sqrt()) @ z.to(fc)
    coloured = es @ middle @ es.T @ whitened + ms
    return coloured.reshape(1, n, h, w).to(content.dtype)


def dfp_target(content: Tensor, style: Tensor, z: Tensor | Callable[[int], Tensor], lam: float = 0.6,
               alpha: float = 0.6) -> Tensor:
    """DFP feature target: alpha [lam WCT_Z + (1 - lam) WCT] + (1 - alpha) f_c (lam: diversity, alpha: stylisation)."""
    for name, value in (("lam", lam), ("alpha", alpha)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"DFP's {name} blends two feature maps, so it must lie in [0, 1], got {value}")

    def blended(k: int) -> Tensor:  # lam Z + (1 - lam) I: one WCT gives lam WCT_Z + (1 - lam) WCT
        z_k = z(k) if callable(z) else z
        return lam * z_k + (1 - lam) * torch.eye(k, dtype=z_k.dtype, device=z_k.device)

    return alpha * whitening_colouring(content, style, blended) + (1 - alpha) * content


def dfp_targets(vgg: VGG19Features, content: Tensor, style: Tensor, layers: Sequence[str] = STYLE_LAYERS,
                seed: int = 0, lam: float = 0.6, alpha: float = 0.6) -> list[Tensor]:
    """One DFP target per layer for one draw of the random orthogonal matrices (a new seed: a new stylisation)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fc, fs = features_by_name(vgg, content), features_by_name(vgg, style)
    return [dfp_target(fc[name], fs[name], lambda k: random_orthogonal(k, generator), lam, alpha) for name in layers]


# --- Diversity ------------------------------------------------------------------------------------------------------


def _pairs(count: int) -> list[tuple[int, int]]:
    pairs = list(itertools.combinations(range(count), 2))
    if not pairs:
        raise ValueError(f"diversity needs at least 2 images, got {count}")
    return pairs


def feature_diversity(images: Tensor, vgg: VGG19Features) -> float:
    """Mean over pairs of (1/L) sum_l mean_positions |phi_l(x_i) - phi_l(x_j)|^2, features unit-normalised per position.

    LPIPS without its learned weights: 0 for identical images, at most 4.
    """
    with torch.no_grad():
        feats = [F.normalize(f, dim=1, eps=1e-10) for f in vgg(images)]
    distances = [sum((f[i] - f[j]).square().sum(dim=0).mean() for f in feats) / len(feats)
                 for i, j in _pairs(len(images))]
    return float(sum(distances) / len(distances))


def lpips_diversity(images: Tensor, lpips: Callable[[Tensor, Tensor], Tensor]) -> float:
    """Mean over pairs of an LPIPS metric (e.g. torchmetrics' LearnedPerceptualImagePatchSimilarity), as in DFP."""
    with torch.no_grad():
        distances = [float(lpips(images[i:i + 1], images[j:j + 1])) for i, j in _pairs(len(images))]
    return sum(distances) / len(distances)


def pixel_diversity(images: Tensor) -> float:
    """Mean over pairs of the mean absolute RGB difference (images in [0, 1]), DFP's pixel distance."""
    distances = [(images[i] - images[j]).abs().mean() for i, j in _pairs(len(images))]
    return float(sum(distances) / len(distances))
