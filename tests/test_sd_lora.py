"""helpers/sd_lora.py (notebook 06): tiny offline components, LoRA counts and adapters, captioned images, errors."""
import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from helpers import clip, sd_lora
from helpers.environment import gpu_choices
from helpers.training import count_parameters

FP32 = sd_lora.MixedPrecision(nullcontext, None, "fp32")
EPS32 = torch.finfo(torch.float32).eps


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

    folder = clip.write_tiny_tokenizer(tmp_path)
    assert (folder / "merges.txt").read_text() == "#version: 0.2\n"
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A red").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "r", "e", "d</w>", "<|endoftext|>"]
    assert len(tokenizer) == 2 + 2 * 256 <= clip.TINY_CLIP_TEXT_CONFIG["vocab_size"]


def test_tiny_pipeline_loads_and_generates(tiny_model):
    pipe = sd_lora.load_pipeline(tiny_model)
    images = sd_lora.generate(pipe, ["a red circle", "a blue square"], [0, 1], steps=2, guidance=7.5, size=32)
    assert images.shape == (4, 3, 32, 32)
    again = sd_lora.generate(pipe, ["a blue square"], [0], steps=2, guidance=7.5, size=32)
    assert torch.equal(again[0], images[2])                 # prompt-major, and a seed fixes the image
    assert not torch.equal(images[2], images[3])            # another seed, another image


def _accelerator(mixed_precision="no"):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one global state
    return Accelerator(mixed_precision=mixed_precision, cpu=True)


def _scheduler(model):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(model, subfolder="scheduler")


def _train(unet, model, steps=2, lr=1e-2):
    """A few LoRA steps on random latents and text states (the UNet's input sizes), through the notebook's step."""
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        micro_batches = [(torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)) for _ in range(2)]
        sd_lora.lora_training_step(unet, optimizer, micro_batches, _scheduler(model), _accelerator(), FP32, 5.0)
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


def _trained_lora(tiny_model, alpha: int):
    """A rank-4 LoRA with `alpha` added to the tiny UNet and trained: the UNet, its prediction on PROBE, and the
    adapter's effect (the largest change of that prediction)."""
    pipe = sd_lora.load_pipeline(tiny_model)
    base = sd_lora.predict_noise(pipe.unet, PROBE)
    unet = sd_lora.add_lora(pipe.unet, rank=4, alpha=alpha)
    _train(unet, tiny_model)
    trained = sd_lora.predict_noise(unet, PROBE)
    return unet, trained, (trained - base).abs().max().item()


def test_reloaded_adapter_reproduces_the_trained_unet_when_alpha_is_not_rank(tiny_model, tmp_path):
    # The LoRA update is (alpha / r) B A: saved without lora_alpha, a reload used alpha = r and halved it here.
    unet, trained, effect = _trained_lora(tiny_model, alpha=8)
    path = sd_lora.save_lora(unet, tmp_path / "adapter")
    fresh = sd_lora.load_pipeline(tiny_model)
    sd_lora.load_lora(fresh, tmp_path / "adapter", "trained")
    reloaded = sd_lora.predict_noise(fresh.unet, PROBE)
    assert effect > 1e-3, "the trained adapter must change the UNet's prediction"
    assert (reloaded - trained).abs().max().item() <= 1e-6 * effect
    saved, loaded = sd_lora.lora_weights(unet), sd_lora.lora_weights(fresh.unet)
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # the file holds exactly the 23,040 fp32 LoRA weights after its header
    header, data = sd_lora.safetensors_layout(path)
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
    sd_lora.save_lora(unet, tmp_path / "halved", alpha=2)
    fresh = sd_lora.load_pipeline(tiny_model)
    sd_lora.load_lora(fresh, tmp_path / "halved", "halved")
    assert fresh.unet.peft_config["halved"].lora_alpha == 2
    gap = (sd_lora.predict_noise(fresh.unet, PROBE) - trained).abs().max().item()
    assert effect > 1e-3 and gap <= 1e-5 * effect           # the notebook's check passes
    _strip_config(tmp_path / "halved" / sd_lora.LORA_WEIGHT_FILE)
    wrong = sd_lora.load_pipeline(tiny_model)
    sd_lora.load_lora(wrong, tmp_path / "halved", "halved")
    assert wrong.unet.peft_config["halved"].lora_alpha == 4  # without the config, diffusers takes alpha = r
    wrong_gap = (sd_lora.predict_noise(wrong.unet, PROBE) - trained).abs().max().item()
    assert wrong_gap > 0.5 * effect                          # the check fails: about the whole effect again


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
    sd_lora.lora_training_step(unet, optimizer, micro_batches, _scheduler(tiny_model), _accelerator(), FP32)
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
    torch.manual_seed(5)
    zero = sd_lora.diffusion_loss(_Oracle(latents, scheduler, False), latents, None, scheduler)
    torch.manual_seed(5)
    noise = torch.randn_like(latents)                      # the same draw: predicting 0 costs mean(eps^2)
    assert zero.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    # z_t = sqrt(abar) z_0 + sqrt(1 - abar) eps, target eps: the oracle's error is float32 rounding of z_t,
    # divided by sqrt(1 - abar) >= sqrt(beta_1) = 0.029: at most about 1e3 eps relative to eps itself
    assert perfect.item() <= (1e3 * EPS32) ** 2 * zero.item()


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
        sd_lora.lora_training_step(unet, optimizer, [batch], scheduler, accelerator, FP32)
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


def test_resumed_training_equals_a_straight_run(tiny_model, tmp_path, capsys):
    images = sd_lora.make_shape_images(tmp_path / "shapes", count=4)
    sample = lambda: torch.zeros(1, 3, 4, 4, dtype=torch.uint8)  # noqa: E731

    torch.manual_seed(0)
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    plan = _plan(tmp_path / "straight", 4)
    assert sd_lora.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), FP32, run,
                              plan, sample) == 4
    straight, straight_losses = sd_lora.lora_weights(unet), run.history.series("loss")[1]
    assert sorted(p.name for p in plan.folder.iterdir()) == ["step-000003.pt", "step-000004.pt"]  # keep_last=2

    torch.manual_seed(0)
    parts = _fresh_training(tiny_model, images)
    sd_lora.train_lora(*parts[:4], _scheduler(tiny_model), _accelerator(), FP32, parts[4],
                       _plan(tmp_path / "cut", 2), sample)
    torch.manual_seed(99)                                   # a new session: other RNG state, new objects
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    capsys.readouterr()
    sd_lora.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), FP32, run,
                       _plan(tmp_path / "cut", 4), sample)
    assert f"resuming from {tmp_path / 'cut' / 'step-000002.pt'} at step 2 of 4" in capsys.readouterr().out
    resumed = sd_lora.lora_weights(unet)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert run.history.series("loss")[1] == straight_losses and run.stopwatch.iterations == 4
    assert sorted(run.snapshots) == [2, 4]
    # a second Run all: the finished run is reused, nothing trains, and it says so
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    again = sd_lora.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), FP32, run,
                               _plan(tmp_path / "cut", 4), sample)
    assert again == 4 and "reusing the finished run" in capsys.readouterr().out
    assert all(torch.equal(straight[k], v) for k, v in sd_lora.lora_weights(unet).items())
    assert run.history.series("loss")[1] == straight_losses   # the saved history, not a new one


def test_training_stops_at_its_time_limit_with_a_checkpoint(tiny_model, tmp_path):
    images = sd_lora.make_shape_images(tmp_path / "shapes", count=2)
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    plan = _plan(tmp_path / "run", 50, checkpoint_every=10, time_limit_s=0.0)
    step = sd_lora.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), FP32, run,
                              plan, lambda: torch.zeros(1))
    assert step == 1 and [p.name for p in plan.folder.iterdir()] == ["step-000001.pt"]


def test_gradient_checkpointing_gives_the_same_update(tiny_model):
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
    # the same arithmetic recomputed: equal up to float32 rounding of the largest weight
    for k in plain:
        assert (plain[k] - checkpointed[k]).abs().max() <= 16 * EPS32 * plain[k].abs().max(), k


# --- gradient checkpointing: only when the free GPU memory needs it --------------------------------


def test_memory_need_scales_the_h100_measurement():
    # review session, SD 1.5 UNet, batch 2, 64 x 64 latents: 3.96 GB peak without checkpointing, 1.64 GB weights
    assert sd_lora.training_memory_gb(2, 64, checkpointing=False) == pytest.approx(2.32)
    assert sd_lora.training_memory_gb(4, 64, checkpointing=False) == pytest.approx(4.64)
    assert sd_lora.training_memory_gb(2, 96, checkpointing=False) == pytest.approx(2.32 * 2.25)
    assert sd_lora.training_memory_gb(2, 64, checkpointing=True) == pytest.approx(0.62)
    assert sd_lora.training_memory_gb(2, 64, checkpointing=False, quantized=True) == pytest.approx(2.92)


def _t4_choices(monkeypatch, device="cpu"):
    monkeypatch.setenv("EMULATE_T4", "1")
    return gpu_choices(torch.device(device))


def test_checkpointing_only_when_memory_is_short(monkeypatch):
    # need without checkpointing + 1.5 GB headroom, against the free memory
    t4 = _t4_choices(monkeypatch)
    need = sd_lora.training_memory_gb(2, 64, checkpointing=False) + sd_lora.HEADROOM_GB   # 3.82 GB
    assert need == pytest.approx(3.82)
    assert not sd_lora.decide_gradient_checkpointing(t4, 13.0, need)[0]   # a T4 with SD 1.5 loaded: off
    assert sd_lora.decide_gradient_checkpointing(t4, 3.5, need)[0]
    assert not sd_lora.decide_gradient_checkpointing(t4, 13.0, sd_lora.training_memory_gb(8, 64, False) + 1.5)[0]
    assert sd_lora.decide_gradient_checkpointing(t4, 13.0, sd_lora.training_memory_gb(12, 64, False) + 1.5)[0]
    monkeypatch.setenv("EMULATE_T4", "0")
    use, why = sd_lora.decide_gradient_checkpointing(gpu_choices(torch.device("cpu")), None, need)
    assert not use and "cpu: no GPU memory to save" in why


def test_t4_emulation_on_the_cpu_takes_the_t4_decision_and_says_why(monkeypatch, capsys):
    use, why = sd_lora.choose_gradient_checkpointing(_t4_choices(monkeypatch), 2, 64)
    assert not use and "3.8 GB" in why and "13.0 GB of GPU memory is free" in why
    assert "EMULATE_T4: torch.cuda.mem_get_info (free GPU memory) needs a CUDA device" in capsys.readouterr().out


def test_free_memory_is_read_after_emptying_the_cache(monkeypatch):
    # 10 GB sit in PyTorch's cache after the pipeline's load; mem_get_info counts them as used until empty_cache
    cached = {"bytes": 10e9}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: cached.update(bytes=0.0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (13e9 - cached["bytes"], 16e9))
    assert sd_lora.free_gpu_memory_gb(torch.device("cuda")) == pytest.approx(13.0)
    cached["bytes"] = 10e9
    monkeypatch.setenv("EMULATE_T4", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    use, why = sd_lora.choose_gradient_checkpointing(gpu_choices(torch.device("cuda")), 2, 64)
    assert not use and "13.0 GB of GPU memory is free" in why


# --- mixed precision: accelerate's on CUDA, built here where accelerate refuses (T4 emulation on a CPU) ---------


def test_mixed_precision_on_a_plain_cpu_is_fp32(monkeypatch):
    monkeypatch.setenv("EMULATE_T4", "0")
    choices = gpu_choices(torch.device("cpu"))
    precision = sd_lora.mixed_precision(_accelerator(choices.mixed_precision), choices)
    assert precision.scaler is None and precision.description.startswith("fp32")


def test_t4_emulation_runs_the_step_in_fp16_with_an_enabled_grad_scaler(tiny_model, monkeypatch):
    choices = _t4_choices(monkeypatch)
    accelerator = _accelerator(choices.mixed_precision)
    assert accelerator.scaler is None and not accelerator.native_amp   # accelerate refuses fp16 on a CPU
    precision = sd_lora.mixed_precision(accelerator, choices)
    assert precision.scaler is not None and precision.scaler.is_enabled()
    assert "accelerate turns fp16 mixed precision off on cpu" in precision.description
    # the T4's weights: a frozen fp16 UNet with fp32 LoRA weights (the combination a T4 trains)
    unet = sd_lora.add_lora(sd_lora.load_pipeline(tiny_model, dtype=torch.float16).unet, rank=4, alpha=4)
    seen = []
    layer = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    before = sd_lora.lora_weights(unet)
    batches = [(torch.randn(1, 4, 16, 16, dtype=torch.float16), torch.randn(1, 77, 32, dtype=torch.float16))]
    loss = sd_lora.lora_training_step(unet, optimizer, batches, _scheduler(tiny_model), accelerator, precision)
    assert math.isfinite(loss) and seen and set(seen) == {torch.float16}   # the forward ran in fp16
    assert precision.scaler.get_scale() == 2.0 ** 16                       # scaled, no overflow: no back-off
    assert any(not torch.equal(before[k], v) for k, v in sd_lora.lora_weights(unet).items())  # it stepped
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)


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
        assert dataset[i]["pixel_values"].shape == (3, 32, 32)
    items = dict(zip([p.name for p in dataset.images], (dataset[i] for i in range(len(dataset)))))
    assert items["grey.png"]["caption"] == "a grey image"
    # greyscale 128 -> the same value in all three channels, 128 / 127.5 - 1; transparent black -> black, -1
    grey = items["grey.png"]["pixel_values"] - (128 / 127.5 - 1)
    assert grey.abs().max() <= 8 * EPS32                    # resampling a constant: rounding on values near 1
    assert torch.equal(items["tall.png"]["pixel_values"], torch.full((3, 32, 32), -1.0))


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


# --- CLIP score ----------------------------------------------------------------------------------


def test_clip_score_by_hand():
    # CLIPScore = max(100 * mean cosine, 0): cosines 0.3, -0.2, 0.1 -> 100 * 0.2 / 3 = 6.667 (a per-pair clip at 0
    # would give (30 + 0 + 10) / 3 = 13.33); the embeddings' lengths do not matter
    cosines = torch.tensor([0.3, -0.2, 0.1])
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    texts = torch.stack([2 * cosines[0], 2 * (1 - cosines[0] ** 2).sqrt()])[None]
    texts = torch.cat([texts, torch.stack([(1 - cosines[1] ** 2).sqrt(), cosines[1]])[None] * 5,
                       torch.stack([cosines[2], -(1 - cosines[2] ** 2).sqrt()])[None]])
    assert clip.clip_score_from_embeddings(images, texts) == pytest.approx(100 * 0.2 / 3, rel=1e-6)
    assert clip.clip_score_from_embeddings(images, -texts) == 0.0          # mean cosine -0.067 -> 0


def test_clip_preprocessing_is_clips(tmp_path):
    # CLIP's own preprocessing (transformers' CLIPImageProcessor): shorter side resized to the input size
    # (bicubic, antialiased), centre crop, CLIP's mean and std. A wide image must not be squeezed.
    from transformers import CLIPImageProcessor

    size = 32
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image = torch.rand(3, 1, 1).expand(3, 96, 160).clone()
    image[:, 30:66, 40:120] = torch.rand(3, 1, 1)               # a wide rectangle on a background
    image += 0.1 * torch.rand(3, 96, 160)
    image = image.clamp(0, 1)
    uint8 = (image * 255).round().to(torch.uint8)
    reference = processor(images=uint8, return_tensors="pt", do_convert_rgb=False).pixel_values
    ours = clip.clip_pixels(uint8[None].float() / 255, size)
    assert ours.shape == reference.shape == (1, 3, size, size)
    # the processor rounds to 8 bits: up to about 1.5 levels of 255, over CLIP's std (about 0.27)
    assert (ours - reference).abs().max() <= 1.5 / 255 / min(clip.CLIP_STD)


def test_clip_embeddings_are_the_projected_ones(tmp_path):
    # CLIPScore compares the projected embeddings (the shared image-text space), not the encoders' pooled
    # outputs; the stand-in's projections are random 32 x 32 matrices, so the two differ
    model, tokenizer = clip.load_clip(clip.STAND_IN_CLIP_ID, tmp_path, torch.device("cpu"))
    images, captions = torch.rand(2, 3, 40, 40), ["a red circle", "a blue square"]
    image_embeds = clip.clip_image_embeddings(model, images)
    text_embeds = clip.clip_text_embeddings(model, tokenizer, captions)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=clip.clip_pixels(images, 32)).pooler_output
        tokens = tokenizer(captions, padding=True, return_tensors="pt")
        text_pooled = model.text_model(**tokens).pooler_output
        expected = model.visual_projection(pooled), model.text_projection(text_pooled)
    for ours, reference, unprojected in ((image_embeds, expected[0], pooled), (text_embeds, expected[1], text_pooled)):
        scale = reference.abs().max()
        assert (ours - reference).abs().max() <= 64 * EPS32 * scale
        assert (ours - unprojected).abs().max() > 0.1 * scale
    # an image scored against its own direction: cosine 1 -> 100
    assert clip.clip_score_from_embeddings(image_embeds, 3 * image_embeds) == pytest.approx(100, rel=1e-6)


# --- experiments/bench_sd_lora.py: the timed variants and the T4 estimate in the notebook's header ------


def _bench():
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
