"""tools/gpu_check.py (`make gpu-check`): what can be checked without a GPU."""
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
import gpu_check  # tools/gpu_check.py


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_it_says_no_cuda_device_and_exits_non_zero():
    done = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stdout, (done.returncode, done.stdout, done.stderr)


def notebook(tmp_path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    return path


def test_execute_runs_cells_in_one_shell_with_magics_and_stops_at_the_first_failure(tmp_path):
    ok = notebook(tmp_path, "x = 2", "%time y = x * 3", "assert y == 6")
    run = lambda nb: subprocess.run([sys.executable, "tools/gpu_check.py", "--execute", str(nb)],  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
    done = run(ok)
    assert done.returncode == 0 and done.stdout.count("[gpu-check] cell") == 3, done.stdout + done.stderr
    bad = notebook(tmp_path, "x = 2", "assert x == 3, 'x is not 3'", "print('never')")
    done = run(bad)
    assert done.returncode == 1 and "cell 1 FAILED" in done.stdout and "never" not in done.stdout


def test_random_weights_land_where_torchvision_looks_and_load(tmp_path, monkeypatch):
    written = gpu_check.write_random_weights(tmp_path)
    assert [Path(p).name for p in written] == ["vgg19-dcbb9e9d.pth", "alexnet-owt-7be5be79.pth"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models import VGG19_Weights, vgg19
    state = VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False)  # no download: the cached file
    vgg19().load_state_dict(state)


def test_the_tiny_text_encoder_loads_and_embeds_a_caption(tmp_path):
    from transformers import AutoModel, AutoTokenizer
    folder = gpu_check.write_tiny_text_encoder(tmp_path / "enc")
    tokens = AutoTokenizer.from_pretrained(folder)(["a photo of a red circle"], return_tensors="pt")
    assert tokens["input_ids"][0].tolist().count(1) == 0  # every word is in the vocabulary (id 1: [UNK])
    hidden = AutoModel.from_pretrained(folder)(**tokens).last_hidden_state
    assert hidden.shape == (1, 8, 32)  # [CLS], 6 words, [SEP]


def test_the_unit_row_selects_the_gpu_path_tests():
    # the unit row runs tests chosen by name: it must find the CUDA-only ones and the fp16/GradScaler ones of
    # every family (a renamed test would silently drop out of make gpu-check)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                          str(gpu_check.ROOT / "tests"), "-k", gpu_check.UNIT_TESTS],
                         capture_output=True, text=True, cwd=gpu_check.ROOT).stdout
    for test_file in ("test_mnist_gan", "test_style", "test_text2image", "test_pix2pixhd_training",
                      "test_sd_lora", "test_environment_training"):
        assert f"tests/{test_file}.py::" in out, f"make gpu-check's unit row selects no test of {test_file}"
    assert "test_optimisation_step_never_waits_for_the_gpu" in out and "test_graphed_step" in out
