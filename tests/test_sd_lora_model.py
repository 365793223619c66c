"""helpers/sd_lora (notebook 06), the model: the tiny offline pipeline, LoRA counts, the adapter (training only its
weights, saving, reloading, its checkpoint view), and the errors of model loading and QLoRA."""

import pytest
import torch

from helpers import clip
from helpers.sd_lora import evaluate as sd_eval, lora as sd_adapter, pipeline as sd_pipeline
from helpers.sd_lora import train as sd_train
from helpers.training import count_parameters


from sd_lora_steps import FP32  # tests/sd_lora_steps.py
from sd_lora_steps import accelerator as _accelerator, scheduler as _scheduler, train_steps as _train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return sd_pipeline.resolve_model_id(sd_pipeline.TINY_MODEL_ID, tmp_path_factory.mktemp("sd"))


# --- parameter counts ----------------------------------------------------------------------------------------


def test_sd15_rank4_lora_count_from_its_config_alone():
    # Per transformer block at width C with text width D = 768, rank r = 4, LoRA adds r * (d + k) per projection:
    # self-attention q, k, v, out: 4 * r * 2C; cross-attention q, out: 2 * r * 2C, k, v: 2 * r * (D + C)
    # -> r * (14C + 2D). Blocks: C = 320: 2 down + 3 up = 5; C = 640: 5; C = 1280: 2 down + 3 up + 1 mid = 6.
    # 4 * (4480 + 1536) * 5 + 4 * (8960 + 1536) * 5 + 4 * (17920 + 1536) * 6 = 120,320 + 209,920 + 466,944 = 797,184
    lora, unet = sd_adapter.lora_parameter_count(sd_pipeline.SD15_UNET_CONFIG, rank=4)
    assert lora == 797_184
    assert unet == 859_520_964                              # the SD 1.5 UNet's published size (859.5 M)
    assert round(lora * 4 / 1e6, 2) == 3.19                 # MB in fp32


def test_tiny_lora_count():
    # Only width 64 has attention (1 down block x 2 layers, 1 up block x 3, the mid block): 6 blocks, D = 32:
    # 4 * (14 * 64 + 2 * 32) * 6 = 4 * 960 * 6 = 23,040
    assert sd_adapter.lora_parameter_count(sd_pipeline.TINY_UNET_CONFIG, rank=4)[0] == 23_040


# --- tiny components and tokenizer ---------------------------------------------------------------------------


def test_tiny_tokenizer_is_character_level(tmp_path):
    from transformers import CLIPTokenizer

    folder = clip.write_tiny_tokenizer(tmp_path)
    assert (folder / "merges.txt").read_text() == "#version: 0.2\n"
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A red").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "r", "e", "d</w>", "<|endoftext|>"]
    assert len(tokenizer) == 2 + 2 * 256 <= clip.TINY_CLIP_TEXT_CONFIG["vocab_size"]


# --- the adapter: trained alone, saved, reloaded -------------------------------------------------------------


PROBE = (torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([500]),
         torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2)))


def test_lora_trains_only_adapter_weights(tiny_model):
    unet = sd_adapter.add_lora(sd_pipeline.load_pipeline(tiny_model).unet, rank=4, alpha=4)
    trainable, total = count_parameters(unet, trainable_only=True), count_parameters(unet)
    assert trainable == 23_040 and total == 1_427_012 + 23_040
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    before = sd_adapter.parameter_fingerprints(unet)
    _train(unet, tiny_model)
    after = sd_adapter.parameter_fingerprints(unet)
    changed = {n for n in after if after[n] != before[n]}
    assert changed and all("lora_" in n for n in changed)
    assert sum(p.numel() for p in sd_adapter.LoraParameters(unet).parameters()) == 23_040


def _trained_lora(tiny_model, alpha: int):
    """A rank-4 LoRA with `alpha` added to the tiny UNet and trained: the UNet, its prediction on PROBE, and the
    adapter's effect (the largest change of that prediction)."""
    pipe = sd_pipeline.load_pipeline(tiny_model)
    base = sd_eval.predict_noise(pipe.unet, PROBE)
    unet = sd_adapter.add_lora(pipe.unet, rank=4, alpha=alpha)
    _train(unet, tiny_model)
    trained = sd_eval.predict_noise(unet, PROBE)
    return unet, trained, (trained - base).abs().max().item()


def test_reloaded_adapter_reproduces_the_trained_unet_when_alpha_is_not_rank(tiny_model, tmp_path):
    # The LoRA update is (alpha / r) B A: saved without lora_alpha, a reload used alpha = r and halved it here.
    unet, trained, effect = _trained_lora(tiny_model, alpha=8)
    path = sd_adapter.save_lora(unet, tmp_path / "adapter")
    fresh = sd_pipeline.load_pipeline(tiny_model)
    sd_adapter.load_lora(fresh, tmp_path / "adapter", "trained")
    reloaded = sd_eval.predict_noise(fresh.unet, PROBE)
    assert effect > 1e-3, "the trained adapter must change the UNet's prediction"
    assert (reloaded - trained).abs().max().item() <= 1e-6 * effect
    saved, loaded = sd_adapter.lora_weights(unet), sd_adapter.lora_weights(fresh.unet)
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # the file holds exactly the 23,040 fp32 LoRA weights after its header
    header, data = sd_adapter.safetensors_layout(path)
    assert data == 23_040 * 4 and path.stat().st_size == header + data


def _strip_config(path):
    """Rewrite an adapter file without the adapter's config (alpha among it), as older tools wrote them."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})


def test_reload_check_with_alpha_half_the_rank_fails_on_a_wrong_alpha(tiny_model, tmp_path):
    # The notebook trains with alpha = r (scale 1): a reload that ignored alpha would pass. So it also saves the
    # same update with alpha = r / 2 and B doubled: only a reload that reads alpha = r / 2 gives the trained model;
    # one that takes alpha = r doubles the adapter's effect.
    unet, trained, effect = _trained_lora(tiny_model, alpha=4)
    sd_adapter.save_lora(unet, tmp_path / "halved", alpha=2)
    fresh = sd_pipeline.load_pipeline(tiny_model)
    sd_adapter.load_lora(fresh, tmp_path / "halved", "halved")
    assert fresh.unet.peft_config["halved"].lora_alpha == 2
    gap = (sd_eval.predict_noise(fresh.unet, PROBE) - trained).abs().max().item()
    assert effect > 1e-3 and gap <= 1e-5 * effect           # the notebook's check passes
    _strip_config(tmp_path / "halved" / sd_adapter.LORA_WEIGHT_FILE)
    wrong = sd_pipeline.load_pipeline(tiny_model)
    sd_adapter.load_lora(wrong, tmp_path / "halved", "halved")
    assert wrong.unet.peft_config["halved"].lora_alpha == 4  # without the config, diffusers takes alpha = r
    wrong_gap = (sd_eval.predict_noise(wrong.unet, PROBE) - trained).abs().max().item()
    assert wrong_gap > 0.5 * effect                          # the check fails: about the whole effect again


def test_adapter_reloads_in_offline_mode(tiny_model, tmp_path, monkeypatch):
    # diffusers 0.39 (Colab's) raises "When using the offline mode, you must specify a `weight_name`" otherwise
    import diffusers.loaders.lora_base as lora_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(lora_base, "HF_HUB_OFFLINE", True, raising=False)
    unet = sd_adapter.add_lora(sd_pipeline.load_pipeline(tiny_model).unet, rank=4, alpha=4)
    sd_adapter.save_lora(unet, tmp_path / "adapter")
    fresh = sd_pipeline.load_pipeline(tiny_model)
    sd_adapter.load_lora(fresh, tmp_path / "adapter", "trained")
    assert "trained" in fresh.unet.peft_config


def test_training_continues_after_the_adapter_is_saved_and_compared(tiny_model, tmp_path):
    # The notebook compares the trained LoRA weights with an adapter reloaded in fp16; casting the trained
    # weights to fp16 in place for that broke the next step ("expected dtype float ... but got Half").
    unet = sd_adapter.add_lora(sd_pipeline.load_pipeline(tiny_model).unet, rank=4, alpha=4)
    optimizer = _train(unet, tiny_model)
    sd_adapter.save_lora(unet, tmp_path / "adapter")
    fresh = sd_pipeline.load_pipeline(tiny_model, dtype=torch.float16)
    sd_adapter.load_lora(fresh, tmp_path / "adapter", "trained")
    reloaded = sd_adapter.lora_weights(fresh.unet)
    trained = sd_adapter.lora_weights(unet, dtype=torch.float16)
    assert all(torch.equal(reloaded[k], trained[k]) for k in trained)
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    before = sd_adapter.lora_weights(unet)
    micro_batches = [(torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32))]
    sd_train.lora_training_step(unet, optimizer, micro_batches, _scheduler(tiny_model), _accelerator(), FP32)
    after = sd_adapter.lora_weights(unet)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_view_round_trips(tiny_model, tmp_path):
    from helpers.training import load_checkpoint, save_checkpoint

    unet = sd_adapter.add_lora(sd_pipeline.load_pipeline(tiny_model).unet, rank=4, alpha=4)
    save_checkpoint(tmp_path / "c.pt", {"lora": sd_adapter.LoraParameters(unet)}, step=3)
    original = sd_adapter.lora_weights(unet)
    for p in unet.parameters():
        if p.requires_grad:
            p.data.add_(1.0)
    assert load_checkpoint(tmp_path / "c.pt", {"lora": sd_adapter.LoraParameters(unet)})["step"] == 3
    restored = sd_adapter.lora_weights(unet)
    assert all(torch.equal(original[k], restored[k]) for k in original)


# --- errors: model ids, QLoRA --------------------------------------------------------------------------------


def test_a_model_that_cannot_load_says_what_to_do(tmp_path):
    message = r"could not load the Stable Diffusion model '.*empty'.*model_index.json"
    with pytest.raises(sd_pipeline.ModelLoadError, match=message):
        sd_pipeline.load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(sd_pipeline.ModelLoadError, match="could not load the Stable Diffusion model 'not a valid id!'"):
        sd_pipeline.load_pipeline("not a valid id!")


def test_qlora_without_cuda_refuses_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA GPU" in sd_pipeline.qlora_unavailable_reason()
    with pytest.raises(sd_pipeline.QLoRAUnavailableError, match="QLoRA needs a CUDA GPU.*Change runtime type"):
        sd_pipeline.load_unet_4bit("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_qlora_without_bitsandbytes_refuses_clearly(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real_find_spec(n, *a))
    with pytest.raises(sd_pipeline.QLoRAUnavailableError, match="pip install bitsandbytes"):
        sd_pipeline.load_unet_4bit("stable-diffusion-v1-5/stable-diffusion-v1-5")
