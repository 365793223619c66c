"""The attribute classifier of notebook 04: a small CNN that reads colour, shape, size and position of a shape,
so caption accuracy can check whether a generated image shows what its caption says."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .shapes import ATTRIBUTES, CaptionedImageSet


class AttributeClassifier(nn.Module):
    """A small CNN on 32x32 copies of the images (three conv + max-pool blocks), one softmax head per attribute."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        blocks, channels = [nn.AdaptiveAvgPool2d(32)], 3
        for out in (width, 2 * width, 4 * width):
            blocks += [nn.Conv2d(channels, out, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(channels * 16, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits per attribute for images in [-1, 1] of any size >= 32."""
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}


def train_attribute_classifier(data: CaptionedImageSet, steps: int, batch_size: int = 64, lr: float = 2e-3,
                               device: str | torch.device = "cpu", seed: int = 0) -> AttributeClassifier:
    """Fit an AttributeClassifier on real shapes (cross-entropy summed over the four attributes)."""
    torch.manual_seed(seed)
    model = AttributeClassifier().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=generator)
        logits = model(data.images[idx].to(device))
        target = data.attributes[idx].to(device)
        loss = sum(F.cross_entropy(logits[name], target[:, k]) for k, name in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def attribute_accuracy(classifier: AttributeClassifier, images: Tensor, attributes: Tensor,
                       batch_size: int = 256) -> dict[str, float]:
    """Fraction of images whose predicted attribute equals `attributes` (N, 4): per attribute and all four at once."""
    if len(images) != len(attributes):
        raise ValueError(f"{len(images)} images but {len(attributes)} attribute rows; give one row per image")
    device = next(classifier.parameters()).device
    preds = []
    for start in range(0, len(images), batch_size):
        logits = classifier(images[start:start + batch_size].to(device))
        preds.append(torch.stack([logits[name].argmax(1) for name in ATTRIBUTES], 1).cpu())
    correct = torch.cat(preds) == attributes
    scores = {name: correct[:, k].float().mean().item() for k, name in enumerate(ATTRIBUTES)}
    scores["all"] = correct.all(1).float().mean().item()
    return scores
