"""helpers/sd_lora (notebook 06), training: the noising loss, the step with gradient accumulation, the loop with
checkpoints and resume, the step's precision (T4 emulation) and the gradient-checkpointing decision."""
import math

import pytest
import torch
from torch import nn

from helpers.environment import gpu_choices
from helpers.sd_lora import data as sd_data, lora as sd_adapter, memory as sd_memory
from helpers.sd_lora import pipeline as sd_pipeline, train as sd_train
from helpers.training import History, TrainingRun


from sd_lora_steps import FP32  # tests/sd_lora_steps.py
from sd_lora_steps import accelerator as _accelerator, scheduler as _scheduler, train_steps as _train
EPS32 = torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return sd_pipeline.resolve_model_id(sd_pipeline.TINY_MODEL_ID, tmp_path_factory.mktemp("sd"))


# --- the loss, the step and the loop -------------------------------------------------------------------------


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
    perfect = sd_train.unet_diffusion_loss(_Oracle(latents, scheduler, True), latents, None, scheduler)
    torch.manual_seed(5)
    zero = sd_train.unet_diffusion_loss(_Oracle(latents, scheduler, False), latents, None, scheduler)
    torch.manual_seed(5)
    noise = torch.randn_like(latents)                      # the same draw: predicting 0 costs mean(eps^2)
    assert zero.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    # z_t = sqrt(abar) z_0 + sqrt(1 - abar) eps, target eps: the oracle's error is float32 rounding of z_t,
    # divided by sqrt(1 - abar) >= sqrt(beta_1) = 0.029: at most about 1e3 eps relative to eps itself
    assert perfect.item() <= (1e3 * EPS32) ** 2 * zero.item()


def test_training_lowers_the_loss_on_one_image(tiny_model):
    # Overfit one fixed latent/caption pair: the loss at fixed noise and timesteps must fall.
    unet = sd_adapter.add_lora(sd_pipeline.load_pipeline(tiny_model).unet, rank=4, alpha=4)
    scheduler, accelerator = _scheduler(tiny_model), _accelerator()
    batch = (torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
             torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(1)))

    def fixed_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return sd_train.unet_diffusion_loss(unet, *batch, scheduler).item()

    before = fixed_loss()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(10):
        torch.manual_seed(123)
        sd_train.lora_training_step(unet, optimizer, [batch], scheduler, accelerator, FP32)
    assert fixed_loss() < 0.9 * before                      # measured: 1.092 -> 0.947


def _plan(folder, steps, **overrides):
    values = dict(steps=steps, batch_size=1, grad_accum=2, seed=0, snr_gamma=5.0, max_grad_norm=1.0,
                  folder=folder, checkpoint_every=1, keep_last=2, sample_every=2, config={"rank": 4})
    return sd_train.LoraPlan(**{**values, **overrides})


def _fresh_training(model, dataset_folder):
    pipe = sd_pipeline.load_pipeline(model)
    unet = sd_adapter.add_lora(pipe.unet, rank=4, alpha=4)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    dataset = sd_data.CaptionedImages.from_folder(dataset_folder, 32, random_flip=True)
    return unet, optimizer, dataset, pipe, TrainingRun(History())


def test_resumed_training_equals_a_straight_run(tiny_model, tmp_path, capsys):
    images = sd_data.make_shape_images(tmp_path / "shapes", count=4)
    sample = lambda: torch.zeros(1, 3, 4, 4, dtype=torch.uint8)  # noqa: E731

    torch.manual_seed(0)
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    plan = _plan(tmp_path / "straight", 4)
    assert sd_train.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), FP32, run,
                              plan, sample) == 4
    straight, straight_losses = sd_adapter.lora_weights(unet), run.history.series("loss")[1]
    assert sorted(p.name for p in plan.folder.iterdir()) == ["step-000003.pt", "step-000004.pt"]  # keep_last=2

    torch.manual_seed(0)
    parts = _fresh_training(tiny_model, images)
    sd_train.train_lora(*parts[:4], _scheduler(tiny_model), _accelerator(), FP32, parts[4],
                       _plan(tmp_path / "cut", 2), sample)
    torch.manual_seed(99)                                   # a new session: other RNG state, new objects
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    capsys.readouterr()
    sd_train.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), FP32, run,
                       _plan(tmp_path / "cut", 4), sample)
    assert f"resuming from {tmp_path / 'cut' / 'step-000002.pt'} at step 2 of 4" in capsys.readouterr().out
    resumed = sd_adapter.lora_weights(unet)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert run.history.series("loss")[1] == straight_losses and run.stopwatch.iterations == 4
    assert sorted(run.snapshots) == [2, 4]
    # the checkpoint holds the LoRA view, AdamW and the one run record (history, stopwatch, snapshots, step)
    saved = torch.load(tmp_path / "cut" / "step-000004.pt", weights_only=False)["state"]
    assert sorted(saved) == ["adamw", "lora", "run"] and run.step == saved["run"]["step"] == 4
    assert sorted(saved["run"]["snapshots"]) == [2, 4] and saved["run"]["stopwatch"]["iterations"] == 4
    # a second Run all: the finished run is reused, nothing trains, and it says so
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    again = sd_train.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), FP32, run,
                               _plan(tmp_path / "cut", 4), sample)
    assert again == 4 and "reusing the finished run" in capsys.readouterr().out
    assert all(torch.equal(straight[k], v) for k, v in sd_adapter.lora_weights(unet).items())
    assert run.history.series("loss")[1] == straight_losses   # the saved history, not a new one


def test_training_stops_at_its_time_limit_with_a_checkpoint(tiny_model, tmp_path):
    images = sd_data.make_shape_images(tmp_path / "shapes", count=2)
    unet, optimizer, dataset, pipe, run = _fresh_training(tiny_model, images)
    plan = _plan(tmp_path / "run", 50, checkpoint_every=10, time_limit_s=0.0)
    step = sd_train.train_lora(unet, optimizer, dataset, pipe, _scheduler(tiny_model), _accelerator(), FP32, run,
                              plan, lambda: torch.zeros(1))
    assert step == 1 and [p.name for p in plan.folder.iterdir()] == ["step-000001.pt"]


def test_gradient_checkpointing_gives_the_same_update(tiny_model):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        unet = sd_adapter.add_lora(sd_pipeline.load_pipeline(tiny_model).unet, rank=4, alpha=4)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        _train(unet, tiny_model, steps=1)
        results.append(sd_adapter.lora_weights(unet))
    plain, checkpointed = results
    # the same arithmetic recomputed: equal up to float32 rounding of the largest weight
    for k in plain:
        assert (plain[k] - checkpointed[k]).abs().max() <= 16 * EPS32 * plain[k].abs().max(), k


# --- gradient checkpointing: only when the free GPU memory needs it ------------------------------------------


def test_memory_need_scales_the_h100_measurement():
    # H100_MEASURED (experiments/RESULTS.md, section 06), SD 1.5 UNet, batch 2, 64 x 64 latents: 3.96 GB peak
    # without checkpointing, 1.64 GB weights
    assert sd_memory.training_memory_gb(2, 64, checkpointing=False) == pytest.approx(2.32)
    assert sd_memory.training_memory_gb(4, 64, checkpointing=False) == pytest.approx(4.64)
    assert sd_memory.training_memory_gb(2, 96, checkpointing=False) == pytest.approx(2.32 * 2.25)
    assert sd_memory.training_memory_gb(2, 64, checkpointing=True) == pytest.approx(0.62)
    assert sd_memory.training_memory_gb(2, 64, checkpointing=False, quantized=True) == pytest.approx(2.92)


def _t4_choices(monkeypatch, device="cpu"):
    monkeypatch.setenv("EMULATE_T4", "1")
    return gpu_choices(torch.device(device))


def test_checkpointing_only_when_memory_is_short(monkeypatch):
    # need without checkpointing + 1.5 GB headroom, against the free memory
    t4 = _t4_choices(monkeypatch)
    need = sd_memory.training_memory_gb(2, 64, checkpointing=False) + sd_memory.HEADROOM_GB   # 3.82 GB
    assert need == pytest.approx(3.82)
    assert not sd_memory.decide_gradient_checkpointing(t4, 13.0, need)[0]   # a T4 with SD 1.5 loaded: off
    assert sd_memory.decide_gradient_checkpointing(t4, 3.5, need)[0]
    assert not sd_memory.decide_gradient_checkpointing(t4, 13.0, sd_memory.training_memory_gb(8, 64, False) + 1.5)[0]
    assert sd_memory.decide_gradient_checkpointing(t4, 13.0, sd_memory.training_memory_gb(12, 64, False) + 1.5)[0]
    monkeypatch.setenv("EMULATE_T4", "0")
    use, why = sd_memory.decide_gradient_checkpointing(gpu_choices(torch.device("cpu")), None, need)
    assert not use and "cpu: no GPU memory to save" in why


def test_t4_emulation_on_the_cpu_takes_the_t4_decision_and_says_why(monkeypatch, capsys):
    use, why = sd_memory.choose_gradient_checkpointing(_t4_choices(monkeypatch), 2, 64)
    assert not use and "3.8 GB" in why and "13.0 GB of GPU memory is free" in why
    assert "EMULATE_T4: torch.cuda.mem_get_info (free GPU memory) needs a CUDA device" in capsys.readouterr().out


def test_free_memory_is_read_after_emptying_the_cache(monkeypatch):
    # 10 GB sit in PyTorch's cache after the pipeline's load; mem_get_info counts them as used until empty_cache
    cached = {"bytes": 10e9}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: cached.update(bytes=0.0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (13e9 - cached["bytes"], 16e9))
    assert sd_memory.free_gpu_memory_gb(torch.device("cuda")) == pytest.approx(13.0)
    cached["bytes"] = 10e9
    monkeypatch.setenv("EMULATE_T4", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    use, why = sd_memory.choose_gradient_checkpointing(gpu_choices(torch.device("cuda")), 2, 64)
    assert not use and "13.0 GB of GPU memory is free" in why


# --- mixed precision: accelerate's on CUDA, built here where accelerate refuses (T4 emulation on a CPU) ------


def test_mixed_precision_on_a_plain_cpu_is_fp32(monkeypatch):
    monkeypatch.setenv("EMULATE_T4", "0")
    choices = gpu_choices(torch.device("cpu"))
    precision = sd_train.mixed_precision(_accelerator(choices.mixed_precision), choices)
    assert precision.scaler is None and precision.description.startswith("fp32")


def test_t4_emulation_runs_the_step_in_fp16_with_an_enabled_grad_scaler(tiny_model, monkeypatch):
    choices = _t4_choices(monkeypatch)
    accelerator = _accelerator(choices.mixed_precision)
    assert accelerator.scaler is None and not accelerator.native_amp   # accelerate refuses fp16 on a CPU
    precision = sd_train.mixed_precision(accelerator, choices)
    assert precision.scaler is not None and precision.scaler.is_enabled()
    assert "accelerate turns fp16 mixed precision off on cpu" in precision.description
    # the T4's weights: a frozen fp16 UNet with fp32 LoRA weights (the combination a T4 trains)
    unet = sd_adapter.add_lora(sd_pipeline.load_pipeline(tiny_model, dtype=torch.float16).unet, rank=4, alpha=4)
    seen = []
    layer = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    before = sd_adapter.lora_weights(unet)
    batches = [(torch.randn(1, 4, 16, 16, dtype=torch.float16), torch.randn(1, 77, 32, dtype=torch.float16))]
    loss = sd_train.lora_training_step(unet, optimizer, batches, _scheduler(tiny_model), accelerator, precision)
    assert math.isfinite(loss) and seen and set(seen) == {torch.float16}   # the forward ran in fp16
    assert precision.scaler.get_scale() == 2.0 ** 16                       # scaled, no overflow: no back-off
    assert any(not torch.equal(before[k], v) for k, v in sd_adapter.lora_weights(unet).items())  # it stepped
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
