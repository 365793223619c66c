"""Where a notebook runs: Colab or not, which device, smoke mode, seeding and the run directory."""
from __future__ import annotations

import os
import random
import sys
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
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


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast on `device` in `dtype` (float16 on a T4); a no-op context when `dtype` is None (float32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def env_flag(name: str, hint: str) -> bool:
    """The environment variable `name` as a switch: 1, true, yes, on / 0, false, no, off (unset or empty: off).
    Anything else raises, and `hint` says what to set."""
    value = os.environ.get(name, "0").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={value!r} is not understood; {hint}")


def smoke_mode() -> bool:
    """True when the environment asks for the small, offline CI run (SMOKE=1)."""
    return env_flag("SMOKE", "set SMOKE=1 for the CI-sized run or SMOKE=0 for full mode")


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
    """A short name for metrics.json, e.g. 'cuda:Tesla T4', 'cpu', or 'cpu (T4 emulation)' with EMULATE_T4=1."""
    name = f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type
    return f"{name} (T4 emulation)" if emulate_t4() else name


# --- the GPU path: what a notebook decides from its device, and the T4 emulation that tests it on a CPU ----

T4_CAPABILITY = (7, 5)  # compute capability of Colab's free Tesla T4: fp16 tensor cores, no bf16, no TF32


def emulate_t4() -> bool:
    """True when the environment asks for EMULATE_T4=1: take the decisions a Tesla T4 would make (fp16 autocast,
    an enabled GradScaler, channels-last, fused Adam, no bf16, no TF32) on whatever device runs."""
    return env_flag("EMULATE_T4", "set EMULATE_T4=1 to take a T4's decisions, or 0")


@dataclass(frozen=True)
class GpuChoices:
    """The speed and precision decisions of a notebook, taken from its device once.

    On CUDA they follow the GPU's compute capability: fp16 autocast with a GradScaler on a T4 (7.x), bf16
    autocast without one from 8.x (A100, L4, H100). With EMULATE_T4=1 they are a T4's on any device, so that
    a CPU runs the code of the GPU path. What only real CUDA has (CUDA graphs, cuDNN flags, bitsandbytes,
    torch.cuda memory queries) is decided by `cuda`, and `skip` says so when emulation passes over it."""

    device: torch.device
    capability: tuple[int, int] | None  # the GPU's compute capability (T4: 7.5); None: no GPU decisions
    cuda: bool  # a real CUDA device: graphs, cuDNN, bitsandbytes, torch.cuda memory queries
    emulated: bool  # EMULATE_T4=1

    @property
    def gpu_path(self) -> bool:
        """True where the notebook takes its GPU path (a CUDA device, or the T4 emulation)."""
        return self.capability is not None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype: bf16 from compute capability 8, fp16 on 7.x (T4), None (fp32) otherwise."""
        if self.capability is None or self.capability[0] < 7:
            return None
        return torch.bfloat16 if self.capability[0] >= 8 else torch.float16

    @property
    def grad_scaler_enabled(self) -> bool:
        """fp16 needs loss scaling (its small gradients underflow); bf16 and fp32 do not."""
        return self.amp_dtype == torch.float16

    @property
    def channels_last(self) -> bool:
        """NHWC memory layout, which tensor-core convolutions prefer."""
        return self.gpu_path

    @property
    def fused_adam(self) -> bool:
        """Adam's update as one fused kernel (CUDA, and the CPU under emulation)."""
        return self.gpu_path

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the autocast dtype: 'fp16', 'bf16' or 'no'."""
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.amp_dtype, "no")

    def autocast(self, enabled: bool = True) -> AbstractContextManager:
        """torch.autocast in `amp_dtype` on this device; a no-op context without one."""
        return autocast(self.device, self.amp_dtype if enabled else None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler for this device, enabled exactly when the autocast dtype is fp16."""
        return torch.amp.GradScaler(self.device.type, enabled=self.grad_scaler_enabled)

    def skip(self, what: str, instead: str = "") -> None:
        """Print that `what` needs a real CUDA device and is skipped here (and what runs instead)."""
        print(f"EMULATE_T4: {what} needs a CUDA device, so it is skipped on {self.device.type}"
              + (f"; instead: {instead}" if instead else ""))

    def describe(self) -> str:
        """One line for the notebook's output."""
        if not self.gpu_path:
            return f"{self.device.type}: fp32, no GPU fast paths"
        amp = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32"
        parts = [f"autocast {amp}", "GradScaler" * self.grad_scaler_enabled, "channels-last", "fused Adam"]
        where = (f"T4 emulation on {self.device.type}" if self.emulated and not self.cuda
                 else f"compute capability {self.capability[0]}.{self.capability[1]}"
                 + (" (T4's choices forced by EMULATE_T4=1)" if self.emulated else ""))
        return f"{describe_device(self.device)}: {', '.join(p for p in parts if p)} ({where})"


def gpu_choices(device: torch.device) -> GpuChoices:
    """The decisions for `device`: a CUDA GPU's own, a T4's with EMULATE_T4=1 (also on a bigger GPU, where TF32
    is then turned off as a T4 has none), and none (fp32, no fast path) on a CPU or Apple GPU."""
    emulated = emulate_t4()
    cuda = device.type == "cuda"
    if emulated:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        return GpuChoices(device, T4_CAPABILITY, cuda, True)
    capability = tuple(torch.cuda.get_device_capability(device)) if cuda else None
    return GpuChoices(device, capability, cuda, False)


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
