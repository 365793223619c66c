"""pix2pixHD losses (helpers.pix2pixhd.losses; the LSGAN losses of helpers.losses), checked against numbers worked
out by hand."""
from __future__ import annotations

import pytest
import torch

from helpers.losses import lsgan_discriminator_loss
from helpers.pix2pixhd.losses import (PIX2PIXHD_VGG_WEIGHTS, feature_matching_loss, pix2pixhd_generator_loss,
                                      vgg_loss)


def full(value: float, shape=(1, 1, 2, 2)) -> torch.Tensor:
    return torch.full(shape, float(value))


def test_feature_matching_weights_every_layer_and_scale():
    # 2 scales, each [layer 0, layer 1, prediction] -> n_layers + 2 = 3, so n_layers = 1:
    # weight per layer = (1/num_D) * 4/(n_layers+1) = 1/2 * 4/2 = 1.
    # scale 0: layer 0 |3 - 1| = 2; layer 1 |[0,0,0,0] - [1,-1,0,0]| mean = 0.5
    # scale 1: layer 0 |1 - 0| = 1; layer 1 equal = 0; predictions (9 vs 0) are not matched
    # L_FM = 2 + 0.5 + 1 + 0 = 3.5; times lambda_feat 10 = 35
    fake = [[full(3), full(0), full(9)], [full(1), full(5), full(9)]]
    real = [[full(1), torch.tensor([[[[1.0, -1.0], [0.0, 0.0]]]]), full(0)], [full(0), full(5), full(0)]]
    assert feature_matching_loss(fake, real).item() == pytest.approx(35.0)
    assert feature_matching_loss(fake, real, lambda_feat=1.0).item() == pytest.approx(3.5)


def test_feature_matching_at_official_defaults():
    # num_D 3, n_layers 3 -> 5 outputs per scale, 4 matched layers, weight (1/3)*(4/4) = 1/3 each;
    # every matched layer differs by 0.3: 3 scales * 4 layers * 0.3 * 1/3 = 1.2; times 10 = 12
    fake = [[full(0.3)] * 4 + [full(7)] for _ in range(3)]
    real = [[full(0.0)] * 4 + [full(0)] for _ in range(3)]
    assert feature_matching_loss(fake, real).item() == pytest.approx(12.0)


def test_feature_matching_trains_generator_only():
    fake = [[full(1).requires_grad_(), full(0)]]
    real = [[full(0).requires_grad_(), full(0)]]
    feature_matching_loss(fake, real).backward()
    assert real[0][0].grad is None
    # d/dfake of 10 * (4/1) * mean|fake - real| over 4 pixels = 10 * 4 / 4 = 10 per pixel
    assert torch.allclose(fake[0][0].grad, full(10.0))


def test_feature_matching_shape_errors():
    with pytest.raises(ValueError, match="same number of scales"):
        feature_matching_loss([[full(0), full(0)]], [])
    with pytest.raises(ValueError, match=">= 2"):
        feature_matching_loss([[full(0)]], [[full(0)]])


def test_vgg_loss_layer_weights():
    # differences 32, 16, 8, 4, 1 at relu1_1 .. relu5_1, weights 1/32, 1/16, 1/8, 1/4, 1: each term is 1,
    # sum 5, times lambda_vgg 10 = 50
    assert PIX2PIXHD_VGG_WEIGHTS == (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1)
    fake = [full(v) for v in (32, 16, 8, 4, 1)]
    real = [full(0)] * 5
    assert vgg_loss(fake, real).item() == pytest.approx(50.0)
    # only relu5_1 differs by 0.5: 10 * 1 * 0.5 = 5; only relu1_1: 10 * 0.5 / 32 = 0.15625
    assert vgg_loss([full(0)] * 4 + [full(0.5)], real).item() == pytest.approx(5.0)
    assert vgg_loss([full(0.5)] + [full(0)] * 4, real).item() == pytest.approx(0.15625)
    with pytest.raises(ValueError, match="one weight per layer"):
        vgg_loss(fake[:3], real)


def test_generator_total_and_terms():
    # 3 scales; predictions on the fake = 0 -> LSGAN G term (0 - 1)^2 = 1 per scale, summed = 3 (no 1/2 factor)
    # FM: one matched layer per scale (n_layers 0 -> weight 4/1 * 1/3), difference 0.5: 3 * 4/3 * 0.5 * 10 = 20
    # VGG: as above, 50. Total 3 + 20 + 50 = 73.
    d_fake = [[full(0.5), full(0)] for _ in range(3)]
    d_real = [[full(0.0), full(1)] for _ in range(3)]
    vgg_fake, vgg_real = [full(v) for v in (32, 16, 8, 4, 1)], [full(0)] * 5
    terms = pix2pixhd_generator_loss(d_fake, d_real, vgg_fake, vgg_real)
    assert {k: round(v.item(), 5) for k, v in terms.items()} == {"gan": 3.0, "fm": 20.0, "vgg": 50.0, "total": 73.0}
    gan_only = pix2pixhd_generator_loss(d_fake, d_real, vgg_fake, vgg_real, lambda_feat=0, lambda_vgg=0)
    assert gan_only["total"].item() == 3.0 and gan_only["fm"].item() == 0 and gan_only["vgg"].item() == 0
    assert pix2pixhd_generator_loss(d_fake, d_real)["total"].item() == pytest.approx(23.0)


def test_discriminator_loss_on_the_last_output_of_each_scale():
    # D(real) = 0.5 on both scales: (0.5 - 1)^2 = 0.25 each -> 0.5; D(fake) = 0.5: 0.25 each -> 0.5;
    # L_D = 0.5 * (0.5 + 0.5) = 0.5
    d_real = [[full(3), full(0.5)], [full(3), full(0.5)]]
    d_fake = [[full(3), full(0.5)], [full(3), full(0.5)]]
    loss = lsgan_discriminator_loss([s[-1] for s in d_real], [s[-1] for s in d_fake])
    assert loss.item() == pytest.approx(0.5)
