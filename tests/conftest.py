"""Test session set-up: the Triton interpreter where there is no GPU, offline hubs, a shared JIT-extension cache."""

import os
from pathlib import Path


def _cuda_device_present() -> bool:
    """Whether torch sees a CUDA device, asked through NVML: no CUDA context is created in the pytest
    process, so tests that fork workers afterwards still can (importing torch does not import triton)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.is_available()


# Before anything imports triton (which reads TRITON_INTERPRET when kernels are decorated): without a GPU,
# the Triton kernels run in the interpreter; with one they are compiled, so that pytest on a GPU machine
# tests what runs there. An explicit TRITON_INTERPRET wins either way.
if not _cuda_device_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "hfdist" / "torch_extensions"))

import pytest  # noqa: E402


def pytest_configure(config):
    # Tests that start several processes (launchers, gloo groups): `pytest -m "not distributed"` skips them.
    config.addinivalue_line("markers", "distributed: starts several processes (real process groups); slow")
    # The GPU suite's rehearsal on the CPU (benchmarks/gpu_suite.py --dry-run, ~1 min): `pytest -m gpu_suite`.
    config.addinivalue_line("markers", "gpu_suite: the GPU suite's CPU rehearsal (gpu_suite.py --dry-run)")


@pytest.fixture
def tiny_model_dir(tmp_path):
    from hfdist.testing import tiny_model_folder

    return tiny_model_folder(tmp_path / "tiny-model")
