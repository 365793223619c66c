"""CLIP for notebooks 04 and 06: loading a CLIP model (or its offline stand-in, a tiny random CLIP), CLIP's image
preprocessing, and the CLIP score (Hessel et al. 2021): how well images agree with their captions.

The stand-in (`STAND_IN_CLIP_ID`) has random weights and a character-level tokenizer: it runs offline and tests the
code path, but its scores mean nothing. The notebooks say so in their output and in metrics.json."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

STAND_IN_CLIP_ID = "tiny-random-clip"  # not a Hub id: a tiny random CLIP built from the configs below (offline)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the image normalisation CLIP was trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CLIP_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 5,
    "vocab_size": 1000, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
}
TINY_CLIP_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
    "image_size": 32, "patch_size": 4,
}


def byte_level_alphabet() -> list[str]:
    """The 256 characters byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """Write a character-level CLIP tokenizer (vocab.json + a merges.txt holding only its header) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in byte_level_alphabet():
            vocab[char + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


class ClipLoadError(RuntimeError):
    """A CLIP model could not be loaded."""


def load_clip(model_id: str, work_dir: str | os.PathLike, device: torch.device) -> tuple[Any, Any]:
    """A CLIPModel and its tokenizer from the Hub, or for STAND_IN_CLIP_ID a tiny random one (offline stand-in;
    its tokenizer files are written to work_dir/clip-tokenizer)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    if model_id == STAND_IN_CLIP_ID:
        torch.manual_seed(0)
        text = dict(TINY_CLIP_TEXT_CONFIG)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION_CONFIG, projection_dim=32))
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(work_dir) / "clip-tokenizer"),
                                                  model_max_length=TINY_CLIP_TEXT_CONFIG["max_position_embeddings"])
        return model.to(device).eval(), tokenizer
    try:
        return CLIPModel.from_pretrained(model_id).to(device).eval(), CLIPTokenizer.from_pretrained(model_id)
    except Exception as err:
        raise ClipLoadError(f"could not load the CLIP model {model_id!r} for the CLIP score ({err}); check the id "
                            "and your internet connection") from err


def clip_pixels(images: Tensor, size: int) -> Tensor:
    """CLIP's preprocessing of images in [0, 1] (N, 3, H, W): the shorter side resized to `size` (bicubic,
    antialiased), the centre `size` x `size` cropped, normalised by CLIP's mean and standard deviation."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    pixels = TF.resize(images.float(), size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    pixels = TF.center_crop(pixels, [size, size]).clamp(0, 1)  # bicubic overshoots a little
    mean, std = (torch.tensor(v, device=pixels.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (pixels - mean) / std


def clip_score_from_embeddings(image_embeds: Tensor, text_embeds: Tensor) -> float:
    """CLIPScore (Hessel et al. 2021, as torchmetrics computes it): max(100 * mean cosine similarity of the
    image/caption pairs, 0)."""
    cosine = F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return max(100 * cosine.mean().item(), 0.0)


@torch.no_grad()
def clip_image_embeddings(model: Any, images: Tensor) -> Tensor:
    """Projected CLIP image embeddings of images in [0, 1] (transformers CLIPModel), after clip_pixels."""
    device = next(model.parameters()).device
    pixels = clip_pixels(images, model.config.vision_config.image_size).to(device, model.dtype)
    embeds = model.get_image_features(pixel_values=pixels)
    return getattr(embeds, "pooler_output", embeds).float()  # transformers 5 returns an output object


@torch.no_grad()
def clip_text_embeddings(model: Any, tokenizer: Any, captions: Sequence[str]) -> Tensor:
    """CLIP text embeddings of captions (projected; transformers CLIPModel and its tokenizer)."""
    device = next(model.parameters()).device
    tokens = tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt").to(device)
    embeds = model.get_text_features(**tokens)
    return getattr(embeds, "pooler_output", embeds).float()


def clip_score(model: Any, tokenizer: Any, images: Tensor, captions: Sequence[str]) -> float:
    """CLIPScore of images in [0, 1] against their captions with a transformers CLIPModel."""
    return clip_score_from_embeddings(clip_image_embeddings(model, images),
                                      clip_text_embeddings(model, tokenizer, captions))
