"""Shared helpers for the kernels: backend choice, chunk sizing, weight-gradient accumulation.

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
    options: dict = field(
        default_factory=dict
    )  # other compile options the launch passes, e.g. enable_fp_fusion


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401, PLC0415 (optional: triton, imported only when asked)
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def auto_backend(device_type: str) -> str:
    """What ``backend="auto"`` runs on a device of this type where triton is installed."""
    return "triton" if device_type == "cuda" else "torch"


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
        return auto_backend(device.type) if triton_available() else "torch"
    if not triton_available():
        raise ValueError(f"{op}: backend='triton' needs the triton package, which is not installed")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if not interpreter_enabled():
            raise ValueError(
                f"{op}: backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use backend='torch'"
            )
        return "triton"
    raise ValueError(
        f"{op}: backend='triton' supports CUDA tensors (or CPU under TRITON_INTERPRET=1), "
        f"got a tensor on {device}"
    )


def check_interpreted(kernel, op: str) -> None:
    """On CPU the kernel must have been decorated while TRITON_INTERPRET=1 was set (triton reads it then)."""
    if type(kernel).__name__ != "InterpretedFunction":
        raise ValueError(
            f"{op}: the Triton kernels were compiled for a GPU (TRITON_INTERPRET was not 1 when they were first "
            "imported); set TRITON_INTERPRET=1 before the first use of backend='triton' on CPU"
        )


# ---------------------------------------------------------------------------------------------------
# Fused loss (kernels/cross_entropy.py): chunk sizing and weight-gradient accumulation.
# ---------------------------------------------------------------------------------------------------


def chunk_rows(num_rows: int, bytes_per_row: int, budget_bytes: int, multiple: int = 8) -> int:
    """Rows per chunk so that ``rows * bytes_per_row`` (everything a chunk holds at once) fits ``budget_bytes``.

    The rows are then balanced over the chunks (ceil(num_rows / chunks), rounded up to ``multiple`` for
    matmul alignment unless that would pass the budget), so that the last chunk is not a sliver. Depends
    on shapes only: no host sync.
    """
    max_rows = max(1, budget_bytes // max(1, bytes_per_row))
    if max_rows >= num_rows:
        return max(1, num_rows)
    num_chunks = -(-num_rows // max_rows)
    rows = -(-num_rows // num_chunks)
    return max(1, min(-(-rows // multiple) * multiple, max_rows))


GRAD_ACCUMULATIONS = ("weight_dtype", "fp32")
UPCAST_SLICE_ROWS = 8192  # the CPU "upcast" path converts the [V, rows] gradient this many rows at a time


@dataclass(frozen=True)
class AccumulationPath:
    """How the fused loss accumulates the weight gradient over its chunks: what actually runs.

    ``method``: "addmm" (``acc.addmm_(a, b)`` in the accumulator's own dtype: fp32 math, one rounding per
    chunk; cuBLAS beta=1), "addmm_out_fp32" (CUDA: ``fp32 += bf16 @ bf16`` in one cuBLAS call, addmm with
    ``out_dtype``), "upcast" (CPU, which has no mixed-dtype addmm: fp32 GEMMs on upcast slices).
    """

    requested: str
    dtype: torch.dtype  # the accumulator's
    method: str
    note: str = ""  # why it is not what was requested, if it is not

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        text = f"grad_accumulation={self.requested!r}: {dtype} accumulator, {self.method}"
        return text + (f" ({self.note})" if self.note else "")


def accumulator_dtype(mode: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The weight-gradient accumulator's dtype that ``mode`` asks for: the weight's own, or fp32 for a 2-byte weight
    under "fp32" (on a GPU whose torch has the mixed-dtype addmm; see grad_accumulation_path)."""
    if mode == "weight_dtype" or torch.empty((), dtype=weight_dtype).element_size() >= 4:
        return weight_dtype
    return torch.float32


def grad_accumulation_path(mode: str, weight_dtype: torch.dtype, device: torch.device) -> AccumulationPath:
    """The accumulation that ``mode`` ("weight_dtype" | "fp32") gets for this weight dtype and device.

    A weight of 4 bytes or more is accumulated in its own dtype either way. "fp32" for a 2-byte weight on
    CUDA needs the mixed-dtype ``addmm``; where that fails (checked once per device) it falls back to the
    weight's dtype, saying so once, never to an fp32 GEMM on upcast operands.
    """
    if mode not in GRAD_ACCUMULATIONS:
        raise ValueError(f"grad_accumulation must be one of {GRAD_ACCUMULATIONS}, got {mode!r}")
    if accumulator_dtype(mode, weight_dtype) == weight_dtype:
        return AccumulationPath(mode, weight_dtype, "addmm")
    if device.type != "cuda":
        return AccumulationPath(mode, torch.float32, "upcast")
    if _cuda_mixed_addmm_works(device.index if device.index is not None else torch.cuda.current_device()):
        return AccumulationPath(mode, torch.float32, "addmm_out_fp32")
    return AccumulationPath(mode, weight_dtype, "addmm", note="torch.addmm(out_dtype=float32) unavailable")


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
    except Exception:  # any failure (missing op, no kernel for this GPU, no CUDA) means: not usable
        ok = False
    if not ok:
        logger.warning(
            "grad_accumulation='fp32' needs torch.addmm(out_dtype=float32) (fp32 += bf16 @ bf16 in one "
            "cuBLAS call), which fails with this torch on cuda:%d: the fused loss accumulates the weight "
            "gradient in the weight's dtype instead (fp32 math, one rounding per chunk)",
            device_index,
        )
    return ok


class WeightGradAccumulator:
    """``sum_k a_k @ b_k`` over the chunks of the fused loss, then that gradient in the weight's dtype.

    In the weight's dtype (``path.method == "addmm"``): one [V, H] tensor, ``acc.addmm_(a, b)`` per chunk.
    In fp32 for a 2-byte weight: two fp32 pieces along V, rows [0, V//2) in a buffer of exactly V*H*2 bytes
    (the size of the result) and the other rows apart. ``finish`` converts the first piece in place into
    the first half of its own buffer (``downcast_scaled_``), writes the second, converted, into the second
    half, and drops it: the gradient owns exactly V*H*2 bytes (no fp32 storage behind ``weight.grad``), and
    the peak is the fp32 accumulator itself (no second copy at any time).
    """

    def __init__(self, shape, dtype: torch.dtype, device: torch.device, path: AccumulationPath):
        self.dtype, self.path = dtype, path
        rows, cols = shape
        self._buffer = None
        if path.dtype == dtype:
            self._pieces = [(0, torch.zeros(rows, cols, device=device, dtype=dtype))]
        else:
            assert path.dtype == torch.float32 and torch.empty((), dtype=dtype).element_size() == 2
            split = rows // 2
            self._buffer = torch.zeros((rows * cols + 1) // 2, device=device, dtype=torch.float32)
            self._pieces = [
                (0, self._buffer[: split * cols].view(split, cols)),
                (split, torch.zeros(rows - split, cols, device=device, dtype=torch.float32)),
            ]
        self.shape = (rows, cols)

    def add_(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """acc += a @ b, with ``a`` [V, k] and ``b`` [k, H] in the weight's dtype."""
        method = self.path.method
        b32 = b.float() if method == "upcast" else None
        for start, acc in self._pieces:
            part = a[start : start + acc.shape[0]]
            if method == "addmm":
                acc.addmm_(part, b)
            elif method == "addmm_out_fp32":
                torch.ops.aten.addmm.dtype_out(acc, part, b, torch.float32, out=acc)
            else:
                for s in range(0, part.shape[0], UPCAST_SLICE_ROWS):
                    acc[s : s + UPCAST_SLICE_ROWS].addmm_(part[s : s + UPCAST_SLICE_ROWS].float(), b32)

    def finish(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The accumulated gradient times ``scale`` (fp32 scalar), in the weight's dtype; consumes the accumulator."""
        pieces, self._pieces = self._pieces, None
        if self._buffer is None:
            acc = pieces[0][1]
            return acc if scale is None else acc.mul_(scale)
        buffer, self._buffer = self._buffer, None
        scale = 1.0 if scale is None else scale
        rows, cols = self.shape
        downcast_scaled_(pieces[0][1], scale, self.dtype)  # rows [0, split) -> the first half of the buffer
        out = buffer.view(self.dtype)[: rows * cols].view(rows, cols)
        split, rest = pieces[1]
        del pieces
        step = max(1, (1 << 22) // cols)
        for s in range(0, rest.shape[0], step):  # rows [split, V) -> the second half, slice by slice
            torch.mul(rest[s : s + step], scale, out=out[split + s : split + s + step])
        return out


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
