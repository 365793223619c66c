"""Pix2PixHD helpers: parameter counts at the official defaults, shapes, input encoding, data, schedule, metrics."""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.pix2pixhd.data import (
    CMP_FACADES_URL, PairedFolderDataset, ProceduralLabelImages, check_image_size, download_cmp_facades,
    encode_input, instance_edges, label_sketch, one_hot_labels,
)
from helpers.pix2pixhd.model import (GlobalGenerator, LocalEnhancer, MultiscaleDiscriminator, NLayerDiscriminator,
                                     ResnetBlock)
from helpers.pix2pixhd.train import linear_decay_lr
from helpers.downloads import PROJECT_URL, TIMEOUT_S, USER_AGENT, DownloadError
from helpers.metrics import psnr, ssim
from helpers.training import count_parameters

# Official defaults (Cityscapes): label_nc 35 + 1 instance-edge channel = 36 input channels, RGB output,
# D input = 36 + 3 = 39 channels. A conv k x k, in -> out has k*k*in*out weights + out biases; InstanceNorm has none.
#
# Global generator, ngf 64, 4 downsamplings, 9 residual blocks:
#   c7s1-64   49*36*64 + 64       =     112,960
#   d128      9*64*128 + 128      =      73,856
#   d256      9*128*256 + 256     =     295,168
#   d512      9*256*512 + 512     =   1,180,160
#   d1024     9*512*1024 + 1024   =   4,719,616
#   R1024 x9  9 * 2*(9*1024*1024 + 1024) = 9 * 18,876,416 = 169,887,744
#   u512      9*1024*512 + 512    =   4,719,104
#   u256      9*512*256 + 256     =   1,179,904
#   u128      9*256*128 + 128     =     295,040
#   u64       9*128*64 + 64       =      73,792
#   c7s1-3    49*64*3 + 3         =       9,411
#   total                         = 182,546,755
GLOBAL_PARAMS = 182_546_755
# Local enhancer, ngf 32: G1 above without its c7s1-3 head (182,546,755 - 9,411 = 182,537,344) plus G2:
#   c7s1-32   49*36*32 + 32       =      56,480
#   d64       9*32*64 + 64        =      18,496
#   R64 x3    3 * 2*(9*64*64 + 64)=     221,568
#   u32       9*64*32 + 32        =      18,464
#   c7s1-3    49*32*3 + 3         =       4,707
#   G2 total                      =     319,715 -> G = 182,857,059
LOCAL_ONLY_PARAMS = 319_715
LOCAL_PARAMS = 182_857_059
# PatchGAN, ndf 64, 3 layers, k4: C64 16*39*64+64 = 40,000; C128 16*64*128+128 = 131,200;
# C256 16*128*256+256 = 524,544; C512 16*256*512+512 = 2,097,664; out 16*512*1+1 = 8,193 -> 2,801,601; x3 scales.
PATCHGAN_PARAMS = 2_801_601
MULTISCALE_PARAMS = 3 * PATCHGAN_PARAMS


def test_parameter_counts_at_official_defaults():
    with torch.device("meta"):  # shapes only: 190M parameters would take seconds to initialise
        global_g, local, patch, multi = (GlobalGenerator(36), LocalEnhancer(36), NLayerDiscriminator(39),
                                         MultiscaleDiscriminator(39))
    assert count_parameters(global_g) == GLOBAL_PARAMS
    assert count_parameters(local) == LOCAL_PARAMS
    assert sum(p.numel() for p in local.local_parameters()) == LOCAL_ONLY_PARAMS
    assert count_parameters(patch) == PATCHGAN_PARAMS
    assert count_parameters(multi) == MULTISCALE_PARAMS == 8_404_803


def test_generators_keep_size_and_make_rgb():
    x = torch.randn(2, 7, 64, 96)
    for g in (GlobalGenerator(7, ngf=4, n_blocks=1), LocalEnhancer(7, ngf=2, n_blocks_global=1, n_blocks_local=1)):
        y = g(x)
        assert y.shape == (2, 3, 64, 96)


def test_resnet_block_is_residual():
    block = ResnetBlock(4)
    for p in block.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(block(x), x)


def test_local_enhancer_loads_and_freezes_global():
    g1 = GlobalGenerator(5, ngf=4, n_blocks=1)
    g = LocalEnhancer(5, ngf=2, n_blocks_global=1, n_blocks_local=1)
    g.load_global(g1)
    assert all(torch.equal(a, b) for a, b in zip(g.global_features.state_dict().values(),
                                                 g1.features.state_dict().values()))
    g.freeze_global(True)
    assert count_parameters(g, trainable_only=True) == sum(p.numel() for p in g.local_parameters())
    g.freeze_global(False)
    assert count_parameters(g, trainable_only=True) == count_parameters(g)


def test_multiscale_discriminator_outputs():
    d = MultiscaleDiscriminator(5, ndf=4, n_layers=3, num_D=3)
    out = d(torch.randn(1, 2, 64, 64), torch.randn(1, 3, 64, 64))
    assert len(out) == 3 and all(len(scale) == 5 for scale in out)
    # k4 s2 p2: 64 -> 33 -> 17 -> 9, then k4 s1 p2: 9 -> 10 -> 11; the 1/2 scale starts from 32.
    assert [tuple(t.shape[-2:]) for t in out[0]] == [(33, 33), (17, 17), (9, 9), (10, 10), (11, 11)]
    assert tuple(out[1][-1].shape) == (1, 1, 7, 7) and out[0][3].shape[1] == 32
    with pytest.raises(ValueError, match="same size"):
        d(torch.randn(1, 2, 64, 64), torch.randn(1, 3, 32, 32))


def test_sizes_not_divisible_by_32_are_refused():
    with pytest.raises(ValueError, match=r"250x256 is not divisible by 32.*256x256"):
        check_image_size(250, 256)
    with pytest.raises(ValueError, match="local enhancer input size 80x64 is not divisible by 32"):
        LocalEnhancer(3, ngf=2, n_blocks_global=1, n_blocks_local=1)(torch.randn(1, 3, 80, 64))
    with pytest.raises(ValueError, match="not divisible by 16"):
        GlobalGenerator(3, ngf=2, n_blocks=1)(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="32x32 is below the minimum 64x64"):
        LocalEnhancer(3, ngf=2, n_blocks_global=1, n_blocks_local=1)(torch.randn(1, 3, 32, 32))


def test_one_hot_and_instance_edges_by_hand():
    labels = torch.tensor([[[0, 2], [1, 2]]])
    assert one_hot_labels(labels, 3)[0].tolist() == [[[1, 0], [0, 0]], [[0, 0], [1, 0]], [[0, 1], [0, 1]]]
    inst = torch.tensor([[[5, 5, 5], [5, 7, 5], [5, 5, 5]]])
    # every 4-neighbour pair across the 7 marks both pixels: the centre and its four neighbours, not the corners
    assert instance_edges(inst)[0, 0].tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    x = encode_input(labels, 3, torch.tensor([[[1, 1], [1, 2]]]))
    assert x.shape == (1, 4, 2, 2) and x[0, 3].tolist() == [[0, 1], [1, 1]]


def test_rgb_sketch_input_feeds_directly():
    sketch = label_sketch(torch.tensor([[[0, 0, 1], [0, 0, 1]]]))
    # the class changes between columns 1 and 2: both columns become black lines (-1), column 0 stays white (1)
    assert sketch.shape == (1, 3, 2, 3) and sketch[0, 0].tolist() == [[1, -1, -1], [1, -1, -1]]
    assert encode_input(sketch, 0) is sketch
    with pytest.raises(ValueError, match=r"label_nc=0\) must be float images of shape \(N, 3, H, W\)"):
        encode_input(torch.zeros(1, 2, 2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*127.5"):
        encode_input(torch.full((1, 3, 2, 2), 255.0), 0)


def test_label_values_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"values \[7, 255\] outside 0..5 \(label_nc=6\).*at least 256"):
        one_hot_labels(torch.tensor([[[0, 7], [255, 1]]]), 6)
    with pytest.raises(ValueError, match="values \\[-1\\]"):
        one_hot_labels(torch.tensor([[[0, -1]]]), 6)
    with pytest.raises(ValueError, match="non-integer"):
        one_hot_labels(torch.tensor([[[0.5, 1.0]]]), 6)
    with pytest.raises(ValueError, match="same height and width"):
        encode_input(torch.zeros(1, 4, 4, dtype=torch.long), 2, torch.zeros(1, 4, 2, dtype=torch.long))


def test_lr_schedule_constant_then_linear_to_zero():
    # n_constant 2, n_decay 4: epochs 0, 1, 2 at the base rate, then down by 1/4 each epoch
    assert [linear_decay_lr(e, 1.0, 2, 4) for e in range(8)] == [1, 1, 1, 0.75, 0.5, 0.25, 0, 0]
    assert linear_decay_lr(5, 2e-4, 10, 0) == 2e-4


def test_procedural_dataset_is_deterministic_and_in_range():
    a, b = ProceduralLabelImages(3, 32, seed=4), ProceduralLabelImages(3, 32, seed=4)
    item = a[1]
    assert item["label"].shape == (32, 32) and item["image"].shape == (3, 32, 32)
    assert torch.equal(item["image"], b[1]["image"])
    assert int(item["label"].max()) < ProceduralLabelImages.label_nc


def test_procedural_photo_is_drawn_from_its_maps():
    """The docstring's claim: the photo is a function of the maps. Sky pixels (class 0) get the sky colour
    (0.45, 0.65, 0.95) brightened by 0.35 * y / horizon, so their blue channel only grows downwards, and the
    dark outline appears only where two building instances meet (the edge channel's information)."""
    data = ProceduralLabelImages(8, 32, seed=3)
    for i in range(len(data)):
        label, inst, image = data.labels[i], data.instances[i], (data.images[i] + 1) / 2
        sky = label == 0
        red = image[0][sky]
        assert torch.all(red >= 0.45 - 1e-6)  # the sky colour's red, brightened, never darkened
        brick = image[0] * (label == 2)  # building pixels: colour 0.70 red, 0.45x on an instance outline
        edges = instance_edges(inst[None])[0, 0].bool() & (label == 2)
        assert torch.allclose(brick[edges], torch.full_like(brick[edges], 0.70 * 0.45))
        assert torch.allclose(brick[(label == 2) & ~edges], torch.full_like(brick[(label == 2) & ~edges], 0.70))


def _write_pair(folder, stem, photo_size=(40, 30), label_size=(40, 30), label_value=2):
    Image.new("RGB", photo_size, (200, 10, 10)).save(folder / f"{stem}.jpg")
    Image.fromarray(np.full(label_size[::-1], label_value, dtype=np.uint8), mode="L").save(folder / f"{stem}.png")


def test_paired_folder_dataset_reads_and_resizes(tmp_path):
    _write_pair(tmp_path, "a")
    item = PairedFolderDataset(tmp_path, tmp_path, 32, label_nc=13)[0]
    assert item["label"].shape == (32, 32) and int(item["label"].unique()) == 2
    # the photo is one colour: every pixel is its decoded JPEG value v (about (200, 10, 10)) mapped by v / 127.5 - 1
    with Image.open(tmp_path / "a.jpg") as photo:
        decoded = torch.tensor(np.asarray(photo.convert("RGB"))[0, 0], dtype=torch.float32)
    expected = (decoded / 127.5 - 1)[:, None, None].expand(3, 32, 32)
    assert item["image"].shape == (3, 32, 32)
    assert torch.allclose(item["image"], expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps)


def test_paired_folder_dataset_errors(tmp_path):
    _write_pair(tmp_path, "a")
    Image.new("RGB", (40, 30)).save(tmp_path / "lonely.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 photo\(s\) .* have no label map .*lonely.png"):
        PairedFolderDataset(tmp_path, tmp_path, 32, label_nc=13)
    (tmp_path / "lonely.jpg").unlink()
    _write_pair(tmp_path, "b", label_size=(20, 30))
    with pytest.raises(ValueError, match="photo 'b.jpg' is 40x30 but its label map 'b.png' is 20x30"):
        PairedFolderDataset(tmp_path, tmp_path, 32, label_nc=13, names=["b"])[0]
    _write_pair(tmp_path, "c", label_value=20)
    with pytest.raises(ValueError, match=r"label map 'c.png' has values \[20\] outside 0..12"):
        PairedFolderDataset(tmp_path, tmp_path, 32, label_nc=13, names=["c"])[0]
    with pytest.raises(FileNotFoundError, match="photo folder .* not found"):
        PairedFolderDataset(tmp_path / "nope", tmp_path, 32, label_nc=13)
    with pytest.raises(ValueError, match="IMAGE_SIZE size 30x30 is not divisible by 32"):
        PairedFolderDataset(tmp_path, tmp_path, 30, label_nc=13)


def test_cmp_facades_download_reuses_a_copy(tmp_path):
    base = tmp_path / "cmp_facades" / "base"
    base.mkdir(parents=True)
    _write_pair(base, "cmp_b0001")
    assert download_cmp_facades(tmp_path, url="http://127.0.0.1:9/none.zip") == base  # no download needed


def _facades_zip(folder: Path) -> Path:
    """A zip laid out as CMP_facade_DB_base.zip: base/cmp_b0001.jpg and its label map base/cmp_b0001.png."""
    (folder / "base").mkdir(parents=True)
    _write_pair(folder / "base", "cmp_b0001")
    archive = folder / "CMP_facade_DB_base.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("cmp_b0001.jpg", "cmp_b0001.png"):
            zf.write(folder / "base" / name, f"base/{name}")
    return archive


def test_cmp_facades_download_unpacks_the_zip(tmp_path):
    archive = _facades_zip(tmp_path / "server")
    folder = download_cmp_facades(tmp_path / "data", url=archive.as_uri())  # file://: no network needed
    assert folder == tmp_path / "data" / "cmp_facades" / "base"
    assert len(PairedFolderDataset(folder, folder, 32, label_nc=13)) == 1


def test_a_damaged_cmp_facades_archive_is_deleted_with_what_to_do(tmp_path):
    """A download cut short leaves a file that is no zip: it is deleted, and the error says to run again."""
    archive = tmp_path / "cmp_facades" / "CMP_facade_DB_base.zip"
    archive.parent.mkdir()
    archive.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(RuntimeError, match=r"could not unpack the CMP facades .*deleted: run again"):
        download_cmp_facades(tmp_path, url="http://127.0.0.1:9/none.zip")  # the file is there: no download
    assert not archive.exists()


def test_cmp_facades_download_has_a_timeout_a_user_agent_and_says_what_to_do(tmp_path, monkeypatch):
    requests = []

    def refuse(request, *args, **kwargs):
        requests.append((request, kwargs.get("timeout", args[1] if len(args) > 1 else None)))
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(DownloadError, match=r"CMP Facade Database .* within 60 s .*PIX2PIXHD_DATASET=procedural"):
        download_cmp_facades(tmp_path)
    (request, timeout), = requests
    assert timeout == TIMEOUT_S and request.get_header("User-agent") == USER_AGENT
    assert PROJECT_URL in USER_AGENT and request.full_url == CMP_FACADES_URL
    assert not list((tmp_path / "cmp_facades").glob("*.zip*")), "a failed download leaves no file behind"


def test_cmp_facades_download_from_a_stalled_server_stops(tmp_path):
    """A server that accepts the connection and never answers: the download stops after its timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/CMP_facade_DB_base.zip"
        started = time.monotonic()
        with pytest.raises(DownloadError, match="timed out"):
            download_cmp_facades(tmp_path, url=url, timeout=0.5)
    assert time.monotonic() - started < 30


def test_psnr_by_hand_on_unit_range_images():
    real = torch.full((2, 3, 16, 16), 0.5)
    fake = real.clone()
    fake[0] += 0.1  # MSE 0.01 on range 1: 10*log10(1 / 0.01) = 20 dB
    fake[1] += 0.01  # MSE 0.0001: 40 dB
    assert torch.allclose(psnr(fake, real), torch.tensor([20.0, 40.0]))
    with pytest.raises(ValueError, match="same shape"):
        psnr(real, real[:1])


def test_ssim_of_a_grey_wall_and_the_same_wall_5_percent_brighter():
    # Constant images: the contrast-structure term is (0 + C2) / (0 + C2) = 1, so SSIM is the luminance term
    # (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), C1 = (0.01 * 1)^2: (0.55 + 1e-4) / (0.25 + 0.3025 + 1e-4).
    # On [-1, 1] with range 2 the same pair (0 vs 0.1) gives 4e-4 / 0.0104 = 0.038: why SSIM takes [0, 1].
    wall, brighter = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), 0.55)
    # float32: the variance blur(x^2) - blur(x)^2 cancels 0.3025 - 0.3025, an error of a few eps * 0.3025 next to
    # C2 = (0.03)^2 = 9e-4 in the contrast term (measured 555 eps relative)
    cancellation = 8 * torch.finfo(torch.float32).eps * 0.55**2 / 0.03**2  # 3.2e-4
    assert ssim(wall, brighter).item() == pytest.approx(0.5501 / 0.5526, rel=cancellation)
    assert ssim(wall, brighter).item() > 0.99


def test_ssim_properties_and_errors():
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(1))
    assert torch.allclose(ssim(x, 1 - x), ssim(1 - x, x))
    real = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(real, real)
    message = r"SSIM takes images in \[0, 1\], got values in \[-1.00, -1.00\].*\(x \+ 1\) / 2"
    with pytest.raises(ValueError, match=message):
        ssim(torch.full((1, 3, 16, 16), -1.0), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"PSNR takes images in \[0, 1\]"):
        psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 2.0))


def test_psnr_and_ssim_agree_with_torchmetrics_on_unit_range_images():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    torch.manual_seed(0)
    a = torch.rand(3, 3, 32, 40)
    b = (a + 0.25 * torch.randn(3, 3, 32, 40)).clamp(0, 1)
    b[0] = 0.3 + 0.4 * b[0]  # one pair with shifted means, where the luminance term matters
    # torchmetrics pads by reflection (5 px for the 11x11 window); its map without that border is our valid region
    _, full_map = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none", return_full_image=True)
    # float32 rounding, relative: 11x11 Gaussian blurs (121-term sums) and means over the windows; measured
    # 0 eps (SSIM) and 0.6 eps (PSNR) apart on an AMD EPYC
    rounding = 256 * torch.finfo(torch.float32).eps
    assert torch.allclose(ssim(a, b), full_map[..., 5:-5, 5:-5].flatten(1).mean(1), rtol=rounding, atol=0)
    expected_psnr = torch.stack([peak_signal_noise_ratio(f, r, data_range=1.0) for f, r in zip(a, b)])
    assert torch.allclose(psnr(a, b), expected_psnr, rtol=rounding, atol=0)
