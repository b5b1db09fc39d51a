"""Which precision a run computes in: the processor's native bf16 detected, and the choice `precision=auto` makes.

bf16 mixed precision keeps float32 master weights and optimizer state and runs the matmuls in bfloat16 (Lightning's
"bf16-mixed": torch.autocast); the loss, norms, softmax statistics and rotary angles stay float32 in the model's
own code. It pays only where the processor multiplies bf16 natively: AVX-512 BF16 (AMD Zen 4+, Intel Cooper
Lake+) or AMX (Intel Sapphire Rapids+); elsewhere torch emulates bf16 through float32 and is slower than float32
itself, so `auto` keeps float32 there.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

AUTO = "auto"
BF16, FLOAT32 = "bf16-mixed", "32-true"


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; else what the platform reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "an unnamed processor"


def native_bf16_cpu() -> Optional[str]:
    """The instruction set through which this CPU multiplies bf16 natively ("AMX" or "AVX-512 BF16"), or None."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX-512 BF16"
    return None


def resolve(precision: str, device: torch.device) -> tuple[str, str]:
    """(the Lightning precision a run uses, why) for a requested `precision` on `device`.

    auto: bf16-mixed on a CPU with native bf16 and on a GPU that supports it, float32 elsewhere. Anything else is
    taken as asked ("set by trainer.precision"), whatever the processor.
    """
    if precision != AUTO:
        return precision, f"set by trainer.precision={precision}"
    if device.type == "cpu":
        native = native_bf16_cpu()
        if native is not None:
            return BF16, f"auto: {cpu_name()} multiplies bf16 natively ({native})"
        return FLOAT32, f"auto: {cpu_name()} has neither AVX-512 BF16 nor AMX (bf16 would be emulated, slower)"
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return BF16, f"auto: {torch.cuda.get_device_name(device)} supports bf16"
    return FLOAT32, f"auto: no native bf16 on {device.type}"


def training_dtype(precision: str) -> torch.dtype:
    """The dtype training's matmuls run in under a Lightning precision: bfloat16, float16, else float32."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


EVAL_PRECISIONS = ("auto", "float32", "bf16")


def eval_dtype(precision: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(the dtype an evaluation's matmuls run in, why) for EvalConfig.precision: auto (bf16 where `resolve` would
    train in it), float32 or bf16."""
    if precision == "auto":
        resolved, why = resolve(AUTO, device)
        return training_dtype(resolved), why
    return (torch.bfloat16 if precision == "bf16" else torch.float32), f"set by precision={precision}"
