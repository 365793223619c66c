"""The seed-003 GAN: parameter counts by hand, shapes, one step, and a short run that must learn."""
import pytest
import torch

from helpers.mnist_gan import Discriminator, Generator, batches, generate, train_step


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_generator_parameter_count_by_hand():
    # Linear 100->128: 12,928 ; 128->256: 33,024 + BN 512 ; 256->512: 131,584 + BN 1,024 ;
    # 512->1024: 525,312 + BN 2,048 ; 1024->784: 803,600 ; total 1,510,032
    assert count(Generator(100)) == 1_510_032


def test_discriminator_parameter_count_by_hand():
    # Linear 784->512: 401,920 ; 512->256: 131,328 ; 256->1: 257 ; total 533,505
    assert count(Discriminator()) == 533_505


def test_shapes_and_ranges():
    G, D = Generator(16), Discriminator()
    images = G(torch.randn(5, 16))
    assert images.shape == (5, 1, 28, 28) and images.abs().max() <= 1
    prob = D(images)
    assert prob.shape == (5, 1) and ((prob > 0) & (prob < 1)).all()


def test_generate_is_repeatable_for_a_seed():
    G = Generator(8)
    assert torch.equal(generate(G, 10, torch.device("cpu"), seed=3), generate(G, 10, torch.device("cpu"), seed=3))
    assert not torch.equal(generate(G, 10, torch.device("cpu"), seed=3), generate(G, 10, torch.device("cpu"), seed=4))


def test_batches_cover_the_data_once_without_the_last_partial_batch():
    data = torch.arange(10).float()
    out = batches(data, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in out] == [4, 4]
    assert len(set(torch.cat(out).tolist())) == 8


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
        out = train_step(G, D, opt_g, opt_d, real)
    end = (G.eval()(torch.randn(64, 8)).mean() - 0.8).abs().item()
    assert end < 0.5 * start, (start, end)
    assert set(out) == {"loss/generator", "loss/discriminator", "D(x)/real", "D(x)/fake"}
