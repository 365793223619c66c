"""GAN-CLS / GAN-INT losses of notebook 04 against values worked out by hand."""
import math

import pytest
import torch

from helpers.t2i.losses import (feature_matching_mse, gan_cls_discriminator_loss, gan_cls_generator_loss,
                                interpolate_embeddings, l1_image_loss, mode_seeking_loss)

LN3 = math.log(3.0)
EPS = torch.finfo(torch.float32).eps  # the losses are float32: bounds are a few roundings of the value


def test_discriminator_loss_at_zero_logits():
    # sigmoid(0) = 1/2, so every BCE term is ln 2: ln 2 + 1/2 (ln 2 + ln 2) = 2 ln 2 = 1.386294
    zero = torch.zeros(4)
    assert gan_cls_discriminator_loss(zero, zero, zero).item() == pytest.approx(2 * math.log(2), rel=4 * EPS)


def test_discriminator_loss_mixed_logits():
    # real/right logit ln 3 -> p = 3/4 -> -ln(3/4) = 0.287682; real/wrong logit 0 -> ln 2 = 0.693147;
    # fake/right logit -ln 3 -> p = 1/4 -> BCE to 0 = -ln(3/4) = 0.287682
    # total = 0.287682 + 0.5 * (0.693147 + 0.287682) = 0.778097
    loss = gan_cls_discriminator_loss(torch.tensor([LN3]), torch.tensor([0.0]), torch.tensor([-LN3]))
    expected = -math.log(0.75) + 0.5 * (math.log(2) - math.log(0.75))
    assert expected == pytest.approx(0.778097, abs=5e-7)            # the worked value above, to its 6 decimals
    assert loss.item() == pytest.approx(expected, rel=4 * EPS)


def test_discriminator_fake_terms_weigh_one_half():
    # real/right logit 100 -> loss ~0; real/wrong logit -100 -> ~0; fake/right logit 100 -> BCE to 0 = 100
    # so the loss is 1/2 * 100 = 50 (it would be 100 without the 1/2 weight)
    loss = gan_cls_discriminator_loss(torch.tensor([100.0]), torch.tensor([-100.0]), torch.tensor([100.0]))
    assert loss.item() == pytest.approx(50.0, rel=4 * EPS)
    # and the wrong-text term likewise: wrong logit 100 -> 1/2 * 100
    loss = gan_cls_discriminator_loss(torch.tensor([100.0]), torch.tensor([100.0]), torch.tensor([-100.0]))
    assert loss.item() == pytest.approx(50.0, rel=4 * EPS)


def test_generator_loss_by_hand():
    # logit ln 3 -> p = 3/4 -> -ln(3/4) = 0.287682; logit 0 -> ln 2 = 0.693147; mean over the batch
    assert gan_cls_generator_loss(torch.tensor([LN3, LN3])).item() == pytest.approx(-math.log(0.75), rel=4 * EPS)
    both = gan_cls_generator_loss(torch.tensor([LN3, 0.0]))
    assert both.item() == pytest.approx((-math.log(0.75) + math.log(2)) / 2, rel=4 * EPS)


def test_interpolation_values_and_errors():
    t1, t2 = torch.tensor([[2.0, 4.0]]), torch.tensor([[0.0, 8.0]])
    assert interpolate_embeddings(t1, t2).tolist() == [[1.0, 6.0]]            # 0.5*2+0.5*0, 0.5*4+0.5*8
    assert interpolate_embeddings(t1, t2, beta=0.25).tolist() == [[0.5, 7.0]]  # 0.25*2+0.75*0, 0.25*4+0.75*8
    with pytest.raises(ValueError, match=r"beta=1.5; GAN-INT interpolates"):
        interpolate_embeddings(t1, t2, beta=1.5)
    with pytest.raises(ValueError, match="cannot be interpolated"):
        interpolate_embeddings(t1, torch.zeros(1, 3))


def test_feature_matching_mse_by_hand():
    # batch means: fake [[1,3],[3,5]] -> [2,4]; real [[0,0],[2,2]] -> [1,1]; MSE = ((2-1)^2 + (4-1)^2) / 2 = 5
    fake = torch.tensor([[1.0, 3.0], [3.0, 5.0]], requires_grad=True)
    real = torch.tensor([[0.0, 0.0], [2.0, 2.0]], requires_grad=True)
    loss = feature_matching_mse(fake, real)
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    assert real.grad is None and fake.grad is not None


def test_l1_image_loss_by_hand():
    # |1 - 0| = 1, |-1 - 0.5| = 1.5, mean 1.25
    assert l1_image_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.5])).item() == pytest.approx(1.25)


def test_mode_seeking_loss_by_hand():
    # mean|f1 - f2| = (0.5 + 1.5) / 2 = 1; mean|z1 - z2| = (2 + 2) / 2 = 2; ratio 1/2; loss 1 / (0.5 + eps) = 2
    f1, f2 = torch.tensor([0.0, 1.0]), torch.tensor([0.5, -0.5])
    z1, z2 = torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0])
    assert mode_seeking_loss(f1, f2, z1, z2, eps=0.0).item() == pytest.approx(2.0)
    # identical images: ratio 0, loss 1 / eps, as large as the loss gets
    assert mode_seeking_loss(f1, f1, z1, z2, eps=1e-5).item() == pytest.approx(1e5)


def test_mode_seeking_cap_stops_the_push_beyond_it():
    # ratio 1/2 as above; a cap of 1/4 counts it as 1/4 -> loss 4, and no gradient pushes further apart
    f1 = torch.tensor([0.0, 1.0], requires_grad=True)
    f2, z1, z2 = torch.tensor([0.5, -0.5]), torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0])
    capped = mode_seeking_loss(f1, f2, z1, z2, cap=0.25, eps=0.0)
    assert capped.item() == pytest.approx(4.0)
    capped.backward()
    assert torch.equal(f1.grad, torch.zeros(2))
    assert mode_seeking_loss(f1, f2, z1, z2, cap=1.0, eps=0.0).item() == pytest.approx(2.0)   # below the cap
