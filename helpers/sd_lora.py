"""Stable Diffusion + LoRA/QLoRA for notebook 06: tiny offline components, captioned images, adapters, CLIP score.

The tiny shapes are the ones diffusers' own tests use; the SD 1.5 UNet config below is the real
`stable-diffusion-v1-5/stable-diffusion-v1-5` `unet/config.json` (the entries that decide its shapes).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import transforms

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TINY_MODEL_ID = "tiny-random-sd"  # not a Hub id: build tiny random components from configs (offline stand-in)
STAND_IN_NOTE = ("tiny randomly initialised UNet, VAE, CLIP text encoder and tokenizer built from configs "
                 "(offline stand-in): the images are noise-like and not meaningful")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

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
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 5,
    "vocab_size": 1000, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
}
TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}
TINY_CLIP_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
    "image_size": 32, "patch_size": 4,
}


class ModelLoadError(RuntimeError):
    """A Stable Diffusion checkpoint could not be loaded."""


class MissingCaptionError(ValueError):
    """Training images were found without a caption."""


class QLoRAUnavailableError(RuntimeError):
    """4-bit QLoRA was asked for where bitsandbytes cannot run (no CUDA GPU or no bitsandbytes)."""


# --- tiny offline components ---------------------------------------------------------------------


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


def build_tiny_components(folder: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Tiny random UNet, VAE, CLIP text encoder, a local tokenizer and a DDIM scheduler (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(folder) / "tokenizer-files"),
                                              model_max_length=TINY_TEXT_CONFIG["max_position_embeddings"])
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


def load_pipeline(model_id: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A StableDiffusionPipeline from a Hub id or a local folder; a ModelLoadError that says what to do otherwise."""
    from diffusers import StableDiffusionPipeline

    try:
        # `torch_dtype` works on every diffusers version (the newest prefer `dtype`)
        pipe = StableDiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype)
    except Exception as err:
        raise ModelLoadError(
            f"could not load the Stable Diffusion model {model_id!r} ({type(err).__name__}: {str(err)[:300]}). "
            "Check the id on https://huggingface.co (e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5'), your internet "
            "connection and, for gated models, `huggingface-cli login`; or pass a local folder that holds model_index.json"
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def mixed_precision_for(device: torch.device) -> str:
    """'bf16' on GPUs that compute in bf16 natively (compute capability >= 8), 'fp16' on older GPUs (T4), else 'no'."""
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


# --- LoRA ----------------------------------------------------------------------------------------


def lora_config(rank: int, alpha: float, target_modules: Sequence[str] = LORA_TARGET_MODULES):
    """The peft LoraConfig of diffusers' LoRA script: gaussian A, zero B, on the attention projections."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))


def add_lora(unet: nn.Module, rank: int, alpha: float, target_modules: Sequence[str] = LORA_TARGET_MODULES) -> nn.Module:
    """Freeze the UNet, attach a LoRA adapter with `unet.add_adapter` and keep the LoRA weights in fp32."""
    from diffusers.training_utils import cast_training_params

    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, target_modules))
    cast_training_params(unet, dtype=torch.float32)
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


def lora_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The UNet's LoRA weights only, with the key names diffusers' `save_lora_weights` expects."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet: nn.Module, folder: str | os.PathLike) -> Path:
    """Save only the LoRA weights as `pytorch_lora_weights.safetensors` in `folder`; return the file."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(save_directory=folder, unet_lora_layers=state, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def lora_weights(unet: nn.Module) -> dict[str, Tensor]:
    """Every LoRA tensor of a peft-adapted UNet by parameter name (adapter name removed), detached on the CPU."""
    import re

    return {re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", n): p.detach().float().cpu()
            for n, p in unet.named_parameters() if "lora_" in n}


class LoraParameters(nn.Module):
    """A view of a UNet's trainable (LoRA) parameters as one small module, so a checkpoint holds only them."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.params = nn.ParameterDict({n.replace(".", "/"): p for n, p in unet.named_parameters() if p.requires_grad})


# --- QLoRA ---------------------------------------------------------------------------------------


def qlora_unavailable_reason() -> str | None:
    """Why 4-bit QLoRA cannot run here (no CUDA GPU, no bitsandbytes), or None when it can."""
    if not torch.cuda.is_available():
        return ("QLoRA needs a CUDA GPU: bitsandbytes' 4-bit kernels run only on CUDA (diffusers raises "
                "'No GPU found' otherwise). Run this notebook on a GPU runtime (Colab: Runtime > Change runtime type > T4)")
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        return "QLoRA needs bitsandbytes: `pip install bitsandbytes` (it is in requirements-colab.txt), then restart"
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
                                                    torch_dtype=compute_dtype)
    except Exception as err:
        raise ModelLoadError(f"could not load the UNet of {model_id!r} in 4-bit ({type(err).__name__}: {err})") from err


# --- captioned images ----------------------------------------------------------------------------


def image_transform(resolution: int, random_flip: bool = False) -> transforms.Compose:
    """Any size -> shorter side resized to `resolution`, centre-cropped square, optionally flipped, in [-1, 1]."""
    steps = [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
             transforms.CenterCrop(resolution)]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])


def check_captions(captions: Sequence[str | None], source: str, names: Sequence[str] | None = None) -> list[str]:
    """The captions stripped, or a MissingCaptionError naming the images that have none."""
    missing = [(names[i] if names else f"row {i}") for i, c in enumerate(captions) if c is None or not str(c).strip()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingCaptionError(
            f"{len(missing)} of {len(captions)} images in {source} have no caption: {shown}. Give every image a caption: "
            "a text file of the same name (cat.png -> cat.txt) or a line {\"file_name\": \"cat.png\", \"text\": \"...\"} "
            "in metadata.jsonl; or remove the uncaptioned images"
        )
    return [str(c).strip() for c in captions]


def read_image_folder(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Image paths and captions of a folder: captions from metadata.jsonl, else from same-name .txt files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' not found; create it with images and their captions")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'; put your training images there")
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
        by_name = {row.get("file_name"): row.get("text") for row in rows}
        captions = [by_name.get(p.name) for p in images]
    else:
        captions = [p.with_suffix(".txt").read_text() if p.with_suffix(".txt").is_file() else None for p in images]
    return images, check_captions(captions, f"'{folder}'", [p.name for p in images])


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, read from its header."""
    with Image.open(path) as image:
        return image.size


class CaptionedImages(Dataset):
    """Images (paths or PIL images, any size and mode) with captions, as {'pixel_values', 'caption'} at one resolution."""

    def __init__(self, images: Sequence[Any], captions: Sequence[str], resolution: int, random_flip: bool = False,
                 source: str = "the dataset") -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions in {source}; give one caption per image")
        names = [Path(p).name for p in images] if isinstance(images, (list, tuple)) and all(
            isinstance(p, (str, Path)) for p in images) else None
        self.captions = check_captions(captions, source, names)
        self.images = images
        self.transform = image_transform(resolution, random_flip)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, resolution: int, random_flip: bool = False) -> "CaptionedImages":
        """A folder of images with captions (metadata.jsonl or same-name .txt files)."""
        images, captions = read_image_folder(folder)
        return cls(images, captions, resolution, random_flip, source=f"'{folder}'")

    @classmethod
    def from_hub(cls, name: str, resolution: int, random_flip: bool = False, split: str = "train",
                 image_column: str = "image", caption_column: str = "text") -> "CaptionedImages":
        """A Hub image/caption dataset such as 'lambdalabs/naruto-blip-captions' (needs `datasets`)."""
        try:
            from datasets import load_dataset
        except ImportError as err:
            raise ImportError("Hub datasets need `pip install datasets` (Colab has it)") from err
        rows = load_dataset(name, split=split)
        for column in (image_column, caption_column):
            if column not in rows.column_names:
                raise KeyError(f"dataset {name!r} has no column {column!r} (it has {rows.column_names})")
        captions = list(rows[caption_column])
        return cls(_Column(rows, image_column), captions, resolution, random_flip, source=f"dataset {name!r}")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        return {"pixel_values": self.transform(image.convert("RGB")), "caption": self.captions[index]}


class _Column:
    """One column of a Hub dataset, indexed lazily (images are decoded only when used)."""

    def __init__(self, rows: Any, column: str) -> None:
        self.rows, self.column = rows, column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[int(index)][self.column]


def batch_indices(step: int, batch_size: int, length: int, seed: int = 0) -> list[int]:
    """The dataset indices of batch number `step`: a new seeded permutation each epoch, so resume is exact."""
    per_epoch = max(1, length // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[position * batch_size:(position + 1) * batch_size]


SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}


def make_shape_images(folder: str | os.PathLike, count: int = 8, seed: int = 0) -> Path:
    """Write `count` captioned images of coloured shapes, of mixed sizes, into `folder` (a tiny training set)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [(64, 64), (96, 64), (64, 112), (80, 80)]
    for i in range(count):
        colour, background = rng.sample(sorted(SHAPE_COLOURS), 2)
        shape = rng.choice(["circle", "square"])
        width, height = sizes[i % len(sizes)]
        image = Image.new("RGB", (width, height), SHAPE_COLOURS[background])
        half = min(width, height) // 4
        box = [width // 2 - half, height // 2 - half, width // 2 + half, height // 2 + half]
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=SHAPE_COLOURS[colour])
        image.save(folder / f"shape_{i:02d}.png")
        (folder / f"shape_{i:02d}.txt").write_text(f"a {colour} {shape} on a {background} background\n")
    return folder


# --- generation and CLIP score -------------------------------------------------------------------


def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
             size: int) -> Tensor:
    """Images in [0, 1] of shape (len(prompts) * len(seeds), 3, size, size): prompt-major, one generator per seed."""
    images = []
    for prompt in prompts:
        for seed in seeds:
            generator = torch.Generator(device=pipe.device).manual_seed(seed)
            out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                       generator=generator, output_type="pt")
            images.append(out.images.float().cpu())
    return torch.cat(images)


def load_clip(model_id: str, work_dir: str | os.PathLike, device: torch.device) -> tuple[Any, Any]:
    """A CLIPModel and tokenizer from the Hub, or for TINY_MODEL_ID a tiny random one (offline stand-in)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    if model_id == TINY_MODEL_ID:
        torch.manual_seed(0)
        text = {k: v for k, v in TINY_TEXT_CONFIG.items()}
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION_CONFIG, projection_dim=32))
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(work_dir) / "clip-tokenizer"),
                                                  model_max_length=TINY_TEXT_CONFIG["max_position_embeddings"])
        return model.to(device).eval(), tokenizer
    try:
        return CLIPModel.from_pretrained(model_id).to(device).eval(), CLIPTokenizer.from_pretrained(model_id)
    except Exception as err:
        raise ModelLoadError(f"could not load the CLIP model {model_id!r} for the CLIP score ({err}); check the id "
                             "and your internet connection") from err


def parameter_fingerprints(module: nn.Module) -> dict[str, str]:
    """A SHA-1 of every parameter's bytes by name (peft's `.base_layer` removed), to show later what changed."""
    import hashlib

    def digest(p: Tensor) -> str:
        return hashlib.sha1(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()

    return {name.replace(".base_layer", ""): digest(p) for name, p in module.named_parameters()}
