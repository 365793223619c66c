"""helpers.vgg: the features-only VGG19 matches torchvision's, layer names follow the papers, extraction by name."""
import pytest
import torch
from torchvision.models import vgg19

from helpers.vgg import VGG19Features, build_vgg19_features, vgg19_layer_names


def test_features_only_build_matches_torchvision_vgg19_features():
    ours, theirs = build_vgg19_features(), vgg19(weights=None).features
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_layer_names_follow_the_papers():
    names = vgg19_layer_names()
    assert len(names) == 37
    # torchvision indices used by pix2pixHD's VGG loss: relu1_1=1, relu2_1=6, relu3_1=11, relu4_1=20, relu5_1=29
    assert [names.index(n) for n in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")] == [1, 6, 11, 20, 29]
    assert names.index("conv4_2") == 21 and names[-1] == "pool5"


def test_extractor_returns_the_named_layers_in_order_with_avg_pooling():
    model = VGG19Features(["relu2_1", "conv1_1"], pretrained=False, pooling="avg")
    out = model(torch.rand(1, 3, 32, 32))
    assert [tuple(f.shape) for f in out] == [(1, 128, 16, 16), (1, 64, 32, 32)]
    assert any(isinstance(m, torch.nn.AvgPool2d) for m in model.body)
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_layer_is_refused_with_examples():
    with pytest.raises(ValueError, match="unknown VGG19 layer.*conv4_2"):
        VGG19Features(["conv6_1"], pretrained=False)


def test_pretrained_weights_download_through_helpers_downloads(monkeypatch):
    # the ImageNet weights come through helpers.downloads (timeout, the project's User-Agent, a clear error);
    # a failed download must say what to do, not hang or fall back to random weights
    from helpers import vgg as vgg_module
    from helpers.downloads import DownloadError

    calls = []

    def refuse(weights, role, *args, **kwargs):
        calls.append(weights.url)
        raise DownloadError(f"{role} could not be downloaded (test)")

    monkeypatch.setattr(vgg_module, "cache_torchvision_weights", refuse)
    with pytest.raises(RuntimeError, match="SMOKE=1"):
        vgg_module.load_vgg19_features(pretrained=True)
    assert calls == [vgg_module.VGG19_Weights.IMAGENET1K_V1.url]
