"""MNIST-like data (names, offline IDX files, [-1, 1] scaling) and the offline quality measures."""
import math

import numpy as np
import pytest
import torch

from helpers.data import DataDirError, check_raw_files, load_mnist_like, stand_in_note
from prepare_data import prepare_mnist_5k, write_idx  # tools/prepare_data.py
from helpers.metrics import (class_coverage, frechet_distance, frechet_distance_from_stats, model_output_to_uint8,
                             uint8_to_model_input)


def _fake_raw(root, name="MNIST", n_train=6, n_test=4):
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return raw


def test_unknown_dataset_name_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*\['FashionMNIST', 'MNIST'\]"):
        load_mnist_like("mnist", tmp_path)


def test_offline_idx_files_load_scaled_to_minus_one_one(tmp_path):
    raw = _fake_raw(tmp_path)
    dataset = load_mnist_like("MNIST", tmp_path, train=True)
    assert len(dataset) == 6
    image, label = dataset[0]
    raw_pixels = torch.from_numpy(np.fromfile(raw / "train-images-idx3-ubyte", np.uint8)[16:16 + 784].copy())
    assert image.shape == (1, 28, 28)
    assert torch.allclose(image.flatten(), raw_pixels.float() / 127.5 - 1, atol=1e-6)  # 0 -> -1, 255 -> 1


def test_truncated_file_is_reported_with_what_to_do(tmp_path):
    raw = _fake_raw(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataDirError, match="train-images-idx3-ubyte is truncated.*prepare-offline"):
        load_mnist_like("MNIST", tmp_path)


def test_missing_file_is_reported(tmp_path):
    raw = _fake_raw(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataDirError, match="t10k-labels-idx1-ubyte is missing"):
        check_raw_files(tmp_path, "MNIST")


def test_empty_data_dir_means_download(tmp_path):
    assert check_raw_files(tmp_path, "FashionMNIST") is False


def test_mnist_5k_stand_in_is_balanced_and_labelled_as_stand_in(tmp_path):
    prepare_mnist_5k(tmp_path)
    train, test = load_mnist_like("MNIST", tmp_path, True), load_mnist_like("MNIST", tmp_path, False)
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(test.targets).tolist() == [100] * 10
    assert "stand-in" in stand_in_note(tmp_path, "MNIST")


def test_frechet_distance_of_diagonal_gaussians_by_hand():
    # |(0,0)-(3,4)|^2 = 25 ; (sqrt1 - sqrt4)^2 + (sqrt4 - sqrt9)^2 = 1 + 1 = 2 ; FD = 27
    fd = frechet_distance_from_stats(torch.zeros(2), torch.diag(torch.tensor([1.0, 4.0])),
                                     torch.tensor([3.0, 4.0]), torch.diag(torch.tensor([4.0, 9.0])))
    assert fd == pytest.approx(27.0, abs=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    features = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    # shifting every vector by 1 in each of 8 dimensions adds |shift|^2 = 8 and nothing else
    assert frechet_distance(features, features + 1) == pytest.approx(8.0, abs=1e-6)


def test_class_coverage_is_the_entropy_of_the_predicted_histogram():
    assert class_coverage(torch.tensor([0, 0, 1, 1])) == pytest.approx(math.log(2))
    assert class_coverage(torch.arange(10).repeat(3)) == pytest.approx(math.log(10))
    assert class_coverage(torch.zeros(7, dtype=torch.long)) == pytest.approx(0.0)


def test_uint8_round_trip_of_generator_outputs():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).repeat(196).view(1, 1, 28, 28)
    as_uint8 = model_output_to_uint8(images)
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (1, 28, 28)
    assert as_uint8.flatten()[:4].tolist() == [0, 128, 255, 255]  # (0+1)*127.5 = 127.5 rounds to 128; 2 is clamped
    assert uint8_to_model_input(as_uint8).flatten()[0].item() == -1.0
    with pytest.raises(TypeError, match="uint8"):
        uint8_to_model_input(np.zeros((1, 28, 28), np.float32))


def test_torchvision_download_runs_under_a_socket_timeout(tmp_path, monkeypatch):
    # torchvision's MNIST download has no timeout of its own: load_mnist_like must give it one, and a server that
    # accepts the connection but never answers must then raise within about that time instead of hanging
    import socket
    import time
    import urllib.request

    from helpers import data, downloads

    seen = []

    class Recorder:
        def __init__(self, root, train, download, transform):
            seen.append((download, socket.getdefaulttimeout()))

    monkeypatch.setitem(data.MNIST_LIKE, "MNIST", Recorder)
    before = socket.getdefaulttimeout()
    load_mnist_like("MNIST", tmp_path)  # no copy there: it downloads
    assert seen == [(True, downloads.TIMEOUT_S)] and socket.getdefaulttimeout() == before

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        start = time.monotonic()
        with downloads.socket_timeout(0.5), pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{silent.getsockname()[1]}/train-images-idx3-ubyte.gz")
        assert time.monotonic() - start < 5
    finally:
        silent.close()
