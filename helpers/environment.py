"""Where a notebook runs: Colab or not, which device, smoke mode, seeding and the run directory."""
from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PACKAGE_PARENT = Path(__file__).resolve().parent.parent
DRIVE_MOUNT = Path("/content/drive")
DRIVE_RUN_DIR = DRIVE_MOUNT / "MyDrive" / "genimg-runs"


def default_root() -> Path:
    """The repository in a checkout (it has notebooks/); else the working directory, e.g. Colab's /content
    for a notebook run on its own (its helpers were unpacked from the notebook)."""
    return PACKAGE_PARENT if (PACKAGE_PARENT / "notebooks").is_dir() else Path.cwd()


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def smoke_mode() -> bool:
    """True when the environment asks for the small, offline CI run (SMOKE=1)."""
    value = os.environ.get("SMOKE", "0").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"SMOKE={value!r} is not understood; set SMOKE=1 for the CI-sized run or SMOKE=0 for full mode")


def pick_device(prefer: str | None = None) -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU (or `prefer` / $DEVICE if given)."""
    wanted = prefer or os.environ.get("DEVICE")
    if wanted:
        device = torch.device(wanted)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {wanted!r} was asked for but CUDA is not available; unset DEVICE or use 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """A short name for metrics.json, e.g. 'cuda:NVIDIA T4' or 'cpu'."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_drive_for_runs(wanted: bool) -> Path | None:
    """With `wanted` in Colab: mount Google Drive and set $RUN_DIR to a folder on it, so that checkpoints outlive
    the runtime and a re-run resumes. Elsewhere (or not wanted) nothing changes; returns the Drive folder or None."""
    if not wanted:
        return None
    if not in_colab():
        print(f"RUN_DIR_ON_DRIVE: not in Colab, so Google Drive is not mounted; RUN_DIR stays "
              f"{os.environ.get('RUN_DIR') or default_root() / 'runs'}")
        return None
    from google.colab import drive  # only in Colab
    drive.mount(str(DRIVE_MOUNT))
    DRIVE_RUN_DIR.mkdir(parents=True, exist_ok=True)
    os.environ["RUN_DIR"] = str(DRIVE_RUN_DIR)
    print(f"RUN_DIR_ON_DRIVE: runs go to {DRIVE_RUN_DIR} on your Google Drive (a re-run resumes from there)")
    return DRIVE_RUN_DIR


def run_dir(notebook: str, root: str | os.PathLike | None = None) -> Path:
    """The folder a notebook's run writes to: $RUN_DIR/<notebook> (default runs/<notebook>; <notebook>-smoke in smoke
    mode, so a smoke run never resumes into a full one), created and checked writable."""
    base = Path(root or os.environ.get("RUN_DIR") or default_root() / "runs")
    path = base / (f"{notebook}-smoke" if smoke_mode() else notebook)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"run directory '{path}' is not writable ({err.strerror}); "
            "set RUN_DIR to a folder you can write to (in Colab, e.g. /content/runs or a mounted Google Drive)"
        ) from err
    return path


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder datasets are read from and downloaded to: $DATA_DIR (default data/ in the repository, or in
    the working directory for a notebook run on its own)."""
    path = Path(root or os.environ.get("DATA_DIR") or default_root() / "data")
    path.mkdir(parents=True, exist_ok=True)
    return path
