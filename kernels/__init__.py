"""Triton kernels, importable as ``hfdist.kernels`` (placeholder until the kernels land)."""
