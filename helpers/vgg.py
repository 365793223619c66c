"""VGG19 feature extractor with the paper's layer names (conv1_1, relu4_2, ...), shared by style transfer and pix2pixHD."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.models import VGG19_Weights

from .downloads import cache_torchvision_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAND_IN_NOTE = "VGG19 with random weights (offline stand-in): its losses and images are not meaningful"


VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def vgg19_layer_names() -> list[str]:
    """Names of the 37 modules of torchvision's vgg19().features, as the papers name them (conv1_1, relu1_1, ...)."""
    names, block, index = [], 1, 1
    for item in VGG19_CONFIG:
        if item == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
            index += 1
    return names


def build_vgg19_features() -> nn.Sequential:
    """VGG19's convolutional part alone (no 120M-parameter classifier), initialised as torchvision initialises it."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG19_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(channels, item, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


def load_vgg19_features(pretrained: bool) -> nn.Sequential:
    """VGG19 `features`: torchvision's ImageNet weights if `pretrained` (downloads once), random weights otherwise."""
    features = build_vgg19_features()
    if not pretrained:
        return features
    try:
        cache_torchvision_weights(VGG19_Weights.IMAGENET1K_V1, "VGG19's ImageNet weights")  # timeout, User-Agent
        state = VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as err:  # the download is the only thing that fails here
        raise RuntimeError(
            "could not load torchvision's ImageNet VGG19 weights (needs internet once, ~550 MB, cached in "
            f"~/.cache/torch): {err}. Connect to the internet, or run with SMOKE=1 to use random weights"
        ) from err
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    return features


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
