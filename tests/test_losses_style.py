"""Style-transfer losses of helpers.style.losses against values worked out by hand."""
import pytest
import torch

from helpers.style.losses import content_loss, gram_matrix, style_layer_loss, style_loss, total_variation_loss

# One image, two channels, two positions: channel 0 = [1, 2], channel 1 = [3, 4].
FEATURES = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)


def test_gram_matrix_is_divided_by_the_number_of_positions():
    # F F^T = [[1*1 + 2*2, 1*3 + 2*4], [3*1 + 4*2, 3*3 + 4*4]] = [[5, 11], [11, 25]]; M = 2 positions -> / 2.
    expected = torch.tensor([[[2.5, 5.5], [5.5, 12.5]]])
    assert torch.equal(gram_matrix(FEATURES), expected)


def test_gram_matrix_does_not_grow_with_image_size():
    # Tiling the 1x2 map to 2x2 doubles every sum F_i F_j and the number of positions: G is unchanged.
    tiled = FEATURES.repeat(1, 1, 2, 1)
    assert torch.allclose(gram_matrix(tiled), gram_matrix(FEATURES))


def test_gram_matrix_ignores_where_features_are():
    # Any rearrangement of positions (rotation, flip, shuffle) leaves G unchanged: no diversity from spatial moves.
    features = torch.randn(1, 4, 3, 5)
    shuffled = features.flatten(2)[..., torch.randperm(15)].view(1, 4, 3, 5)
    assert torch.allclose(gram_matrix(shuffled), gram_matrix(features), atol=1e-6)
    assert torch.allclose(gram_matrix(features.flip(-1).transpose(-1, -2)), gram_matrix(features), atol=1e-6)


def test_gram_matrix_rejects_flat_features():
    with pytest.raises(ValueError, match=r"expects feature maps \(B, N, H, W\)"):
        gram_matrix(torch.ones(2, 4))


def test_content_loss_is_the_mean_squared_difference():
    # F - P = [1, 2, 3, 4] - 0 -> squares 1, 4, 9, 16 -> mean 30 / 4 = 7.5.
    assert content_loss(FEATURES, torch.zeros_like(FEATURES)).item() == pytest.approx(7.5)
    # [1, 2] vs [3, 5]: differences -2, -3 -> (4 + 9) / 2 = 6.5.
    assert content_loss(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])).item() == pytest.approx(6.5)


def test_style_layer_loss_matches_the_paper_formula():
    # Paper: unnormalised G_hat = [[5, 11], [11, 25]], target 0, N = 2, M = 2:
    # E = (25 + 121 + 121 + 625) / (4 * 2^2 * 2^2) = 892 / 64 = 13.9375.
    zero_target = torch.zeros(1, 2, 2)
    assert style_layer_loss(FEATURES, zero_target).item() == pytest.approx(13.9375)


def test_style_loss_weights_layers():
    zero_target, own_target = torch.zeros(1, 2, 2), gram_matrix(FEATURES)
    # Default weights 1/2 each: (13.9375 + 0) / 2.
    assert style_loss([FEATURES, FEATURES], [zero_target, own_target]).item() == pytest.approx(6.96875)
    # Weights 2 and 1: 2 * 13.9375 + 0.
    assert style_loss([FEATURES, FEATURES], [zero_target, own_target], [2.0, 1.0]).item() == pytest.approx(27.875)


def test_style_loss_accepts_an_unbatched_target_gram():
    assert style_loss([FEATURES], [torch.zeros(2, 2)]).item() == pytest.approx(13.9375)


def test_style_loss_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="one target Gram per feature map"):
        style_loss([FEATURES, FEATURES], [torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="got 1 layer weights for 2 layers"):
        style_loss([FEATURES, FEATURES], [torch.zeros(2, 2)] * 2, [1.0])


def test_total_variation_loss_by_hand():
    # Image [[0, 1], [2, 4]]: vertical differences 2, 3 -> mean(4, 9) = 6.5; horizontal 1, 2 -> mean(1, 4) = 2.5.
    image = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).view(1, 1, 2, 2)
    assert total_variation_loss(image).item() == pytest.approx(9.0)
    assert total_variation_loss(torch.full((1, 3, 4, 4), 0.7)).item() == 0.0


def test_total_variation_loss_rejects_tiny_images():
    with pytest.raises(ValueError, match="H, W >= 2"):
        total_variation_loss(torch.ones(1, 3, 1, 5))


def test_losses_give_gradients_to_the_image():
    features = FEATURES.clone().requires_grad_(True)
    (content_loss(features, torch.zeros_like(features)) + style_loss([features], [torch.zeros(2, 2)])).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
