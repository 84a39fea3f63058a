"""What the machine can compute fast: the CPU's name and bf16 support, a GPU's bf16 support.

Without native bf16 (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm) a CPU emulates bf16
matmuls: on an AVX2-only AMD EPYC, a 1024 x 1024 bf16 matmul ran at 0.9 GFLOP/s against 106 in
fp32 (2 threads, torch 2.13). ``bf16: auto`` therefore means bf16 autocast only where the chip
does it natively.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# /proc/cpuinfo flags that mean bf16 matmuls run in hardware
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, aarch64 BF16


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.flags for flag in NATIVE_BF16_FLAGS)

    @property
    def bf16_flags(self) -> list[str]:
        return sorted(flag for flag in NATIVE_BF16_FLAGS if flag in self.flags)


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags from /proc/cpuinfo's text (x86 ``flags``,
    aarch64 ``Features``)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown CPU", flags)


def cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:  # not Linux: name only, no flags
        text = ""
    return parse_cpuinfo(text)


def matmul_gflops(dtype: torch.dtype, n: int = 256, repeats: int = 3) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` on the CPU (best of ``repeats``; milliseconds)."""
    generator = torch.Generator().manual_seed(0)  # not the global RNG: the run's seeding stays as it is
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    torch.mm(a, b)  # first call: kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / max(best, 1e-9) / 1e9


def bf16_slowdown() -> float:
    """How many times slower a bf16 matmul runs than an fp32 one on this CPU, measured."""
    return matmul_gflops(torch.float32) / matmul_gflops(torch.bfloat16)


@dataclass(frozen=True)
class Precision:
    """The autocast a run uses, and why."""

    bf16: bool
    fp16: bool
    reason: str
    warning: str | None = None
    cpu: CpuInfo = CpuInfo("unknown CPU")  # the host CPU, recorded with the decision (summary.json)

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def choose_precision(bf16: bool | str, fp16: bool | str, device: torch.device, cpu: CpuInfo | None = None,
                     slowdown=None) -> Precision:  # fmt: skip
    """Resolve ``bf16`` / ``fp16`` (True, False or "auto") for ``device``.

    auto: on CUDA, bf16 where the GPU supports it (fp16 is never chosen for the user: it needs
    loss scaling); on CPU, bf16 only with native bf16 matmuls, else fp32. An explicit ``bf16: true``
    on a CPU without them runs, with a warning that gives the measured slowdown.
    """
    cpu = cpu or cpu_info()
    decided = functools.partial(Precision, cpu=cpu)
    if fp16 is True:
        return decided(False, True, "fp16: true")
    if device.type == "cuda":
        if bf16 is True:
            return decided(True, False, "bf16: true")
        if bf16 == "auto" and torch.cuda.is_bf16_supported():
            return decided(True, False, f"bf16: auto, and {torch.cuda.get_device_name(device)} supports bf16")
        if bf16 == "auto":
            return decided(False, False, "bf16: auto, and this GPU has no bf16 (fp16: true for fp16 autocast)")
        return decided(False, False, "bf16: false")
    if device.type != "cpu":
        return decided(bf16 is True, False, f"bf16: {bf16} on {device.type}")
    if bf16 == "auto":
        if cpu.native_bf16:
            return decided(True, False, f"bf16: auto, and the CPU ({cpu.model}) has native bf16 "
                                          f"({', '.join(cpu.bf16_flags)})")  # fmt: skip
        return decided(False, False, f"bf16: auto, and the CPU ({cpu.model}) has no native bf16 "
                                       "(no AVX-512 BF16 or AMX): fp32 is faster there")  # fmt: skip
    if bf16 is True:
        if cpu.native_bf16:
            return decided(True, False, "bf16: true")
        times = (slowdown or bf16_slowdown)()
        warning = (f"bf16: true on a CPU without native bf16 ({cpu.model}): bf16 matmuls measured {times:.0f}x "
                   "slower than fp32 here; bf16=auto (or false) trains in fp32")  # fmt: skip
        return decided(True, False, "bf16: true", warning)
    return decided(False, False, "bf16: false")
