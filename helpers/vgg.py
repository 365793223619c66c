"""VGG19 feature extractor with the paper's layer names (conv1_1, relu4_2, ...), shared by style transfer and pix2pixHD."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.models import VGG19_Weights, vgg19

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAND_IN_NOTE = "VGG19 with random weights (offline stand-in): its losses and images are not meaningful"


def vgg19_layer_names() -> list[str]:
    """Names of the 37 modules of torchvision's vgg19().features, as the papers name them."""
    names, block, index = [], 1, 1
    for module in vgg19(weights=None).features:
        if isinstance(module, nn.Conv2d):
            names.append(f"conv{block}_{index}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{index}")
            index += 1
        else:
            names.append(f"pool{block}")
            block, index = block + 1, 1
    return names


def load_vgg19_features(pretrained: bool) -> nn.Sequential:
    """torchvision's VGG19 `features`: ImageNet weights if `pretrained` (downloads once), random weights otherwise."""
    if not pretrained:
        return vgg19(weights=None).features
    try:
        return vgg19(weights=VGG19_Weights.IMAGENET1K_V1).features
    except Exception as err:  # the download is the only thing that fails here
        raise RuntimeError(
            "could not load torchvision's ImageNet VGG19 weights (needs internet once, ~550 MB, cached in "
            f"~/.cache/torch): {err}. Connect to the internet, or run with SMOKE=1 to use random weights"
        ) from err


class VGG19Features(nn.Module):
    """Frozen VGG19 returning the feature maps of the named layers, in the order asked."""

    def __init__(self, layers: Sequence[str], pretrained: bool = True, pooling: str = "max",
                 normalize_input: bool = True) -> None:
        super().__init__()
        names = vgg19_layer_names()
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise ValueError(f"unknown VGG19 layer(s) {unknown}; valid names look like conv4_2, relu1_1, pool3")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.layers = list(layers)
        self.pretrained = pretrained
        self.normalize_input = normalize_input
        last = max(names.index(name) for name in layers)
        modules = []
        for module in list(load_vgg19_features(pretrained))[: last + 1]:
            if isinstance(module, nn.ReLU):
                module = nn.ReLU(inplace=False)
            elif isinstance(module, nn.MaxPool2d) and pooling == "avg":
                module = nn.AvgPool2d(kernel_size=2, stride=2)
            modules.append(module)
        self.body = nn.Sequential(*modules)
        self.names = names[: last + 1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps of `self.layers` for images in [0, 1] (normalised here) or raw if normalize_input=False."""
        x = (images - self.mean) / self.std if self.normalize_input else images
        wanted, found = set(self.layers), {}
        for name, module in zip(self.names, self.body):
            x = module(x)
            if name in wanted:
                found[name] = x
        return [found[name] for name in self.layers]

    def train(self, mode: bool = True) -> "VGG19Features":
        """VGG stays in eval mode: it is a fixed feature extractor."""
        return super().train(False)
