"""The networks of notebook 07: a small U-Net denoiser (time, class, text) and an autoencoder."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim): cos and sin of t at geometric
    frequencies, as the Transformer embeds positions."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class CrossAttention(nn.Module):
    """Image positions attend to text tokens, as in Stable Diffusion: queries from the feature map,
    keys and values from the token embeddings. Padded tokens get no attention. The result is added
    to the input."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * channels, bias=False)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.to_q(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C): one query per position
        k, v = self.to_kv(context.to(q.dtype)).chunk(2, dim=-1)  # (B, tokens, C) each
        q, k, v = (a.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2) for a in (q, k, v))
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(c // self.heads)  # (B, heads, HW, T)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attended = (scores.softmax(-1).to(v.dtype) @ v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with group norm and SiLU, the time (and class) embedding added in
    between, a skip connection around them. Then cross-attention, when the model reads text."""

    def __init__(self, channels_in: int, channels_out: int, emb_dim: int,
                 context_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, channels_out)
        self.norm2 = nn.GroupNorm(8, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        same = channels_in == channels_out
        self.skip = nn.Identity() if same else nn.Conv2d(channels_in, channels_out, 1)
        self.attn = CrossAttention(channels_out, context_dim) if context_dim else None

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h))) + self.skip(x)
        return h if self.attn is None else self.attn(h, context, context_mask)


class Denoiser(nn.Module):
    """A small U-Net that predicts the noise eps in x_t. Down: a ResBlock per width, halving the
    size between them. A middle block. Up: ResBlocks that also read the matching down block's output
    (skip connections). It reads the timestep, and a class label (num_classes: none) or text."""

    def __init__(self, channels: int = 1, widths: Sequence[int] = (16, 32, 64), emb_dim: int = 128,
                 num_classes: int | None = None, context_dim: int | None = None) -> None:
        super().__init__()
        def block(channels_in: int, channels_out: int) -> ResBlock:
            return ResBlock(channels_in, channels_out, emb_dim, context_dim)
        self.emb_dim, ups = emb_dim, list(reversed(widths))
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(block(i, o) for i, o in zip([widths[0], *widths], widths))
        self.mid = block(widths[-1], widths[-1])
        self.up = nn.ModuleList(block(i + o, o) for i, o in zip([ups[0], *ups], ups))
        self.out = nn.Sequential(nn.GroupNorm(8, widths[0]), nn.SiLU(),
                                 nn.Conv2d(widths[0], channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # starts by predicting eps = 0
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim))
        if self.class_emb is not None:
            emb = emb + self.class_emb(labels)
        h, skips = self.stem(x), []
        for i, block in enumerate(self.down):
            h = h if i == 0 else F.avg_pool2d(h, 2, ceil_mode=True)  # 28 -> 14 -> 7, or 7 -> 4
            h = block(h, emb, context, context_mask)
            skips.append(h)
        h = self.mid(h, emb, context, context_mask)
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1), emb, context, context_mask)
        return self.out(h)


class AutoEncoder(nn.Module):
    """28x28 images in [-1, 1] <-> latents of `latent_channels` x 7 x 7: two stride-2 convolutions
    down (widths[0] at 28x28, widths[1] at 14x14, widths[2] at 7x7), two transposed ones up. The
    latent diffusion runs between `encode` and `decode`."""

    def __init__(self, latent_channels: int = 4, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        a, b, c = widths
        self.encoder = nn.Sequential(
            nn.Conv2d(1, a, 3, padding=1), nn.SiLU(),
            nn.Conv2d(a, b, 4, 2, 1), nn.SiLU(),                # 14 x 14
            nn.Conv2d(b, c, 4, 2, 1), nn.SiLU(),                # 7 x 7
            nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, latent_channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(c, b, 4, 2, 1), nn.SiLU(),       # 14 x 14
            nn.ConvTranspose2d(b, a, 4, 2, 1), nn.SiLU(),       # 28 x 28
            nn.Conv2d(a, 1, 3, padding=1), nn.Tanh())

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 1, 28, 28) -> latents (B, latent_channels, 7, 7)."""
        return self.encoder(images)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1]."""
        return self.decoder(latents)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))
