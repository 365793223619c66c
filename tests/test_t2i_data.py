"""helpers.t2i.shapes, data and flowers: the captioned shapes set, batches with right and wrong captions and
packs of one caption, and Oxford-102 Flowers with Reed et al.'s captions (loading and downloads)."""
import hashlib
import http.server
import io
import tarfile
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import downloads
from helpers.downloads import USER_AGENT, DownloadError
from helpers.t2i import flowers
from helpers.t2i.data import MEAN_Z_DISTANCE, mismatched_captions, same_caption_pixel_distance, sample_batch
from helpers.t2i.evaluate import within_caption_spread
from helpers.t2i.flowers import (FLOWERS_CAPTIONS_ENV, FlowersWithCaptions, download_flowers102,
                                 download_flowers_captions, flowers_class_split, load_flowers_captions)
from helpers.t2i.shapes import (COLOURS, CaptionedImageSet, all_combinations, describe, make_shapes,
                                real_images_per_combination, render_shape, split_combinations)


def test_shapes_captions_and_split():
    assert len(all_combinations()) == 96                   # 4 colours x 3 shapes x 2 sizes x 4 positions
    assert describe((0, 0, 0, 0)) == "a small red circle in the top left on a white background"
    assert describe((3, 2, 1, 3), 1) == "a yellow triangle, big, in the bottom right corner"
    train, test = split_combinations(0.2, seed=0)
    assert (len(train), len(test)) == (77, 19) and not set(train) & set(test)   # round(96 * 0.2) = 19
    with pytest.raises(ValueError, match="template 9 does not exist"):
        describe((0, 0, 0, 0), 9)


def test_render_shape_places_colour_where_the_caption_says():
    image = render_shape((2, 1, 1, 3), 64)                 # large blue square, bottom right
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    blue = (image == np.array(COLOURS["blue"])).all(-1)
    ys, xs = np.nonzero(blue)
    assert ys.mean() > 32 and xs.mean() > 32 and blue.sum() > 400
    assert (image[0, 0] == 255).all()


def test_make_shapes_and_mismatched_captions():
    data = make_shapes(20, all_combinations(), image_size=32, seed=0, captions_per_image=3)
    assert data.images.shape == (20, 3, 32, 32)
    for image, attrs in zip(data.images, data.attributes.tolist()):   # each image shows its caption's colour
        colour = torch.tensor(list(COLOURS.values())[attrs[0]]).float() / 127.5 - 1
        assert (image.permute(1, 2, 0) == colour).all(-1).sum() > 10
    for ids, attrs in zip(data.caption_ids, data.attributes.tolist()):
        assert [data.captions[i] for i in ids] == [describe(attrs, t) for t in range(3)]
    images, right, wrong, labels = sample_batch(data, 64, torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32) and labels.shape == (64, 4) and data.class_counts == (4, 3, 2, 4)
    for caption_id, attrs in zip(right.tolist(), labels.tolist()):   # the labels are the right caption's
        assert data.captions[caption_id] in [describe(attrs, t) for t in range(3)]
    assert (data.caption_groups[right] != data.caption_groups[wrong]).all()
    with pytest.raises(ValueError, match="at least two groups"):
        mismatched_captions(torch.zeros(3, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                            torch.Generator())


def test_real_shapes_of_one_caption_differ_and_stay_in_their_corner():
    real = real_images_per_combination([(2, 1, 1, 3)], 6, 64, seed=0)   # large blue square, bottom right
    assert real.shape == (1, 6, 3, 64, 64) and within_caption_spread(real).item() > 0.05
    blue = (real[0] * 127.5 + 127.5).round().permute(0, 2, 3, 1).eq(torch.tensor(COLOURS["blue"])).all(-1)
    ys, xs = blue.nonzero()[:, 1], blue.nonzero()[:, 2]
    assert ys.float().mean() > 32 and xs.float().mean() > 32


def test_same_caption_pixel_distance_by_hand():
    # group 0: an all-black and an all-white image (|(-1) - 1| = 2 at every pixel); group 1: two equal images
    images = torch.stack([-torch.ones(3, 4, 4), torch.ones(3, 4, 4), torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)])
    data = CaptionedImageSet(images, [[0], [0], [1], [1]], torch.tensor([0, 0, 1, 1]), ["a", "b"],
                             torch.tensor([0, 1]))
    distance = same_caption_pixel_distance(data, 200, torch.Generator().manual_seed(0))
    assert 0.8 < distance < 1.2            # about half the pairs are 2 apart, the other half 0
    only = CaptionedImageSet(images[:2], [[0], [1]], torch.tensor([0, 1]), ["a", "b"], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="only one of its group"):
        same_caption_pixel_distance(only, 1, torch.Generator())
    torch.manual_seed(0)
    assert MEAN_Z_DISTANCE == pytest.approx(torch.randn(200_000).sub(torch.randn(200_000)).abs().mean().item(),
                                            rel=0.01)


def test_packs_hold_images_of_one_group():
    # image i is filled with i / 100 and belongs to group i % 3: a pack's second image must be another
    # image (other value) of the same group
    images = torch.arange(12.0).div(100).view(12, 1, 1, 1).expand(12, 3, 4, 4)
    groups = torch.arange(12) % 3
    data = CaptionedImageSet(images, [[int(g)] for g in groups], groups, ["a", "b", "c"],
                             torch.arange(3), attributes=torch.zeros(12, 4, dtype=torch.long))
    packs, right, _, _ = sample_batch(data, 32, torch.Generator().manual_seed(0), pack=2)
    assert packs.shape == (32, 6, 4, 4)
    first, second = (packs[:, c, 0, 0].mul(100).round().long() for c in (0, 3))
    assert (first != second).all() and (groups[first] == groups[second]).all()
    assert (right == groups[first]).all()           # caption id k belongs to group k here


def test_flowers_captions_and_class_split(tmp_path):
    folder = tmp_path / "cvpr2016_flowers" / "text_c10" / "class_00001"
    folder.mkdir(parents=True)
    (folder / "image_06734.txt").write_text("this flower has pink petals\n\nthe petals are wide\n")
    captions = load_flowers_captions(tmp_path)
    assert captions == {"image_06734": ["this flower has pink petals", "the petals are wide"]}
    train, test = flowers_class_split(tmp_path, n_test=20, seed=0)
    assert (len(train), len(test)) == (82, 20) and sorted(train + test) == list(range(102))
    (tmp_path / "cvpr2016_flowers" / "trainvalclasses.txt").write_text("class_00002\nclass_00005\n")
    (tmp_path / "cvpr2016_flowers" / "testclasses.txt").write_text("class_00001\n")
    assert flowers_class_split(tmp_path) == ([1, 4], [0])
    with pytest.raises(FileNotFoundError, match="no text_c10 folder"):
        load_flowers_captions(tmp_path / "cvpr2016_flowers" / "text_c10" / "class_00001")


def test_flowers_dataset_matches_captions_by_file_stem(tmp_path, monkeypatch):
    from PIL import Image
    from torchvision import datasets

    files = []
    for i in (1, 2, 3):
        path = tmp_path / f"image_{i:05d}.jpg"
        Image.new("RGB", (90, 80), (200, 20 * i, 0)).save(path)
        files.append(path)

    class FakeFlowers102:
        """torchvision's Flowers102 as seen by the loader: one image per official split."""

        def __init__(self, root, split, download):
            k = ("train", "val", "test").index(split)
            self._image_files, self._labels = [files[k]], [[0, 0, 5][k]]

    monkeypatch.setattr(datasets, "Flowers102", FakeFlowers102)
    monkeypatch.setattr(flowers, "download_flowers102", lambda root: Path(root) / "flowers-102")
    captions = {"image_00001": ["pink petals", "round"], "image_00002": ["round"], "image_00003": ["tall stem"]}
    ds = FlowersWithCaptions(tmp_path, classes=[0], captions=captions, image_size=32, train=False)
    assert [f.name for f in ds.files] == ["image_00001.jpg", "image_00002.jpg"]   # class 5 left out
    assert ds.captions == ["pink petals", "round"]                                # shared captions stored once
    assert ds.caption_ids == [[0, 1], [1]] and ds.caption_groups.tolist() == [0, 0]
    image, caption_id, label = ds[1]
    assert image.shape == (3, 32, 32) and caption_id == 1 and label == 0
    assert ds.class_labels.tolist() == [[0], [0]] and ds.class_counts == (102,)
    batch = ds.image_batch(torch.tensor([1, 0, 1]))
    assert batch.shape == (3, 3, 32, 32) and torch.equal(batch[0], batch[2])


WARNING_PAGE = """<html><body><p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{action}" method="get">
<input type="submit" id="uc-download-link" value="Download anyway"/>
<input type="hidden" name="id" value="FILE"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-123"></form></body></html>"""


def test_drive_urls_carry_the_resource_key():
    urls = downloads.drive_download_urls("FILE", "0-KEY")
    assert [urllib.parse.urlsplit(u).netloc for u in urls] == ["drive.usercontent.google.com", "drive.google.com"]
    for url in urls:
        assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)) == {
            "id": "FILE", "export": "download", "resourcekey": "0-KEY", "confirm": "t"}


def test_drive_confirmation_url_from_the_warning_page():
    page_url = "https://drive.usercontent.google.com/download?id=FILE&export=download&resourcekey=0-KEY"
    page = WARNING_PAGE.format(action="https://drive.usercontent.google.com/download")
    url = downloads.drive_confirmation_url(page, page_url)
    parts = urllib.parse.urlsplit(url)
    assert parts.netloc == "drive.usercontent.google.com" and parts.path == "/download"
    assert dict(urllib.parse.parse_qsl(parts.query)) == {
        "resourcekey": "0-KEY", "id": "FILE", "export": "download", "confirm": "t", "uuid": "u-123"}
    old_page = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=AbC&amp;id=FILE">Download</a>'
    assert downloads.drive_confirmation_url(old_page, page_url) == (
        "https://drive.usercontent.google.com/uc?export=download&confirm=AbC&id=FILE")
    assert downloads.drive_confirmation_url("<p>Quota exceeded</p>", page_url) is None


def caption_archive() -> bytes:
    """A tar.gz laid out like cvpr2016_flowers.tar.gz: cvpr2016_flowers/text_c10/class_00001/image_00001.txt."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        text = b"this flower has white petals\nthe petals are round\n"
        info = tarfile.TarInfo("cvpr2016_flowers/text_c10/class_00001/image_00001.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    return buffer.getvalue()


@pytest.fixture
def drive_server(serve_http):
    """A local stand-in for Google Drive: /quota answers a page without a form, /warn the virus-scan page whose
    form leads to /download, which sends the archive only with the uuid and the resource key."""
    archive = caption_archive()
    agents = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            agents.append(self.headers.get("User-Agent"))
            path, _, query = self.path.partition("?")
            fields = dict(urllib.parse.parse_qsl(query))
            if path == "/download" and fields.get("uuid") == "u-123" and fields.get("resourcekey") == "0-KEY":
                body, kind = archive, "application/x-gzip"
            elif path == "/warn":
                body, kind = WARNING_PAGE.format(action="/download").encode(), "text/html; charset=utf-8"
            else:
                body, kind = b"<p>Quota exceeded</p>", "text/html"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return serve_http(Handler), agents


def test_flowers_captions_download_follows_the_warning_page_after_a_failed_source(tmp_path, drive_server,
                                                                                   monkeypatch):
    monkeypatch.delenv(FLOWERS_CAPTIONS_ENV, raising=False)
    server, agents = drive_server
    urls = [f"{server}/quota", f"{server}/warn?id=FILE&export=download&resourcekey=0-KEY"]
    folder = download_flowers_captions(tmp_path, urls=urls, timeout=5)
    assert agents == [USER_AGENT] * 3             # quota page, warning page, file: the project's User-Agent
    assert load_flowers_captions(folder) == {"image_00001": ["this flower has white petals",
                                                             "the petals are round"]}
    assert download_flowers_captions(tmp_path, urls=["http://127.0.0.1:1/never"]) == folder   # kept


def test_flowers_captions_failure_says_what_to_download_by_hand(tmp_path, drive_server, monkeypatch):
    monkeypatch.delenv(FLOWERS_CAPTIONS_ENV, raising=False)
    with pytest.raises(DownloadError, match=r"quota: .*answered with a web page.*download Reed et al.'s "
                                            r"cvpr2016_flowers.tar.gz by hand.*T2I_FLOWERS_CAPTIONS.*"
                                            r"or set T2I_DATASET=shapes to train on the built-in shapes"):
        download_flowers_captions(tmp_path, urls=[f"{drive_server[0]}/quota"], timeout=5)


def test_flowers_captions_from_a_local_archive_or_folder(tmp_path, monkeypatch):
    archive = tmp_path / "cvpr2016_flowers.tar.gz"
    archive.write_bytes(caption_archive())
    monkeypatch.setenv(FLOWERS_CAPTIONS_ENV, str(archive))
    folder = download_flowers_captions(tmp_path / "data", urls=[])
    assert folder == tmp_path / "data" / "flowers-captions" and len(load_flowers_captions(folder)) == 1
    monkeypatch.setenv(FLOWERS_CAPTIONS_ENV, str(folder))
    assert download_flowers_captions(tmp_path / "elsewhere", urls=[]) == folder
    monkeypatch.setenv(FLOWERS_CAPTIONS_ENV, str(tmp_path / "missing.tar.gz"))
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder with text_c10"):
        download_flowers_captions(tmp_path / "other", urls=[])


def flowers102_files() -> dict[str, bytes]:
    """Small stand-ins for the three Oxford-102 files: an image archive holding jpg/, two label files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for i in (1, 2):
            info = tarfile.TarInfo(f"jpg/image_{i:05d}.jpg")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"jpg"))
    return {"102flowers.tgz": buffer.getvalue(), "imagelabels.mat": b"labels", "setid.mat": b"splits"}


@pytest.fixture
def oxford_server(serve_http):
    """A local stand-in for robots.ox.ac.uk: /vgg/NAME serves the files, /gone/ answers 404, /bad/ damaged files."""
    files, agents = flowers102_files(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            agents.append(self.headers.get("User-Agent"))
            folder, _, name = self.path.strip("/").partition("/")
            if folder in ("vgg", "bad") and name in files:
                body = files[name] if folder == "vgg" else files[name][:-1] + b"!"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    return serve_http(Handler), agents


def test_flowers102_download_tries_each_source_checks_md5_and_unpacks(tmp_path, oxford_server, monkeypatch):
    """Issue 15.5: the Oxford files come through helpers.downloads (User-Agent, timeout, the next source)."""
    import hashlib
    server, agents = oxford_server
    files = flowers102_files()
    monkeypatch.setattr(flowers, "FLOWERS102_FILES", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    folder = download_flowers102(tmp_path, [f"{server}/gone/", f"{server}/vgg/"], timeout=5)
    assert folder == tmp_path / "flowers-102"
    assert sorted(p.name for p in (folder / "jpg").iterdir()) == ["image_00001.jpg", "image_00002.jpg"]
    assert (folder / "setid.mat").read_bytes() == b"splits" and not (folder / "102flowers.tgz").exists()
    assert agents == [USER_AGENT] * 6             # each file: the failed source, then the one that answers
    assert download_flowers102(tmp_path, ["http://127.0.0.1:1/"], timeout=5) == folder   # kept, no download


def test_flowers102_download_failure_says_what_to_do(tmp_path, oxford_server, monkeypatch):
    import hashlib
    server, _ = oxford_server
    monkeypatch.setattr(flowers, "FLOWERS102_FILES", {k: hashlib.md5(v).hexdigest()
                                                      for k, v in flowers102_files().items()})
    with pytest.raises(DownloadError, match=r"(?s)2 sources.*gone/102flowers.tgz.*or set T2I_DATASET=shapes"):
        download_flowers102(tmp_path, [f"{server}/gone/", f"{server}/gone/"], timeout=5)
    with pytest.raises(DownloadError, match=r"102flowers.tgz arrived damaged.*or set T2I_DATASET=shapes"):
        download_flowers102(tmp_path, [f"{server}/bad/"], timeout=5)
    assert not (tmp_path / "flowers-102" / "102flowers.tgz").exists()   # a damaged file is not kept
