"""What the stylised image minimises: VGG19 features by layer name, the content, style and feature losses in
relative units (StyleObjective), and the colour spaces of luminance-only transfer."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..vgg import VGG19Features
from .losses import content_loss, gram_matrix, style_loss, total_variation_loss

CONTENT_LAYERS = ("relu4_2",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
YIQ_FROM_RGB = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


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


# --- The objective -------------------------------------------------------------------------------------------------


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
