"""The LoRA adapter: its peft config on the UNet's attention projections, parameter counts, adapter files (save,
load, their layout), and views of the LoRA weights (copies, a checkpointable module, fingerprints)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

LORA_WEIGHT_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights writes


# The attention projections diffusers' LoRA script adapts: query, key, value and output projection
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_config(rank: int, alpha: float, target_modules: Sequence[str] = LORA_TARGET_MODULES):
    """The peft LoraConfig of diffusers' LoRA script: Gaussian A, zero B, on `target_modules`."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                      target_modules=list(target_modules))


def add_lora(unet: nn.Module, rank: int, alpha: float,
             target_modules: Sequence[str] = LORA_TARGET_MODULES) -> nn.Module:
    """Freeze the UNet, attach a LoRA adapter (`unet.add_adapter`), keep its weights in fp32."""
    from diffusers.training_utils import cast_training_params

    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, target_modules))
    cast_training_params(unet, dtype=torch.float32)  # fp16 weights would lose Adam's small updates
    return unet


def lora_parameter_count(unet_config: Mapping[str, Any], rank: int,
                         target_modules: Sequence[str] = LORA_TARGET_MODULES) -> tuple[int, int]:
    """(LoRA parameters, UNet parameters) from a UNet config alone: the model is built on the meta device (no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        base = sum(p.numel() for p in unet.parameters())
        unet.add_adapter(lora_config(rank, rank, target_modules))
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n), base


def save_lora(unet: nn.Module, folder: str | os.PathLike, adapter: str = "default",
              alpha: float | None = None) -> Path:
    """Save only the LoRA weights, in fp32, with the adapter's config (rank, alpha, targets) as
    metadata, to folder/pytorch_lora_weights.safetensors; return the file. With `alpha`: the same
    update written with that alpha, each B multiplied by (the adapter's alpha) / alpha, so that
    (alpha / r) B A is unchanged and only a reload that reads alpha reproduces the model."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter))
    weights = {name: w.detach().float().cpu().contiguous() for name, w in weights.items()}
    metadata = unet.peft_config[adapter].to_dict()  # without lora_alpha, a reload uses alpha = r
    if alpha is not None:
        factor = metadata["lora_alpha"] / alpha
        weights = {name: w * factor if "lora_B" in name or "lora.up" in name else w
                   for name, w in weights.items()}
        metadata["lora_alpha"] = alpha
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=weights,
                                              safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    return Path(folder) / LORA_WEIGHT_FILE


def load_lora(pipe: Any, folder: str | os.PathLike, adapter: str) -> None:
    """Load an adapter written by `save_lora` into the pipeline's UNet under the name `adapter`.
    The file is named: without it diffusers 0.39 (Colab's) fails when HF_HUB_OFFLINE=1."""
    pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_FILE, adapter_name=adapter)


def safetensors_layout(path: str | os.PathLike) -> tuple[int, int]:
    """(header bytes, tensor data bytes) of a .safetensors file: an 8-byte length, a JSON header, then the data."""
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_length))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + header_length, max(ends, default=0)


def lora_weights(unet: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Copies of every LoRA tensor of a peft-adapted UNet by parameter name (adapter name removed), on the CPU in
    fp32, after rounding to `dtype` when given (to compare with an adapter loaded in that precision)."""
    return {re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", n): p.detach().to(dtype or p.dtype).float().cpu().clone()
            for n, p in unet.named_parameters() if "lora_" in n}


class LoraParameters(nn.Module):
    """A view of a UNet's trainable (LoRA) parameters as one small module, so a checkpoint holds only them."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.params = nn.ParameterDict({n.replace(".", "/"): p for n, p in unet.named_parameters() if p.requires_grad})


def parameter_fingerprints(module: nn.Module) -> dict[str, str]:
    """A SHA-1 of every parameter's bytes by name (peft's `.base_layer` removed), to show later what changed."""
    import hashlib

    def digest(p: Tensor) -> str:
        return hashlib.sha1(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()

    return {name.replace(".base_layer", ""): digest(p) for name, p in module.named_parameters()}
