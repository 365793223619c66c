"""Notebook 07's diffusion family: schedules, sampling, guidance, the denoiser, training and resume, scoring."""
import json
import math

import numpy as np
import pytest
import torch

from helpers import metrics
from helpers.diffusion import evaluate as ev
from helpers.diffusion.data import CaptionTable, ClassLabels
from helpers.diffusion.model import AutoEncoder, CrossAttention, Denoiser, timestep_embedding
from helpers.diffusion.sample import ddim_sample, ddim_timesteps, ddpm_sample, guided_eps
from helpers.diffusion.schedule import NoiseSchedule, cosine_betas, linear_betas, predict_x0, q_sample
from helpers.diffusion.train import DenoiserPlan, DenoiserRun, train_denoiser
from helpers.environment import GpuChoices, T4_CAPABILITY

EPS32 = torch.finfo(torch.float32).eps
CPU = GpuChoices(torch.device("cpu"), None, False, False)
T4_ON_CPU = GpuChoices(torch.device("cpu"), T4_CAPABILITY, False, True)


def close(a, b, k=64):
    """|a - b| within k float32 epsilons of the reference's magnitude."""
    bound = k * EPS32 * max(1.0, float(torch.as_tensor(b).abs().max()))
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max()) <= bound


# --- schedules and the forward process -------------------------------------------------------------------


def test_linear_schedule_is_ddpms():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12) and betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert betas[1].item() - betas[0].item() == pytest.approx((0.02 - 1e-4) / 999, rel=1e-9)


def test_cosine_schedule_matches_its_alpha_bar_formula():
    steps, s = 1000, 0.008
    alpha_bar = torch.cumprod(1 - cosine_betas(steps), 0)
    f = lambda t: math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):  # below the cap of 0.999, the product telescopes to f(t + 1) / f(0)
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine_betas(steps).max().item() <= 0.999


def test_cosine_keeps_more_signal_in_the_middle_and_both_end_near_zero():
    linear, cosine = NoiseSchedule("linear", 1000), NoiseSchedule("cosine", 1000)
    assert cosine.alpha_bars[500] > linear.alpha_bars[500]
    assert linear.alpha_bars[-1] < 1e-4 and cosine.alpha_bars[-1] < 1e-4
    assert bool((cosine.alpha_bars[1:] < cosine.alpha_bars[:-1]).all())
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule("quadratic")


def test_q_sample_is_the_closed_form_and_predict_x0_inverts_it():
    schedule = NoiseSchedule("cosine", 100)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 5, 5, generator=g), torch.randn(4, 1, 5, 5, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    x_t = q_sample(schedule, x0, t, noise)
    for i, step in enumerate(t.tolist()):
        abar = schedule.alpha_bars[step].item()
        assert close(x_t[i], math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * noise[i])
    assert close(predict_x0(schedule, x_t[:3], t[:3], noise[:3]), x0[:3], k=4096)


# --- sampling ------------------------------------------------------------------------------------------------


def test_ddim_timesteps_run_from_the_last_step_down_to_zero():
    assert ddim_timesteps(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert len(ddim_timesteps(1000, 50)) == 50 and ddim_timesteps(1000, 1) == [999]
    with pytest.raises(ValueError):
        ddim_timesteps(100, 101)


@pytest.mark.parametrize("steps", [5, 20, 100])
def test_ddim_with_the_true_noise_gives_back_the_clean_image(steps):
    schedule = NoiseSchedule("linear", 100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 6, 6, generator=g) * 2 - 1
    x_T = q_sample(schedule, x0, torch.full((8,), 99), torch.randn(8, 1, 6, 6, generator=g))

    def true_eps(x, t):
        abar = schedule.at(schedule.alpha_bars, t, x)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    trajectory = []
    out = ddim_sample(true_eps, schedule, x_T, steps, trajectory=trajectory)
    assert len(trajectory) == steps
    assert close(out, x0, k=4096), (out - x0).abs().max()


def test_a_ddpm_step_draws_from_the_posterior_of_x0_and_x_t():
    """x_{t-1} = mu~(x_t, x_0) + sigma~ z with the textbook posterior mean and variance, when eps is true."""
    schedule = NoiseSchedule("linear", 2)
    x0, x_T = torch.tensor([[0.5, -0.25]]), torch.tensor([[1.0, 2.0]])
    seen = []

    def true_eps(x, t):
        seen.append(x.clone())
        abar = schedule.at(schedule.alpha_bars, t, x)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    ddpm_sample(true_eps, schedule, x_T, torch.Generator().manual_seed(3))
    b1, a1, ab1, ab0 = (schedule.betas[1].item(), schedule.alphas[1].item(), schedule.alpha_bars[1].item(),
                        schedule.alpha_bars[0].item())
    mean = math.sqrt(ab0) * b1 / (1 - ab1) * x0 + math.sqrt(a1) * (1 - ab0) / (1 - ab1) * x_T
    sigma = math.sqrt(b1 * (1 - ab0) / (1 - ab1))
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3))
    assert close(seen[1], mean + sigma * z, k=256), (seen[1], mean + sigma * z)


class Linear(torch.nn.Module):
    """eps = a x + b[label]: a model simple enough to compute guidance by hand."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x, t, labels):
        return 0.3 * x + self.bias[labels].view(-1, 1)


def test_guidance_with_w_zero_is_the_conditional_model_and_w_two_is_three_cond_minus_two_uncond():
    model, x, t = Linear(), torch.ones(2, 4), torch.zeros(2, dtype=torch.long)
    cond, null = {"labels": torch.tensor([0, 1])}, {"labels": torch.tensor([2, 2])}
    assert torch.equal(guided_eps(model, cond, null, 0.0)(x, t), model(x, t, **cond))
    by_hand = 3 * (0.3 + torch.tensor([[0.5], [-1.0]])) - 2 * (0.3 + 2.0)
    assert close(guided_eps(model, cond, null, 2.0)(x, t).detach(), by_hand.expand(2, 4))


# --- networks ------------------------------------------------------------------------------------------------


def test_timestep_embedding_is_cos_then_sin_of_t_times_geometric_frequencies():
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [10_000 ** (-k / 4) for k in range(4)]
    expected = [math.cos(7 * f) for f in freqs] + [math.sin(7 * f) for f in freqs]
    assert close(emb[1], torch.tensor(expected), k=16)


def perturbed(model):
    """A copy with its zero-initialised output layer given weights, so that outputs depend on inputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.out[-1].parameters():
            p.normal_(0, 0.1)
    return model


def test_the_denoiser_keeps_the_shape_and_starts_by_predicting_zero_noise():
    torch.manual_seed(0)
    pixel = Denoiser(1, (16, 32, 64), num_classes=10)
    latent = Denoiser(4, (32, 64), context_dim=12)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 5, 999])
    assert torch.equal(pixel(x, t, labels=torch.tensor([0, 3, 10])), torch.zeros_like(x))
    context, mask = torch.randn(3, 5, 12), torch.ones(3, 5, dtype=torch.bool)
    assert latent(torch.randn(3, 4, 7, 7), t, context=context, context_mask=mask).shape == (3, 4, 7, 7)


def test_cross_attention_ignores_padded_tokens_and_reads_real_ones():
    torch.manual_seed(0)
    model = perturbed(Denoiser(4, (32, 64), context_dim=12)).eval()
    x, t = torch.randn(2, 4, 7, 7), torch.tensor([100, 900])
    context, mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    base = model(x, t, context=context, context_mask=mask)
    padded = context.clone()
    padded[:, 3:] = 100.0  # only the padded tokens change
    assert torch.equal(model(x, t, context=padded, context_mask=mask), base)
    real = context.clone()
    real[:, 0] += 1.0  # a real token changes
    assert (model(x, t, context=real, context_mask=mask) - base).abs().max() > 1e-4


def test_cross_attention_is_a_softmax_over_tokens_added_to_the_input():
    torch.manual_seed(0)
    attn = CrossAttention(8, 3, heads=1).eval()
    x, context = torch.randn(1, 8, 2, 2), torch.randn(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 1]], dtype=torch.bool)
    q = attn.to_q(attn.norm(x).flatten(2).transpose(1, 2))
    k, v = attn.to_kv(context).chunk(2, -1)
    weights = ((q @ k.transpose(1, 2)) / math.sqrt(8)).masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    expected = x + attn.out(weights @ v).transpose(1, 2).reshape(1, 8, 2, 2)
    assert close(attn(x, context, mask).detach(), expected.detach(), k=256)
    assert weights[0, :, 2].abs().max() == 0


def test_autoencoder_maps_28_by_28_to_4_by_7_by_7_and_back_into_minus_one_one():
    ae = AutoEncoder(4)
    z = ae.encode(torch.randn(2, 1, 28, 28))
    assert z.shape == (2, 4, 7, 7) and ae.decode(z).shape == (2, 1, 28, 28)


# --- conditioning --------------------------------------------------------------------------------------------


def test_label_dropout_replaces_labels_by_no_class_at_the_asked_rate():
    labels = torch.arange(10_000) % 10
    out = ClassLabels(10).training_inputs(labels, torch.Generator().manual_seed(0), 0.1)["labels"]
    dropped = (out == 10).float().mean().item()
    assert abs(dropped - 0.1) < 5 * math.sqrt(0.1 * 0.9 / 10_000), dropped
    assert torch.equal(out[out != 10], labels[out != 10])


class WordTokenizer:
    """Splits on spaces; token i is the i-th word's vocabulary index, padded with 0 to max_length."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, captions, padding, truncation, max_length, return_tensors):
        ids = [[1] + [self.vocab.setdefault(w, len(self.vocab) + 2) for w in c.split()][:max_length - 1]
               for c in captions]
        mask = [[1] * len(i) + [0] * (max_length - len(i)) for i in ids]
        ids = [i + [0] * (max_length - len(i)) for i in ids]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


class TableEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(100, 6)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"last_hidden_state": self.table(input_ids)})()


def test_caption_table_picks_captions_of_the_class_and_the_empty_caption_when_dropped():
    torch.manual_seed(0)
    table = CaptionTable(WordTokenizer(), TableEncoder(), ["cat", "dog"], ["a {}", "one {} here"], length=6)
    assert table.captions == [["a cat", "one cat here"], ["a dog", "one dog here"]]
    labels = torch.tensor([0, 1, 1, 0])
    kept = table.training_inputs(labels, torch.Generator().manual_seed(0), 0.0)
    for i, label in enumerate(labels.tolist()):
        assert any(torch.equal(kept["context"][i], table.tokens[label, k]) for k in range(2))
    dropped = table.training_inputs(labels, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(dropped["context"], table.null_tokens.expand(4, -1, -1))
    assert dropped["context_mask"].sum(1).tolist() == [1] * 4  # "" keeps its start token
    assert torch.equal(table.prompt_inputs(["a dog"])["context"][0], table.tokens[1, 0])


# --- training: resume, reuse, the T4's fp16 path -----------------------------------------------------------


def tiny(steps, seed, choices=CPU):
    torch.manual_seed(seed)
    plan = DenoiserPlan(steps, 8, 1e-3, 0.1, 0.9, checkpoint_every=3)
    return DenoiserRun(Denoiser(4, (16, 32), num_classes=10), plan, choices)


def data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(64, 4, 7, 7, generator=g), torch.randint(10, (64,), generator=g)


def weights(run):
    return [t.clone() for t in [*run.model.state_dict().values(), *run.ema.state_dict().values()]]


def test_a_resumed_run_equals_a_straight_one_bit_for_bit(tmp_path, capsys):
    latents, labels = data()
    schedule, classes = NoiseSchedule("cosine", 50), ClassLabels(10)
    straight = train_denoiser(tiny(6, 0), schedule, latents, labels, classes, tmp_path / "a", {})
    train_denoiser(tiny(3, 0), schedule, latents, labels, classes, tmp_path / "b", {})
    resumed = train_denoiser(tiny(6, 99), schedule, latents, labels, classes, tmp_path / "b", {})
    assert "resuming from" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(weights(straight), weights(resumed)))
    assert resumed.record.step == 6 and resumed.record.stopwatch.iterations == 6


def test_a_finished_run_is_reused_not_trained_again(tmp_path, capsys):
    latents, labels = data()
    schedule, classes = NoiseSchedule("cosine", 50), ClassLabels(10)
    first = train_denoiser(tiny(3, 0), schedule, latents, labels, classes, tmp_path, {})
    again = train_denoiser(tiny(3, 7), schedule, latents, labels, classes, tmp_path, {})
    assert "reusing the finished run" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(weights(first), weights(again)))


def test_the_t4_path_trains_under_fp16_autocast_with_an_enabled_grad_scaler(tmp_path):
    latents, labels = data()
    run = tiny(4, 0, T4_ON_CPU)
    before = weights(run)
    train_denoiser(run, NoiseSchedule("cosine", 50), latents, labels, ClassLabels(10), tmp_path, {})
    assert run.scaler.is_enabled() and run.scaler.get_scale() > 0
    _, losses = run.record.history.series("loss/eps_mse")
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(run)))


def test_the_checkpoint_refuses_another_schedule(tmp_path):
    latents, labels = data()
    train_denoiser(tiny(3, 0), NoiseSchedule("cosine", 50), latents, labels, ClassLabels(10), tmp_path, {})
    with pytest.raises(Exception, match="another configuration"):
        train_denoiser(tiny(3, 0), NoiseSchedule("linear", 50), latents, labels, ClassLabels(10), tmp_path, {})


# --- sampling many images and scoring them -----------------------------------------------------------------


def test_diffusion_samples_are_balanced_finite_images_and_agreement_counts_the_asked_class():
    torch.manual_seed(0)
    model = perturbed(Denoiser(1, (16, 32), num_classes=10))
    labels = ev.balanced_labels(30)
    assert torch.bincount(labels).tolist() == [3] * 10
    images = ev.diffusion_samples(model, NoiseSchedule("cosine", 20), ClassLabels(10), labels, (1, 28, 28),
                                  ddim_sample, guided_eps, 5, 1.5, torch.device("cpu"), CPU, seed=0, batch=16)
    assert images.shape == (30, 1, 28, 28) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    classifier = metrics.MnistClassifier().eval()
    score = metrics.SampleQuality(classifier, torch.rand(40, 1, 28, 28) * 2 - 1, torch.device("cpu"))
    predicted = classifier(images).argmax(1)
    assert ev.score_with_labels(score, images, predicted)["agreement"] == 1.0
    wrong = ev.score_with_labels(score, images, (predicted + 1) % 10)
    assert wrong["agreement"] == 0.0 and wrong["fd"] == pytest.approx(score(images)["fd"], rel=1e-12)


def test_the_gan_rows_come_from_notebook_02s_full_run_when_there_is_one(tmp_path):
    classifier = metrics.MnistClassifier().eval()
    score = metrics.SampleQuality(classifier, torch.rand(40, 1, 28, 28) * 2 - 1, torch.device("cpu"))
    rows, caption = ev.gan_rows(tmp_path, score)
    assert rows == ev.GAN_REFERENCE and "reference values" in caption
    folder = tmp_path / "02_fashion_mnist_gan"
    folder.mkdir()
    fake = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    np.savez(folder / "samples.npz", images=fake, images_baseline=fake[::-1])
    (folder / "metrics.json").write_text(json.dumps({"mode": "full", "recipes": {"improved": {"seconds": 9.0}}}))
    rows, caption = ev.gan_rows(tmp_path, score)
    assert "your own" in caption and rows["improved GAN recipe"]["train_seconds"] == 9.0
    assert rows["improved GAN recipe"]["fd"] == pytest.approx(score(metrics.uint8_to_model_input(fake))["fd"])


def test_the_scoreboard_is_reused_only_with_the_same_settings(tmp_path):
    path = tmp_path / "scoreboard.json"
    board = ev.load_scoreboard(path, {"n": 10})
    board["rows"]["x"] = {"fd": 1.0}
    ev.save_scoreboard(path, board)
    assert ev.load_scoreboard(path, {"n": 10})["rows"] == {"x": {"fd": 1.0}}
    assert ev.load_scoreboard(path, {"n": 20})["rows"] == {}
    assert ev.fmt({"a": 0.5}, "a", ".1%") == "50.0%" and ev.fmt({}, "a", ".1%") == "–"


def test_the_weight_average_warms_up_so_a_short_run_does_not_sample_its_initial_weights(tmp_path):
    """With decay 0.999 from the first step, 300 steps leave 74 % of the initial weights in the average
    (0.999^300) and the samples are noise. The warm-up min(decay, (1 + step) / (10 + step)) forgets them."""
    latents, labels = data()
    run = tiny(30, 0)
    run = DenoiserRun(run.model, DenoiserPlan(30, 8, 1e-2, 0.1, 0.999, checkpoint_every=30), CPU)
    initial = [p.clone() for p in run.ema.parameters()]
    train_denoiser(run, NoiseSchedule("cosine", 50), latents, labels, ClassLabels(10), tmp_path, {})
    to_model = sum(float((e - p).norm()) for e, p in zip(run.ema.parameters(), run.model.parameters()))
    to_initial = sum(float((e - i).norm()) for e, i in zip(run.ema.parameters(), initial))
    assert to_model < to_initial, (to_model, to_initial)


def test_the_bench_case_times_the_taught_step_on_the_cpu():
    import bench_diffusion  # experiments/bench_diffusion.py

    rows = bench_diffusion.run(torch.device("cpu"), reduced=True)
    assert [r["baseline"] for r in rows] == [True] and rows[0]["notebook"] == "07"
    assert rows[0]["ms_per_step"] > 0 and rows[0]["it_per_s"] == pytest.approx(1000 / rows[0]["ms_per_step"])


def test_ddim_on_the_cosine_schedule_needs_its_x0_guess_clipped_when_the_noise_is_slightly_wrong():
    """At t = T - 1 the cosine schedule's alpha_bar is about 1e-8 (its last beta is capped at 0.999), so a
    small error in eps becomes a huge x0 guess. A network only predicts noise of the size it was trained
    on (here: the true noise, bounded by 4, plus a small error): unclipped samples blow up, clipped ones
    stay near the data."""
    schedule = NoiseSchedule("cosine", 1000)
    assert schedule.alpha_bars[-1] < 1e-7
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(16, 4, 7, 7, generator=g) * 2 - 1
    x_T = torch.randn(16, 4, 7, 7, generator=g)
    error = 0.05 * torch.randn(16, 4, 7, 7, generator=g)

    def slightly_wrong_eps(x, t):
        abar = schedule.at(schedule.alpha_bars, t, x)
        return ((x - abar.sqrt() * x0) / (1 - abar).sqrt()).clamp(-4, 4) + error

    unclipped = ddim_sample(slightly_wrong_eps, schedule, x_T, 20)
    clipped = ddim_sample(slightly_wrong_eps, schedule, x_T, 20, clip=1.0)
    assert unclipped.abs().max() > 50, unclipped.abs().max()
    assert (clipped - x0).abs().max() < 0.5, (clipped - x0).abs().max()
