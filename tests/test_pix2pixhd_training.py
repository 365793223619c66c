"""pix2pixHD training on the CPU: the fast-path options give the eager step's results, and the two-stage
schedule resumed after an interruption ends with exactly the weights of an uninterrupted run."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.utils.data import DataLoader

import helpers.pix2pixhd.train as p2p
from helpers.environment import seed_everything
from helpers.pix2pixhd.data import ProceduralLabelImages, encode_pair_batch
from helpers.pix2pixhd.fast_path import FastPath
from helpers.pix2pixhd.losses import PIX2PIXHD_VGG_LAYERS
from helpers.pix2pixhd.model import GlobalGenerator, LocalEnhancer, MultiscaleDiscriminator
from helpers.pix2pixhd.train import (TrainingSetup, pix2pixhd_train_step, train_variant, training_step_flops,
                                     two_stage_plan)
from helpers.training import CheckpointMismatchError
from helpers.vgg import VGG19Features

IN_NC = ProceduralLabelImages.label_nc + 1  # one-hot classes + the instance-edge channel
PLAN = two_stage_plan(32, global_epochs=(1, 1), local_epochs=(2, 2), fix_global=2)
# 6 epochs: global 0, 1 (decay); local 0, 1 (G1 frozen), 2 (Adam rebuilt over all of G), 3 (decay)
N_TRAIN = 2  # pairs, batch 1: 2 iterations per epoch
CONFIG = {"test": "resume"}


@pytest.fixture(scope="module")
def vgg():
    """A random-weight VGG19 (frozen, stateless between runs): built once for the module."""
    seed_everything(2)
    return VGG19Features(list(PIX2PIXHD_VGG_LAYERS), pretrained=False, normalize_input=False)


def build_generator(stage: str) -> torch.nn.Module:
    if stage == "global":
        return GlobalGenerator(IN_NC, ngf=4, n_downsampling=3, n_blocks=1)
    return LocalEnhancer(IN_NC, ngf=2, n_downsample_global=3, n_blocks_global=1, n_blocks_local=1)


def make_setup(vgg, fast: FastPath = FastPath(), n_train: int = N_TRAIN) -> TrainingSetup:
    data = ProceduralLabelImages(n_train, 32, seed=0)
    encode = functools.partial(encode_pair_batch, label_nc=data.label_nc, use_instance=True)
    preview = next(iter(DataLoader(data, 2)))
    return TrainingSetup(DataLoader(data, 1, shuffle=True, drop_last=True), encode, preview, vgg, fast=fast)


def run(folder, vgg, stop_after=None):
    """What the notebook does on every call: seed, build everything fresh, train or resume."""
    seed_everything(0)
    D = MultiscaleDiscriminator(IN_NC + 3, ndf=4, n_layers=3, num_D=3)
    return train_variant("v", PLAN, build_generator, D, make_setup(vgg), folder, CONFIG, stop_after)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, vgg, one_thread):
    return run(tmp_path_factory.mktemp("straight"), vgg)


def test_uninterrupted_run_follows_the_plan(straight):
    assert straight.complete and isinstance(straight.G, LocalEnhancer)
    assert straight.run.stopwatch.iterations == 6 * N_TRAIN
    steps, lrs = straight.run.history.series("lr")
    assert steps == list(range(1, 6 * N_TRAIN + 1))
    # as the official schedule, the first decay epoch still runs at 2e-4 and the last at 2e-4 / n_decay:
    # global (1, 1): 2e-4, 2e-4; local (2, 2): 2e-4, 2e-4, 2e-4, 1e-4
    assert lrs[::N_TRAIN] == [2e-4, 2e-4, 2e-4, 2e-4, 2e-4, 1e-4]
    assert sorted(straight.run.snapshots) == [N_TRAIN * e for e in range(1, 7)]
    assert all(p.requires_grad for p in straight.G.parameters()), "G1 is unfrozen after stage 2"


def test_adam_is_rebuilt_over_all_of_G_after_the_frozen_epochs(straight, tmp_path_factory):
    """Adam's step count in the last checkpoint: the local enhancer's own weights (G2) and G1's were both
    updated only by the Adam built after the 2 frozen epochs, i.e. for the last 2 epochs."""
    folder = next(tmp_path_factory.getbasetemp().glob("straight*"))
    opt_g = torch.load(folder / "checkpoints" / "v_local.pt", weights_only=False)["state"]["opt_g"]
    steps = {int(s["step"]) for s in opt_g["state"].values()}
    assert steps == {2 * N_TRAIN} and len(opt_g["state"]) == len(list(straight.G.parameters()))


def test_a_stage_checkpoint_holds_the_models_the_optimizers_and_one_run_record(straight, tmp_path_factory):
    """The run record is saved under "run": the iterations of the whole variant, the epochs of this stage."""
    folder = next(tmp_path_factory.getbasetemp().glob("straight*"))
    for stage, iterations in (("global", 2 * N_TRAIN), ("local", 6 * N_TRAIN)):
        saved = torch.load(folder / "checkpoints" / f"v_{stage}.pt", weights_only=False)
        assert set(saved["state"]) == {"G", "D", "opt_g", "opt_d", "scaler", "run"}
        run_state = saved["state"]["run"]
        assert saved["step"] == run_state["step"] == run_state["stopwatch"]["iterations"] == iterations
        assert run_state["epoch"] == (2 if stage == "global" else 4)
        assert sorted(run_state["snapshots"]) == list(range(N_TRAIN, iterations + 1, N_TRAIN))
        assert len(run_state["history"]["lr"]) == iterations


def test_stage_2_starts_from_the_trained_G1_and_keeps_it_frozen(tmp_path, vgg, one_thread):
    """A local stage that is all frozen epochs ends with G1 exactly as stage 1 left it (and trained G2)."""
    seed_everything(0)
    D = MultiscaleDiscriminator(IN_NC + 3, ndf=4, n_layers=3, num_D=3)
    plan = two_stage_plan(32, global_epochs=(1, 0), local_epochs=(1, 0), fix_global=1)
    trained = train_variant("f", plan, build_generator, D, make_setup(vgg), tmp_path, CONFIG)
    g1 = build_generator("global")
    p2p.load_checkpoint(tmp_path / "checkpoints" / "f_global.pt", {"G": g1}, restore_rng=False)
    assert same_weights(trained.G.global_features, g1.features)
    assert not same_weights(trained.G.local_down, build_generator("local").local_down)


@pytest.mark.parametrize("stop_after", [1, 2, 3, 4, 5], ids=["in-global-stage", "between-stages",
                                                             "in-frozen-G1-epochs", "before-adam-rebuild",
                                                             "after-adam-rebuild"])
def test_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, vgg, straight, stop_after, one_thread):
    stopped = run(tmp_path, vgg, stop_after=stop_after)
    assert not stopped.complete and stopped.run.stopwatch.iterations == N_TRAIN * stop_after
    resumed = run(tmp_path, vgg)  # a fresh session: new models, data loader, records; resumes from disk
    assert resumed.complete
    assert same_weights(resumed.G, straight.G) and same_weights(resumed.D, straight.D)
    assert resumed.run.history.state_dict() == straight.run.history.state_dict()
    assert resumed.run.stopwatch.iterations == straight.run.stopwatch.iterations
    assert sorted(resumed.run.snapshots) == sorted(straight.run.snapshots)


def test_a_second_call_says_it_resumes_or_reuses_and_trains_no_further(tmp_path, vgg, straight, capsys,
                                                                     one_thread):
    """What a second Run all does: a stopped run says "resuming" and ends as the straight run; a call on the
    finished run says "reusing the finished run", trains nothing and gives the same models and records."""
    assert p2p.saved_epochs("v", PLAN, tmp_path) == 0
    run(tmp_path, vgg, stop_after=3)
    assert p2p.saved_epochs("v", PLAN, tmp_path) == 3
    assert "resuming" not in capsys.readouterr().out  # a fresh start says nothing
    resumed = run(tmp_path, vgg)
    assert f"v: resuming the run saved in {tmp_path / 'checkpoints'} (epoch 3 of 6)" in capsys.readouterr().out
    assert resumed.saved_before == 3 and p2p.saved_epochs("v", PLAN, tmp_path) == 6
    again = run(tmp_path, vgg)
    assert f"v: reusing the finished run in {tmp_path / 'checkpoints'} (epoch 6 of 6)" in capsys.readouterr().out
    assert again.complete and again.saved_before == 6
    assert again.run.stopwatch.iterations == straight.run.stopwatch.iterations
    assert same_weights(again.G, straight.G) and same_weights(again.D, straight.D)
    assert again.run.history.state_dict() == straight.run.history.state_dict()
    stopped_again = run(tmp_path, vgg, stop_after=3)  # asking a finished run to stop changes nothing
    assert stopped_again.complete and same_weights(stopped_again.G, straight.G)


def test_a_checkpoint_without_a_run_record_is_refused_with_what_to_do(tmp_path):
    """A checkpoint kept by each record on its own ("history", "stopwatch", "progress"), as an older version of
    the loop wrote it, says what to do instead of failing on a missing key."""
    path = tmp_path / "checkpoints" / "v_global.pt"
    path.parent.mkdir()
    torch.save({"format": 3, "state": {"progress": {"epoch": 2, "snapshots": {}}}}, path)
    with pytest.raises(CheckpointMismatchError, match=r"v_global.pt' holds no run record.*new folder"):
        p2p.saved_epochs("v", PLAN, tmp_path)


def test_the_resume_check_fails_when_resume_loses_the_random_state(tmp_path, vgg, straight, monkeypatch,
                                                                   one_thread):
    """The check above can fail: a resume that does not restore the RNG shuffles the data differently."""
    monkeypatch.setattr(p2p, "load_checkpoint", functools.partial(p2p.load_checkpoint, restore_rng=False))
    run(tmp_path, vgg, stop_after=3)
    resumed = run(tmp_path, vgg)
    assert not same_weights(resumed.G, straight.G)


# --- the fast path on the CPU: the same step, the same numbers -----------------------------------------------------


FLOAT32_EPS = torch.finfo(torch.float32).eps
# Two float32 sums of n terms taken in different orders (another convolution kernel, another memory layout) can
# differ by up to about n * eps of the sum of the terms' magnitudes. The step's longest sums have a few thousand
# terms: a weight gradient of a full-size convolution adds batch 2 x 32 x 32 = 2,048 products, a VGG relu5_1
# output 512 x 9 = 4,608. So kernels may differ by up to 4,096 * eps ~ 4.9e-4 of the largest gradient; measured:
# 26-29 eps on one AMD EPYC (1 and 2 threads), 1e-5 of the largest gradient (~84 eps) on another CPU. A real fault
# is of the order of the gradient itself (the channels-last InstanceNorm gradient below is off by more than 1).
SUM_TERMS = 4096


def first_step(vgg, fast: FastPath, scaler: torch.amp.GradScaler | None = None
               ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One training step of fresh seeded models with the options `fast`: its losses, and the gradients it left
    (G's from L_G, D's from L_D), unscaled when a loss scaler was used."""
    seed_everything(1)
    G = fast.prepare(build_generator("local"))
    D = fast.prepare(MultiscaleDiscriminator(IN_NC + 3, ndf=4, n_layers=3, num_D=3))
    setup = make_setup(vgg, fast, n_train=2)  # the preview batch holds 2 pairs
    opt_g, opt_d = fast.adam(G.parameters(), 2e-4, (0.5, 0.999)), fast.adam(D.parameters(), 2e-4, (0.5, 0.999))
    x, real = (fast.tensor(t) for t in setup.encode(setup.preview, 32))
    scaler = scaler or fast.grad_scaler(torch.device("cpu"))
    out = pix2pixhd_train_step(G, D, vgg, opt_g, opt_d, scaler, x, real, amp_dtype=fast.amp_dtype)
    grads = {f"G.{n}": p.grad for n, p in G.named_parameters()} | {f"D.{n}": p.grad for n, p in D.named_parameters()}
    first_step.adam_steps = {name: {int(s["step"]) for s in opt.state.values()}
                             for name, opt in (("G", opt_g), ("D", opt_d))}
    return {k: v.item() for k, v in out.items()}, grads


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over all tensors, relative to max |b|."""
    scale = max(t.abs().max().item() for t in b.values())
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b) / scale


@pytest.fixture(scope="module")
def eager(vgg, one_thread):
    return first_step(vgg, FastPath())


# (Fused Adam alone is not a case here: the gradients exist before Adam runs, so they could not differ. Its update
# is compared with the plain one in test_fused_adam_update_equals_the_plain_one.)
@pytest.mark.parametrize("fast", [FastPath(channels_last=True),
                                  FastPath(compile=True, compile_backend="aot_eager"),
                                  FastPath(channels_last=True, fused_adam=True, compile=True,
                                           compile_backend="aot_eager")],
                         ids=["channels-last", "compile", "all-but-amp"])
def test_fast_path_step_gives_the_eager_losses_and_gradients(vgg, eager, fast, one_thread):
    losses, grads = first_step(vgg, fast)
    assert losses == pytest.approx(eager[0], rel=SUM_TERMS * FLOAT32_EPS)
    # gradients agree to float32 rounding (see SUM_TERMS). (Weights after Adam are not compared element by
    # element: Adam's first step moves a weight by lr * sign(gradient), so a gradient that is pure rounding noise,
    # e.g. a conv bias in front of an InstanceNorm, moves by +-lr either way.)
    assert largest_difference(grads, eager[1]) < SUM_TERMS * FLOAT32_EPS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_step_runs_on_cpu_and_stays_close(vgg, eager, dtype, one_thread):
    """The autocast path on the CPU, with fp16's loss scaler enabled as on a T4: the losses and the unscaled
    gradients within a few roundings of the autocast dtype of fp32's, and both Adams took their step."""
    fast = FastPath(amp_dtype=dtype)
    scaler = fast.grad_scaler(torch.device("cpu"))
    assert scaler.is_enabled() == (dtype == torch.float16)
    losses, grads = first_step(vgg, fast, scaler)
    eps = torch.finfo(dtype).eps  # bf16 7.8e-3, fp16 9.8e-4
    assert losses == pytest.approx(eager[0], rel=4 * eps)  # measured: 0.4 eps (bf16), 0.2 eps (fp16)
    # The gradients of G2 and D point the way fp32's do and have their size (so the scaler unscaled them):
    # measured 1 - cosine 1.1 eps (bf16) and 1.2 eps (fp16), norm ratio 0.985 and 1.020. G1 is left out: in this
    # tiny model its bottleneck is 2x2 pixels, where InstanceNorm divides by the spread of 4 numbers, so rounding
    # its inputs to 8 or 11 bits moves G1's gradients by 70 % of their size (that is the model, not autocast).
    names = [k for k in eager[1] if not k.startswith("G.global_features")]
    ours, ref = (torch.cat([g[k].float().flatten() for k in names]) for g in (grads, eager[1]))
    assert 1 - torch.nn.functional.cosine_similarity(ours, ref, dim=0) < 8 * eps
    assert abs(ours.norm() / ref.norm() - 1) < 0.1
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert first_step.adam_steps == {"G": {1}, "D": {1}}, "a step was skipped (overflow in fp16)"
    if scaler.is_enabled():
        assert scaler.get_scale() == fast.init_scale  # no overflow: the scale was not halved


def test_fp16_loss_scale_of_2_16_skips_the_first_steps(vgg, one_thread):
    """Why FastPath starts the loss scale at 2**8: at torch's default 2**16 every gradient above 65,504 / 65,536
    (< 1) overflows fp16, so the first step is skipped (the scale halves) and Adam never steps."""
    fast = FastPath(amp_dtype=torch.float16, init_scale=2.0**16)
    scaler = fast.grad_scaler(torch.device("cpu"))
    first_step(vgg, fast, scaler)
    assert first_step.adam_steps["G"] == set(), "G's Adam stepped: its gradients did not overflow at 2**16"
    assert scaler.get_scale() == 2.0**15


def test_channels_last_instance_norm_gradient_is_wrong_at_batch_1_on_cpu():
    """Why FastPath.for_device leaves channels-last off (its docstring and notebook 05 say so): torch's CPU
    InstanceNorm gets its input gradient wrong at batch 1 when the incoming gradient is channels-last, as a
    convolution's backward makes it. If this test fails, torch has fixed it: revisit the text."""
    torch.manual_seed(0)
    errors = {}
    for batch in (1, 2):
        x, grad = torch.randn(batch, 8, 8, 8), torch.randn(batch, 8, 8, 8)
        results = []
        for layout in (torch.contiguous_format, torch.channels_last):
            xi = x.clone().requires_grad_()
            torch.nn.functional.instance_norm(xi).backward(grad.contiguous(memory_format=layout))
            results.append(xi.grad)
        errors[batch] = ((results[0] - results[1]).abs().max() / results[0].abs().max()).item()
    # relative to the largest gradient: rounding at batch 2 (64-term sums), a wrong gradient at batch 1
    assert errors[2] < SUM_TERMS * FLOAT32_EPS and errors[1] > 0.1, errors


def test_fused_adam_update_equals_the_plain_one(one_thread):
    torch.manual_seed(0)
    weights = [torch.randn(8, 4, 3, 3), torch.randn(8)]
    grads = [[torch.randn_like(w) * 10.0 ** -k for w in weights] for k in range(3)]  # shrinking gradients
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = FastPath(fused_adam=fused).adam(params, 2e-4, (0.5, 0.999))
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    # the same formula in another order: each of the 3 steps may round each weight differently by an ulp or two
    assert all((a - b).abs().max() <= 8 * FLOAT32_EPS * b.abs().max() for a, b in zip(*results))
    assert not torch.equal(results[0][0], weights[0])


def test_fast_path_is_chosen_from_the_device(monkeypatch):
    monkeypatch.setenv("EMULATE_T4", "0")
    assert FastPath.for_device(torch.device("cpu")) == FastPath()
    assert FastPath.for_device(torch.device("cpu")).describe() == "eager fp32 (no fast-path option on)"
    for capability, dtype in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16),
                              ((6, 1), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        fast = FastPath.for_device(torch.device("cuda"))
        assert fast.amp_dtype == dtype and fast.cudnn_benchmark and fast.fused_adam and not fast.channels_last
        assert not fast.compile and FastPath.for_device(torch.device("cuda"), compile=True).compile
    assert fast.describe() == "fp32, cuDNN autotuning, fused Adam"
    assert (FastPath(amp_dtype=torch.float16, compile=True).describe()
            == "autocast float16 with a loss scaler (from 2**8), torch.compile (inductor)")


def test_t4_emulation_gives_the_fp16_path_on_the_cpu(monkeypatch, capsys):
    """EMULATE_T4=1: a T4's decisions on the CPU (gpu_choices), with what the CPU lacks said to be skipped."""
    monkeypatch.setenv("EMULATE_T4", "1")
    fast = FastPath.for_device(torch.device("cpu"), compile=True)
    assert fast == FastPath(amp_dtype=torch.float16, fused_adam=True)  # no cuDNN, no compile, NCHW
    assert fast.grad_scaler(torch.device("cpu")).is_enabled()
    out = capsys.readouterr().out
    assert "EMULATE_T4: cuDNN autotuning needs a CUDA device, so it is skipped on cpu" in out
    assert "EMULATE_T4: torch.compile" in out and "channels-last: left off" in out


def test_step_flops_grow_with_the_batch_and_match_the_official_size():
    with torch.device("meta"):
        G, D = LocalEnhancer(36), MultiscaleDiscriminator(39)
        vgg = VGG19Features(list(PIX2PIXHD_VGG_LAYERS), pretrained=False, normalize_input=False)
    one = training_step_flops(G, D, vgg, 36, 512, 1024, batch=1)
    assert training_step_flops(G, D, vgg, 36, 512, 1024, batch=2) == 2 * one
    # the reviewer's estimate for this configuration (1024x512, official widths, VGG loss) was about 2.7 TFLOP
    assert 2.5e12 < one < 3.2e12


def test_bench_flags_an_fp32_option_whose_gradients_are_wrong(one_thread):
    """experiments/bench_pix2pixhd.py on the CPU (batch 1): channels-last is faster or slower, but its gradients are
    wrong (torch's InstanceNorm, test above), and the bench says so instead of only printing a speed-up."""
    import bench_pix2pixhd

    assert bench_pix2pixhd.FP32_ROUNDING == SUM_TERMS * FLOAT32_EPS
    rows = {row["variant"]: row for row in bench_pix2pixhd.run(torch.device("cpu"), reduced=True)}
    assert "WRONG" in rows["channels-last"]["note"]
