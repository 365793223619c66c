"""Diffusion losses of notebook 06 (helpers/sd_lora/losses.py), checked against numbers worked out by hand."""
import pytest
import torch

from helpers.sd_lora.losses import diffusion_snr, noise_prediction_loss


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    # alpha_bar = 0.5 -> 0.5/0.5 = 1;  0.8 -> 0.8/0.2 = 4;  0.2 -> 0.2/0.8 = 0.25
    alphas_cumprod = torch.tensor([0.5, 0.8, 0.2])
    snr = diffusion_snr(alphas_cumprod, torch.tensor([0, 1, 2, 1]))
    assert torch.allclose(snr, torch.tensor([1.0, 4.0, 0.25, 4.0]))


def _pred_target():
    # item 0: errors (1, 2) -> mean square (1 + 4) / 2 = 2.5;  item 1: errors (2, 0) -> (4 + 0) / 2 = 2.0
    pred = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    return pred, torch.zeros_like(pred)


def test_plain_noise_prediction_mse():
    pred, target = _pred_target()
    # (2.5 + 2.0) / 2 = 2.25
    assert noise_prediction_loss(pred, target).item() == pytest.approx(2.25)


def test_min_snr_weighting_epsilon():
    pred, target = _pred_target()
    # SNR (10, 2), gamma 5: w = min(10, 5)/10 = 0.5 and min(2, 5)/2 = 1 -> (0.5 * 2.5 + 1 * 2.0) / 2 = 1.625
    loss = noise_prediction_loss(pred, target, snr=torch.tensor([10.0, 2.0]), gamma=5.0)
    assert loss.item() == pytest.approx(1.625)


def test_min_snr_weighting_v_prediction():
    pred, target = _pred_target()
    # w = min(10, 5)/(10 + 1) = 5/11 and min(2, 5)/(2 + 1) = 2/3 -> (2.5 * 5/11 + 2.0 * 2/3) / 2 = 1.2348485
    loss = noise_prediction_loss(pred, target, snr=torch.tensor([10.0, 2.0]), gamma=5.0, prediction_type="v_prediction")
    assert loss.item() == pytest.approx(1.2348485, rel=1e-6)


def test_loss_averages_over_all_non_batch_dimensions():
    # one item of shape (4, 2, 2) with errors all 3 -> 9; a second item with errors 0 -> mean (9 + 0) / 2 = 4.5
    pred = torch.cat([torch.full((1, 4, 2, 2), 3.0), torch.zeros(1, 4, 2, 2)])
    assert noise_prediction_loss(pred, torch.zeros_like(pred)).item() == pytest.approx(4.5)


def test_min_snr_needs_the_snr():
    pred, target = _pred_target()
    with pytest.raises(ValueError, match="min-SNR weighting needs the SNR"):
        noise_prediction_loss(pred, target, gamma=5.0)
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        noise_prediction_loss(pred, target, snr=torch.ones(2), gamma=5.0, prediction_type="sample")
