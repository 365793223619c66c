"""Pix2PixHD's GPU fast path: the speed options of the training step (autocast with a loss scaler, cuDNN
autotuning, fused Adam, torch.compile, channels-last), chosen from the device, each one off on a plain CPU."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from ..environment import gpu_choices

@dataclass
class FastPath:
    """Speed options of the training step; all off: the plain eager fp32 step a student writes."""

    amp_dtype: torch.dtype | None = None  # autocast dtype (fp16 gets a GradScaler); None: fp32
    cudnn_benchmark: bool = False  # let cuDNN time its algorithms for each new shape
    fused_adam: bool = False  # one kernel for the whole Adam update
    compile: bool = False  # torch.compile G and D in place (fuses norm, padding, activations)
    channels_last: bool = False  # NHWC tensors and weights (off by default: see `for_device`)
    compile_backend: str = "inductor"
    init_scale: float = 2.0**8  # fp16 loss scale to start from (torch's default 2**16 overflows)

    @classmethod
    def for_device(cls, device: torch.device, compile: bool = False) -> "FastPath":
        """The options `gpu_choices(device)` decides: autocast in bf16 (compute capability >= 8)
        or fp16 with a loss scaler (7.x, a T4, or EMULATE_T4=1), fused Adam; on CUDA also cuDNN
        autotuning and torch.compile when asked. A CPU without emulation: eager fp32.
        Channels-last stays off, with a printed reason: InstanceNorm turns NHWC tensors back into
        NCHW, so it cannot speed up the memory-bound layers, and on the CPU (torch 2.11-2.14)
        InstanceNorm's input gradient is wrong at batch 1 when the incoming gradient is NHWC (see
        the tests). The bench times it."""
        choices = gpu_choices(device)
        if not choices.gpu_path:
            return cls()
        if not choices.cuda:
            choices.skip("cuDNN autotuning", "the CPU's own convolution kernels")
            if compile:
                choices.skip("torch.compile (COMPILE = True)", "the eager step")
        if choices.channels_last:
            print("channels-last: left off (InstanceNorm turns NHWC back into NCHW; on a CPU its "
                  "gradient is wrong at batch 1)")
        return cls(amp_dtype=choices.amp_dtype, cudnn_benchmark=choices.cuda,
                   fused_adam=choices.fused_adam, compile=compile and choices.cuda)

    def describe(self) -> str:
        """The options that are on, in words."""
        amp = f"autocast {str(self.amp_dtype).removeprefix('torch.')}" if self.amp_dtype else "fp32"
        if self.amp_dtype == torch.float16:
            amp += f" with a loss scaler (from 2**{int(math.log2(self.init_scale))})"
        parts = [amp, "cuDNN autotuning" * self.cudnn_benchmark, "fused Adam" * self.fused_adam,
                 f"torch.compile ({self.compile_backend})" * self.compile,
                 "channels-last" * self.channels_last]
        options = ", ".join(p for p in parts if p)
        return options if options != "fp32" else "eager fp32 (no fast-path option on)"

    def prepare(self, module: nn.Module) -> nn.Module:
        """Apply the options to a model in place (channels-last, torch.compile) and to cuDNN."""
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        if self.compile:
            module.compile(backend=self.compile_backend)
        return module

    def tensor(self, x: Tensor) -> Tensor:
        """A batch in the memory format the prepared models expect."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def adam(self, params: Iterable[nn.Parameter], lr: float,
             betas: tuple[float, float]) -> torch.optim.Adam:
        """Adam with the paper's settings, fused into one kernel when `fused_adam`."""
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=self.fused_adam or None)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """The loss scaler: on for fp16 (small gradients would underflow), off for bf16 and fp32.
        It starts at `init_scale`: at 2**16 the first steps' gradients overflow fp16 (max 65,504)
        and the scaler skips those optimizer steps while it halves the scale."""
        return torch.amp.GradScaler(device.type, init_scale=self.init_scale,
                                    enabled=self.amp_dtype == torch.float16)
