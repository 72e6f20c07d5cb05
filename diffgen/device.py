"""Choosing the device and the numeric precision, and the autocast context for each."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from diffgen.errors import DiffgenError, InvalidSetting

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the name, and the autocast dtype (None for plain fp32)."""

    name: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES[self.name]

    @property
    def needs_loss_scaling(self) -> bool:
        return self.name == "fp16"


def select_device(spec: str = "auto") -> torch.device:
    """Resolve "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InvalidSetting(
            f"--device {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffgenError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DiffgenError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DiffgenError(f"--device {spec}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise InvalidSetting(f"--device {spec!r} is not supported; use auto, cpu, cuda[:N] or mps")
    return device


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_precision(spec: str, device: torch.device) -> Precision:
    """Resolve "auto" to bf16 where the hardware runs it fast, else fp32; reject fp16 on CPU."""
    if spec not in PRECISIONS:
        raise InvalidSetting(f"--precision {spec!r} is not known; use {', '.join(PRECISIONS)}")
    if spec == "auto":
        if device.type == "cuda":
            spec = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        elif device.type == "cpu":
            spec = "bf16" if cpu_has_fast_bf16() else "fp32"
        else:
            spec = "fp32"
    if spec == "fp16" and device.type == "cpu":
        raise InvalidSetting("--precision fp16 is not supported on the CPU; use bf16 or fp32")
    if spec == "bf16" and device.type == "mps":
        raise InvalidSetting("--precision bf16 is not supported on MPS; use fp16 or fp32")
    return Precision(spec)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """The autocast context for a forward pass at this precision (a no-op for fp32)."""
    dtype = precision.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve(device_spec: str, precision_spec: str) -> tuple[torch.device, Precision]:
    device = select_device(device_spec)
    precision = select_precision(precision_spec, device)
    log.info("device %s, precision %s", device, precision.name)
    return device, precision
