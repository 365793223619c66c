"""The Stable Diffusion pipeline: model ids, the tiny offline pipeline built from configs, loading the pipeline or
its UNet alone (in 4-bit NF4 for QLoRA), and the errors that say what to do.

The tiny shapes are the ones diffusers' own tests use; the SD 1.5 UNet config below is the real
`stable-diffusion-v1-5/stable-diffusion-v1-5` `unet/config.json` (the entries that decide its shapes).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..clip import TINY_CLIP_TEXT_CONFIG, write_tiny_tokenizer

TINY_MODEL_ID = "tiny-random-sd"  # not a Hub id: build tiny random components from configs (offline stand-in)
TINY_PIPELINE_NOTE = ("tiny randomly initialised UNet, VAE, CLIP text encoder and tokenizer built from configs "
                 "(offline stand-in): the images are noise-like and not meaningful")
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64], "layers_per_block": 2, "sample_size": 32, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32, "norm_num_groups": 32,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "sample_size": 64,
}
TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}


class ModelLoadError(RuntimeError):
    """A Stable Diffusion checkpoint could not be loaded."""


class QLoRAUnavailableError(RuntimeError):
    """4-bit QLoRA was asked for where bitsandbytes cannot run (no CUDA GPU or no bitsandbytes)."""


def build_tiny_components(folder: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Tiny random UNet, VAE, CLIP text encoder, a local tokenizer and a DDIM scheduler (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT_CONFIG))
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(folder) / "tokenizer-files"),
                                              model_max_length=TINY_CLIP_TEXT_CONFIG["max_position_embeddings"])
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": DDIMScheduler(**TINY_SCHEDULER_CONFIG)}


def save_tiny_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random StableDiffusionPipeline to `folder` (loadable like a Hub checkpoint) and return it."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    pipe = StableDiffusionPipeline(**build_tiny_components(folder, seed), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def resolve_model_id(model_id: str, work_dir: str | os.PathLike) -> str:
    """`model_id` itself, or for TINY_MODEL_ID the folder of a freshly written tiny pipeline."""
    return str(save_tiny_pipeline(Path(work_dir) / TINY_MODEL_ID)) if model_id == TINY_MODEL_ID else model_id


def hub_variant(model_id: str, dtype: torch.dtype) -> str | None:
    """'fp16' (the half-size weight files) for a Hub id loaded in half precision; None for fp32 or a local folder."""
    return "fp16" if dtype in (torch.float16, torch.bfloat16) and not Path(model_id).is_dir() else None


def load_pipeline(model_id: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A StableDiffusionPipeline (no safety checker) from a Hub id or a local folder, the fp16 weight files when
    loading in half precision; a ModelLoadError that says what to do otherwise."""
    from diffusers import StableDiffusionPipeline

    try:
        # `torch_dtype` works on every diffusers version (the newest prefer `dtype`)
        pipe = StableDiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype, variant=hub_variant(model_id, dtype),
                                                       safety_checker=None, requires_safety_checker=False)
    except Exception as err:
        raise ModelLoadError(
            f"could not load the Stable Diffusion model {model_id!r} ({type(err).__name__}: {str(err)[:300]}). "
            "Check the id on https://huggingface.co (e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5'), your internet "
            "connection and, for gated models, `huggingface-cli login`; or pass a local folder that holds model_index.json"
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def qlora_unavailable_reason() -> str | None:
    """Why 4-bit QLoRA cannot run here (no CUDA GPU, no bitsandbytes), or None when it can."""
    if not torch.cuda.is_available():
        return ("QLoRA needs a CUDA GPU: bitsandbytes' 4-bit kernels run only on CUDA (diffusers raises "
                "'No GPU found' otherwise). Run this notebook on a GPU runtime (Colab: Runtime > Change runtime type > T4)")
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        return ("QLoRA needs bitsandbytes (notebook 06 installs it where a CUDA GPU is present): "
                "`pip install bitsandbytes`, then restart the runtime and run the notebook again")
    return None


def load_unet_4bit(model_id: str, compute_dtype: torch.dtype = torch.float16):
    """The UNet of `model_id` with its Linear layers quantised to 4-bit NF4 (bitsandbytes); refuses clearly without CUDA."""
    reason = qlora_unavailable_reason()
    if reason is not None:
        raise QLoRAUnavailableError(reason)
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    try:
        return UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", quantization_config=config,
                                                    torch_dtype=compute_dtype,
                                                    variant=hub_variant(model_id, compute_dtype))
    except Exception as err:
        raise ModelLoadError(f"could not load the UNet of {model_id!r} in 4-bit ({type(err).__name__}: {err})") from err


def load_unet(model_id: str, dtype: torch.dtype, device: str | torch.device):
    """The UNet of `model_id` alone in `dtype` (not quantised): QLoRA's stand-in where bitsandbytes cannot run."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dtype,
                                                variant=hub_variant(model_id, dtype)).to(device)
