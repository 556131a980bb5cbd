"""Shared helpers for the kernels: backend choice, chunk sizing, fp32 accumulation of bf16 products.

Nothing here imports triton: the Triton modules are imported lazily, the first time the ``"triton"``
backend is used, so that ``TRITON_INTERPRET=1`` may be set after ``hfdist.kernels`` is imported.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")

# Sampling (shared by the torch reference in sampling.py and the Triton sampler): a token's integer mass is
# q = floor(w * 2**MASS_BITS); the total mass stays below V * 2**32 < 2**53, exact in int64 and fp64.
MASS_BITS = 32


def inverse_temperature(temperature) -> float | torch.Tensor:
    """1 / temperature rounded to fp32 (0 where temperature <= 0: those rows are greedy).

    A Python number gives a Python float (no tensor, no device work): the quotient of the fp32-rounded
    temperature, computed in fp64 and rounded once to fp32, which is the correctly rounded fp32 division
    (fp64 carries more than 2 * 24 + 2 bits), i.e. what ``torch.reciprocal`` gives on an fp32 tensor.
    """
    if isinstance(temperature, torch.Tensor):
        t = temperature.float()
        return torch.where(t > 0, torch.reciprocal(torch.where(t > 0, t, 1.0)), 0.0)
    t32 = struct.unpack("f", struct.pack("f", float(temperature)))[0] if temperature > 0 else 0.0
    if t32 <= 0:  # as the tensor path: a temperature that rounds to 0 in fp32 is greedy
        return 0.0
    try:
        return struct.unpack("f", struct.pack("f", 1.0 / t32))[0]
    except OverflowError:  # beyond fp32's range: inf, as torch.reciprocal gives
        return math.inf


@dataclass(frozen=True)
class KernelVariant:
    """One compiled form of a Triton kernel that the launch code can ask for.

    Each ``kernels/_triton_*.py`` module lists its variants in ``compile_variants()``, built from the same
    tables its launch code reads, so that the ahead-of-time compile check (tests/test_kernels_compile.py)
    covers every variant a wrapper can launch.
    """
    name: str  # e.g. "_ce_kernel[bf16, softcap, grad]"
    kernel: Any  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*fp32", "i64", "fp32", "constexpr", ...)
    constexprs: dict = field(default_factory=dict)  # constexpr argument name -> value
    num_warps: int = 4
    options: dict = field(default_factory=dict)  # other compile options the launch passes, e.g. enable_fp_fusion


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Map ``backend`` ("auto" | "triton" | "torch") to the one that runs on ``device``.

    "auto" is Triton on CUDA (when triton is installed) and torch elsewhere. "triton" on a CPU tensor
    only works in the Triton interpreter; it raises a ValueError that says so otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError(f"{op}: backend='triton' needs the triton package, which is not installed")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if not interpreter_enabled():
            raise ValueError(
                f"{op}: backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use backend='torch'")
        return "triton"
    raise ValueError(f"{op}: backend='triton' supports CUDA tensors (or CPU under TRITON_INTERPRET=1), "
                     f"got a tensor on {device}")


def check_interpreted(kernel, op: str) -> None:
    """On CPU the kernel must have been decorated while TRITON_INTERPRET=1 was set (triton reads it then)."""
    if type(kernel).__name__ != "InterpretedFunction":
        raise ValueError(
            f"{op}: the Triton kernels were compiled for a GPU (TRITON_INTERPRET was not 1 when they were first "
            "imported); set TRITON_INTERPRET=1 before the first use of backend='triton' on CPU")


def chunk_rows(num_rows: int, num_cols: int, bytes_per_element: int, budget_bytes: int, multiple: int = 8) -> int:
    """Rows per chunk so that a [rows, num_cols] block of ``bytes_per_element`` stays within ``budget_bytes``.

    The rows are then balanced over the chunks (ceil(num_rows / chunks), rounded up to ``multiple`` for
    matmul alignment), so that the last chunk is not a sliver. Depends on shapes only: no host sync.
    """
    rows = max(1, budget_bytes // max(1, num_cols * bytes_per_element))
    if rows >= num_rows:
        return max(1, num_rows)
    num_chunks = -(-num_rows // rows)
    rows = -(-num_rows // num_chunks)
    rows = -(-rows // multiple) * multiple
    return max(1, min(rows, num_rows))


@functools.lru_cache(maxsize=None)
def _cuda_mixed_addmm_works(device_index: int) -> bool:
    """One-time probe: does this torch build do ``fp32 += bf16 @ bf16`` in one cuBLAS call (addmm out_dtype)?"""
    try:
        device = torch.device("cuda", device_index)
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(64, 32, device=device, generator=gen).to(torch.bfloat16)
        b = torch.randn(32, 48, device=device, generator=gen).to(torch.bfloat16)
        acc = torch.ones(64, 48, device=device)
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
        ref = 1.0 + a.float() @ b.float()
        ok = bool(torch.allclose(acc, ref, rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        ok = False
    if not ok:
        logger.warning("torch.addmm(out_dtype=float32) is not usable here: falling back to upcasting the "
                       "bf16/fp16 operands to fp32 slice by slice for the weight-gradient accumulation (slower)")
    return ok


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slice_rows: int = 8192) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` possibly bf16/fp16.

    The products are summed in fp32 and added to ``acc`` without rounding the partial result to the
    inputs' dtype (that rounding, once per chunk, is how a bf16 weight gradient drifts). On CUDA this
    is one cuBLAS call (``addmm`` with ``out_dtype``); elsewhere the operands are upcast, ``a`` slice by
    slice so that the temporary stays small.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _cuda_mixed_addmm_works(acc.device.index or 0):
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
        return
    b32 = b.float()
    for start in range(0, a.shape[0], slice_rows):
        end = min(start + slice_rows, a.shape[0])
        acc[start:end].addmm_(a[start:end].float(), b32)


def downcast_scaled_(acc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return ``(acc * scale).to(dtype)`` written into ``acc``'s own storage (no second buffer).

    ``acc`` is fp32 and contiguous; ``dtype`` is 2 bytes wide. Element i of the result lives at byte 2i,
    element i of ``acc`` at byte 4i: converting the range [s, e) after [0, s) is done never overwrites
    an unread fp32 element. The first range goes through a small temporary; after it, ranges [s, 2s)
    cannot overlap their own output, so they are written directly (log2(n) steps). ``acc`` is consumed.
    The result keeps the fp32 storage alive (2x its own size) until it is freed: the price of never
    holding the fp32 accumulator and a separate low-precision copy at the same time.
    """
    assert acc.dtype == torch.float32 and acc.is_contiguous()
    assert torch.empty((), dtype=dtype).element_size() == 2
    flat = acc.view(-1)
    n = flat.numel()
    out = flat.view(dtype)[:n]
    first = min(n, 1 << 20)
    out[:first].copy_((flat[:first] * scale).to(dtype))
    start = first
    while start < n:
        end = min(2 * start, n)
        torch.mul(flat[start:end], scale, out=out[start:end])
        start = end
    return out.view(acc.shape)
