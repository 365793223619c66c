"""Pix2PixHD's networks (Wang et al. 2018): the global generator G1, the local enhancer G2, the 70x70 PatchGAN and
the multi-scale discriminator, with their building blocks and the official initialisation.

Layer lists follow the paper and NVIDIA/pix2pixHD `models/networks.py` (written afresh here, not copied), so the
parameter counts at the default widths match the official ones. Notebook 05 holds these as editable cells (the
build copies them from here; a test keeps them equal): their lines stay <= 100.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import check_image_size

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
