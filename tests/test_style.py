"""helpers.style: image inputs and their errors, colour preservation, the objective, DFP and diversity."""
import copy
import functools
import hashlib
import http.server
import socket
import threading
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import downloads, style
from helpers.downloads import PROJECT_URL, DownloadError
from helpers.training import load_checkpoint, save_checkpoint
from helpers.vgg import VGG19Features

VGG19_PARAMETERS_TO_CONV5_1 = 12_944_960  # sum of (in * out * 9 + out) over conv1_1 ... conv5_1
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def close(actual, expected, k):
    """|actual - expected| <= k * eps(dtype) * max|expected|: a bound relative to the magnitude and the dtype."""
    eps = torch.finfo(expected.dtype).eps
    return torch.allclose(actual, expected, rtol=0, atol=k * eps * float(expected.abs().max()))


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
    image = style.load_image("skimage:chelsea", 90, "content image")  # 451 x 300 photo
    assert image.shape == (1, 3, 60, 90)


def test_skimage_source_equals_the_skimage_array():
    import skimage.data

    image = style.load_image("skimage:immunohistochemistry", 512)  # 512 x 512: no resize
    expected = torch.from_numpy(skimage.data.immunohistochemistry()).permute(2, 0, 1).float() / 255
    assert torch.equal(image[0], expected)


def test_unknown_skimage_name_says_what_to_pass():
    with pytest.raises(ValueError, match=r"style image 'skimage:starry': skimage\.data has no image 'starry'"):
        style.load_image("skimage:starry", 64, "style image")


def test_resize_long_side_of_a_tall_image():
    assert style.resize_long_side(Image.new("RGB", (100, 300)), 60).size == (20, 60)


def test_grayscale_image_becomes_three_equal_channels():
    image = style.load_image("skimage:gravel", 64, "style image")  # a 2-D (grayscale) array
    assert image.shape == (1, 3, 64, 64)
    assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 1], image[:, 2])
    assert image.std() > 0.05  # a texture, not a flat gray


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
    with pytest.raises(FileNotFoundError, match=r"content image 'nope\.jpg' not found; pass a full path, an http"):
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


@pytest.mark.parametrize("key", sorted(style.PAINTINGS))
def test_painting_urls_are_the_commons_files_their_pages_name(key):
    # upload.wikimedia.org/wikipedia/commons[/thumb]/a/ab/NAME[/1280px-NAME], where ab = md5(NAME)[:2].
    painting = style.PAINTINGS[key]
    url = urllib.parse.urlsplit(painting.url)
    assert (url.scheme, url.netloc) == ("https", "upload.wikimedia.org")
    parts = url.path.split("/")[3:]
    thumb = parts[0] == "thumb"
    a, ab, name = parts[thumb:thumb + 3]
    digest = hashlib.md5(urllib.parse.unquote(name).encode()).hexdigest()
    assert (a, ab) == (digest[0], digest[:2])
    assert urllib.parse.unquote(name) == painting.page.split("/wiki/File:")[1]
    assert parts[thumb + 3:] == ([f"1280px-{name}"] if thumb else [])
    assert painting.sources == (painting.url, f"{style.COMMONS}thumb/{a}/{ab}/{name}/960px-{name}")
    assert style.PAINTING_STAND_INS[key].startswith("skimage:")
    assert style.describe_source(painting.url) == f"{painting.title} ({painting.artist}, {painting.year})"


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    user_agents: list = []

    def do_GET(self):
        self.user_agents.append(self.headers["User-Agent"])
        super().do_GET()

    def log_message(self, *args):
        pass


def test_a_painting_url_is_downloaded_with_a_user_agent(tmp_path):
    # The Starry Night's Wikimedia path, served from a local server (this machine cannot reach Wikimedia).
    path = urllib.parse.urlsplit(style.PAINTINGS["starry_night"].url).path
    local_file = tmp_path / urllib.parse.unquote(path).lstrip("/")
    local_file.parent.mkdir(parents=True)
    Image.new("RGB", (1280, 1014), (20, 40, 200)).save(local_file, "JPEG")
    handler = functools.partial(RecordingHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        image = style.load_image(f"http://127.0.0.1:{server.server_port}{path}", 512, "style image")
    finally:
        server.shutdown()
    assert image.shape == (1, 3, 406, 512)
    assert RecordingHandler.user_agents[-1] == style.USER_AGENT
    assert "genimg-notebooks" in style.USER_AGENT and PROJECT_URL in style.USER_AGENT  # Wikimedia's policy


def serve(folder, handler=RecordingHandler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_painting_whose_first_source_fails_comes_from_the_second_and_is_cached(tmp_path, monkeypatch, capsys):
    # Wikimedia's addresses, rewritten to a local server that has only the 960 px copy of The Great Wave.
    served = tmp_path / "server"
    thumb = urllib.parse.unquote(urllib.parse.urlsplit(style.PAINTINGS["great_wave"].sources[1]).path)
    (served / thumb.lstrip("/")).parent.mkdir(parents=True)
    Image.new("RGB", (960, 645), (200, 30, 30)).save(served / thumb.lstrip("/"), "JPEG")
    server = serve(served)
    local = f"http://127.0.0.1:{server.server_port}/"
    monkeypatch.setattr(style, "PAINTINGS", {key: style.Painting(p.title, p.artist, p.year,
                                                                 p.url.replace("https://upload.wikimedia.org/", local),
                                                                 p.page)
                                             for key, p in style.PAINTINGS.items()})
    monkeypatch.setattr(style, "COMMONS", local + "wikipedia/commons/")
    try:
        path = style.fetch_painting("great_wave", tmp_path / "paintings")
        assert path == tmp_path / "paintings" / "great_wave.jpg" and Image.open(path).size == (960, 645)
        assert "trying the next source" in capsys.readouterr().out
        requests = len(RecordingHandler.user_agents)
        assert style.fetch_painting("great_wave", tmp_path / "paintings") == path  # the cached copy
        assert len(RecordingHandler.user_agents) == requests and "reusing" in capsys.readouterr().out
        with pytest.raises(DownloadError, match=r"painting 'The Scream' could not be downloaded from any of its 2"):
            style.fetch_painting("the_scream", tmp_path / "paintings")
    finally:
        server.shutdown()
    assert style.describe_source(path) == "The Great Wave off Kanagawa (Katsushika Hokusai, c. 1831)"


def test_torchvision_weights_are_downloaded_once_and_checked(tmp_path, monkeypatch):
    served = tmp_path / "server"
    served.mkdir()
    payload = b"not really weights"
    digest = hashlib.sha256(payload).hexdigest()
    (served / f"tiny-{digest[:8]}.pth").write_bytes(payload)
    (served / "tiny-00000000.pth").write_bytes(payload)
    server = serve(served)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    class Weights:
        url = f"http://127.0.0.1:{server.server_port}/tiny-{digest[:8]}.pth"

    class Damaged:
        url = f"http://127.0.0.1:{server.server_port}/tiny-00000000.pth"

    try:
        path = downloads.cache_torchvision_weights(Weights, "tiny weights")
        assert path == tmp_path / "hub" / "checkpoints" / f"tiny-{digest[:8]}.pth" and path.read_bytes() == payload
        requests = len(RecordingHandler.user_agents)
        assert downloads.cache_torchvision_weights(Weights, "tiny weights") == path
        assert len(RecordingHandler.user_agents) == requests  # found in the cache, not downloaded again
        with pytest.raises(DownloadError, match=r"tiny weights: the file from .* is damaged"):
            downloads.cache_torchvision_weights(Damaged, "tiny weights")
        assert not (tmp_path / "hub" / "checkpoints" / "tiny-00000000.pth").exists()
    finally:
        server.shutdown()


def test_a_server_that_never_answers_times_out_with_a_clear_error():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/painting.jpg"
        with pytest.raises(ConnectionError, match=r"style image '.*' could not be downloaded within 0.5 s .*timed out"):
            style.fetch_url(url, "style image", timeout=0.5)
    finally:
        silent.close()


def test_too_small_for_vgg_pooling():
    with pytest.raises(ValueError, match=r"content image 'skimage:chelsea' would be 30x20 px.*at least 32 px.*IMAGE_SIZE"):
        style.load_image("skimage:chelsea", 30, "content image")


def test_elongated_image_is_too_small_even_at_a_large_size(tmp_path):
    Image.new("RGB", (400, 20)).save(tmp_path / "strip.png")
    with pytest.raises(ValueError, match=r"would be 512x26 px"):
        style.load_image(tmp_path / "strip.png", 512, "style image")


# --- colour preservation --------------------------------------------------------------------------------------------


def test_yiq_round_trip_and_gray():
    images = torch.rand(2, 3, 5, 7)
    assert close(style.yiq_to_rgb(style.rgb_to_yiq(images)), images, 16)
    gray = style.rgb_to_yiq(torch.full((1, 3, 1, 1), 0.5)).flatten()
    assert close(gray, torch.tensor([0.5, 0.0, 0.0]), 8)


def test_keep_colours_takes_luminance_from_stylised_and_colour_from_content():
    # Red content: Y = 0.299. Gray stylised: Y = 0.5. Adding 0.5 - 0.299 = 0.201 to every channel of red gives
    # (1.201, 0.201, 0.201), clamped to (1, 0.201, 0.201).
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    result = style.keep_colours(torch.full((1, 3, 1, 1), 0.5), red).flatten()
    assert close(result, torch.tensor([1.0, 0.201, 0.201]), 16)


def test_luminance_image_matches_the_reference_statistics():
    style_image, content = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16) * 0.5 + 0.25
    gray = style.luminance_image(style_image, reference=content)
    y, y_ref = style.rgb_to_yiq(gray)[:, 0], style.rgb_to_yiq(content)[:, 0]
    assert torch.equal(gray[:, 0], gray[:, 2])
    assert close(y.mean(), y_ref.mean(), 64) and close(y.std(), y_ref.std(), 64)


# --- objective and optimisation -------------------------------------------------------------------------------------


def test_objective_is_zero_where_it_should_be(vgg):
    content, style_image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    objective = style.StyleObjective(vgg, content, style_image, beta=10.0)
    at_content = style.evaluate(objective, content)
    at_style = style.evaluate(objective, style_image)
    assert at_content["content"] == 0.0 and at_style["style"] == 0.0  # the same features give the same Grams
    assert at_style["content"] > 0 and at_content["style"] > 0
    assert at_content["total"] == pytest.approx(10.0 * at_content["style"], rel=1e-5)


def test_stylise_lowers_the_total_loss(vgg):
    torch.manual_seed(1)
    content, style_image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    objective = style.StyleObjective(vgg, content, style_image, beta=10.0, tau=1.0)
    for optimizer in ("lbfgs", "adam"):
        init = style.initial_image(content, "noise", seed=3)
        result = style.stylise(objective, init, steps=4, optimizer=optimizer)
        assert result.shape == content.shape
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


def _quadratic(n=40, seed=0):
    """0.5 x^T A x - b^T x with an ill-conditioned A (eigenvalues 0.1 ... 10), in float64."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-1, 1, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    return a, b, torch.randn(n, generator=generator, dtype=torch.float64)


def _lbfgs_path(make, steps, a, b, x0):
    x = torch.nn.Parameter(x0.clone())
    optimizer = make([x])

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * x @ a @ x - b @ x
        loss.backward()
        return loss

    path = []
    for _ in range(steps):
        optimizer.step(closure)
        path.append(x.detach().clone())
    return path


def test_sync_free_lbfgs_takes_the_steps_of_torch_lbfgs():
    # 12 iterations with a 5-pair history: the ring buffer wraps around twice.
    a, b, x0 = _quadratic()
    ours = _lbfgs_path(lambda p: style.SyncFreeLBFGS(p, lr=1.0, history_size=5), 12, a, b, x0)
    torchs = _lbfgs_path(lambda p: torch.optim.LBFGS(p, lr=1.0, max_iter=1, history_size=5), 12, a, b, x0)
    for step, (x_ours, x_torch) in enumerate(zip(ours, torchs)):
        assert close(x_ours, x_torch, 256), f"iteration {step + 1}"
    assert (ours[-1] - ours[0]).norm() > 0.1  # it did move


def test_sync_free_lbfgs_minimises_a_quadratic():
    a, b, x0 = _quadratic()
    x_star = torch.linalg.solve(a, b)
    path = _lbfgs_path(lambda p: style.SyncFreeLBFGS(p, history_size=10), 60, a, b, x0)
    assert (path[-1] - x_star).norm() < 1e-3 * (x0 - x_star).norm()


def test_sync_free_lbfgs_weights_a_pair_without_curvature_zero():
    # Along a linear loss y = 0: the pair is stored with rho = 0 and the step stays steepest descent.
    x = torch.nn.Parameter(torch.zeros(3))
    optimizer = style.SyncFreeLBFGS([x], lr=1.0)
    direction = torch.tensor([1.0, -2.0, 0.5])

    def closure():
        optimizer.zero_grad()
        loss = -(direction * x).sum()
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    state = optimizer.state[x]
    assert state["pairs"] == 2 and state["rho"][:2].tolist() == [0.0, 0.0]
    # step 1: (1 / |g|_1) g = g / 3.5; steps 2, 3: lr * g with H = 1
    assert close(x.detach(), direction * (1 / 3.5 + 2), 8)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_sync_free_lbfgs_on_the_style_objective_takes_torch_steps_at_first(vgg, channels_last):
    # The notebook's claim (section 10): in the first 3 iterations no pixel differs by more than 1e-4 of the
    # largest pixel change of one iteration. (Later, last-bit differences grow: see the next test.)
    torch.manual_seed(2)
    content, style_image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    extractor = copy.deepcopy(vgg).to(memory_format=torch.channels_last) if channels_last else vgg
    objective = style.StyleObjective(extractor, content, style_image, beta=400.0, tau=10.0)
    differences, largest_step = style.lockstep_differences(objective, style.initial_image(content, seed=1), 3)
    assert largest_step > 0.01  # the pixels did move
    assert max(differences) <= 1e-4 * largest_step


def test_one_bit_of_the_start_changes_the_final_loss_by_more_than_float_rounding(vgg):
    # Why the notebook no longer asserts "within 1 % of torch's loss" after 120 iterations: L-BFGS amplifies
    # last-bit differences. The same optimiser from starts one float32 step apart ends measurably apart.
    torch.manual_seed(3)
    content, style_image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    objective = style.StyleObjective(vgg, content, style_image, beta=400.0, tau=10.0)
    start = style.initial_image(content, seed=2)
    ends = [style.evaluate(objective, style.stylise(objective, x, steps=40))["total"]
            for x in (start, torch.nextafter(start, torch.ones_like(start)))]
    assert abs(ends[1] / ends[0] - 1) > 1000 * EPS32


def test_optimisation_step_returns_the_losses_as_device_tensors(vgg):
    content = torch.rand(1, 3, 32, 32)
    objective = style.StyleObjective(vgg, content, torch.rand(1, 3, 32, 32))
    image = style.StylisedImage(style.initial_image(content))
    losses = style.optimisation_step(objective, image, style.make_optimizer(image))
    assert set(losses) == {"content", "style", "tv", "total"}
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in losses.values())


def test_lbfgs_resumed_from_a_checkpoint_continues_the_same_run(vgg, tmp_path):
    content, style_image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    objective = style.StyleObjective(vgg, content, style_image, beta=400.0)

    def fresh():
        image = style.StylisedImage(style.initial_image(content, seed=4))
        return image, style.make_optimizer(image, history_size=3)

    image, optimizer = fresh()
    for _ in range(6):
        style.optimisation_step(objective, image, optimizer)
    straight = image().detach().clone()
    image, optimizer = fresh()
    for _ in range(4):
        style.optimisation_step(objective, image, optimizer)
    save_checkpoint(tmp_path / "run.pt", {"image": image, "optimizer": optimizer}, 4)
    image, optimizer = fresh()
    load_checkpoint(tmp_path / "run.pt", {"image": image, "optimizer": optimizer})
    for _ in range(2):
        style.optimisation_step(objective, image, optimizer)
    assert torch.equal(image().detach(), straight)


def test_sync_free_lbfgs_reads_nothing_back_to_the_host_and_torch_lbfgs_does(vgg):
    content = torch.rand(1, 3, 32, 32)
    objective = style.StyleObjective(vgg, content, torch.rand(1, 3, 32, 32), tau=1.0)
    reads = {}
    for name in ("lbfgs", "torch_lbfgs"):
        image = style.StylisedImage(style.initial_image(content))
        optimizer = style.make_optimizer(image, name, history_size=4)
        for _ in range(2):
            style.optimisation_step(objective, image, optimizer)
        with style.HostReadCounter() as counter:
            for _ in range(6):  # the history (4 pairs) fills and wraps around
                style.optimisation_step(objective, image, optimizer)
        reads[name] = counter.reads
    assert reads["lbfgs"] == 0 and reads["torch_lbfgs"] >= 6


def test_host_read_counter_counts_item_float_and_bool():
    x = torch.rand(3)
    with style.HostReadCounter() as counter:
        y = (x * 2).clamp(0, 1).sum()
        assert counter.reads == 0
        x.sum().item(), float(y), bool(y > 0)
    assert counter.reads == 3


def test_fp16_gradient_error_is_rounding_that_a_loss_scale_does_not_remove(vgg):
    # The notebook's advice (section 10): VGG in fp16 or bf16 moves the gradient by far more than float32
    # rounding, and a loss scale, which only fixes underflow, does not bring it back.
    content, style_image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    reference = style.StyleObjective(vgg, content, style_image, beta=400.0, tau=10.0)
    x = style.initial_image(content)
    assert style.autocast_gradient_error(reference, reference, x) == 0.0
    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        objective = style.StyleObjective(vgg, content, style_image, beta=400.0, tau=10.0, autocast=dtype)
        errors[dtype] = style.autocast_gradient_error(objective, reference, x)
        assert errors[dtype] > 1000 * EPS32
    assert errors[torch.bfloat16] > errors[torch.float16]  # 8 bits of mantissa against 11
    fp16 = style.StyleObjective(vgg, content, style_image, beta=400.0, tau=10.0, autocast=torch.float16)
    scaled = style.autocast_gradient_error(fp16, reference, x, loss_scale=2.0**7)
    assert scaled > 0.5 * errors[torch.float16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only on a GPU")
def test_optimisation_step_never_waits_for_the_gpu():
    torch.manual_seed(0)
    vgg_cuda = VGG19Features([*style.CONTENT_LAYERS, *style.STYLE_LAYERS], pretrained=False).cuda()
    content = torch.rand(1, 3, 64, 64, device="cuda")
    objective = style.StyleObjective(vgg_cuda, content, torch.rand(1, 3, 64, 64, device="cuda"), tau=1.0)
    image = style.StylisedImage(style.initial_image(content))
    optimizer = style.make_optimizer(image)
    style.optimisation_step(objective, image, optimizer)  # first step allocates the history
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            style.optimisation_step(objective, image, optimizer)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_run_key_changes_with_any_input_value_or_setting():
    content, style_image = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    key = style.run_key(content, style_image, steps=5, beta=400.0)
    assert style.run_key(content.clone(), style_image.clone(), beta=400.0, steps=5) == key
    nudged = content.clone()
    nudged[0, 0, 0, 0] += 1e-3
    assert style.run_key(nudged, style_image, steps=5, beta=400.0) != key
    assert style.run_key(content, style_image, steps=6, beta=400.0) != key
    assert style.run_key(content, style_image, steps=5, beta=40.0) != key


# --- DFP ------------------------------------------------------------------------------------------------------------


def test_feature_covariance_by_hand():
    # Channel 0 = [1, 3], channel 1 = [2, 2]: variances 1 and 0, covariance 0.
    features = torch.tensor([[1.0, 3.0], [2.0, 2.0]]).view(1, 2, 1, 2)
    assert style.feature_covariance(features).tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_random_orthogonal():
    z = style.random_orthogonal(6, torch.Generator().manual_seed(0))
    assert close(z @ z.T, torch.eye(6, dtype=z.dtype), 64)


def test_wct_and_dfp_keep_the_style_mean_and_covariance():
    generator = torch.Generator().manual_seed(0)
    content = torch.randn(1, 4, 8, 10, generator=generator)
    style_features = torch.randn(1, 4, 6, 9, generator=generator) * torch.tensor([3.0, 1.0, 0.5, 2.0]).view(1, 4, 1, 1)
    target = style.feature_covariance(style_features)
    plain = style.whitening_colouring(content, style_features)
    perturbed = style.whitening_colouring(content, style_features, style.random_orthogonal(4, generator))
    for output in (plain, perturbed):
        assert close(style.feature_covariance(output).float(), target.float(), 64)  # a float32 output
        assert close(output.mean(dim=(2, 3)), style_features.mean(dim=(2, 3)), 64)
    assert (plain - perturbed).abs().mean() > 0.1  # same statistics, different features: the source of diversity


def test_dfp_target_blends():
    generator = torch.Generator().manual_seed(1)
    content, style_features = torch.randn(1, 3, 5, 5, generator=generator), torch.randn(1, 3, 5, 5, generator=generator)
    z = style.random_orthogonal(3, generator)
    plain = style.whitening_colouring(content, style_features)
    assert close(style.dfp_target(content, style_features, z, lam=0.0, alpha=1.0), plain, 16)
    assert torch.equal(style.dfp_target(content, style_features, z, lam=0.6, alpha=0.0), content)
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


class Identity(torch.nn.Module):
    """A stand-in feature extractor with one layer: the image itself."""

    def forward(self, images):
        return [images]


def test_feature_diversity_by_hand(vgg):
    image = torch.rand(1, 3, 32, 32)
    assert style.feature_diversity(image.repeat(3, 1, 1, 1), vgg) == 0.0
    # Unit feature vectors (1, 0, 0), (0, 1, 0), (-1, 0, 0) at every position: squared distances 2, 4, 2.
    images = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [-3.0, 0, 0]]).view(3, 3, 1, 1).expand(3, 3, 4, 4)
    assert style.feature_diversity(images, Identity()) == pytest.approx(8 / 3, rel=4 * EPS32)
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


def test_relative_units_give_the_missing_fraction_of_the_energy():
    # The text's claim: a relative loss is the fraction of the target's energy that is missing. An image at half
    # the content has features P/2: content (1/2)^2 = 1/4. At half the style, Grams A/4: each style layer scores
    # w_l (3/4)^2, so the style term is (3/4)^2 (weights sum to 1); total = 1/4 + beta (3/4)^2 (no TV).
    extractor = ScaledImage(["relu4_2", "relu1_1", "relu2_1"])
    content, style_image = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    objective = style.StyleObjective(extractor, content, style_image, ["relu4_2"], ["relu1_1", "relu2_1"],
                                     beta=3.0)
    at_half_content, at_half_style = (style.evaluate(objective, x / 2) for x in (content, style_image))
    assert at_half_content["content"] == pytest.approx(0.25, rel=16 * EPS32)
    assert at_half_style["style"] == pytest.approx(0.5625, rel=16 * EPS32)
    assert at_half_content["total"] == pytest.approx(0.25 + 3.0 * at_half_content["style"], rel=16 * EPS32)
