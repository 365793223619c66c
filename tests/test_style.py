"""helpers.style: image inputs and their errors, colour preservation, the objective, DFP and diversity."""
import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import style
from helpers.vgg import VGG19Features

REPO_ROOT = Path(__file__).resolve().parent.parent

ASSETS = REPO_ROOT / "assets"
VGG19_PARAMETERS_TO_CONV5_1 = 12_944_960  # sum of (in * out * 9 + out) over conv1_1 ... conv5_1


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return VGG19Features([*style.CONTENT_LAYERS, *style.STYLE_LAYERS], pretrained=False)


def test_vgg_extractor_for_style_transfer_has_the_paper_layers(vgg):
    assert sum(p.numel() for p in vgg.parameters()) == VGG19_PARAMETERS_TO_CONV5_1
    shapes = [tuple(f.shape) for f in vgg(torch.rand(1, 3, 32, 48))]
    assert shapes == [(1, 512, 4, 6), (1, 64, 32, 48), (1, 128, 16, 24), (1, 256, 8, 12), (1, 512, 4, 6),
                      (1, 512, 2, 3)]


# --- inputs ---------------------------------------------------------------------------------------------------------


def test_load_image_keeps_the_aspect_ratio():
    image = style.load_image(ASSETS / "chelsea.jpg", 90, "content image")  # 451 x 300 photo
    assert image.shape == (1, 3, 60, 90)
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_resize_long_side_of_a_tall_image():
    assert style.resize_long_side(Image.new("RGB", (100, 300)), 60).size == (20, 60)


def test_grayscale_image_becomes_three_equal_channels():
    image = style.load_image(ASSETS / "gravel.jpg", 64, "style image")  # an 'L' mode JPEG
    assert image.shape == (1, 3, 64, 64)
    assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 1], image[:, 2])


def test_rgba_is_flattened_onto_white(tmp_path):
    pixels = np.zeros((40, 40, 4), dtype=np.uint8)
    pixels[..., 0], pixels[:20, :, 3], pixels[20:, :, 3] = 255, 255, 0  # top: opaque red; bottom: transparent
    Image.fromarray(pixels, "RGBA").save(tmp_path / "rgba.png")
    image = style.load_image(tmp_path / "rgba.png", 40)
    assert image[0, :, 5, 5].tolist() == [1.0, 0.0, 0.0]
    assert image[0, :, 30, 5].tolist() == [1.0, 1.0, 1.0]


def test_sixteen_bit_gray_is_scaled_not_clipped():
    image = style.as_rgb_image(Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    half = np.array([[500, 1000]], dtype=np.uint16)
    assert style.as_rgb_image(Image.fromarray(half)).getpixel((0, 0))[0] == 127


def test_missing_file_names_the_input():
    with pytest.raises(FileNotFoundError, match=r"content image 'nope\.jpg' not found; put it in assets/"):
        style.load_image("nope.jpg", 64, "content image")


def test_unreadable_image_names_the_input(tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a picture")
    with pytest.raises(ValueError, match=r"style image '.*notes\.jpg' is not a readable image .*pass a JPEG, PNG"):
        style.load_image(fake, 64, "style image")


def test_failing_url_names_the_input():
    url = "http://127.0.0.1:9/missing.jpg"  # the discard port: connection refused at once
    with pytest.raises(ConnectionError, match=r"style image 'http://127\.0\.0\.1:9/missing\.jpg' could not be downl"):
        style.load_image(url, 64, "style image")


def test_image_by_url(tmp_path):
    Image.new("RGB", (80, 40), (0, 255, 0)).save(tmp_path / "green.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        image = style.load_image(f"http://127.0.0.1:{server.server_port}/green.png", 64, "content image")
        missing = f"http://127.0.0.1:{server.server_port}/gone.png"
        with pytest.raises(ConnectionError, match="could not be downloaded"):
            style.load_image(missing, 64, "content image")
    finally:
        server.shutdown()
    assert image.shape == (1, 3, 32, 64) and image[0, 1].min() == 1.0


def test_too_small_for_vgg_pooling():
    with pytest.raises(ValueError, match=r"content image '.*chelsea\.jpg' would be 30x20 px.*at least 32 px.*IMAGE_SIZE"):
        style.load_image(ASSETS / "chelsea.jpg", 30, "content image")


def test_elongated_image_is_too_small_even_at_a_large_size(tmp_path):
    Image.new("RGB", (400, 20)).save(tmp_path / "strip.png")
    with pytest.raises(ValueError, match=r"would be 512x26 px"):
        style.load_image(tmp_path / "strip.png", 512, "style image")


# --- colour preservation --------------------------------------------------------------------------------------------


def test_yiq_round_trip_and_gray():
    images = torch.rand(2, 3, 5, 7)
    assert torch.allclose(style.yiq_to_rgb(style.rgb_to_yiq(images)), images, atol=1e-5)
    gray = style.rgb_to_yiq(torch.full((1, 3, 1, 1), 0.5)).flatten()
    assert gray.tolist() == pytest.approx([0.5, 0.0, 0.0], abs=1e-6)


def test_keep_colours_takes_luminance_from_stylised_and_colour_from_content():
    # Red content: Y = 0.299. Gray stylised: Y = 0.5. Adding 0.5 - 0.299 = 0.201 to every channel of red gives
    # (1.201, 0.201, 0.201), clamped to (1, 0.201, 0.201).
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    result = style.keep_colours(torch.full((1, 3, 1, 1), 0.5), red).flatten()
    assert result.tolist() == pytest.approx([1.0, 0.201, 0.201], abs=1e-4)


def test_luminance_image_matches_the_reference_statistics():
    style_image, content = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16) * 0.5 + 0.25
    gray = style.luminance_image(style_image, reference=content)
    y, y_ref = style.rgb_to_yiq(gray)[:, 0], style.rgb_to_yiq(content)[:, 0]
    assert torch.equal(gray[:, 0], gray[:, 2])
    assert y.mean().item() == pytest.approx(y_ref.mean().item(), abs=1e-4)
    assert y.std().item() == pytest.approx(y_ref.std().item(), abs=1e-4)


# --- objective and optimisation -------------------------------------------------------------------------------------


def test_objective_is_zero_where_it_should_be(vgg):
    content, style_image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    objective = style.StyleObjective(vgg, content, style_image, style_weight=10.0)
    at_content = style.evaluate(objective, content)
    at_style = style.evaluate(objective, style_image)
    assert at_content["content"] == 0.0 and at_style["style"] < 1e-10
    assert at_style["content"] > 0 and at_content["style"] > 0
    assert at_content["total"] == pytest.approx(10.0 * at_content["style"], rel=1e-5)


def test_stylise_lowers_the_total_loss(vgg):
    torch.manual_seed(1)
    content, style_image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    objective = style.StyleObjective(vgg, content, style_image, style_weight=10.0, tv_weight=1.0)
    for optimizer in ("lbfgs", "adam"):
        init = style.initial_image(content, "noise", seed=3)
        result = style.stylise(objective, init, steps=4, optimizer=optimizer)
        assert result.shape == content.shape and 0.0 <= result.min() and result.max() <= 1.0
        assert style.evaluate(objective, result)["total"] < style.evaluate(objective, init)["total"]


def test_initial_image_and_optimizer_options():
    content = torch.rand(1, 3, 8, 8)
    assert torch.equal(style.initial_image(content, "noise", 5), style.initial_image(content, "noise", 5))
    assert not torch.equal(style.initial_image(content, "noise", 5), style.initial_image(content, "noise", 6))
    assert torch.equal(style.initial_image(content, "content"), content)
    with pytest.raises(ValueError, match="init must be 'noise'"):
        style.initial_image(content, "zeros")
    with pytest.raises(ValueError, match="optimizer must be 'lbfgs'"):
        style.make_optimizer(style.StylisedImage(content), "sgd")


# --- DFP ------------------------------------------------------------------------------------------------------------


def _covariance(features: torch.Tensor) -> torch.Tensor:
    flat = features.flatten(2)[0].double()
    centred = flat - flat.mean(dim=1, keepdim=True)
    return centred @ centred.T / flat.shape[1]


def test_random_orthogonal():
    z = style.random_orthogonal(6, torch.Generator().manual_seed(0))
    assert torch.allclose(z @ z.T, torch.eye(6, dtype=z.dtype), atol=1e-10)


def test_wct_and_dfp_keep_the_style_mean_and_covariance():
    generator = torch.Generator().manual_seed(0)
    content = torch.randn(1, 4, 8, 10, generator=generator)
    style_features = torch.randn(1, 4, 6, 9, generator=generator) * torch.tensor([3.0, 1.0, 0.5, 2.0]).view(1, 4, 1, 1)
    target = _covariance(style_features)
    plain = style.whitening_colouring(content, style_features)
    perturbed = style.whitening_colouring(content, style_features, style.random_orthogonal(4, generator))
    for output in (plain, perturbed):
        assert torch.allclose(_covariance(output), target, atol=1e-4)
        assert torch.allclose(output.mean(dim=(2, 3)), style_features.mean(dim=(2, 3)), atol=1e-5)
    assert (plain - perturbed).abs().mean() > 0.1  # same statistics, different features: the source of diversity


def test_dfp_target_blends():
    generator = torch.Generator().manual_seed(1)
    content, style_features = torch.randn(1, 3, 5, 5, generator=generator), torch.randn(1, 3, 5, 5, generator=generator)
    z = style.random_orthogonal(3, generator)
    plain = style.whitening_colouring(content, style_features)
    assert torch.allclose(style.dfp_target(content, style_features, z, lam=0.0, alpha=1.0), plain, atol=1e-6)
    assert torch.allclose(style.dfp_target(content, style_features, z, lam=0.6, alpha=0.0), content)
    with pytest.raises(ValueError, match=r"DFP's lam .* must lie in \[0, 1\], got 1.5"):
        style.dfp_target(content, style_features, z, lam=1.5)


def test_dfp_targets_differ_by_seed_and_repeat_by_seed(vgg):
    content, style_image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    first, again = (style.dfp_targets(vgg, content, style_image, seed=0) for _ in range(2))
    other = style.dfp_targets(vgg, content, style_image, seed=1)
    assert [t.shape for t in first] == [f.shape for f in vgg(content)][1:]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.allclose(a, b) for a, b in zip(first, other))


# --- diversity ------------------------------------------------------------------------------------------------------


def test_pixel_diversity_by_hand():
    # Gray levels 0, 0.5, 1: pairwise mean |difference| 0.5, 1, 0.5 -> mean 2/3.
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.5, 1.0)])
    assert style.pixel_diversity(images) == pytest.approx(2 / 3)


def test_feature_diversity(vgg):
    image = torch.rand(1, 3, 32, 32)
    assert style.feature_diversity(image.repeat(3, 1, 1, 1), vgg) == pytest.approx(0.0, abs=1e-9)
    value = style.feature_diversity(torch.rand(3, 3, 32, 32), vgg)
    assert 0.0 < value <= 4.0
    with pytest.raises(ValueError, match="at least 2 images"):
        style.pixel_diversity(image)


def test_lpips_diversity_averages_a_metric_over_pairs():
    # A stand-in "metric": |mean(a) - mean(b)|. Means 0, 0.5, 1 -> pairs 0.5, 1, 0.5 -> 2/3.
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.5, 1.0)])
    assert style.lpips_diversity(images, lambda a, b: (a.mean() - b.mean()).abs()) == pytest.approx(2 / 3)


class ScaledImage(torch.nn.Module):
    """A stand-in feature extractor: the map of layer k is (k + 1) x the image, so a black image gives zero maps."""

    def __init__(self, layers):
        super().__init__()
        self.layers = list(layers)

    def forward(self, images):
        return [(k + 1) * images for k in range(len(self.layers))]


def test_an_all_zero_feature_map_scores_one_in_relative_units():
    # The text's unit: each loss divided by its value for an all-zero feature map (content: mean(P^2); style layer
    # l: 1/4 mean(A_l^2)), so zero maps score exactly 1 for content and 1 for style (layer weights sum to 1).
    extractor = ScaledImage(["relu4_2", "relu1_1", "relu2_1"])
    content, style_image = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    objective = style.StyleObjective(extractor, content, style_image, ["relu4_2"], ["relu1_1", "relu2_1"],
                                     style_weight=3.0)
    losses = style.evaluate(objective, torch.zeros(1, 3, 8, 8))
    assert losses["content"] == pytest.approx(1.0, rel=1e-6)
    assert losses["style"] == pytest.approx(1.0, rel=1e-6)
    assert losses["total"] == pytest.approx(1.0 + 3.0 * 1.0, rel=1e-6)
