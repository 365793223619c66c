"""Training plumbing shared by the notebooks: checkpoints with resume, scalar history + TensorBoard, metrics.json."""
from __future__ import annotations

import copy
import json
import os
import random
import re
import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from .environment import describe_device

CHECKPOINT_FORMAT = 3  # 2: one `state` mapping of objects with state_dict(); 3: every loop keeps one TrainingRun


class CheckpointMismatchError(RuntimeError):
    """A checkpoint was written by a model of another architecture or configuration."""


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of a model (all, or only those with requires_grad); a 4-bit weight (bitsandbytes
    packs two per uint8 byte) counts as the two values it holds."""
    return sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in module.parameters()
               if p.requires_grad or not trainable_only)


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """The exponential moving average of a model's weights, one step:
    average <- decay * average + (1 - decay) * model, for every parameter and every floating-point
    buffer (batch-norm statistics); a buffer that counts (batch-norm's batches seen) is copied."""
    for mine, theirs in zip(average.state_dict().values(), model.state_dict().values()):
        mine.lerp_(theirs, 1 - decay) if mine.is_floating_point() else mine.copy_(theirs)


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training loop uses."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class Stateful(Protocol):
    """What a checkpoint stores: models, optimizers, History, Stopwatch, a GradScaler, a run's own state."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def save_checkpoint(
    path: str | os.PathLike,
    state: Mapping[str, Stateful],
    step: int = 0,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write the state_dict of every object in `state` (models, optimizers, History, Stopwatch, ...), the step,
    the RNG states, the run's config and plain `extra` values to `path` atomically. With `keep_last`, delete
    all but the newest `keep_last` checkpoints named like this one (step-000100.pt, step-000200.pt, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "config": dict(config or {}),
        "state": {name: obj.state_dict() for name, obj in state.items()},
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    if keep_last is not None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: keep at least the checkpoint just written (1 or more)")
        for old in checkpoints_like(path)[:-keep_last]:
            old.unlink()
    return path


def checkpoints_like(path: str | os.PathLike) -> list[Path]:
    """The files in path's folder named like `path` but for its numbers, lowest number (oldest step) first."""
    path = Path(path)
    shape = re.compile(re.sub(r"\d+", r"\\d+", re.escape(path.name)))
    found = [p for p in path.parent.iterdir() if shape.fullmatch(p.name)] if path.parent.is_dir() else []
    return sorted(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p.name)])


def _check_config(path: Path, saved: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    diffs = [f"{k}: {saved.get(k)!r} in the file, {v!r} here" for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint '{path}' was saved with another configuration ({'; '.join(diffs)}); "
            "use the parameters it was trained with, or point RUN_DIR at a new folder to start afresh"
        )


def _check_shapes(path: Path, name: str, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(v.shape)} here"
             for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            part for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shapes {wrong[:3]}" if wrong else "",
            ) if part
        )
        raise CheckpointMismatchError(
            f"checkpoint '{path}' holds a '{name}' of another architecture or image size ({detail}); "
            "build the model with the parameters it was trained with, or point RUN_DIR at a new folder"
        )


def load_checkpoint(
    path: str | os.PathLike,
    state: Mapping[str, Stateful],
    config: Mapping[str, Any] | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint into the objects of `state` (any subset of those saved), after checking the config and
    the models' shapes; returns its step, config and extra values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found; train first or check RUN_DIR")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"'{path}' is not a checkpoint of this version of helpers.training.save_checkpoint; "
            "delete it (or point RUN_DIR at a new folder) and train again")
    if config is not None:
        _check_config(path, payload["config"], config)
    absent = sorted(set(state) - set(payload["state"]))
    if absent:
        raise CheckpointMismatchError(f"checkpoint '{path}' has no {absent} (it has {sorted(payload['state'])})")
    for name, obj in state.items():
        if isinstance(obj, nn.Module):
            _check_shapes(path, name, obj, payload["state"][name])
    for name, obj in state.items():
        obj.load_state_dict(payload["state"][name])
    if restore_rng:
        set_rng_state(payload["rng"])
    return {"step": payload["step"], "config": payload["config"], "extra": payload["extra"]}


class History:
    """Scalars per step: kept in memory for plots, written to TensorBoard, saved with checkpoints for resume."""

    def __init__(self, log_dir: str | os.PathLike | None = None) -> None:
        self.values: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(log_dir))

    def log(self, step: int, **scalars: float) -> None:
        """Record scalars (tensors or floats) at `step`."""
        for name, value in scalars.items():
            value = float(value.detach()) if torch.is_tensor(value) else float(value)
            self.values[name].append((int(step), value))
            if self.writer is not None:
                self.writer.add_scalar(name, value, step)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """Steps and values of one scalar."""
        if name not in self.values:
            raise KeyError(f"no scalar named '{name}' was logged (known: {sorted(self.values)})")
        steps, values = zip(*self.values[name]) if self.values[name] else ((), ())
        return list(steps), list(values)

    def state_dict(self) -> dict[str, list[tuple[int, float]]]:
        """The history as plain lists (for a checkpoint)."""
        return {k: list(v) for k, v in self.values.items()}

    def load_state_dict(self, state: Mapping[str, list[tuple[int, float]]]) -> None:
        """Replace the history by a saved one."""
        self.values = defaultdict(list, {k: [tuple(x) for x in v] for k, v in state.items()})

    def flush(self) -> None:
        """Write pending TensorBoard events to disk."""
        if self.writer is not None:
            self.writer.flush()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run in MiB: CUDA allocator peak on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class Stopwatch:
    """Wall time and item counts of a training loop, for throughput figures."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.iterations = 0
        self.images = 0
        self._start: float | None = None

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start
        self._start = None

    def count(self, iterations: int = 1, images: int = 0) -> None:
        """Add finished iterations and the images they processed."""
        self.iterations += iterations
        self.images += images

    def state_dict(self) -> dict[str, float]:
        """Seconds and counts so far (for a checkpoint)."""
        return {"seconds": self.seconds, "iterations": self.iterations, "images": self.images}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Continue from saved seconds and counts."""
        self.seconds, self.iterations, self.images = state["seconds"], state["iterations"], state["images"]

    def throughput(self) -> dict[str, float]:
        """Iterations and images per second over the timed spans."""
        if self.seconds <= 0:
            return {"it_per_s": 0.0, "img_per_s": 0.0}
        return {"it_per_s": self.iterations / self.seconds, "img_per_s": self.images / self.seconds}


@dataclass
class TrainingRun:
    """The one record every training loop keeps besides its models and optimizers. A checkpoint stores it
    through state_dict(), so a re-run cell resumes where it stopped.

    history: the logged scalars; stopwatch: training seconds and counts; snapshots: images made from fixed
    inputs, by iteration; step: iterations done; epoch: epochs done (of the current stage, in a loop with
    stages); records: the loop's own plain values (scores per epoch, the best epoch so far), saved as they are."""

    history: History = field(default_factory=History)
    stopwatch: Stopwatch = field(default_factory=Stopwatch)
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    records: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """Everything above as plain values (History and Stopwatch through their own state_dict)."""
        return {"history": self.history.state_dict(), "stopwatch": self.stopwatch.state_dict(),
                "snapshots": dict(self.snapshots), "step": self.step, "epoch": self.epoch,
                "records": copy.deepcopy(self.records)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved run (the History keeps its TensorBoard writer)."""
        self.history.load_state_dict(state["history"])
        self.stopwatch.load_state_dict(state["stopwatch"])
        self.snapshots, self.records = dict(state["snapshots"]), copy.deepcopy(dict(state["records"]))
        self.step, self.epoch = int(state["step"]), int(state["epoch"])


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished its queued work (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_per_step(step: Callable[[], object], device: torch.device, iterations: int = 20,
                  warmup: int = 3) -> dict[str, float | None]:
    """Mean wall-clock time of `step()` over `iterations` calls after `warmup` untimed ones, with the device
    synchronised before and after the timed calls (not between them); CUDA peak memory of the timed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    synchronize(device)
    ms = (time.perf_counter() - start) * 1000 / iterations
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"ms_per_step": ms, "it_per_s": 1000 / ms, "peak_memory_mb": peak}


def write_metrics(
    run_dir: str | os.PathLike,
    notebook: str,
    smoke: bool,
    device: torch.device,
    iterations: int,
    seconds: float,
    throughput: Mapping[str, float],
    quality: Mapping[str, Any],
    stand_ins: list[str] | None = None,
    **extra: Any,
) -> Path:
    """Write the run's metrics.json in the collection's common format and return its path."""
    record = {
        "notebook": notebook,
        "mode": "smoke" if smoke else "full",
        "device": describe_device(device),
        "iterations": int(iterations),
        "seconds": round(float(seconds), 3),
        "throughput": {k: round(float(v), 4) for k, v in throughput.items()},
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "quality": dict(quality),
        "stand_ins": list(stand_ins or []),
        **extra,
    }
    path = Path(run_dir) / "metrics.json"
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    return path
