"""BCE (seed 003) and LSGAN losses against numbers worked out by hand."""
import math

import pytest
import torch

from helpers.losses import (bce_discriminator_loss, bce_generator_loss, lsgan_discriminator_loss,
                            lsgan_generator_loss)

D_REAL = torch.tensor([[0.9], [0.6]])
D_FAKE = torch.tensor([[0.2], [0.5]])


def test_bce_discriminator_loss_is_mean_of_real_and_fake_terms():
    # real_loss = -(ln 0.9 + ln 0.6)/2 = (0.1053605 + 0.5108256)/2 = 0.3080931
    # fake_loss = -(ln 0.8 + ln 0.5)/2 = (0.2231436 + 0.6931472)/2 = 0.4581454
    # d_loss = (0.3080931 + 0.4581454)/2 = 0.3831192
    assert bce_discriminator_loss(D_REAL, D_FAKE).item() == pytest.approx(0.3831192, abs=1e-6)


def test_bce_generator_loss_labels_fakes_real():
    # g_loss = -(ln 0.2 + ln 0.5)/2 = (1.6094379 + 0.6931472)/2 = 1.1512925
    assert bce_generator_loss(D_FAKE).item() == pytest.approx(1.1512925, abs=1e-6)


def test_bce_losses_at_the_equilibrium_are_ln2():
    half = torch.full((4, 1), 0.5)
    assert bce_discriminator_loss(half, half).item() == pytest.approx(math.log(2))
    assert bce_generator_loss(half).item() == pytest.approx(math.log(2))


def test_bce_discriminator_loss_is_not_symmetric_in_its_arguments():
    # swapping real and fake must change the loss: a test that catches swapped labels
    assert bce_discriminator_loss(D_FAKE, D_REAL).item() != pytest.approx(0.3831192, abs=1e-3)


def test_lsgan_discriminator_single_scale():
    # real: ((0.8-1)^2 + (1.2-1)^2)/2 = 0.04 ; fake: (0.3^2 + 0.1^2)/2 = 0.05 ; 0.5*(0.04+0.05) = 0.045
    real, fake = torch.tensor([0.8, 1.2]), torch.tensor([0.3, -0.1])
    assert lsgan_discriminator_loss(real, fake).item() == pytest.approx(0.045)


def test_lsgan_discriminator_sums_over_scales():
    # second scale: real (0+0+0+1)/4 = 0.25, fake 0.5^2 = 0.25 ; 0.5*(0.04+0.25+0.05+0.25) = 0.295
    reals = [torch.tensor([0.8, 1.2]), torch.tensor([1.0, 1.0, 1.0, 0.0])]
    fakes = [torch.tensor([0.3, -0.1]), torch.tensor([0.5])]
    assert lsgan_discriminator_loss(reals, fakes).item() == pytest.approx(0.295)


def test_lsgan_generator_loss():
    # ((0.3-1)^2 + (-0.1-1)^2)/2 = (0.49 + 1.21)/2 = 0.85 ; two scales add: 0.85 + (0.5-1)^2 = 1.1
    assert lsgan_generator_loss(torch.tensor([0.3, -0.1])).item() == pytest.approx(0.85)
    assert lsgan_generator_loss([torch.tensor([0.3, -0.1]), torch.tensor([0.5])]).item() == pytest.approx(1.1)
