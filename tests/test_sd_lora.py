"""helpers/sd_lora.py (notebook 06): tiny offline components, LoRA counts and adapters, captioned images, errors."""
import json

import pytest
import torch
from PIL import Image

from helpers import sd_lora
from helpers.metrics import clip_score, clip_score_from_embeddings
from helpers.training import count_parameters


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return sd_lora.resolve_model_id(sd_lora.TINY_MODEL_ID, tmp_path_factory.mktemp("sd"))


# --- parameter counts ----------------------------------------------------------------------------


def test_sd15_rank4_lora_count_from_its_config_alone():
    # Per transformer block at width C with text width D = 768, rank r = 4, LoRA adds r * (d + k) per projection:
    # self-attention q, k, v, out: 4 * r * 2C; cross-attention q, out: 2 * r * 2C, k, v: 2 * r * (D + C)
    # -> r * (14C + 2D). Blocks: C = 320: 2 down + 3 up = 5; C = 640: 5; C = 1280: 2 down + 3 up + 1 mid = 6.
    # 4 * (4480 + 1536) * 5 + 4 * (8960 + 1536) * 5 + 4 * (17920 + 1536) * 6 = 120,320 + 209,920 + 466,944 = 797,184
    lora, unet = sd_lora.lora_parameter_count(sd_lora.SD15_UNET_CONFIG, rank=4)
    assert lora == 797_184
    assert unet == 859_520_964                              # the SD 1.5 UNet's published size (859.5 M)
    assert round(lora * 4 / 1e6, 2) == 3.19                 # MB in fp32


def test_tiny_lora_count():
    # Only width 64 has attention (1 down block x 2 layers, 1 up block x 3, the mid block): 6 blocks, D = 32:
    # 4 * (14 * 64 + 2 * 32) * 6 = 4 * 960 * 6 = 23,040
    assert sd_lora.lora_parameter_count(sd_lora.TINY_UNET_CONFIG, rank=4)[0] == 23_040


# --- tiny components and tokenizer ---------------------------------------------------------------


def test_tiny_tokenizer_is_character_level(tmp_path):
    from transformers import CLIPTokenizer

    folder = sd_lora.write_tiny_tokenizer(tmp_path)
    assert (folder / "merges.txt").read_text() == "#version: 0.2\n"
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A red").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "r", "e", "d</w>", "<|endoftext|>"]
    assert len(tokenizer) == 2 + 2 * 256 <= sd_lora.TINY_TEXT_CONFIG["vocab_size"]


def test_tiny_pipeline_loads_and_generates(tiny_model):
    pipe = sd_lora.load_pipeline(tiny_model)
    images = sd_lora.generate(pipe, ["a red circle"], [0, 1], steps=2, guidance=7.5, size=32)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    again = sd_lora.generate(pipe, ["a red circle"], [0], steps=2, guidance=7.5, size=32)
    assert torch.equal(again, images[:1])                   # a seed fixes the image


def test_lora_trains_only_adapter_weights_and_reloads_identically(tiny_model, tmp_path):
    pipe = sd_lora.load_pipeline(tiny_model)
    unet = sd_lora.add_lora(pipe.unet, rank=4, alpha=4)
    trainable, total = count_parameters(unet, trainable_only=True), count_parameters(unet)
    assert trainable == 23_040 and total == 1_427_012 + 23_040
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    before = sd_lora.parameter_fingerprints(unet)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        x = torch.randn(1, 4, 16, 16)
        loss = (unet(x, torch.tensor([500]), torch.randn(1, 77, 32)).sample - x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = sd_lora.parameter_fingerprints(unet)
    changed = {n for n in after if after[n] != before[n]}
    assert changed and all("lora_" in n for n in changed)

    path = sd_lora.save_lora(unet, tmp_path / "adapter")
    assert path.name == "pytorch_lora_weights.safetensors" and 23_040 * 4 < path.stat().st_size < 23_040 * 4 + 65_536
    fresh = sd_lora.load_pipeline(tiny_model)
    fresh.load_lora_weights(tmp_path / "adapter", adapter_name="trained")
    saved, loaded = sd_lora.lora_weights(unet), sd_lora.lora_weights(fresh.unet)
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)

    view = sd_lora.LoraParameters(unet)
    assert sum(p.numel() for p in view.parameters()) == 23_040


def test_checkpoint_view_round_trips(tiny_model, tmp_path):
    from helpers.training import load_checkpoint, save_checkpoint

    unet = sd_lora.add_lora(sd_lora.load_pipeline(tiny_model).unet, rank=4, alpha=4)
    save_checkpoint(tmp_path / "c.pt", {"lora": sd_lora.LoraParameters(unet)}, step=3)
    original = sd_lora.lora_weights(unet)
    for p in unet.parameters():
        if p.requires_grad:
            p.data.add_(1.0)
    assert load_checkpoint(tmp_path / "c.pt", {"lora": sd_lora.LoraParameters(unet)})["step"] == 3
    restored = sd_lora.lora_weights(unet)
    assert all(torch.equal(original[k], restored[k]) for k in original)


# --- captioned images ----------------------------------------------------------------------------


def test_mixed_sizes_are_resized_and_cropped(tmp_path):
    folder = sd_lora.make_shape_images(tmp_path, count=4)
    assert len({Image.open(p).size for p in folder.glob("*.png")}) == 4
    Image.new("L", (50, 30), 128).save(folder / "grey.png")       # greyscale, wide
    Image.new("RGBA", (20, 90), (0, 0, 0, 0)).save(folder / "tall.png")
    (folder / "grey.txt").write_text("a grey image")
    (folder / "tall.txt").write_text("a tall image")
    dataset = sd_lora.CaptionedImages.from_folder(folder, resolution=32)
    assert len(dataset) == 6
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["pixel_values"].shape == (3, 32, 32)
        assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert dict(zip([p.name for p in dataset.images], dataset.captions))["grey.png"] == "a grey image"


def test_metadata_jsonl_captions(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "black square"}) + "\n")
    assert sd_lora.CaptionedImages.from_folder(tmp_path, 16).captions == ["black square"]


def test_images_without_captions_are_named(tmp_path):
    folder = sd_lora.make_shape_images(tmp_path, count=3)
    (folder / "shape_01.txt").unlink()
    (folder / "shape_02.txt").write_text("   \n")
    with pytest.raises(sd_lora.MissingCaptionError, match=r"2 of 3 images .* no caption: shape_01.png, shape_02.png"):
        sd_lora.CaptionedImages.from_folder(folder, 32)
    with pytest.raises(sd_lora.MissingCaptionError, match="row 1"):
        sd_lora.CaptionedImages([Image.new("RGB", (8, 8))] * 2, ["ok", None], 8)


def test_hub_style_dataset_through_datasets(tmp_path):
    pytest.importorskip("datasets")                          # Colab has it; CI does not install it
    Image.new("RGB", (48, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 48)).save(tmp_path / "b.png")
    rows = [{"file_name": "a.png", "text": "wide"}, {"file_name": "b.png", "text": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(sd_lora.MissingCaptionError, match="1 of 2 images in dataset .* no caption: row 1"):
        sd_lora.CaptionedImages.from_hub(str(tmp_path), 16)
    rows[1]["text"] = "tall"
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = sd_lora.CaptionedImages.from_hub(str(tmp_path), 16)
    assert dataset.captions == ["wide", "tall"] and dataset[1]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(KeyError, match="has no column 'caption'"):
        sd_lora.CaptionedImages.from_hub(str(tmp_path), 16, caption_column="caption")


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        sd_lora.CaptionedImages.from_folder(tmp_path, 32)
    with pytest.raises(FileNotFoundError, match="image folder '.*nowhere' not found"):
        sd_lora.CaptionedImages.from_folder(tmp_path / "nowhere", 32)


def test_batches_cover_each_epoch_and_repeat_exactly():
    first_epoch = [i for step in range(5) for i in sd_lora.batch_indices(step, 2, 10, seed=0)]
    assert sorted(first_epoch) == list(range(10))
    assert sd_lora.batch_indices(7, 2, 10, seed=0) == sd_lora.batch_indices(7, 2, 10, seed=0)
    assert sd_lora.batch_indices(5, 2, 10, seed=0) != sd_lora.batch_indices(0, 2, 10, seed=0)


# --- errors: model ids, QLoRA --------------------------------------------------------------------


def test_a_model_that_cannot_load_says_what_to_do(tmp_path):
    message = r"could not load the Stable Diffusion model '.*empty'.*model_index.json"
    with pytest.raises(sd_lora.ModelLoadError, match=message):
        sd_lora.load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(sd_lora.ModelLoadError, match="could not load the Stable Diffusion model 'not a valid id!'"):
        sd_lora.load_pipeline("not a valid id!")


def test_qlora_without_cuda_refuses_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA GPU" in sd_lora.qlora_unavailable_reason()
    with pytest.raises(sd_lora.QLoRAUnavailableError, match="QLoRA needs a CUDA GPU.*Change runtime type"):
        sd_lora.load_unet_4bit("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_qlora_without_bitsandbytes_refuses_clearly(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real_find_spec(n, *a))
    with pytest.raises(sd_lora.QLoRAUnavailableError, match="pip install bitsandbytes"):
        sd_lora.load_unet_4bit("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_mixed_precision_choice_on_cpu():
    assert sd_lora.mixed_precision_for(torch.device("cpu")) == "no"


# --- CLIP score ----------------------------------------------------------------------------------


def test_clip_score_by_hand():
    # pair 1: cos((1, 0), (1, 1)) = 1/sqrt(2) = 0.70711 -> 70.711; pair 2: cos((1, 0), (-1, 0)) = -1 -> clipped to 0
    # mean (70.711 + 0) / 2 = 35.355
    images, texts = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    score = clip_score_from_embeddings(images, texts)
    assert score.item() == pytest.approx(35.3553, abs=1e-3)


def test_clip_score_with_tiny_stand_in(tmp_path):
    model, tokenizer = sd_lora.load_clip(sd_lora.TINY_MODEL_ID, tmp_path, torch.device("cpu"))
    score = clip_score(model, tokenizer, torch.rand(2, 3, 40, 40), ["a red circle", "a blue square"])
    assert 0 <= score <= 100

