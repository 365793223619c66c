"""Pix2PixHD (Wang et al. 2018): input encoding, generators, multi-scale PatchGAN, the training step with its GPU
fast path, the resumable two-stage schedule, and the data (CMP Facades, procedural toy streets).

Layer lists follow the paper and NVIDIA/pix2pixHD `models/networks.py` (written afresh here, not copied), so the
parameter counts at the default widths match the official ones. Notebook 05 holds the models, the step and the
schedule as editable cells (the build copies them from here; a test keeps them equal): their lines stay <= 100.
"""
from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .downloads import TIMEOUT_S, DownloadError, fetch_file
from .environment import autocast, gpu_choices
from .losses import lsgan_discriminator_loss, pix2pixhd_generator_loss
from .training import History, Stopwatch, load_checkpoint, save_checkpoint, synchronize

CMP_FACADES_PAGE = "https://cmp.felk.cvut.cz/~tylecr1/facade/"
CMP_FACADES_URL = CMP_FACADES_PAGE + "CMP_facade_DB_base.zip"
CMP_FACADES_CLASSES = ["(unused)", "background", "facade", "window", "door", "cornice", "sill", "balcony",
                       "blind", "deco", "molding", "pillar", "shop"]
PROCEDURAL_CLASSES = ["sky", "ground", "building", "window", "tree", "sun"]


# --- input checks and encoding --------------------------------------------------------------------------------------


def check_image_size(height: int, width: int, multiple: int = 32, what: str = "image", minimum: int = 0) -> None:
    """Raise a ValueError unless height and width are multiples of `multiple` and at least `minimum`."""
    if min(height, width) < minimum:
        raise ValueError(f"{what} size {height}x{width} is below the minimum {minimum}x{minimum}: the residual "
                         "blocks' reflection padding needs at least 2x2 pixels at the bottleneck; use larger images")
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        fix_h = max(multiple, round(height / multiple) * multiple)
        fix_w = max(multiple, round(width / multiple) * multiple)
        raise ValueError(
            f"{what} size {height}x{width} is not divisible by {multiple}: the generator halves it "
            f"{int(math.log2(multiple))} times and must come back to the same size; resize or crop to e.g. "
            f"{fix_h}x{fix_w}"
        )


def check_label_map(labels: Tensor, label_nc: int, what: str = "label map") -> Tensor:
    """Return `labels` as int64 (N, H, W) after checking every value lies in 0..label_nc-1."""
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 3:
        raise ValueError(f"{what} must have shape (N, H, W) or (N, 1, H, W) of class indices, "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError(f"{what} holds non-integer values; pass class indices, not an image or a one-hot map")
    labels = labels.long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= label_nc:
        bad = sorted(set(torch.unique(labels).tolist()) - set(range(label_nc)))[:5]
        raise ValueError(
            f"{what} has values {bad} outside 0..{label_nc - 1} (label_nc={label_nc}); set label_nc to at least "
            f"{high + 1}, or map those values (e.g. an 'ignore' value 255) to a valid class first"
        )
    return labels


def one_hot_labels(labels: Tensor, label_nc: int) -> Tensor:
    """(N, H, W) class indices -> (N, label_nc, H, W) one-hot float map."""
    labels = check_label_map(labels, label_nc)
    return F.one_hot(labels, label_nc).permute(0, 3, 1, 2).float()


def instance_edges(instances: Tensor) -> Tensor:
    """(N, H, W) instance ids -> (N, 1, H, W) map that is 1 where a pixel differs from a 4-neighbour, else 0."""
    if instances.dim() == 4 and instances.shape[1] == 1:
        instances = instances[:, 0]
    if instances.dim() != 3:
        raise ValueError(f"instance map must have shape (N, H, W) or (N, 1, H, W), got {tuple(instances.shape)}")
    edge = torch.zeros_like(instances, dtype=torch.bool)
    horizontal = instances[:, :, 1:] != instances[:, :, :-1]
    vertical = instances[:, 1:, :] != instances[:, :-1, :]
    edge[:, :, 1:] |= horizontal
    edge[:, :, :-1] |= horizontal
    edge[:, 1:, :] |= vertical
    edge[:, :-1, :] |= vertical
    return edge.unsqueeze(1).float()


def check_rgb_input(images: Tensor, what: str = "RGB input") -> Tensor:
    """Return `images` if they are float (N, 3, H, W) in [-1, 1] (a sketch or edge map fed directly), else raise."""
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{what} (label_nc=0) must be float images of shape (N, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}; pass class indices with label_nc > 0 for label maps")
    if images.min() < -1 or images.max() > 1:
        raise ValueError(f"{what} must lie in [-1, 1], got [{images.min():.2f}, {images.max():.2f}]; "
                         "map 0..255 pixels with x / 127.5 - 1")
    return images


def label_sketch(labels: Tensor, instances: Tensor | None = None) -> Tensor:
    """A sketch of a label map: black (-1) lines on white (1) where the class or the instance changes, (N, 3, H, W)."""
    edges = instance_edges(labels)
    if instances is not None:
        edges = torch.maximum(edges, instance_edges(instances))
    return (1 - 2 * edges).repeat(1, 3, 1, 1)


def encode_input(labels: Tensor, label_nc: int, instances: Tensor | None = None) -> Tensor:
    """Generator input: one-hot labels (+ the instance-edge channel when given); label_nc 0: RGB images as they are."""
    if label_nc == 0:
        return check_rgb_input(labels)
    one_hot = one_hot_labels(labels, label_nc)
    if instances is None:
        return one_hot
    if instances.shape[-2:] != one_hot.shape[-2:]:
        raise ValueError(f"instance map is {tuple(instances.shape[-2:])} but the label map is "
                         f"{tuple(one_hot.shape[-2:])}; both must have the same height and width")
    return torch.cat([one_hot, instance_edges(instances).to(one_hot)], dim=1)


def encode_pair_batch(batch: dict, size: int, label_nc: int, use_instance: bool,
                 device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """A data batch resized to `size` (maps: nearest, photos: area) and encoded: (G's input map, photo) on
    `device`. label_nc 0: the label map is drawn as an RGB sketch, which G gets as it is."""
    label, image, instance = batch["label"][:, None].float(), batch["image"], batch.get("instance")
    if label.shape[-1] != size:
        label = F.interpolate(label, size=(size, size), mode="nearest")
        image = F.interpolate(image, size=(size, size), mode="area")
        if instance is not None:
            instance = F.interpolate(instance[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    label = label[:, 0].long()
    if label_nc == 0:
        x = encode_input(label_sketch(label, instance), 0)
    else:
        x = encode_input(label, label_nc, instance if use_instance else None)
    return x.to(device), image.to(device)


def colorize_labels(labels: Tensor, label_nc: int) -> Tensor:
    """(N, H, W) class indices -> (N, 3, H, W) colours in [-1, 1] for figures (matplotlib's tab20 palette)."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"](np.arange(max(label_nc, 1)) % 20)[:, :3]
    palette = torch.tensor(colours, dtype=torch.float32) * 2 - 1
    return palette[check_label_map(labels.cpu(), label_nc)].permute(0, 3, 1, 2)


def input_channels(label_nc: int, use_instance: bool) -> int:
    """Channels of the encoded input: label_nc one-hot planes (+1 edge map); label_nc 0 means an RGB input."""
    return (label_nc if label_nc > 0 else 3) + int(use_instance)


# --- generator (taught in notebook 05: lines <= 100) ---------------------------------------------


def init_weights(module: nn.Module) -> None:
    """Official initialisation: conv weights from N(0, 0.02); biases keep PyTorch's default."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)


def conv_block(in_ch: int, out_ch: int, kernel: int, stride: int = 1,
               reflect: int = 0) -> list[nn.Module]:
    """[ReflectionPad] + Conv + InstanceNorm + ReLU (zero padding 1 for the stride-2 3x3 convs)."""
    pad = [nn.ReflectionPad2d(reflect)] if reflect else []
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=0 if reflect else 1)
    return [*pad, conv, nn.InstanceNorm2d(out_ch), nn.ReLU(True)]


def up_block(in_ch: int, out_ch: int) -> list[nn.Module]:
    """ConvTranspose 3x3 stride 2 (doubles H and W) + InstanceNorm + ReLU."""
    return [nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(out_ch), nn.ReLU(True)]


def to_rgb(in_ch: int, output_nc: int = 3) -> nn.Sequential:
    """c7s1-3: ReflectionPad(3) + Conv7x7 to RGB + Tanh."""
    return nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_ch, output_nc, 7), nn.Tanh())


def downsample(x: Tensor) -> Tensor:
    """The official 2x downsampling: AvgPool2d(3, stride 2, padding 1, count_include_pad=False)."""
    return F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)


class ResnetBlock(nn.Module):
    """x + [pad, conv3x3, IN, ReLU, pad, conv3x3, IN](x), no activation after the add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Residual connection."""
        return x + self.block(x)


class GlobalGenerator(nn.Module):
    """G1: c7s1-ngf, n_down x d(2k), n_blocks x R, n_down x u(k/2), c7s1-3 (paper: ngf 64, 4, 9)."""

    def __init__(self, input_nc: int, output_nc: int = 3, ngf: int = 64, n_downsampling: int = 4,
                 n_blocks: int = 9) -> None:
        super().__init__()
        self.n_downsampling = n_downsampling
        layers = conv_block(input_nc, ngf, 7, reflect=3)
        for i in range(n_downsampling):
            layers += conv_block(ngf * 2**i, ngf * 2 ** (i + 1), 3, stride=2)
        layers += [ResnetBlock(ngf * 2**n_downsampling) for _ in range(n_blocks)]
        for i in range(n_downsampling, 0, -1):
            layers += up_block(ngf * 2**i, ngf * 2 ** (i - 1))
        self.features = nn.Sequential(*layers)
        self.to_rgb = to_rgb(ngf, output_nc)
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """Encoded input map (N, C, H, W) -> image (N, 3, H, W) in [-1, 1]."""
        check_image_size(x.shape[-2], x.shape[-1], 2**self.n_downsampling, "global generator input",
                         minimum=2 ** (self.n_downsampling + 1))
        return self.to_rgb(self.features(x))


class LocalEnhancer(nn.Module):
    """G = {G1, G2}: G1 (width 2*ngf, no RGB head) on the half-size input, added to G2's output."""

    def __init__(self, input_nc: int, output_nc: int = 3, ngf: int = 32,
                 n_downsample_global: int = 4, n_blocks_global: int = 9,
                 n_blocks_local: int = 3) -> None:
        super().__init__()
        self.multiple = 2 ** (n_downsample_global + 1)
        self.global_features = GlobalGenerator(input_nc, output_nc, 2 * ngf, n_downsample_global,
                                               n_blocks_global).features
        self.local_down = nn.Sequential(*conv_block(input_nc, ngf, 7, reflect=3),
                                        *conv_block(ngf, 2 * ngf, 3, stride=2))
        self.local_up = nn.Sequential(*[ResnetBlock(2 * ngf) for _ in range(n_blocks_local)],
                                      *up_block(2 * ngf, ngf))
        self.to_rgb = to_rgb(ngf, output_nc)
        for part in (self.local_down, self.local_up, self.to_rgb):
            part.apply(init_weights)

    def load_global(self, generator: GlobalGenerator) -> None:
        """Start from a trained global generator (stage 1); its RGB head is not used here."""
        self.global_features.load_state_dict(generator.features.state_dict())

    def freeze_global(self, frozen: bool) -> None:
        """Freeze (or unfreeze) G1, as in the first `niter_fix_global` epochs of stage 2."""
        self.global_features.requires_grad_(not frozen)

    def local_parameters(self) -> list[nn.Parameter]:
        """Parameters of G2 only (what stage 2 trains while G1 is frozen)."""
        parts = (self.local_down, self.local_up, self.to_rgb)
        return [p for part in parts for p in part.parameters()]

    def forward(self, x: Tensor) -> Tensor:
        """Encoded input map (N, C, H, W) -> image (N, 3, H, W) in [-1, 1]."""
        check_image_size(x.shape[-2], x.shape[-1], self.multiple, "local enhancer input",
                         minimum=2 * self.multiple)
        g1 = self.global_features(downsample(x))
        return self.to_rgb(self.local_up(self.local_down(x) + g1))


# --- discriminator (taught in notebook 05) -------------------------------------------------------


class NLayerDiscriminator(nn.Module):
    """70x70 PatchGAN: C64 (no norm), C128, C256, C512 (stride 1), a 1-channel map; LReLU 0.2."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        blocks = [nn.Sequential(nn.Conv2d(input_nc, ndf, 4, stride=2, padding=2),
                                nn.LeakyReLU(0.2, True))]
        channels = ndf
        for n in range(1, n_layers + 1):
            previous, channels = channels, min(channels * 2, 512)
            stride = 2 if n < n_layers else 1
            blocks.append(nn.Sequential(nn.Conv2d(previous, channels, 4, stride=stride, padding=2),
                                        nn.InstanceNorm2d(channels), nn.LeakyReLU(0.2, True)))
        blocks.append(nn.Sequential(nn.Conv2d(channels, 1, 4, stride=1, padding=2)))
        self.blocks = nn.ModuleList(blocks)
        self.apply(init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every block's output: n_layers + 1 features for feature matching, then the patch map."""
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


class MultiscaleDiscriminator(nn.Module):
    """num_D independent PatchGANs on the (input map, image) pair at full, 1/2, 1/4 ... size."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, num_D: int = 3) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.scales = nn.ModuleList(NLayerDiscriminator(input_nc, ndf, n_layers)
                                    for _ in range(num_D))

    def forward(self, input_map: Tensor, image: Tensor) -> list[list[Tensor]]:
        """One list of block outputs per scale, full resolution first."""
        if input_map.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"input map is {tuple(input_map.shape[-2:])} but the image is "
                             f"{tuple(image.shape[-2:])}; the discriminator needs the same size")
        x = torch.cat([input_map, image], dim=1)
        results = []
        for i, scale in enumerate(self.scales):
            if i > 0:
                x = downsample(x)
            results.append(scale(x))
        return results


# --- learning-rate schedule -----------------------------------------------------------------------------------------


def linear_decay_lr(epoch: int, base_lr: float, n_constant: int, n_decay: int) -> float:
    """LR of 0-based `epoch`: base_lr for epochs 0..n_constant, then down by base_lr/n_decay per epoch."""
    if n_decay <= 0:
        return base_lr
    return base_lr * max(0.0, 1.0 - max(0, epoch - n_constant) / n_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- training: GPU fast path, step, resumable two-stage schedule (taught in notebook 05) ----------


@dataclass
class FastPath:
    """Speed options of the training step; all off: the plain eager fp32 step a student writes."""

    amp_dtype: torch.dtype | None = None  # autocast dtype (fp16 gets a GradScaler); None: fp32
    cudnn_benchmark: bool = False  # let cuDNN time its algorithms for each new shape
    fused_adam: bool = False  # one kernel for the whole Adam update
    compile: bool = False  # torch.compile G and D in place (fuses norm, padding, activations)
    channels_last: bool = False  # NHWC tensors and weights (off by default: see `for_device`)
    compile_backend: str = "inductor"
    init_scale: float = 2.0**8  # fp16 loss scale to start from (torch's default 2**16 overflows)

    @classmethod
    def for_device(cls, device: torch.device, compile: bool = False) -> "FastPath":
        """The options `gpu_choices(device)` decides: autocast in bf16 (compute capability >= 8)
        or fp16 with a loss scaler (7.x, a T4, or EMULATE_T4=1), fused Adam; on CUDA also cuDNN
        autotuning and torch.compile when asked. A CPU without emulation: eager fp32.
        Channels-last stays off, with a printed reason: InstanceNorm turns NHWC tensors back into
        NCHW, so it cannot speed up the memory-bound layers, and on the CPU (torch 2.11-2.14)
        InstanceNorm's input gradient is wrong at batch 1 when the incoming gradient is NHWC (see
        the tests). The bench times it."""
        choices = gpu_choices(device)
        if not choices.gpu_path:
            return cls()
        if not choices.cuda:
            choices.skip("cuDNN autotuning", "the CPU's own convolution kernels")
            if compile:
                choices.skip("torch.compile (COMPILE = True)", "the eager step")
        if choices.channels_last:
            print("channels-last: left off (InstanceNorm turns NHWC back into NCHW; on a CPU its "
                  "gradient is wrong at batch 1)")
        return cls(amp_dtype=choices.amp_dtype, cudnn_benchmark=choices.cuda,
                   fused_adam=choices.fused_adam, compile=compile and choices.cuda)

    def describe(self) -> str:
        """The options that are on, in words."""
        amp = f"autocast {str(self.amp_dtype).removeprefix('torch.')}" if self.amp_dtype else "fp32"
        if self.amp_dtype == torch.float16:
            amp += f" with a loss scaler (from 2**{int(math.log2(self.init_scale))})"
        parts = [amp, "cuDNN autotuning" * self.cudnn_benchmark, "fused Adam" * self.fused_adam,
                 f"torch.compile ({self.compile_backend})" * self.compile,
                 "channels-last" * self.channels_last]
        options = ", ".join(p for p in parts if p)
        return options if options != "fp32" else "eager fp32 (no fast-path option on)"

    def prepare(self, module: nn.Module) -> nn.Module:
        """Apply the options to a model in place (channels-last, torch.compile) and to cuDNN."""
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        if self.compile:
            module.compile(backend=self.compile_backend)
        return module

    def tensor(self, x: Tensor) -> Tensor:
        """A batch in the memory format the prepared models expect."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def adam(self, params: Iterable[nn.Parameter], lr: float,
             betas: tuple[float, float]) -> torch.optim.Adam:
        """Adam with the paper's settings, fused into one kernel when `fused_adam`."""
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=self.fused_adam or None)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """The loss scaler: on for fp16 (small gradients would underflow), off for bf16 and fp32.
        It starts at `init_scale`: at 2**16 the first steps' gradients overflow fp16 (max 65,504)
        and the scaler skips those optimizer steps while it halves the scale."""
        return torch.amp.GradScaler(device.type, init_scale=self.init_scale,
                                    enabled=self.amp_dtype == torch.float16)


@dataclass
class TrainingSetup:
    """What every stage of a variant uses: data, frozen VGG, loss weights, Adam, the fast path."""

    loader: DataLoader  # batches of {"label", "image"(, "instance")}
    encode: Callable[[dict, int], tuple[Tensor, Tensor]]  # (batch, size) -> (map, photo) on device
    preview: dict  # a batch whose outputs are kept as snapshots while training
    vgg: nn.Module | None = None  # None (or lambda_vgg 0): no VGG term
    lambda_feat: float = 10.0
    lambda_vgg: float = 10.0
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    fast: FastPath = field(default_factory=FastPath)
    snapshot_every: int = 1  # epochs between snapshots (and one at the end of every stage)


@dataclass
class Progress:
    """The run's own part of a checkpoint: epochs done in the current stage, snapshots so far."""

    epoch: int = 0
    snapshots: dict[int, Tensor] = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Plain values for a checkpoint."""
        return {"epoch": self.epoch, "snapshots": dict(self.snapshots)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint."""
        self.epoch, self.snapshots = state["epoch"], dict(state["snapshots"])


@dataclass
class Trained:
    """A variant after `train_variant`: its models, records, and whether every stage finished."""

    G: nn.Module
    D: nn.Module
    complete: bool
    history: History
    stopwatch: Stopwatch
    progress: Progress
    saved_before: int = 0  # epochs its checkpoints held when the call began (0: a fresh start)


def pix2pixhd_train_step(G: nn.Module, D: nn.Module, vgg: nn.Module | None,
                         opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler, x: Tensor, real: Tensor,
                         lambda_feat: float = 10.0, lambda_vgg: float = 10.0,
                         amp_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """One iteration as in the official code: one forward pass of G; D on the real pair, the fake
    pair (for G's losses) and the detached fake pair (for D's); an Adam step of G, then one of D.
    amp_dtype: autocast dtype, None for fp32; the scaler scales fp16 losses (a no-op otherwise)."""
    with autocast(x.device, amp_dtype):
        fake = G(x)
        d_real = D(x, real)
        d_fake = D(x, fake)  # not detached: L_GAN and L_FM reach G through D
        d_fake_detached = D(x, fake.detach())  # for L_D: D's step must not move G
        use_vgg = vgg is not None and lambda_vgg > 0
        vgg_fake = vgg(fake) if use_vgg else None
        with torch.no_grad():
            vgg_real = vgg(real) if use_vgg else None
        g_terms = pix2pixhd_generator_loss(d_fake, d_real, vgg_fake, vgg_real, lambda_feat,
                                           lambda_vgg)
        loss_d = lsgan_discriminator_loss([s[-1] for s in d_real], [s[-1] for s in d_fake_detached])
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(g_terms["total"]).backward()
    scaler.step(opt_g)
    opt_d.zero_grad(set_to_none=True)  # also drops the gradients that G's loss left in D
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)
    scaler.update()
    return {**{f"G/{k}": v.detach() for k, v in g_terms.items()}, "D/loss": loss_d.detach()}


@torch.no_grad()
def snapshot(G: nn.Module, setup: TrainingSetup, size: int) -> Tensor:
    """G's images, on the CPU, for the preview batch's maps at `size`."""
    G.eval()
    return G(setup.fast.tensor(setup.encode(setup.preview, size)[0])).float().cpu()


def pix2pixhd_train_epoch(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer,
                          opt_d: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                          setup: TrainingSetup, size: int, record: dict, lr: float) -> None:
    """One pass over the data at `size` px. The losses stay on the device until the epoch ends, so
    that logging never makes the CPU wait for the GPU in the middle of an epoch."""
    G.train()
    D.train()
    watch, steps = record["stopwatch"], []
    with watch:
        for batch in tqdm(setup.loader, desc=f"{size} px, lr {lr:.1e}", leave=False):
            x, real = (setup.fast.tensor(t) for t in setup.encode(batch, size))
            losses = pix2pixhd_train_step(G, D, setup.vgg, opt_g, opt_d, scaler, x, real,
                                          setup.lambda_feat, setup.lambda_vgg, setup.fast.amp_dtype)
            watch.count(1, len(real))
            steps.append((watch.iterations, losses))
        synchronize(next(G.parameters()).device)
    for step, losses in steps:
        record["history"].log(step, lr=lr, **losses)
    record["history"].flush()


@dataclass
class Stage:
    """One stage of the schedule: which generator, at what size, for how many epochs."""

    name: str  # "global": G1 alone; "local": G1 + G2, the local enhancer
    size: int  # image height and width in this stage
    epochs: tuple[int, int]  # (constant-LR epochs, linear-decay epochs)
    fix_global: int = 0  # "local" only: first epochs with G1 frozen (official: niter_fix_global)


def two_stage_plan(size: int, global_epochs: tuple[int, int], local_epochs: tuple[int, int],
                   fix_global: int) -> list[Stage]:
    """The paper's schedule: G1 alone at half size, then G1 + G2 at full size, G1 first frozen."""
    return [Stage("global", size // 2, global_epochs),
            Stage("local", size, local_epochs, fix_global)]


def train_stage(stage: Stage, G: nn.Module, D: nn.Module, setup: TrainingSetup, record: dict,
                path: Path, config: dict, stop_after: int | None = None) -> bool:
    """Train one stage from its checkpoint (if `path` exists) to its last epoch, saving after every
    epoch; False when stopped after `stop_after` epochs of the stage (a simulated disconnect)."""
    device = next(G.parameters()).device
    opt_g = setup.fast.adam(G.parameters(), setup.lr, setup.betas)
    opt_d = setup.fast.adam(D.parameters(), setup.lr, setup.betas)
    scaler = setup.fast.grad_scaler(device)
    state = {"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d, "scaler": scaler, **record}
    progress, n_epochs = record["progress"], sum(stage.epochs)
    progress.epoch = 0
    if path.is_file():
        load_checkpoint(path, state, config, map_location=device)
    while progress.epoch < n_epochs:
        if stop_after is not None and progress.epoch >= stop_after:
            return False
        if stage.fix_global:  # G1 frozen at first; then, as officially, a new Adam over all of G
            G.freeze_global(progress.epoch < stage.fix_global)
            if progress.epoch == stage.fix_global:
                opt_g = state["opt_g"] = setup.fast.adam(G.parameters(), setup.lr, setup.betas)
        lr = linear_decay_lr(progress.epoch, setup.lr, *stage.epochs)
        set_lr(opt_g, lr)
        set_lr(opt_d, lr)
        pix2pixhd_train_epoch(G, D, opt_g, opt_d, scaler, setup, stage.size, record, lr)
        progress.epoch += 1
        if progress.epoch % setup.snapshot_every == 0 or progress.epoch == n_epochs:
            progress.snapshots[record["stopwatch"].iterations] = snapshot(G, setup, stage.size)
        save_checkpoint(path, state, record["stopwatch"].iterations, config)
    if stage.fix_global:
        G.freeze_global(False)
    return True


def saved_epochs(name: str, plan: Sequence[Stage], folder: Path) -> int:
    """Epochs of variant `name` that its checkpoints in folder/checkpoints hold (0: none saved).
    Reads only each checkpoint's progress record (mmap: the weights stay on disk)."""
    done = 0
    for stage in plan:
        path = folder / "checkpoints" / f"{name}_{stage.name}.pt"
        if not path.is_file():
            break
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        epoch = saved["state"]["progress"]["epoch"]
        done += epoch
        if epoch < sum(stage.epochs):
            break
    return done


def train_variant(name: str, plan: Sequence[Stage], build_generator: Callable[[str], nn.Module],
                  D: nn.Module, setup: TrainingSetup, folder: Path, config: dict,
                  stop_after: int | None = None) -> Trained:
    """Train, resume or just load every stage of a variant: checkpoints in folder/checkpoints,
    losses in folder/tensorboard/<name>. Stage 2's G starts from stage 1's trained G1; D carries
    over. stop_after: stop after that many epochs of the run (a disconnect; a new call resumes).
    Prints whether it reuses a finished run or resumes a stopped one."""
    total, saved = sum(sum(stage.epochs) for stage in plan), saved_epochs(name, plan, folder)
    if saved:
        what = "reusing the finished run" if saved == total else "resuming the run saved"
        print(f"{name}: {what} in {folder / 'checkpoints'} (epoch {saved} of {total})")
    record = {"history": History(folder / "tensorboard" / name), "stopwatch": Stopwatch(),
              "progress": Progress()}
    setup.fast.prepare(D)
    G, done = None, 0
    for stage in plan:
        trained_g1, G = G, setup.fast.prepare(build_generator(stage.name))
        if trained_g1 is not None:
            G.load_global(trained_g1)
        stage_config = {**config, "stage": stage.name, "size": stage.size,
                        "epochs": list(stage.epochs), "fix_global": stage.fix_global,
                        "fp16": setup.fast.amp_dtype == torch.float16}
        path = folder / "checkpoints" / f"{name}_{stage.name}.pt"
        left = None if stop_after is None else stop_after - done
        if not train_stage(stage, G, D, setup, record, path, stage_config, left):
            return Trained(G, D, False, **record, saved_before=saved)
        done += sum(stage.epochs)
    return Trained(G, D, True, **record, saved_before=saved)


def training_step_flops(G: nn.Module, D: nn.Module, vgg: nn.Module | None, input_nc: int,
                        height: int, width: int, batch: int) -> int:
    """FLOPs of one `pix2pixhd_train_step` (convolutions and matrix products, forward and
    backward), counted on shapes only: build G, D and vgg under `torch.device("meta")`."""
    with torch.device("meta"):
        x, real = torch.empty(batch, input_nc, height, width), torch.empty(batch, 3, height, width)
        # SGD: the counter sees no optimizer FLOPs anyway, and Adam reads its step count with .item()
        # on torch 2.11, which meta tensors cannot do
        opt_g, opt_d = torch.optim.SGD(G.parameters(), 0.0), torch.optim.SGD(D.parameters(), 0.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        with FlopCounterMode(display=False) as counter:
            pix2pixhd_train_step(G, D, vgg, opt_g, opt_d, scaler, x, real)
    return counter.get_total_flops()


# --- data -----------------------------------------------------------------------------------------------------------


def _disc(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def procedural_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One label map, instance map and RGB image (H, W, 3 in [0, 1]) of a toy street: sky, ground, buildings, ..."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    horizon = rng.uniform(0.6, 0.8)
    label = np.where(yy < horizon, 0, 1).astype(np.int64)
    instance = label.copy()
    next_id = 2
    if rng.random() < 0.7:
        sun = _disc(yy, xx, rng.uniform(0.08, 0.2), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.09))
        label[sun], instance[sun] = 5, next_id
        next_id += 1
    for _ in range(rng.integers(1, 4)):
        left, width, top = rng.uniform(0, 0.7), rng.uniform(0.2, 0.4), rng.uniform(0.2, 0.45)
        body = (xx >= left) & (xx < left + width) & (yy >= top) & (yy < horizon)
        label[body], instance[body] = 2, next_id
        next_id += 1
        cell = 1 / 8
        windows = body & ((xx - left) % cell > cell * 0.45) & ((yy - top) % cell > cell * 0.45)
        windows &= (xx < left + width - cell * 0.3) & (yy < horizon - cell * 0.5)
        label[windows] = 3
    for _ in range(rng.integers(0, 3)):
        cy, cx, r = horizon - rng.uniform(0.05, 0.1), rng.uniform(0.05, 0.95), rng.uniform(0.06, 0.1)
        crown = _disc(yy, xx, cy, cx, r)
        label[crown], instance[crown] = 4, next_id
        next_id += 1
    palette = np.array([[0.45, 0.65, 0.95], [0.30, 0.55, 0.25], [0.70, 0.38, 0.28],
                        [0.15, 0.20, 0.35], [0.10, 0.40, 0.15], [1.00, 0.85, 0.25]], dtype=np.float32)
    image = palette[label]
    sky = label == 0
    image[sky] += (0.35 * (yy[sky] / horizon))[:, None]
    ground = label == 1
    image[ground] *= (1.2 - 0.5 * (yy[ground] - horizon) / (1 - horizon))[:, None]
    image[label == 4] *= (0.5 + 0.6 * (1 - yy[label == 4]))[:, None]
    edges = instance_edges(torch.from_numpy(instance)[None])[0, 0].numpy().astype(bool)
    image[edges & (label == 2)] *= 0.45
    return label, instance, np.clip(image, 0, 1)


class ProceduralLabelImages(Dataset):
    """Offline data a CPU model can learn: toy street label maps (6 classes, instance ids) -> rendered photos."""

    label_nc = len(PROCEDURAL_CLASSES)
    class_names = PROCEDURAL_CLASSES

    def __init__(self, count: int, size: int, seed: int = 0) -> None:
        check_image_size(size, size, 16, "procedural image")
        rng = np.random.default_rng(seed)
        scenes = [procedural_scene(rng, size) for _ in range(count)]
        self.labels = torch.from_numpy(np.stack([s[0] for s in scenes]))
        self.instances = torch.from_numpy(np.stack([s[1] for s in scenes]))
        self.images = torch.from_numpy(np.stack([s[2] for s in scenes])).permute(0, 3, 1, 2) * 2 - 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """{'label': (H, W) int64, 'instance': (H, W) int64, 'image': (3, H, W) in [-1, 1]}."""
        return {"label": self.labels[index], "instance": self.instances[index], "image": self.images[index]}


def _read_label(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label map '{path}' is a {img.mode} image; it must hold one class index per pixel "
                             "(mode L or P), not colours")
        return np.array(img, dtype=np.int64)


class PairedFolderDataset(Dataset):
    """Photos and label maps with the same file stem (e.g. cmp_b0001.jpg + cmp_b0001.png), resized to `size`."""

    def __init__(self, image_dir: str | os.PathLike, label_dir: str | os.PathLike, size: int, label_nc: int,
                 image_suffix: str = ".jpg", label_suffix: str = ".png", names: Sequence[str] | None = None) -> None:
        check_image_size(size, size, 32, "dataset IMAGE_SIZE")
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.size, self.label_nc = size, label_nc
        self.image_suffix, self.label_suffix = image_suffix, label_suffix
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"photo folder '{self.image_dir}' not found; download the data first "
                                    "(download_cmp_facades) or point it at your own paired folders")
        stems = sorted(p.stem for p in self.image_dir.glob(f"*{image_suffix}"))
        if names is not None:
            stems = [s for s in stems if s in set(names)]
        if not stems:
            raise FileNotFoundError(f"no '*{image_suffix}' photos in '{self.image_dir}'; check the folder and suffix")
        missing = [s + label_suffix for s in stems if not (self.label_dir / (s + label_suffix)).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} photo(s) in '{self.image_dir}' have no label map in '{self.label_dir}' "
                f"(e.g. {', '.join(missing[:3])}); every photo needs a label map with the same name, or remove it"
            )
        self.stems = stems

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """{'label': (size, size) int64, 'image': (3, size, size) in [-1, 1]}."""
        stem = self.stems[index]
        image_path = self.image_dir / (stem + self.image_suffix)
        label_path = self.label_dir / (stem + self.label_suffix)
        label = _read_label(label_path)
        with Image.open(image_path) as img:
            photo = img.convert("RGB")
        if photo.size != (label.shape[1], label.shape[0]):
            raise ValueError(f"photo '{image_path.name}' is {photo.size[0]}x{photo.size[1]} but its label map "
                             f"'{label_path.name}' is {label.shape[1]}x{label.shape[0]} (width x height); "
                             "a pair must have the same size")
        check_label_map(torch.from_numpy(label)[None], self.label_nc, f"label map '{label_path.name}'")
        label = np.array(Image.fromarray(label.astype(np.uint8)).resize((self.size, self.size), Image.NEAREST))
        photo = photo.resize((self.size, self.size), Image.BICUBIC)
        image = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        return {"label": torch.from_numpy(label.astype(np.int64)), "image": image}


def download_cmp_facades(root: str | os.PathLike, url: str = CMP_FACADES_URL,
                         timeout: float = TIMEOUT_S) -> Path:
    """Download and unpack the CMP Facade Database (base, 378 pairs, ~34 MB) once; return the folder of pairs.
    The download goes through helpers.downloads (timeout, the project's User-Agent). There is no second source
    in this format: the pix2pix mirror stores the labels as JPEG colour pictures, not class indices."""
    root = Path(root) / "cmp_facades"
    folder = root / "base"
    if folder.is_dir() and any(folder.glob("*.jpg")):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "CMP_facade_DB_base.zip"
    try:
        if not archive.is_file():
            fetch_file(url, archive, "the CMP Facade Database", timeout)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(root)
    except DownloadError as err:
        raise DownloadError(f"{err}; or run with SMOKE=1 or PIX2PIXHD_DATASET=procedural for the "
                            "offline toy streets") from err
    except (OSError, zipfile.BadZipFile) as err:
        archive.unlink(missing_ok=True)
        raise RuntimeError(f"could not unpack the CMP facades '{archive}' ({err}); the file was deleted: run "
                           f"again to download it, or download it yourself from {CMP_FACADES_PAGE}") from err
    found = sorted({p.parent for p in root.rglob("*.jpg")})
    if not found:
        raise RuntimeError(f"'{archive}' unpacked but holds no .jpg photos; delete '{root}' and run again")
    return found[0]
