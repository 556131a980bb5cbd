"""Test session set-up: the Triton interpreter, offline hubs, a shared JIT-extension cache."""
import os
from pathlib import Path

# Before anything imports triton: run Triton kernels in its interpreter on this CPU-only machine.
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


@pytest.fixture
def tiny_model_dir(tmp_path):
    from hfdist.testing import tiny_model_folder

    return tiny_model_folder(tmp_path / "tiny-model")
