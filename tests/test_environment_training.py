"""environment and training helpers: smoke flag, run directory, checkpoints with resume, history, metrics.json."""
import json
import os
import random
import sys
import time
import types

import numpy as np
import pytest
import torch
from torch import nn

from helpers import environment
from helpers.environment import describe_device, gpu_choices, pick_device, run_dir, seed_everything, smoke_mode, use_drive_for_runs
from helpers.training import (CHECKPOINT_FORMAT, CheckpointMismatchError, History, Stopwatch, TrainingRun,
                              ema_update, load_checkpoint, save_checkpoint, time_per_step, write_metrics)


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_smoke_mode_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("SMOKE", value)
    assert smoke_mode() is expected


def test_smoke_mode_rejects_unclear_values(monkeypatch):
    monkeypatch.setenv("SMOKE", "maybe")
    with pytest.raises(ValueError, match="SMOKE=1"):
        smoke_mode()


def test_pick_device_falls_back_to_cpu_without_accelerators(monkeypatch):
    monkeypatch.delenv("DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device().type == "cpu"


def test_pick_device_refuses_cuda_when_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")


def test_run_dir_is_created_under_RUN_DIR_and_kept_apart_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_DIR", str(tmp_path))
    monkeypatch.setenv("SMOKE", "0")
    assert run_dir("01_mnist_gan") == tmp_path / "01_mnist_gan"
    assert (tmp_path / "01_mnist_gan").is_dir()
    monkeypatch.setenv("SMOKE", "1")
    assert run_dir("01_mnist_gan") == tmp_path / "01_mnist_gan-smoke"


def test_run_dir_under_a_file_says_what_to_do(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="not writable.*set RUN_DIR"):
        run_dir("x", root=blocker)


def test_drive_outside_colab_is_a_no_op_that_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RUN_DIR", str(tmp_path))
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert use_drive_for_runs(True) is None
    assert "not in Colab" in capsys.readouterr().out and os.environ["RUN_DIR"] == str(tmp_path)
    assert use_drive_for_runs(False) is None and capsys.readouterr().out == ""


def test_drive_in_colab_mounts_and_moves_RUN_DIR_before_run_dir_reads_it(tmp_path, monkeypatch):
    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda where: mounted.append(where))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(environment, "DRIVE_MOUNT", tmp_path / "drive")
    monkeypatch.setattr(environment, "DRIVE_RUN_DIR", tmp_path / "drive" / "MyDrive" / "genimg-runs")
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("SMOKE", "0")
    assert use_drive_for_runs(True) == tmp_path / "drive" / "MyDrive" / "genimg-runs"
    assert mounted == [str(tmp_path / "drive")]
    assert run_dir("01_mnist_gan") == tmp_path / "drive" / "MyDrive" / "genimg-runs" / "01_mnist_gan"


def _model(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 1))


def test_checkpoint_round_trip_restores_weights_optimizer_step_and_rng(tmp_path):
    seed_everything(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    history, watch = History(), Stopwatch()
    history.log(3, loss=0.5)
    watch.seconds = 1.5
    watch.count(7, 70)
    path = save_checkpoint(tmp_path / "c.pt", {"m": model, "opt": opt, "history": history, "watch": watch},
                           step=7, config={"width": 4}, extra={"note": "hi"})
    expected_draws = (torch.rand(3), np.random.rand(), random.random())

    fresh = _model()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    torch.manual_seed(123)  # disturb the generators; loading must restore them
    fresh_history, fresh_watch = History(), Stopwatch()
    state = load_checkpoint(path, {"m": fresh, "opt": fresh_opt, "history": fresh_history, "watch": fresh_watch},
                            config={"width": 4})
    assert state["step"] == 7 and state["extra"] == {"note": "hi"}
    assert fresh_history.series("loss") == ([3], [0.5])
    assert fresh_watch.state_dict() == {"seconds": 1.5, "iterations": 7, "images": 70}
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.random.rand() == expected_draws[1] and random.random() == expected_draws[2]


def test_checkpoint_from_another_architecture_is_refused_clearly(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"G": _model(4)})
    with pytest.raises(CheckpointMismatchError, match="another architecture or image size.*RUN_DIR"):
        load_checkpoint(path, {"G": _model(8)})


def test_checkpoint_with_another_config_is_refused_clearly(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"G": _model()}, config={"image_size": 28})
    with pytest.raises(CheckpointMismatchError, match="image_size: 28 in the file, 32 here"):
        load_checkpoint(path, {"G": _model()}, config={"image_size": 32})


def test_a_subset_loads_and_an_absent_object_is_named(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"G": _model(), "D": _model()})
    load_checkpoint(path, {"G": _model()})
    with pytest.raises(CheckpointMismatchError, match=r"has no \['watch'\] \(it has \['D', 'G'\]\)"):
        load_checkpoint(path, {"G": _model(), "watch": Stopwatch()})


def test_keep_last_deletes_the_older_numbered_checkpoints_only(tmp_path):
    (tmp_path / "best.pt").write_text("other")
    for step in (5, 100, 20):
        save_checkpoint(tmp_path / f"step-{step:06d}.pt", {"G": _model()}, step=step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "step-000020.pt", "step-000100.pt"]
    with pytest.raises(ValueError, match="keep at least"):
        save_checkpoint(tmp_path / "step-000200.pt", {"G": _model()}, keep_last=0)


def test_missing_checkpoint_and_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        load_checkpoint(tmp_path / "nope.pt", {"G": _model()})
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatchError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "other.pt", {"G": _model()})


def test_history_logs_series_and_survives_a_state_round_trip(tmp_path):
    history = History(tmp_path / "tb")
    history.log(1, loss=torch.tensor(2.0), acc=0.5)
    history.log(2, loss=1.0)
    assert history.series("loss") == ([1, 2], [2.0, 1.0])
    restored = History()
    restored.load_state_dict(history.state_dict())
    assert restored.series("loss") == ([1, 2], [2.0, 1.0])
    history.flush()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    with pytest.raises(KeyError, match="no scalar named 'nope'"):
        history.series("nope")


def test_stopwatch_throughput_and_state_round_trip():
    watch = Stopwatch()
    watch.seconds = 2.0
    watch.count(10, 640)
    assert watch.throughput() == {"it_per_s": 5.0, "img_per_s": 320.0}
    restored = Stopwatch()
    restored.load_state_dict(watch.state_dict())
    restored.count(10, 640)
    assert restored.iterations == 20 and restored.images == 1280 and restored.seconds == 2.0


def test_training_run_resumes_from_a_checkpoint_with_every_field_and_its_own_writer(tmp_path):
    run = TrainingRun(History(tmp_path / "tb"), step=7, epoch=2, records={"best": {"epoch": 1, "fd": 3.5}})
    run.history.log(7, loss=0.25)
    run.stopwatch.seconds = 1.5
    run.stopwatch.count(7, 448)
    run.snapshots[7] = torch.arange(6.0).view(1, 2, 3)
    save_checkpoint(tmp_path / "last.pt", {"run": run}, run.step)
    run.records["best"]["epoch"] = 99  # the checkpoint keeps its own copy of the records
    resumed = TrainingRun(History(tmp_path / "tb2"))
    load_checkpoint(tmp_path / "last.pt", {"run": resumed})
    assert (resumed.step, resumed.epoch, resumed.records) == (7, 2, {"best": {"epoch": 1, "fd": 3.5}})
    assert resumed.history.series("loss") == ([7], [0.25]) and resumed.history.writer is not None
    assert resumed.stopwatch.state_dict() == {"seconds": 1.5, "iterations": 7, "images": 448}
    assert torch.equal(resumed.snapshots[7], torch.arange(6.0).view(1, 2, 3))


def test_ema_update_by_hand():
    average, model = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        average.weight.fill_(1.0), model.weight.fill_(3.0), model.running_mean.fill_(5.0)
    model.num_batches_tracked.fill_(7)
    ema_update(average, model, decay=0.9)
    assert torch.allclose(average.weight, torch.full((2,), 1.2))  # 0.9 * 1 + 0.1 * 3
    assert torch.allclose(average.running_mean, torch.full((2,), 0.5))  # 0.9 * 0 + 0.1 * 5
    assert average.num_batches_tracked.item() == 7  # a count: copied


def test_ema_update_follows_the_formula_for_every_weight_and_statistic_and_leaves_the_model_alone():
    """average <- decay * average + (1 - decay) * model with decay 0.75, worked out by hand. The values are
    sums of powers of two, so the results are exact in float32."""
    average, model = (nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)) for _ in range(2))
    with torch.no_grad():
        average[0].weight.copy_(torch.tensor([[1.0, -2.0]])), average[0].bias.fill_(4.0)
        model[0].weight.copy_(torch.tensor([[5.0, 2.0]])), model[0].bias.fill_(0.0)
        model[1].running_mean.fill_(8.0), model[1].running_var.fill_(3.0)  # the average's: 0 and 1
    model[1].num_batches_tracked.fill_(12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema_update(average, model, decay=0.75)
    assert average[0].weight.tolist() == [[2.0, -1.0]]  # 0.75 * 1 + 0.25 * 5, 0.75 * -2 + 0.25 * 2
    assert average[0].bias.tolist() == [3.0]  # 0.75 * 4 + 0.25 * 0
    assert average[1].running_mean.tolist() == [2.0]  # 0.75 * 0 + 0.25 * 8
    assert average[1].running_var.tolist() == [1.5]  # 0.75 * 1 + 0.25 * 3
    assert average[1].num_batches_tracked.item() == 12  # a count is copied, not averaged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_of_the_previous_format_is_refused_with_what_to_do(tmp_path):
    path = save_checkpoint(tmp_path / "old.pt", {"G": _model()})
    payload = torch.load(path, weights_only=False)
    torch.save({**payload, "format": CHECKPOINT_FORMAT - 1}, path)
    with pytest.raises(CheckpointMismatchError, match="delete it .* and train again"):
        load_checkpoint(path, {"G": _model()})


def test_time_per_step_counts_only_the_timed_calls():
    calls = []
    timing = time_per_step(lambda: calls.append(time.sleep(0.01)), torch.device("cpu"), iterations=5, warmup=2)
    assert len(calls) == 7
    assert 10 <= timing["ms_per_step"] < 60 and timing["it_per_s"] == pytest.approx(1000 / timing["ms_per_step"])
    assert timing["peak_memory_mb"] is None


def test_metrics_json_has_the_common_fields(tmp_path):
    path = write_metrics(tmp_path, "01_mnist_gan", True, torch.device("cpu"), 10, 1.5, {"it_per_s": 6.6667},
                         {"fd": 3.2}, ["5k MNIST"])
    record = json.loads(path.read_text())
    assert record["mode"] == "smoke" and record["device"] == "cpu" and record["quality"] == {"fd": 3.2}
    assert record["peak_memory_mb"] > 0 and record["stand_ins"] == ["5k MNIST"]


# --- the GPU path and its emulation --------------------------------------------------------------------------


def test_a_cpu_takes_no_gpu_decisions(monkeypatch):
    monkeypatch.setenv("EMULATE_T4", "0")
    choices = gpu_choices(torch.device("cpu"))
    assert not choices.gpu_path and not choices.cuda and choices.amp_dtype is None
    assert not (choices.grad_scaler_enabled or choices.channels_last or choices.fused_adam)
    assert choices.mixed_precision == "no" and not choices.grad_scaler().is_enabled()
    with choices.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_emulate_t4_takes_a_t4s_decisions_on_the_cpu(monkeypatch):
    """fp16 autocast (not the CPU's default bf16), an enabled GradScaler, channels-last, fused Adam."""
    monkeypatch.setenv("EMULATE_T4", "1")
    choices = gpu_choices(torch.device("cpu"))
    assert choices.gpu_path and choices.emulated and not choices.cuda and choices.capability == (7, 5)
    assert choices.amp_dtype == torch.float16 and choices.mixed_precision == "fp16"
    assert choices.grad_scaler_enabled and choices.grad_scaler().is_enabled()
    assert choices.channels_last and choices.fused_adam
    with choices.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    assert describe_device(torch.device("cpu")) == "cpu (T4 emulation)"
    assert "T4 emulation on cpu" in choices.describe() and "float16" in choices.describe()


def test_an_fp16_step_under_emulation_scales_the_loss_and_skips_an_overflowing_step(monkeypatch):
    """What the GradScaler does on a T4: gradients of the scaled loss are unscaled before Adam; a step whose
    gradients overflow is skipped and the scale halved."""
    monkeypatch.setenv("EMULATE_T4", "1")
    choices = gpu_choices(torch.device("cpu"))
    weight = nn.Parameter(torch.tensor([2.0]))
    opt = torch.optim.SGD([weight], lr=0.1)
    scaler = choices.grad_scaler()
    with choices.autocast():
        loss = (weight * 3.0).sum()  # d loss / d weight = 3
    scaler.scale(loss).backward()
    assert weight.grad.item() == 3.0 * 65536.0  # scaled by the initial scale, 2**16
    scaler.step(opt), scaler.update()
    assert weight.item() == pytest.approx(2.0 - 0.1 * 3.0, rel=1e-6)  # unscaled before the step
    weight.grad = torch.tensor([float("inf")])
    scaler.step(opt), scaler.update()
    assert weight.item() == pytest.approx(1.7, rel=1e-6) and scaler.get_scale() == 32768.0


@pytest.mark.parametrize("capability, amp, scaler", [((7, 5), torch.float16, True), ((8, 0), torch.bfloat16, False),
                                                     ((6, 1), None, False)])
def test_a_cuda_gpu_decides_by_its_compute_capability(monkeypatch, capability, amp, scaler):
    monkeypatch.setenv("EMULATE_T4", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    choices = gpu_choices(torch.device("cuda"))
    assert choices.cuda and choices.gpu_path and choices.amp_dtype == amp
    assert choices.grad_scaler_enabled is scaler


def test_emulate_t4_on_a_bigger_gpu_forces_a_t4s_choices_and_turns_tf32_off(monkeypatch):
    monkeypatch.setenv("EMULATE_T4", "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        choices = gpu_choices(torch.device("cuda"))
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert choices.cuda and choices.capability == (7, 5) and choices.amp_dtype == torch.float16
    assert tf32 == (False, False)


def test_emulate_t4_rejects_unclear_values_and_skip_says_what_runs_instead(monkeypatch, capsys):
    monkeypatch.setenv("EMULATE_T4", "maybe")
    with pytest.raises(ValueError, match="EMULATE_T4=1"):
        gpu_choices(torch.device("cpu"))
    monkeypatch.setenv("EMULATE_T4", "1")
    gpu_choices(torch.device("cpu")).skip("a CUDA graph", "the eager step")
    assert capsys.readouterr().out.strip() == (
        "EMULATE_T4: a CUDA graph needs a CUDA device, so it is skipped on cpu; instead: the eager step")
