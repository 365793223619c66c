"""The GAN of the course brief: parameter counts by hand, shapes, one step, a short run that must learn, resume through the
real training loop, and the fast path's bookkeeping."""
import copy
import math
from functools import partial

import pytest
import torch

from helpers.losses import bce_discriminator_loss, bce_generator_loss
from helpers.gan.cuda_graph import choose_step, graphed_step, set_capturable, undone
from helpers.gan.evaluate import gan_samples
from helpers.gan.model import Discriminator, Generator, Recipe, gan_train_step, improved_recipe, baseline_recipe
from helpers.gan.train import GanPlan, batches, train_gan

pytestmark = pytest.mark.usefixtures("one_thread")


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_generator_parameter_count_by_hand():
    # Linear 100->128: 12,928 ; 128->256: 33,024 + BN 512 ; 256->512: 131,584 + BN 1,024 ;
    # 512->1024: 525,312 + BN 2,048 ; 1024->784: 803,600 ; total 1,510,032
    assert count(Generator(100)) == 1_510_032


def test_discriminator_parameter_count_by_hand():
    # Linear 784->512: 401,920 ; 512->256: 131,328 ; 256->1: 257 ; total 533,505
    assert count(Discriminator()) == 533_505


def test_improved_step_trains_g_and_d_and_moves_the_average_towards_g():
    torch.manual_seed(0)
    recipe = improved_recipe(torch.device("cpu"), 8, (16, 32), (16,), ema_decay=0.5)
    g_before, ema_before = copy.deepcopy(recipe.G), copy.deepcopy(recipe.sampler)
    d_before = copy.deepcopy(recipe.D)
    out = recipe.step(IMAGES[:32], torch.randn(32, 8))
    changed = lambda a, b: not torch.equal(next(a.parameters()), next(b.parameters()))  # noqa: E731
    assert changed(recipe.G, g_before) and changed(recipe.D, d_before)
    expected = 0.5 * next(ema_before.parameters()) + 0.5 * next(recipe.G.parameters())
    assert torch.allclose(next(recipe.sampler.parameters()), expected)
    assert set(out) == {"loss/generator", "loss/discriminator", "D(x)/real", "D(x)/fake"}


def test_shapes_and_a_saturated_discriminator_gives_finite_losses_and_gradients():
    """D ends in a sigmoid, so an extreme input saturates it at exactly 0 or 1 in float32. BCE then
    clamps log(0) at -100 (torch's BCELoss), so the losses stay finite: 50 for the D loss (one of its two
    halves is -log(0) -> 100) and 100 for G, and backpropagation gives no NaN."""
    torch.manual_seed(0)
    G, D = Generator(16), Discriminator()
    assert G(torch.randn(5, 16)).shape == (5, 1, 28, 28)
    with torch.no_grad():
        D.net[-2].bias.fill_(1e4)  # the last linear layer: D(x) = sigmoid(~1e4) = 1 for any image
    prob = D(torch.zeros(3, 1, 28, 28))
    assert prob.shape == (3, 1) and torch.equal(prob, torch.ones(3, 1))
    d_loss = bce_discriminator_loss(prob, prob)  # the fakes judged real with certainty: log(1 - 1)
    assert d_loss.item() == 50.0
    assert bce_generator_loss(1 - prob).item() == 100.0
    d_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)


def test_gan_samples_are_repeatable_for_a_seed():
    G, cpu = Generator(8), torch.device("cpu")
    assert torch.equal(gan_samples(G, 10, cpu, seed=3), gan_samples(G, 10, cpu, seed=3))
    assert not torch.equal(gan_samples(G, 10, cpu, seed=3), gan_samples(G, 10, cpu, seed=4))


def test_batches_pass_over_the_data_in_a_new_order_each_time():
    data = torch.arange(10).float()
    out = batches(data, 4, 2, torch.Generator().manual_seed(0))
    assert [len(b) for b in out] == [4, 4] and len(set(torch.cat(out).tolist())) == 8  # one pass, drop_last
    out = batches(data, 4, 5, torch.Generator().manual_seed(0))  # 2 batches per pass: 3 passes, 5 batches
    passes = [torch.cat(out[0:2]), torch.cat(out[2:4])]
    assert all(len(set(p.tolist())) == 8 for p in passes) and not torch.equal(*passes)
    with pytest.raises(ValueError, match="3 images make no batch of 4"):
        batches(data[:3], 4, 1, torch.Generator())


def test_training_moves_the_generator_towards_the_data():
    # real data: every pixel at +0.8. After 150 steps the fakes' mean pixel must be much closer to 0.8 than at start.
    torch.manual_seed(0)
    G, D = Generator(8, hidden=(32, 64)), Discriminator(hidden=(32,))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999))
    real = torch.full((32, 1, 28, 28), 0.8)
    start = (G.eval()(torch.randn(64, 8)).mean() - 0.8).abs().item()
    G.train()
    for _ in range(150):
        out = gan_train_step(G, D, opt_g, opt_d, real, torch.randn(32, 8))
    end = (G.eval()(torch.randn(64, 8)).mean() - 0.8).abs().item()
    assert end < 0.5 * start, (start, end)
    assert set(out) == {"loss/generator", "loss/discriminator", "D(x)/real", "D(x)/fake"}


# --- the training loop: resume through the real path ---------------------------------------------------------

IMAGES = torch.rand(96, 1, 28, 28) * 2 - 1  # 3 batches of 32 per epoch


def tiny_recipe() -> Recipe:
    """A fresh small baseline recipe, as a new session would build it."""
    return baseline_recipe(torch.device("cpu"), 8, (16, 32), (16,), lr=2e-3)


def tiny_plan(epochs: int) -> GanPlan:
    quality = lambda G: {"fd": float(G(torch.ones(2, 8)).mean()), "coverage_nats": 0.0}  # noqa: E731
    return GanPlan(epochs, 3, 32, 0, 2, (4,), torch.zeros(4, 8), quality)


def weights(recipe: Recipe) -> list[torch.Tensor]:
    return [*recipe.G.state_dict().values(), *recipe.D.state_dict().values()]


def test_an_interrupted_run_resumed_in_a_fresh_session_equals_a_straight_run(tmp_path):
    torch.manual_seed(0)
    straight = tiny_recipe()
    straight_run = train_gan(straight, IMAGES, tiny_plan(3), tmp_path / "straight")

    torch.manual_seed(0)
    first = tiny_recipe()
    train_gan(first, IMAGES, tiny_plan(1), tmp_path / "resumed")
    torch.manual_seed(12345)  # a new session: other random state, fresh models, optimizers and run
    resumed = tiny_recipe()
    resumed_run = train_gan(resumed, IMAGES, tiny_plan(3), tmp_path / "resumed")

    assert resumed_run.step == straight_run.step == 9 and resumed_run.epoch == 3
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(straight)))
    g_losses = [[e["g_loss"] for e in run.records["epochs"]] for run in (resumed_run, straight_run)]
    assert g_losses[0] == g_losses[1]
    assert resumed_run.history.series("loss/generator") == straight_run.history.series("loss/generator")
    assert sorted(resumed_run.snapshots) == [4, 9]


# --- the fast path --------------------------------------------------------------------------------------------


def test_undone_restores_weights_and_optimizer_state_so_later_steps_equal_a_fresh_copy():
    torch.manual_seed(0)
    recipe = tiny_recipe()
    twin = copy.deepcopy(recipe)  # same weights, optimizers without state
    twin.step = partial(gan_train_step, twin.G, twin.D, twin.opt_g, twin.opt_d)
    real, z = IMAGES[:32], torch.randn(32, 8)
    with undone(recipe):  # what graphed_step does with its warm-up steps
        for _ in range(3):
            recipe.step(real, z)
    assert all(torch.equal(a, b) for a, b in zip(weights(recipe), weights(twin)))
    for _ in range(2):
        recipe.step(real, z), twin.step(real, z)
    assert all(torch.equal(a, b) for a, b in zip(weights(recipe), weights(twin)))


def test_set_capturable_moves_adam_step_counters_and_back():
    recipe = tiny_recipe()
    recipe.step(IMAGES[:32], torch.randn(32, 8))
    set_capturable(recipe.opt_g, False)
    steps = [s["step"] for s in recipe.opt_g.state.values()]
    assert all(s.device.type == "cpu" and s.dtype == torch.float32 and s.item() == 1 for s in steps)
    assert all(g["capturable"] is False for g in recipe.opt_g.param_groups)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe_name", ["baseline", "improved"])
def test_graphed_step_gives_the_eager_updates(device, recipe_name):
    """On CUDA the step is replayed as a CUDA graph; on a CPU (the T4 emulation) the same function runs
    its step eagerly on the static buffers, after the same warm-up and undo: the updates must be the eager
    step's (bit for bit on the CPU; within float32 rounding of the replayed kernels on CUDA)."""
    def build():
        if recipe_name == "baseline":
            return baseline_recipe(torch.device(device), 8, (16, 32), (16,), lr=2e-3)
        return improved_recipe(torch.device(device), 8, (16, 32), (16,))
    torch.manual_seed(0)
    eager, graphed = build(), build()
    graphed.G.load_state_dict(eager.G.state_dict()), graphed.D.load_state_dict(eager.D.state_dict())
    graphed.sampler.load_state_dict(eager.sampler.state_dict())
    if device == "cuda":
        for opt in (eager.opt_g, eager.opt_d):
            set_capturable(opt, True)
    fast = graphed_step(graphed, 32)  # on CUDA also switches graphed's optimizers to capturable
    losses = []
    for _ in range(5):
        real, z = IMAGES[:32].to(device), torch.randn(32, 8, device=device)
        out_eager, out_fast = eager.step(real, z), fast(real, z)
        losses.append((out_eager["loss/generator"].item(), out_fast["loss/generator"].item()))
    tensors = list(zip(weights(eager) + list(eager.sampler.state_dict().values()),
                       weights(graphed) + list(graphed.sampler.state_dict().values())))
    if device == "cpu":
        assert all(a == b for a, b in losses), losses
        assert all(torch.equal(a, b) for a, b in tensors)
    else:
        eps = torch.finfo(torch.float32).eps
        assert all(math.isclose(a, b, rel_tol=64 * eps) for a, b in losses), losses
        for a, b in tensors:
            bound = 1024 * eps * max(1.0, b.float().abs().max().item())
            assert (a.float() - b.float()).abs().max().item() <= bound


def test_choose_step_takes_the_graphed_path_under_t4_emulation_and_says_the_graph_is_skipped(
        monkeypatch, capsys):
    recipe = tiny_recipe()
    monkeypatch.setenv("EMULATE_T4", "0")
    assert choose_step(recipe, 32, torch.device("cpu")) == recipe.step
    assert "eager step on cpu" in capsys.readouterr().out
    monkeypatch.setenv("EMULATE_T4", "1")
    step = choose_step(recipe, 32, torch.device("cpu"))
    assert step != recipe.step and step.__qualname__.startswith("graphed_step")
    out = capsys.readouterr().out
    assert "EMULATE_T4:" in out and "CUDA graph" in out and "skipped on cpu" in out


def test_the_ablation_trains_its_variants_with_the_family_modules_and_scores_on_schedule(capsys):
    import ablate_gan  # experiments/ablate_gan.py

    from helpers import metrics

    recipe, averages = ablate_gan.variant_recipe("dropout+ttur+hinge+mbstd")
    assert isinstance(recipe, Recipe) and isinstance(recipe.G, Generator) and set(averages) == set(ablate_gan.AVERAGES)
    score = metrics.SampleQuality(metrics.MnistClassifier().eval(), IMAGES[:40], torch.device("cpu"))
    rows = ablate_gan.run("adam09", torch.rand(128, 1, 28, 28) * 2 - 1, score, iterations=5, every=3,
                          samples=50)
    assert [row["step"] for row in rows] == [3, 5]  # every 3 iterations, and at the end
    assert all(set(row) == {"step", "it_per_s", "G", *ablate_gan.AVERAGES} for row in rows)
    assert capsys.readouterr().out.count("adam09 {") == 2
