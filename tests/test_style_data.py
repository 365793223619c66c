"""helpers.style.data: content and style images by path, URL or skimage:NAME, the paintings and their downloads,
and the errors that name the input and say what to do."""
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

from helpers import downloads
from helpers.downloads import PROJECT_URL, DownloadError
from helpers.style import data


# --- inputs ---------------------------------------------------------------------------------------------------------


def test_load_image_keeps_the_aspect_ratio():
    image = data.load_image("skimage:chelsea", 90, "content image")  # 451 x 300 photo
    assert image.shape == (1, 3, 60, 90)


def test_skimage_source_equals_the_skimage_array():
    import skimage.data

    image = data.load_image("skimage:immunohistochemistry", 512)  # 512 x 512: no resize
    expected = torch.from_numpy(skimage.data.immunohistochemistry()).permute(2, 0, 1).float() / 255
    assert torch.equal(image[0], expected)


def test_unknown_skimage_name_says_what_to_pass():
    with pytest.raises(ValueError, match=r"style image 'skimage:starry': skimage\.data has no image 'starry'"):
        data.load_image("skimage:starry", 64, "style image")


def test_resize_long_side_of_a_tall_image():
    assert data.resize_long_side(Image.new("RGB", (100, 300)), 60).size == (20, 60)


def test_grayscale_image_becomes_three_equal_channels():
    image = data.load_image("skimage:gravel", 64, "style image")  # a 2-D (grayscale) array
    assert image.shape == (1, 3, 64, 64)
    assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 1], image[:, 2])
    assert image.std() > 0.05  # a texture, not a flat gray


def test_rgba_is_flattened_onto_white(tmp_path):
    pixels = np.zeros((40, 40, 4), dtype=np.uint8)
    pixels[..., 0], pixels[:20, :, 3], pixels[20:, :, 3] = 255, 255, 0  # top: opaque red; bottom: transparent
    Image.fromarray(pixels, "RGBA").save(tmp_path / "rgba.png")
    image = data.load_image(tmp_path / "rgba.png", 40)
    assert image[0, :, 5, 5].tolist() == [1.0, 0.0, 0.0]
    assert image[0, :, 30, 5].tolist() == [1.0, 1.0, 1.0]


def test_sixteen_bit_gray_is_scaled_not_clipped():
    image = data.as_rgb_image(Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    half = np.array([[500, 1000]], dtype=np.uint16)
    assert data.as_rgb_image(Image.fromarray(half)).getpixel((0, 0))[0] == 127


def test_missing_file_names_the_input():
    with pytest.raises(FileNotFoundError, match=r"content image 'nope\.jpg' not found; pass a full path, an http"):
        data.load_image("nope.jpg", 64, "content image")


def test_unreadable_image_names_the_input(tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a picture")
    with pytest.raises(ValueError, match=r"style image '.*notes\.jpg' is not a readable image .*pass a JPEG, PNG"):
        data.load_image(fake, 64, "style image")


def test_failing_url_names_the_input():
    url = "http://127.0.0.1:9/missing.jpg"  # the discard port: connection refused at once
    with pytest.raises(ConnectionError, match=r"style image 'http://127\.0\.0\.1:9/missing\.jpg' could not be downl"):
        data.load_image(url, 64, "style image")


def test_image_by_url(tmp_path):
    Image.new("RGB", (80, 40), (0, 255, 0)).save(tmp_path / "green.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        image = data.load_image(f"http://127.0.0.1:{server.server_port}/green.png", 64, "content image")
        missing = f"http://127.0.0.1:{server.server_port}/gone.png"
        with pytest.raises(ConnectionError, match="could not be downloaded"):
            data.load_image(missing, 64, "content image")
    finally:
        server.shutdown()
    assert image.shape == (1, 3, 32, 64) and image[0, 1].min() == 1.0


@pytest.mark.parametrize("key", sorted(data.PAINTINGS))
def test_painting_urls_are_the_commons_files_their_pages_name(key):
    # upload.wikimedia.org/wikipedia/commons[/thumb]/a/ab/NAME[/1280px-NAME], where ab = md5(NAME)[:2].
    painting = data.PAINTINGS[key]
    url = urllib.parse.urlsplit(painting.url)
    assert (url.scheme, url.netloc) == ("https", "upload.wikimedia.org")
    parts = url.path.split("/")[3:]
    thumb = parts[0] == "thumb"
    a, ab, name = parts[thumb:thumb + 3]
    digest = hashlib.md5(urllib.parse.unquote(name).encode()).hexdigest()
    assert (a, ab) == (digest[0], digest[:2])
    assert urllib.parse.unquote(name) == painting.page.split("/wiki/File:")[1]
    assert parts[thumb + 3:] == ([f"1280px-{name}"] if thumb else [])
    assert painting.sources == (painting.url, f"{data.COMMONS}thumb/{a}/{ab}/{name}/960px-{name}")
    assert data.PAINTING_STAND_INS[key].startswith("skimage:")
    assert data.describe_source(painting.url) == f"{painting.title} ({painting.artist}, {painting.year})"


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    user_agents: list = []

    def do_GET(self):
        self.user_agents.append(self.headers["User-Agent"])
        super().do_GET()

    def log_message(self, *args):
        pass


def test_a_painting_url_is_downloaded_with_a_user_agent(tmp_path):
    # The Starry Night's Wikimedia path, served from a local server (this machine cannot reach Wikimedia).
    path = urllib.parse.urlsplit(data.PAINTINGS["starry_night"].url).path
    local_file = tmp_path / urllib.parse.unquote(path).lstrip("/")
    local_file.parent.mkdir(parents=True)
    Image.new("RGB", (1280, 1014), (20, 40, 200)).save(local_file, "JPEG")
    handler = functools.partial(RecordingHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        image = data.load_image(f"http://127.0.0.1:{server.server_port}{path}", 512, "style image")
    finally:
        server.shutdown()
    assert image.shape == (1, 3, 406, 512)
    assert RecordingHandler.user_agents[-1] == downloads.USER_AGENT
    assert "genimg-notebooks" in downloads.USER_AGENT and PROJECT_URL in downloads.USER_AGENT  # Wikimedia's policy


def serve(folder, handler=RecordingHandler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_painting_whose_first_source_fails_comes_from_the_second_and_is_cached(tmp_path, monkeypatch, capsys):
    # Wikimedia's addresses, rewritten to a local server that has only the 960 px copy of The Great Wave.
    served = tmp_path / "server"
    thumb = urllib.parse.unquote(urllib.parse.urlsplit(data.PAINTINGS["great_wave"].sources[1]).path)
    (served / thumb.lstrip("/")).parent.mkdir(parents=True)
    Image.new("RGB", (960, 645), (200, 30, 30)).save(served / thumb.lstrip("/"), "JPEG")
    server = serve(served)
    local = f"http://127.0.0.1:{server.server_port}/"
    monkeypatch.setattr(data, "PAINTINGS", {key: data.Painting(p.title, p.artist, p.year,
                                                                 p.url.replace("https://upload.wikimedia.org/", local),
                                                                 p.page)
                                             for key, p in data.PAINTINGS.items()})
    monkeypatch.setattr(data, "COMMONS", local + "wikipedia/commons/")
    try:
        path = data.fetch_painting("great_wave", tmp_path / "paintings")
        assert path == tmp_path / "paintings" / "great_wave.jpg" and Image.open(path).size == (960, 645)
        assert "trying the next source" in capsys.readouterr().out
        requests = len(RecordingHandler.user_agents)
        assert data.fetch_painting("great_wave", tmp_path / "paintings") == path  # the cached copy
        assert len(RecordingHandler.user_agents) == requests and "reusing" in capsys.readouterr().out
        with pytest.raises(DownloadError, match=r"painting 'The Scream' could not be downloaded from any of its 2"):
            data.fetch_painting("the_scream", tmp_path / "paintings")
    finally:
        server.shutdown()
    assert data.describe_source(path) == "The Great Wave off Kanagawa (Katsushika Hokusai, c. 1831)"


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
            data.fetch_url(url, "style image", timeout=0.5)
    finally:
        silent.close()


def test_too_small_for_vgg_pooling():
    with pytest.raises(ValueError, match=r"content image 'skimage:chelsea' would be 30x20 px.*at least 32 px.*IMAGE_SIZE"):
        data.load_image("skimage:chelsea", 30, "content image")


def test_elongated_image_is_too_small_even_at_a_large_size(tmp_path):
    Image.new("RGB", (400, 20)).save(tmp_path / "strip.png")
    with pytest.raises(ValueError, match=r"would be 512x26 px"):
        data.load_image(tmp_path / "strip.png", 512, "style image")
