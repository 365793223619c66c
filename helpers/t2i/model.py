"""The DCGAN of Reed et al. for notebook 04: a text-conditional generator and a matching-aware discriminator,
with the switches of the improved recipe (conditional batch norm, projection term, label heads, packing)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def text_projection(embedding_dim: int, projected_dim: int) -> nn.Sequential:
    """Fully connected layer from the sentence embedding to a small code, then BatchNorm and LeakyReLU(0.2)."""
    return nn.Sequential(nn.Linear(embedding_dim, projected_dim), nn.BatchNorm1d(projected_dim), nn.LeakyReLU(0.2))


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def feature_map_widths(width: int, image_size: int) -> list[int]:
    """Channels at 4x4, 8x8, ... up to image_size/2: width * 8, ..., width for 64 px (the paper's 512 ... 64)."""
    if image_size < 16 or image_size & (image_size - 1):
        raise ValueError(f"image_size={image_size}; use a power of two >= 16 (the paper uses 64)")
    levels = int(math.log2(image_size // 4))
    return [width * 2 ** (levels - 1 - i) for i in range(levels)]


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift come from a code (here [z; text]), not learned constants."""

    def __init__(self, channels: int, code_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.scale_shift = nn.Linear(code_dim, 2 * channels)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        """norm(x) * (1 + scale(code)) + shift(code), per channel."""
        scale, shift = self.scale_shift(code)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class Generator(nn.Module):
    """G(z, t): [z; projected text] up-sampled 4 -> 8 -> ... -> image_size (ConvTranspose, BN,
    ReLU; tanh at the end). conditional_bn=False: the paper's G, the code enters once, at 4x4;
    True: [z; text] also sets the scale and shift of every BatchNorm (noise and text at every
    resolution)."""

    def __init__(self, embedding_dim: int, z_dim: int = 100, projected_dim: int = 128,
                 ngf: int = 64, image_size: int = 64, conditional_bn: bool = False) -> None:
        super().__init__()
        widths = feature_map_widths(ngf, image_size)
        code_dim, self.z_dim, self.conditional_bn = z_dim + projected_dim, z_dim, conditional_bn
        self.project = text_projection(embedding_dim, projected_dim)
        self.stem = nn.ConvTranspose2d(code_dim, widths[0], 4, 1, 0, bias=False)
        norm = (lambda w: ConditionalBatchNorm2d(w, code_dim)) if conditional_bn else nn.BatchNorm2d
        self.norms = nn.ModuleList(norm(w) for w in widths)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False)
                                 for a, b in zip(widths, widths[1:] + [3]))
        self.apply(dcgan_init)

    def forward(self, z: Tensor, text: Tensor) -> Tensor:
        """Images (B, 3, S, S) in [-1, 1] from z (B, z_dim) and embeddings (B, D)."""
        code = torch.cat([z, self.project(text)], dim=1)
        x = self.stem(code[:, :, None, None])
        for norm, up in zip(self.norms, self.ups):
            x = up(F.relu(norm(x, code) if self.conditional_bn else norm(x)))
        return torch.tanh(x)


class Discriminator(nn.Module):
    """D(x, t): strided convs to a 4x4 map; the projected text replicated over it and concatenated;
    1x1 conv, 4x4 conv to one logit. projection=True adds the projection discriminator's term
    (Miyato & Koyama 2018), <W text code, image features summed over 4x4>; n_classes (values
    per label, e.g. (102,) species) adds TAC-GAN's heads (Dash et al. 2017) on the features."""

    def __init__(self, embedding_dim: int, projected_dim: int = 128, ndf: int = 64,
                 image_size: int = 64, projection: bool = False, n_classes: Sequence[int] = (),
                 pack: int = 1) -> None:
        super().__init__()
        widths = feature_map_widths(ndf, image_size)[::-1]
        c, self.pack = widths[-1], pack
        layers = [nn.Conv2d(3 * pack, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b),
                       nn.LeakyReLU(0.2, True)]
        self.image_features = nn.Sequential(*layers)
        self.project = text_projection(embedding_dim, projected_dim)
        self.joint = nn.Sequential(nn.Conv2d(c + projected_dim, c, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(c), nn.LeakyReLU(0.2, True))
        self.score = nn.Conv2d(c, 1, 4, 1, 0, bias=False)
        self.text_to_features = nn.Linear(projected_dim, c, bias=False) if projection else None
        self.class_heads = nn.ModuleList(nn.Linear(c * 16, n) for n in n_classes)
        self.apply(dcgan_init)

    def forward(self, images: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """(logit per image (B,), image features (B, C, 4, 4) for feature matching)."""
        features = self.image_features(images)
        code = self.project(text)
        tiled = code[:, :, None, None].expand(-1, -1, *features.shape[-2:])
        logits = self.score(self.joint(torch.cat([features, tiled], dim=1))).flatten()
        if self.text_to_features is not None:
            logits = logits + (self.text_to_features(code) * features.sum(dim=(2, 3))).sum(dim=1)
        return logits, features


def packed(images: Tensor, pack: int) -> Tensor:
    """(pack * B, 3, H, W) images, `pack` chunks of B (one image per caption in each chunk), as
    (B, 3 * pack, H, W): the images of one caption stacked on the channels, as D reads them."""
    return torch.cat(images.chunk(pack), dim=1) if pack > 1 else images
