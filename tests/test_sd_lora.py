"""helpers/sd_lora.py (notebook 06): tiny offline components, LoRA counts and adapters, captioned images, errors."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

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


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _scheduler(model):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(model, subfolder="scheduler")


def _train(unet, model, steps=2, lr=1e-2):
    """A few LoRA steps on random latents and text states (the UNet's input sizes), through the notebook's step."""
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        micro_batches = [(torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)) for _ in range(2)]
        sd_lora.lora_training_step(unet, optimizer, micro_batches, _scheduler(model), _accelerator(), 5.0)
    return optimizer


PROBE = (torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([500]),
         torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2)))


def test_lora_trains_only_adapter_weights(tiny_model):
    unet = sd_lora.add_lora(sd_lora.load_pipeline(tiny_model).unet, rank=4, alpha=4)
    trainable, total = count_parameters(unet, trainable_only=True), count_parameters(unet)
    assert trainable == 23_040 and total == 1_427_012 + 23_040
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    before = sd_lora.parameter_fingerprints(unet)
    _train(unet, tiny_model)
    after = sd_lora.parameter_fingerprints(unet)
    changed = {n for n in after if after[n] != before[n]}
    assert changed and all("lora_" in n for n in changed)
    assert sum(p.numel() for p in sd_lora.LoraParameters(unet).parameters()) == 23_040


def test_reloaded_adapter_reproduces_the_trained_unet_when_alpha_is_not_rank(tiny_model, tmp_path):
    # The LoRA update is (alpha / r) B A: saved without lora_alpha, a reload used alpha = r and halved it here.
    pipe = sd_lora.load_pipeline(tiny_model)
    base = sd_lora.predict_noise(pipe.unet, PROBE, _accelerator())
    unet = sd_lora.add_lora(pipe.unet, rank=4, alpha=8)
    _train(unet, tiny_model)
    trained = sd_lora.predict_noise(unet, PROBE, _accelerator())
    path = sd_lora.save_lora(unet, tmp_path / "adapter")
    fresh = sd_lora.load_pipeline(tiny_model)
    sd_lora.load_lora(fresh, tmp_path / "adapter", "trained")
    reloaded = sd_lora.predict_noise(fresh.unet, PROBE, _accelerator())
    effect = (trained - base).abs().max().item()
    assert effect > 1e-3, "the trained adapter must change the UNet's prediction"
    assert (reloaded - trained).abs().max().item() <= 1e-6 * effect
    saved, loaded = sd_lora.lora_weights(unet), sd_lora.lora_weights(fresh.unet)
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # the file holds exactly the 23,040 fp32 LoRA weights after its header
    header, data = sd_lora.safetensors_layout(path)
    assert data == 23_040 * 4 and path.stat().st_size == header + data


def test_adapter_reloads_in_offline_mode(tiny_model, tmp_path, monkeypatch):
    # diffusers 0.39 (Colab's) raises "When using the offline mode, you must specify a `weight_name`" otherwise
    import diffusers.loaders.lora_base as lora_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(lora_base, "HF_HUB_OFFLINE", True, raising=False)
    unet = sd_lora.add_lora(sd_lora.load_pipeline(tiny_model).unet, rank=4, alpha=4)
    sd_lora.save_lora(unet, tmp_path / "adapter")
    fresh = sd_lora.load_pipeline(tiny_model)
    sd_lora.load_lora(fresh, tmp_path / "adapter", "trained")
    assert "trained" in fresh.unet.peft_config


def test_training_continues_after_the_adapter_is_saved_and_compared(tiny_model, tmp_path):
    # The notebook compares the trained LoRA weights with an adapter reloaded in fp16; casting the trained
    # weights to fp16 in place for that broke the next step ("expected dtype float ... but got Half").
    unet = sd_lora.add_lora(sd_lora.load_pipeline(tiny_model).unet, rank=4, alpha=4)
    optimizer = _train(unet, tiny_model)
    sd_lora.save_lora(unet, tmp_path / "adapter")
    fresh = sd_lora.load_pipeline(tiny_model, dtype=torch.float16)
    sd_lora.load_lora(fresh, tmp_path / "adapter", "trained")
    reloaded = sd_lora.lora_weights(fresh.unet)
    trained = sd_lora.lora_weights(unet, dtype=torch.float16)
    assert all(torch.equal(reloaded[k], trained[k]) for k in trained)
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    before = sd_lora.lora_weights(unet)
    micro_batches = [(torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32))]
    sd_lora.lora_training_step(unet, optimizer, micro_batches, _scheduler(tiny_model), _accelerator())
    after = sd_lora.lora_weights(unet)
    assert any(not torch.equal(before[k], after[k]) for k in before)


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


# --- the loss, the step and the loop --------------------------------------------------------------


class _Oracle(nn.Module):
    """A stand-in UNet that predicts the noise exactly (it knows z_0) or predicts zero."""

    def __init__(self, latents, scheduler, perfect):
        super().__init__()
        self.latents, self.scheduler, self.perfect = latents, scheduler, perfect

    def forward(self, noisy, t, text_states, return_dict=False):
        abar = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (noisy - abar.sqrt() * self.latents) / (1 - abar).sqrt()
        return (eps if self.perfect else torch.zeros_like(noisy),)


def test_diffusion_loss_noises_the_latents_and_scores_the_noise(tiny_model):
    scheduler = _scheduler(tiny_model)
    latents = torch.randn(3, 4, 8, 8)
    perfect = sd_lora.diffusion_loss(_Oracle(latents, scheduler, True), latents, None, scheduler)
    assert perfect.item() < 1e-8                           # z_t = sqrt(abar) z_0 + sqrt(1 - abar) eps, target eps
    torch.manual_seed(5)
    zero = sd_lora.diffusion_loss(_Oracle(latents, scheduler, False), latents, None, scheduler)
    torch.manual_seed(5)
    noise = torch.randn_like(latents)                      # the same draw: predicting 0 costs mean(eps^2)
    assert zero.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_training_lowers_the_loss_on_one_image(tiny_model):
    # Overfit one fixed latent/caption pair: the loss at fixed noise and timesteps must fall.
    unet = sd_lora.add_lora(sd_lora.load_pipeline(tiny_model).unet, rank=4, alpha=4)
    scheduler, accelerator = _scheduler(tiny_model), _accelerator()
    batch = (torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
             torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(1)))

    def fixed_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return sd_lora.diffusion_loss(unet, *batch, scheduler).item()

    before = fixed_loss()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(10):
        torch.manual_seed(123)
        sd_lora.lora_training_step(unet, optimizer, [batch], scheduler, accelerator)
    assert fixed_loss() < 0.9 * before                      # measured: 1.092 -> 0.947


def _plan(folder, steps, **overrides):
    values = dict(steps=steps, batch_size=1, grad_accum=2, seed=0, snr_gamma=5.0, max_grad_norm=1.0,
                  folder=folder, checkpoint_every=1, keep_last=2, sample_every=2, config={"rank": 4})
    return sd_lora.LoraPlan(**{**values, **overrides})


def _fresh_training(model, dataset_folder):
    from helpers.training import History

    pipe = sd_lora.load_pipeline(model)
    unet = sd_lora.add_lora(pipe.unet, rank=4, alpha=4)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    dataset = sd_lora.CaptionedImages.from_folder(dataset_folder, 32, random_flip=True)
    return unet, optimizer, dataset, pipe, sd_lora.LoraRun(History())


def test_resumed_training_equals_a_straight_run(tiny_model, tmp_path):
    images = sd_lora.make_shape_images(tmp_path / "shapes", count=4)
    sample = lambda: torch.zeros(1, 3, 4, 4, dtype=torch.uint8)  # noqa: E731

    torch.manual_seed(0)
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    plan = _plan(tmp_path / "straight", 4)
    assert sd_lora.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), run, plan,
                              sample) == 4
    straight, straight_losses = sd_lora.lora_weights(unet), run.history.series("loss")[1]
    assert sorted(p.name for p in plan.folder.iterdir()) == ["step-000003.pt", "step-000004.pt"]  # keep_last=2

    torch.manual_seed(0)
    parts = _fresh_training(tiny_model, images)
    sd_lora.train_lora(*parts[:4], _scheduler(tiny_model), _accelerator(), parts[4], _plan(tmp_path / "cut", 2),
                       sample)
    torch.manual_seed(99)                                   # a new session: other RNG state, new objects
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    sd_lora.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), run,
                       _plan(tmp_path / "cut", 4), sample)
    resumed = sd_lora.lora_weights(unet)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert run.history.series("loss")[1] == straight_losses and run.stopwatch.iterations == 4
    assert sorted(run.snapshots) == [2, 4]


def test_training_stops_at_its_time_limit_with_a_checkpoint(tiny_model, tmp_path):
    images = sd_lora.make_shape_images(tmp_path / "shapes", count=2)
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    plan = _plan(tmp_path / "run", 50, checkpoint_every=10, time_limit_s=0.0)
    step = sd_lora.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), run, plan,
                              lambda: torch.zeros(1))
    assert step == 1 and [p.name for p in plan.folder.iterdir()] == ["step-000001.pt"]


def test_gradient_checkpointing_changes_memory_not_the_update(tiny_model):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        unet = sd_lora.add_lora(sd_lora.load_pipeline(tiny_model).unet, rank=4, alpha=4)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        _train(unet, tiny_model, steps=1)
        results.append(sd_lora.lora_weights(unet))
    plain, checkpointed = results
    assert all(torch.allclose(plain[k], checkpointed[k], rtol=0, atol=1e-7) for k in plain)


# --- gradient checkpointing: only when the free GPU memory needs it --------------------------------


def test_memory_need_scales_the_h100_measurement():
    # review session, SD 1.5 UNet, batch 2, 64 x 64 latents: 3.96 GB peak without checkpointing, 1.64 GB weights
    assert sd_lora.training_memory_gb(2, 64, checkpointing=False) == pytest.approx(2.32)
    assert sd_lora.training_memory_gb(4, 64, checkpointing=False) == pytest.approx(4.64)
    assert sd_lora.training_memory_gb(2, 96, checkpointing=False) == pytest.approx(2.32 * 2.25)
    assert sd_lora.training_memory_gb(2, 64, checkpointing=True) == pytest.approx(0.62)
    assert sd_lora.training_memory_gb(2, 64, checkpointing=False, quantized=True) == pytest.approx(2.92)


def test_checkpointing_only_when_memory_is_short(monkeypatch):
    # T4 after loading SD 1.5 in fp16: about 12 GB free; need 2.32 + 1.5 headroom = 3.82 GB -> off
    assert not sd_lora.needs_gradient_checkpointing(12.0, batch_size=2, latent_side=64)
    assert sd_lora.needs_gradient_checkpointing(3.5, batch_size=2, latent_side=64)
    assert not sd_lora.needs_gradient_checkpointing(12.0, batch_size=8, latent_side=64)  # 9.28 + 1.5 <= 12
    assert sd_lora.needs_gradient_checkpointing(12.0, batch_size=10, latent_side=64)  # 11.6 + 1.5 > 12
    use, why = sd_lora.choose_gradient_checkpointing(torch.device("cpu"), 2, 64)
    assert not use and "cpu" in why
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3_000_000_000, 16_000_000_000))
    use, why = sd_lora.choose_gradient_checkpointing(torch.device("cuda"), 2, 64)
    assert use and "3.8 GB" in why and "3.0 GB" in why


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
    from helpers.metrics import clip_image_embeddings, clip_text_embeddings

    model, tokenizer = sd_lora.load_clip(sd_lora.TINY_MODEL_ID, tmp_path, torch.device("cpu"))
    images, captions = torch.rand(2, 3, 40, 40), ["a red circle", "a blue square"]
    image_embeds, text_embeds = clip_image_embeddings(model, images), clip_text_embeddings(model, tokenizer, captions)
    assert image_embeds.shape == text_embeds.shape == (2, 32)   # projection_dim of the stand-in
    # any input size is resized to the model's 32 px: a 32 px copy embeds the same up to resampling
    small = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.allclose(clip_image_embeddings(model, small.clamp(0, 1)), image_embeds, atol=1e-5)
    score = clip_score(model, tokenizer, images, captions)
    assert score == pytest.approx(clip_score_from_embeddings(image_embeds, text_embeds).item())



# --- tools/bench_sd_lora.py: the timed variants and the T4 estimate in the notebook's header ------


def _bench():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import bench_sd_lora

    return bench_sd_lora


def test_t4_estimate_in_the_header_comes_from_the_flop_count():
    bench = _bench()
    flops = bench.full_mode_tflop()
    # SD 1.5 UNet: 0.80 TFLOP forward per 512 px image; the step is 2 x (UNet forward + LoRA backward on 2 images,
    # VAE encoding of 2 images, text encoder)
    assert round(flops["train_step_unet"], 2) == 6.86 and round(flops["train_step"], 1) == 11.4
    estimate = bench.t4_estimate(flops)
    steps = tuple(round(s, 1) for s in estimate["train_step"])
    training = tuple(round(s / 60) for s in estimate["training"])
    rest = tuple(round(s / 60) for s in estimate["rest"])
    assert (steps, training, rest) == ((5.3, 7.7), (26, 38), (16, 23))
    header = (Path(__file__).resolve().parent.parent / "notebooks/06_stable_diffusion_lora.py").read_text()
    header = " ".join(header.split("# %% SETUP")[0].replace("#", " ").split())
    for quoted in ("5.3–7.7 s per step", "26–38 min for 300 steps", "16–23 min", "11.4 TFLOP per step"):
        assert quoted in header, quoted


def test_bench_rows_on_cpu():
    rows = _bench().run(torch.device("cpu"), reduced=True)
    assert [r["baseline"] for r in rows] == [True, False, False, False]
    timed, unavailable = rows[:2], rows[2:]
    assert all(r["ms_per_step"] > 0 and r["peak_memory_mb"] is None for r in timed)  # CPU: no GPU memory
    assert all(r["ms_per_step"] is None and r["note"].startswith("unavailable: QLoRA needs") for r in unavailable)
