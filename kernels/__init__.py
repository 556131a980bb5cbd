"""hfdist.kernels: fused linear cross-entropy (also vocabulary-parallel) and sorting-free sampling.

Triton kernels with torch references: functional ops with thin ``nn.Module`` wrappers; each op takes
``backend="auto" | "triton" | "torch"``
("auto": Triton on CUDA, torch elsewhere; "triton" on CPU needs ``TRITON_INTERPRET=1``). This package
imports nothing from the rest of hfdist, and triton only when the Triton backend is first used.
"""

from .cross_entropy import (
    CrossEntropyLoss,
    FusedLinearCrossEntropyLoss,
    cross_entropy,
    fused_linear_cross_entropy,
)
from .sampling import Sampler, sample, sampling_seeds
from .vocab_parallel import (
    VocabParallelFusedLinearCrossEntropyLoss,
    vocab_parallel_fused_linear_cross_entropy,
)

__all__ = [
    "fused_linear_cross_entropy",
    "vocab_parallel_fused_linear_cross_entropy",
    "cross_entropy",
    "sample",
    "sampling_seeds",
    "FusedLinearCrossEntropyLoss",
    "VocabParallelFusedLinearCrossEntropyLoss",
    "CrossEntropyLoss",
    "Sampler",
]
