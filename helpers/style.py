"""Neural style transfer (Gatys et al. 2016) and multi-modal stylisation by deep feature perturbation (DFP, 2020).

Image inputs (path, URL or skimage:NAME; public-domain paintings by URL; aspect-kept resize; grayscale/RGBA
conversion; luminance-only colour preservation), the objective the stylised image minimises, a sync-free L-BFGS and
the optimisation step, the DFP targets and the diversity measures.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms.functional import pil_to_tensor

from .downloads import (TIMEOUT_S, USER_AGENT, DownloadError, cache_torchvision_weights, fetch_bytes,
                        fetch_first)
from .losses import content_loss, gram_matrix, style_loss, total_variation_loss
from .vgg import VGG19Features

CONTENT_LAYERS = ("relu4_2",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
MIN_SIDE = 32  # conv5_1 sees the image after 4 poolings (1/16): 32 px leaves it 2 x 2 positions
YIQ_FROM_RGB = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


# --- Inputs --------------------------------------------------------------------------------------------------------

SKIMAGE_PREFIX = "skimage:"  # "skimage:chelsea" = skimage.data.chelsea(), shipped with scikit-image (Colab has it)
COMMONS = "https://upload.wikimedia.org/wikipedia/commons/"


@dataclass(frozen=True)
class Painting:
    """A public-domain painting on Wikimedia Commons: what it is and the address of the file."""

    title: str
    artist: str
    year: str
    url: str
    page: str

    @property
    def sources(self) -> tuple[str, str]:
        """Where to download it: the file itself, then Wikimedia's own 960 px copy of it (a second server path)."""
        return self.url, commons_thumbnail(self.url, 960)


def commons_thumbnail(url: str, width: int) -> str:
    """The address of Wikimedia's `width`-px thumbnail of a Commons file, from the file's (or a thumbnail's) address:
    .../commons/a/ab/NAME becomes .../commons/thumb/a/ab/NAME/<width>px-NAME (Wikimedia serves standard widths)."""
    if not url.startswith(COMMONS):
        raise ValueError(f"'{url}' is not a Wikimedia Commons file address (it must start with {COMMONS})")
    parts = url[len(COMMONS):].split("/")
    if parts[0] == "thumb":
        parts = parts[1:4]
    a, ab, name = parts[:3]
    return f"{COMMONS}thumb/{a}/{ab}/{name}/{width}px-{name}"


PAINTINGS = {
    "starry_night": Painting(
        "The Starry Night", "Vincent van Gogh", "1889",
        "https://upload.wikimedia.org/wikipedia/commons/thumb/e/ea/Van_Gogh_-_Starry_Night_-_Google_Art_Project.jpg/"
        "1280px-Van_Gogh_-_Starry_Night_-_Google_Art_Project.jpg",
        "https://commons.wikimedia.org/wiki/File:Van_Gogh_-_Starry_Night_-_Google_Art_Project.jpg"),
    "great_wave": Painting(
        "The Great Wave off Kanagawa", "Katsushika Hokusai", "c. 1831",
        "https://upload.wikimedia.org/wikipedia/commons/0/0a/The_Great_Wave_off_Kanagawa.jpg",
        "https://commons.wikimedia.org/wiki/File:The_Great_Wave_off_Kanagawa.jpg"),
    "composition_vii": Painting(
        "Composition VII", "Wassily Kandinsky", "1913",
        "https://upload.wikimedia.org/wikipedia/commons/b/b4/Vassily_Kandinsky%2C_1913_-_Composition_7.jpg",
        "https://commons.wikimedia.org/wiki/File:Vassily_Kandinsky,_1913_-_Composition_7.jpg"),
    "the_scream": Painting(
        "The Scream", "Edvard Munch", "1893",
        "https://upload.wikimedia.org/wikipedia/commons/c/c5/Edvard_Munch%2C_1893%2C_The_Scream%2C_oil%2C_tempera_and_"
        "pastel_on_cardboard%2C_91_x_73_cm%2C_National_Gallery_of_Norway.jpg",
        "https://commons.wikimedia.org/wiki/File:Edvard_Munch,_1893,_The_Scream,_oil,_tempera_and_pastel_on_cardboard,"
        "_91_x_73_cm,_National_Gallery_of_Norway.jpg"),
}
# Offline stand-ins for the paintings (smoke mode downloads nothing): textured images from skimage.data.
PAINTING_STAND_INS = {"starry_night": "skimage:immunohistochemistry", "great_wave": "skimage:coffee",
                      "composition_vii": "skimage:rocket", "the_scream": "skimage:astronaut"}


def is_url(source: str | os.PathLike) -> bool:
    """True for http(s) addresses."""
    return str(source).lower().startswith(("http://", "https://"))


def fetch_url(url: str, role: str = "image", timeout: float = TIMEOUT_S) -> bytes:
    """Download `url` through helpers.downloads (a timeout, the project's User-Agent, which Wikimedia requires);
    a failure raises DownloadError (a ConnectionError) saying which input it was and what to do."""
    return fetch_bytes(url, role, timeout)


def fetch_painting(key: str, folder: str | os.PathLike, timeout: float = TIMEOUT_S) -> Path:
    """The painting PAINTINGS[key] as a file in `folder` (e.g. DATA_DIR/paintings): reused when a readable copy is
    there, else downloaded from its first source that answers (the file, then Wikimedia's 960 px copy). Raises
    DownloadError listing every source, and what to do, when none answers."""
    painting = PAINTINGS[key]
    target = Path(folder) / f"{key}.jpg"
    if target.is_file():
        try:
            decode_image(target.read_bytes(), target)
            print(f"painting '{painting.title}': reusing {target}")
            return target
        except ValueError:
            print(f"painting '{painting.title}': {target} is not a readable image; downloading it again")
    fetch_first(painting.sources, target, f"painting '{painting.title}'", timeout)
    decode_image(target.read_bytes(), target, f"painting '{painting.title}'")  # an error page is no image
    print(f"painting '{painting.title}': downloaded to {target}")
    return target


def skimage_image(source: str, role: str = "image") -> Image.Image:
    """The picture `skimage:NAME` names: skimage.data.NAME() (shipped with scikit-image, no download)."""
    name = source[len(SKIMAGE_PREFIX):]
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError(f"{role} '{source}' needs scikit-image: pip install scikit-image (Colab has it)") from err
    loader = getattr(skimage.data, name, None)
    if name.startswith("_") or not callable(loader):
        raise ValueError(f"{role} '{source}': skimage.data has no image '{name}'; try skimage:chelsea, "
                         "skimage:coffee, skimage:astronaut, or pass a path or an http(s) URL")
    return Image.fromarray(np.asarray(loader()))


def open_image(source: str | os.PathLike, role: str = "image") -> Image.Image:
    """An RGB PIL image from `skimage:NAME`, an http(s) URL or a path; bad input names the input and what to do."""
    if str(source).startswith(SKIMAGE_PREFIX):
        return as_rgb_image(skimage_image(str(source), role))
    if is_url(source):
        return decode_image(fetch_url(str(source), role), source, role)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{role} '{source}' not found; pass a full path, an http(s) URL or skimage:NAME")
    return decode_image(path.read_bytes(), source, role)


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
    """Image by path, URL or skimage:NAME as a (1, 3, H, W) tensor in [0, 1], its longer side resized to `size` px."""
    image = resize_long_side(open_image(source, role), size)
    check_vgg_size(image.height, image.width, role, source)
    return (pil_to_tensor(image).float() / 255).unsqueeze(0).to(device)


def describe_source(source: str | os.PathLike) -> str:
    """A short caption for an image source: the painting's title and artist, or the file name."""
    painting = next((p for key, p in PAINTINGS.items()
                     if str(source) in p.sources or Path(str(source)).name == f"{key}.jpg"), None)
    if painting is not None:
        return f"{painting.title} ({painting.artist}, {painting.year})"
    return str(source) if str(source).startswith(SKIMAGE_PREFIX) else os.path.basename(str(source))


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
    """mean(target^2): the loss of an all-zero prediction; dividing by it makes a loss unit-free."""
    return max(float(target.square().mean()), 1e-12)


def features_by_name(vgg: VGG19Features, images: Tensor,
                     autocast: torch.dtype | None = None) -> dict[str, Tensor]:
    """VGG19 feature maps by layer name, in float32 (VGG may run in `autocast`, e.g. bf16)."""
    with torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None):
        maps = vgg(images)
    return {name: f.float() for name, f in zip(vgg.layers, maps)}


def relative_feature_loss(maps: dict[str, Tensor], layers: Sequence[str], targets: Sequence[Tensor],
                          scales: Sequence[float]) -> Tensor:
    """Mean over layers of content_loss(F_l, T_l) / scale_l: maps against targets, relative."""
    terms = [content_loss(maps[n], t) / s for n, t, s in zip(layers, targets, scales)]
    return sum(terms) / len(terms)


def check_objective_layers(vgg: VGG19Features, content_layers: Sequence[str], style_layers: Sequence[str],
                           feature_targets: Sequence[Tensor]) -> None:
    """Raise if the extractor lacks a layer, or the DFP feature targets are not one per style layer."""
    missing = [name for name in (*content_layers, *style_layers) if name not in vgg.layers]
    if missing:
        raise ValueError(f"the VGG19Features extractor does not return {missing}; build it with these layers")
    if feature_targets and len(feature_targets) != len(style_layers):
        raise ValueError(f"got {len(feature_targets)} feature targets for {len(style_layers)} style layers; "
                         "give one per style layer")


class StyleObjective(nn.Module):
    """What the image minimises: alpha L_c/L_c0 + beta L_s/L_s0 + tau TV (+ gamma L_f/L_f0), where
    L_c0, L_s0, L_f0 are the losses of all-zero feature maps (so zero maps score 1) and L_f pulls
    the style layers towards given feature maps (DFP's targets in multi-modal transfer)."""

    def __init__(self, vgg: VGG19Features, content: Tensor, style: Tensor,
                 content_layers: Sequence[str] = CONTENT_LAYERS,
                 style_layers: Sequence[str] = STYLE_LAYERS, layer_weights: Sequence[float] = (),
                 alpha: float = 1.0, beta: float = 1.0, tau: float = 0.0,
                 feature_targets: Sequence[Tensor] = (), gamma: float = 0.0,
                 autocast: torch.dtype | None = None) -> None:
        super().__init__()
        check_objective_layers(vgg, content_layers, style_layers, feature_targets)
        self.vgg, self.autocast = vgg, autocast
        self.content_layers, self.style_layers = list(content_layers), list(style_layers)
        self.weights = {"content": alpha, "style": beta, "tv": tau, "feature": gamma}
        maps_c, maps_s = (features_by_name(vgg, x.detach(), autocast) for x in (content, style))
        self.content_targets = [maps_c[name] for name in self.content_layers]
        self.gram_targets = [gram_matrix(maps_s[name]) for name in self.style_layers]
        self.content_scales = [energy(p) for p in self.content_targets]  # zero map: mean(P^2)
        layer_weights = layer_weights or [1 / len(style_layers)] * len(style_layers)
        self.layer_weights = [w / (0.25 * energy(a))  # zero map: E_l = 1/4 mean(A_l^2)
                              for w, a in zip(layer_weights, self.gram_targets)]
        self.feature_targets = feature_targets
        self.feature_scales = [energy(t) for t in feature_targets]

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """The relative losses, TV and their weighted total for images in [0, 1]."""
        maps = features_by_name(self.vgg, images, self.autocast)
        losses = {"content": relative_feature_loss(maps, self.content_layers, self.content_targets,
                                                   self.content_scales),
                  "style": style_loss([maps[n] for n in self.style_layers], self.gram_targets,
                                      self.layer_weights),
                  "tv": total_variation_loss(images)}
        if self.feature_targets:
            losses["feature"] = relative_feature_loss(maps, self.style_layers, self.feature_targets,
                                                      self.feature_scales)
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


class SyncFreeLBFGS(torch.optim.Optimizer):
    """L-BFGS without line search, one iteration per step(closure), that never waits for the GPU.

    It takes the steps of torch.optim.LBFGS(lr, max_iter=1, history_size) (tests compare the two), but keeps every
    scalar on the device: torch's version reads values back to the host about twice per stored pair and iteration
    (up to 200 host syncs per iteration), each one stalling a GPU. Where torch's decides on the host, this one does
    it with arithmetic: a curvature pair with y.s <= 1e-10 is stored with weight 0 instead of being skipped (it
    takes a history slot), and no step is refused or stops early (torch skips a step whose direction does not
    descend or whose gradient is below 1e-7; we let the step run).
    """

    def __init__(self, params, lr: float = 1.0, history_size: int = 100) -> None:
        super().__init__(params, {"lr": lr, "history_size": history_size})
        tensors = [p for group in self.param_groups for p in group["params"]]
        if len(tensors) != 1:
            raise ValueError(f"SyncFreeLBFGS optimises one tensor (the image's pixels), got {len(tensors)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """Evaluate the loss and gradient by `closure`, then move the pixels along the L-BFGS direction."""
        with torch.enable_grad():
            loss = closure()
        group = self.param_groups[0]
        pixels = group["params"][0]
        grad = pixels.grad.detach().reshape(-1).clone()
        state = self.state[pixels]
        if not state:  # first iteration: steepest descent, as torch's, with step min(1, 1/|g|_1) * lr
            size = group["history_size"], grad.numel()
            state.update(pairs=0, s=grad.new_zeros(size), y=grad.new_zeros(size), rho=grad.new_zeros(size[0]),
                         h_diag=grad.new_ones(()))
            direction, step_size = -grad, (1 / grad.abs().sum()).clamp(max=1.0) * group["lr"]
        else:
            self._store_pair(state, grad)
            direction, step_size = self._direction(state, grad), group["lr"]
        pixels.add_(direction.view_as(pixels) * step_size)
        state.update(prev_grad=grad, direction=direction, step_size=step_size)
        return loss

    @staticmethod
    def _store_pair(state: dict, grad: Tensor) -> None:
        """Add the newest curvature pair (s, y) to the ring buffer; its weight rho is 0 where y.s <= 1e-10."""
        s, y = state["direction"] * state["step_size"], grad - state["prev_grad"]
        ys = y.dot(s)
        curved = ys > 1e-10
        slot = state["pairs"] % len(state["rho"])
        state["s"][slot], state["y"][slot] = s, y
        state["rho"][slot] = torch.where(curved, 1 / ys, 0.0)
        state["h_diag"] = torch.where(curved, ys / y.dot(y), state["h_diag"])
        state["pairs"] += 1

    @staticmethod
    def _direction(state: dict, grad: Tensor) -> Tensor:
        """-H g by the two-loop recursion over the stored pairs (newest first, then oldest first)."""
        size = len(state["rho"])
        newest_first = [(state["pairs"] - 1 - k) % size for k in range(min(state["pairs"], size))]
        s, y, rho = state["s"], state["y"], state["rho"]
        q, alphas = -grad, {}
        for i in newest_first:
            alphas[i] = rho[i] * s[i].dot(q)
            q.addcmul_(y[i], alphas[i], value=-1)  # q -= alpha_i y_i
        r = q.mul_(state["h_diag"])
        for i in reversed(newest_first):
            r.addcmul_(s[i], alphas[i] - rho[i] * y[i].dot(r))  # r += (alpha_i - beta_i) s_i
        return r


def make_optimizer(image: StylisedImage, name: str = "lbfgs", lr: float | None = None,
                   history_size: int = 100) -> torch.optim.Optimizer:
    """Optimizer over the image's pixels: "lbfgs" (the paper's method, SyncFreeLBFGS), "torch_lbfgs"
    (torch.optim.LBFGS, one iteration per step() call: the same steps, with host syncs) or "adam"."""
    if name == "lbfgs":
        return SyncFreeLBFGS(image.parameters(), lr=lr or 1.0, history_size=history_size)
    if name == "torch_lbfgs":
        return torch.optim.LBFGS(image.parameters(), lr=lr or 1.0, max_iter=1, history_size=history_size)
    if name == "adam":
        return torch.optim.Adam(image.parameters(), lr=lr or 0.02)
    raise ValueError(f"optimizer must be 'lbfgs' (the paper's), 'torch_lbfgs' or 'adam', got {name!r}")


def optimisation_step(objective: StyleObjective, image: StylisedImage,
                      optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """One iteration: losses at the current image, one optimizer step, pixels clamped to [0, 1].

    The losses come back as tensors on the device: float(...) of one waits for the GPU, so a loop
    reads them only every few iterations.
    """
    losses: dict[str, Tensor] = {}

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses.update(objective(image()))
        losses["total"].backward()
        return losses["total"]

    optimizer.step(closure)
    with torch.no_grad():
        image.pixels.clamp_(0, 1)
    return {name: value.detach() for name, value in losses.items()}


def run_key(*tensors: Tensor, **settings) -> str:
    """A short name for one stylisation run: a hash of its input tensors' values and of its settings, so that a
    saved result is reused only by the same run."""
    digest = hashlib.sha1(repr(sorted(settings.items())).encode())
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def evaluate(objective: StyleObjective, images: Tensor) -> dict[str, float]:
    """The objective's losses of each image of a batch, averaged, as floats."""
    with torch.no_grad():
        values = [objective(x.unsqueeze(0)) for x in images]
    return {name: sum(float(v[name]) for v in values) / len(values) for name in values[0]}


def stylise(objective: StyleObjective, init: Tensor, steps: int, optimizer: str = "lbfgs",
            lr: float | None = None) -> Tensor:
    """Gatys et al.'s optimisation: from `init`, `steps` optimizer iterations; returns the image."""
    image = StylisedImage(init)
    opt = make_optimizer(image, optimizer, lr)
    for _ in range(steps):
        optimisation_step(objective, image, opt)
    return image().detach()


class HostReadCounter(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (.item(), float(), bool(), int() of a tensor) while active.

    On a GPU each such read waits for every queued kernel: a host sync. On a CPU nothing waits, but the reads are
    the same, so counting them checks on any device that an optimizer step would never stall a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def lockstep_differences(objective: StyleObjective, init: Tensor, steps: int, lr: float = 1.0,
                         history_size: int = 100) -> tuple[list[float], float]:
    """SyncFreeLBFGS and torch.optim.LBFGS side by side from `init`: after each of `steps` iterations, the largest
    pixel difference between the two images; and the largest pixel change of one torch iteration (the scale)."""
    images = {name: StylisedImage(init) for name in ("lbfgs", "torch_lbfgs")}
    optimizers = {name: make_optimizer(image, name, lr, history_size) for name, image in images.items()}
    differences, largest_step = [], 0.0
    for _ in range(steps):
        before = images["torch_lbfgs"]().detach().clone()
        for name in images:
            optimisation_step(objective, images[name], optimizers[name])
        ours, theirs = images["lbfgs"]().detach(), images["torch_lbfgs"]().detach()
        largest_step = max(largest_step, float((theirs - before).abs().max()))
        differences.append(float((ours - theirs).abs().max()))
    return differences, largest_step


def autocast_gradient_error(objective: StyleObjective, reference: StyleObjective, images: Tensor,
                            loss_scale: float = 1.0) -> float:
    """|g - g_ref| / |g_ref| for the gradient g of `objective` (e.g. VGG under fp16 autocast) against that of
    `reference` (float32) at `images`; `loss_scale` multiplies the loss before backward and divides the gradient
    after it, as a GradScaler does."""
    grads = []
    for obj, scale in ((objective, loss_scale), (reference, 1.0)):
        x = images.detach().clone().requires_grad_(True)
        (obj(x)["total"] * scale).backward()
        grads.append(x.grad.double() / scale)
    return float((grads[0] - grads[1]).norm() / grads[1].norm())


# --- Multi-modal transfer: deep feature perturbation (DFP, Wang et al. CVPR 2020) -------------------------------


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A random orthogonal n x n matrix Z (Z Z^T = I): the left singular vectors of a Gaussian."""
    u, _, _ = torch.linalg.svd(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return u


def covariance_eigen(features: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Mean m, eigenvectors E, eigenvalues D of the covariance of features (N, M); D > eps max D."""
    mean = features.mean(dim=1, keepdim=True)
    centred = features - mean
    values, vectors = torch.linalg.eigh(centred @ centred.T / features.shape[1])
    keep = values > eps * values.max().clamp_min(1e-30)
    return mean, vectors[:, keep], values[keep]


def feature_covariance(features: Tensor) -> Tensor:
    """Covariance (N x N, float64) of a feature map (1, N, H, W) over its positions."""
    flat = features.flatten(2)[0].double()
    centred = flat - flat.mean(dim=1, keepdim=True)
    return centred @ centred.T / flat.shape[1]


def whitening_colouring(content: Tensor, style: Tensor,
                        z: Tensor | Callable[[int], Tensor] | None = None) -> Tensor:
    """Whitening-colouring transform of content features (1, N, H, W) to the style's statistics:
    E_s D_s^1/2 [Z] E_s^T f^ + m_s, with f^ = E_c D_c^-1/2 E_c^T (f_c - m_c) the whitened content.

    `z`: DFP's random orthogonal k x k matrix, k the rank of the style covariance (or a function of
    k giving one); None: plain WCT (Li et al. 2017).
    """
    _, n, h, w = content.shape
    fc, fs = content.reshape(n, h * w).double(), style.reshape(n, -1).double()
    mc, ec, dc = covariance_eigen(fc)
    ms, es, ds = covariance_eigen(fs)
    whitened = ec @ torch.diag(dc.rsqrt()) @ ec.T @ (fc - mc)
    if callable(z):
        z = z(es.shape[1])
    middle = torch.diag(ds.sqrt()) if z is None else torch.diag(ds.sqrt()) @ z.to(fc)
    coloured = es @ middle @ es.T @ whitened + ms
    return coloured.reshape(1, n, h, w).to(content.dtype)


def dfp_target(content: Tensor, style: Tensor, z: Tensor | Callable[[int], Tensor],
               lam: float = 0.6, alpha: float = 0.6) -> Tensor:
    """DFP's feature target: alpha [lam WCT_Z + (1 - lam) WCT] + (1 - alpha) f_c.

    lam: diversity strength, alpha: stylisation strength (both 0.6 in the DFP paper and code).
    """
    for name, value in (("lam", lam), ("alpha", alpha)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"DFP's {name} blends two feature maps, so it must lie in [0, 1], "
                             f"got {value}")

    def blended(k: int) -> Tensor:  # one WCT with lam Z + (1 - lam) I = lam WCT_Z + (1 - lam) WCT
        z_k = z(k) if callable(z) else z
        return lam * z_k + (1 - lam) * torch.eye(k, dtype=z_k.dtype, device=z_k.device)

    return alpha * whitening_colouring(content, style, blended) + (1 - alpha) * content


def dfp_targets(vgg: VGG19Features, content: Tensor, style: Tensor,
                layers: Sequence[str] = STYLE_LAYERS, seed: int = 0, lam: float = 0.6,
                alpha: float = 0.6) -> list[Tensor]:
    """One DFP target per layer for one draw of random orthogonal matrices (new seed, new draw)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fc, fs = features_by_name(vgg, content), features_by_name(vgg, style)
    return [dfp_target(fc[name], fs[name], lambda k: random_orthogonal(k, generator), lam, alpha)
            for name in layers]


# --- Diversity ----------------------------------------------------------------------------------------------


def _pairs(count: int) -> list[tuple[int, int]]:
    pairs = list(itertools.combinations(range(count), 2))
    if not pairs:
        raise ValueError(f"diversity needs at least 2 images, got {count}")
    return pairs


def feature_diversity(images: Tensor, vgg: VGG19Features) -> float:
    """Mean over pairs of (1/L) sum_l mean_positions |phi_l(x_i) - phi_l(x_j)|^2, features unit-normalised per
    position.

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
