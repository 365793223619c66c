"""helpers.t2i.model and train: the generator and discriminator of notebook 04 (parameter counts, the improved
recipe's switches, packing), the auxiliary class loss, the GAN-CLS training step in float32 and under float16
autocast with a GradScaler, and the loop that resumes from its checkpoint."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from helpers.environment import autocast
from helpers.t2i.data import sample_batch
from helpers.t2i.evaluate import images_from_text
from helpers.t2i.losses import auxiliary_class_loss, feature_matching_mse
from helpers.t2i.model import Discriminator, Generator, packed
from helpers.t2i.shapes import all_combinations, make_shapes
from helpers.t2i.train import TextToImageRecipe, TextToImageSchedule, gan_cls_train_step, train_text_to_image
from helpers.training import History, TrainingRun, count_parameters


def test_generator_and_discriminator_parameter_counts_and_shapes():
    # G (embedding 10, z 4, projection 6, ngf 2, 16 px): Linear 10*6+6 = 66, BN1d 12, ConvT 10->4 (4x4, no bias)
    # 10*4*16 = 640, BN 8, ConvT 4->2 128, BN 4, ConvT 2->3 96: total 954
    g = Generator(10, z_dim=4, projected_dim=6, ngf=2, image_size=16)
    assert count_parameters(g) == 954
    # D: conv 3->2 96, conv 2->4 128, BN 8, projection 66 + 12, 1x1 conv 10->4 40, BN 8, 4x4 conv 4->1 64: total 422
    d = Discriminator(10, projected_dim=6, ndf=2, image_size=16)
    assert count_parameters(d) == 422
    g64, d64 = Generator(384, ngf=8), Discriminator(384, ndf=8)
    images = g64(torch.randn(5, 100), torch.randn(5, 384))
    assert images.shape == (5, 3, 64, 64)
    logits, features = d64(images, torch.randn(5, 384))
    assert logits.shape == (5,) and features.shape == (5, 64, 4, 4)
    with pytest.raises(ValueError, match="image_size=48; use a power of two"):
        Generator(384, image_size=48)


def tiny_models(seed: int = 0, cbn: bool = False, projection: bool = False,
                n_classes: tuple = ()) -> tuple[Generator, Discriminator]:
    """A 16-px generator and discriminator on 8-d embeddings."""
    torch.manual_seed(seed)
    g = Generator(8, z_dim=4, projected_dim=4, ngf=4, image_size=16, conditional_bn=cbn)
    d = Discriminator(8, projected_dim=4, ndf=4, image_size=16, projection=projection, n_classes=n_classes)
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
    two = images_from_text(g, torch.randn(2, 4), text)
    assert (two[0] - two[1]).abs().max() > 1e-3     # conditional BN: z also acts after the first layer
    same = images_from_text(g, torch.zeros(2, 4), text)
    assert torch.allclose(same[0], same[1])


def test_packed_stacks_the_chunks_on_channels_and_d_reads_packs():
    a, b = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    pack = packed(torch.cat([a, b]), 2)          # chunk 1 (a) on channels 0-2, chunk 2 (b) on 3-5
    assert pack.shape == (2, 6, 16, 16) and pack[:, :3].eq(0).all() and pack[:, 3:].eq(1).all()
    assert packed(a, 1) is a
    d = Discriminator(8, projected_dim=4, ndf=4, image_size=16, pack=2)
    logits, features = d(pack, torch.randn(2, 8))
    assert logits.shape == (2,) and features.shape == (2, 8, 4, 4)


def test_auxiliary_class_loss_sums_the_heads_by_hand():
    _, d = tiny_models(n_classes=(3, 2))
    for head in d.class_heads:                       # zero heads: uniform predictions
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    labels = torch.tensor([[0, 1], [2, 0]])
    # uniform over 3 values: ln 3 per image; over 2: ln 2; summed over the two heads
    loss = auxiliary_class_loss(d, torch.randn(2, 8, 4, 4), labels)
    assert loss.item() == pytest.approx(np.log(3) + np.log(2), rel=4 * torch.finfo(torch.float32).eps)


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
    scaler, recipe = scaler_for(amp_dtype), TextToImageRecipe(gan_int=0, feature_matching=1)
    torch.manual_seed(1)
    scalars = gan_cls_train_step(g, d, opt_g, opt_d, scaler, images, h, h_wrong, labels, recipe, amp_dtype)
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
    recipe = TextToImageRecipe(gan_int=1, feature_matching=1, l1=1, mode_seeking=1, auxiliary=1)
    scaler = scaler_for(amp_dtype, init_scale=2.0**4)   # mode seeking's large gradients overflow at 2**8
    scalars = gan_cls_train_step(g, d, opt_g, opt_d, scaler, *step_inputs(), recipe, amp_dtype)
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
            "run": TrainingRun(History())}


@pytest.mark.parametrize("amp_dtype", AMP)
def test_fit_stopped_and_resumed_equals_a_straight_run(tmp_path, capsys, amp_dtype):
    data = make_shapes(24, all_combinations(), image_size=16, seed=0, captions_per_image=2)
    table = torch.randn(len(data.captions), 8, generator=torch.Generator().manual_seed(0))

    def batch_at(step):
        images, right, wrong, labels = sample_batch(data, 8, torch.Generator().manual_seed(step))
        return images, table[right], table[wrong], labels

    fixed, recipe, config = (torch.randn(2, 4), table[:2]), TextToImageRecipe(mode_seeking=1), {"width": 4}
    schedule = TextToImageSchedule(4, checkpoint_every=2, log_every=3)
    straight_state = fit_state(0, amp_dtype)
    straight = train_text_to_image(straight_state, batch_at, recipe, schedule, tmp_path / "a.pt", config, fixed,
                                   amp_dtype)
    straight_scale = straight_state["scaler"].get_scale()
    train_text_to_image(fit_state(0, amp_dtype), batch_at, recipe, TextToImageSchedule(2, log_every=3),
                        tmp_path / "b.pt", config, fixed, amp_dtype)
    resumed_state = fit_state(1, amp_dtype)   # a fresh session: other initial weights and scale, then the checkpoint
    resumed_state["scaler"] = scaler_for(amp_dtype, init_scale=2.0**12)
    resumed = train_text_to_image(resumed_state, batch_at, recipe, TextToImageSchedule(4, log_every=3),
                                  tmp_path / "b.pt", config, fixed, amp_dtype)
    assert resumed.step == straight.step == 4 and sorted(resumed.snapshots) == [2, 4]   # 2: where it stopped
    # windows of 3 close at the checkpoint (2), at 3 and at the end (4), stopped and resumed alike
    assert resumed.history.series("loss/G") == straight.history.series("loss/G")
    assert straight.history.series("loss/G")[0] == [2, 3, 4]
    assert torch.equal(resumed.snapshots[4], straight.snapshots[4])
    assert resumed.stopwatch.iterations == 4
    assert resumed_state["scaler"].get_scale() == straight_scale   # the GradScaler's state came back as well
    again = train_text_to_image(fit_state(2, amp_dtype), batch_at, recipe,   # a second Run all: nothing to train
                                TextToImageSchedule(4, log_every=3), tmp_path / "b.pt", config, fixed,
                                amp_dtype)
    assert again.history.series("loss/G") == straight.history.series("loss/G")
    printed = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'b.pt'} at 2" in printed
    assert f"reusing the finished run in {tmp_path / 'b.pt'} (4 iterations" in printed


def amp_step(amp_dtype, scaler):
    """One iteration with every term but mode seeking (whose 1 / distance overflows float16's gradients on these
    16-px images: the scaler would skip the step) from fixed weights and noise; D and G step by SGD, whose
    update is the learning rate times the gradient, so an unscaled gradient would show in the update."""
    g, d = tiny_models(cbn=True, projection=True, n_classes=(3, 2))
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1)
    before = {**{f"G.{k}": v.clone() for k, v in g.state_dict().items()},
              **{f"D.{k}": v.clone() for k, v in d.state_dict().items()}}
    recipe = TextToImageRecipe(gan_int=1, feature_matching=1, l1=1, auxiliary=1)  # mode seeking: see below
    torch.manual_seed(1)
    scalars = gan_cls_train_step(g, d, opt_g, opt_d, scaler, *step_inputs(), recipe, amp_dtype)
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
    data = make_shapes(24, all_combinations(), image_size=16, seed=0, captions_per_image=2)
    table = torch.randn(len(data.captions), 8, generator=torch.Generator().manual_seed(0))

    def batch_at(step):
        images, right, wrong, labels = sample_batch(data, 8, torch.Generator().manual_seed(step))
        return images, table[right], table[wrong], labels

    fixed, recipe = (torch.randn(2, 4), table[:2]), TextToImageRecipe()
    runs = {}
    for every in (1, 3):
        torch.manual_seed(5)
        schedule = TextToImageSchedule(7, checkpoint_every=100, snapshot_every=100, log_every=every)
        runs[every] = train_text_to_image(fit_state(), batch_at, recipe, schedule, tmp_path / f"{every}.pt",
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
