"""perf/mfu and per-rank peak memory: the FLOP count of a training token and the utilisation formula."""

import pytest
import torch

from hfdist.distributed.perf import mfu, model_flops_per_token, peak_flops, rank_metrics
from hfdist.distributed.plan import meta_model
from hfdist.models import architecture_config


def test_flops_per_token_llama_8b():
    lm = meta_model(architecture_config("llama-3.1-8b"), torch.bfloat16).lm
    # 6 x (8.03 B parameters - 0.525 B input embedding) + 12 x 32 layers x 4096 x 256 tokens
    expected = 6 * (8_030_261_248 - 128256 * 4096) + 12 * 32 * 4096 * 256
    assert model_flops_per_token(lm, 256) == expected


def test_flops_per_token_counts_tied_head_once():
    lm = meta_model(architecture_config("llama-3.2-1b"), torch.bfloat16).lm
    assert model_flops_per_token(lm, 256) == 6 * 1_235_814_400 + 12 * 16 * 32 * 64 * 256


def test_mfu_and_rank_metrics(monkeypatch):
    assert mfu(1000.0, 6e9, world_size=2, device_peak=None) is None
    assert mfu(1000.0, 6e9, world_size=2, device_peak=1e13) == pytest.approx(0.3)
    monkeypatch.delenv("HFDIST_PEAK_TFLOPS", raising=False)
    assert peak_flops(torch.device("cpu")) is None  # no MFU on a CPU unless told its peak
    values = rank_metrics(1.5, 100.0, 1e9, torch.device("cpu"))
    assert values == {"memory/peak_gib": 1.5, "memory/peak_gib/rank0": 1.5}
    monkeypatch.setenv("HFDIST_PEAK_TFLOPS", "1")
    assert rank_metrics(1.5, 100.0, 1e9, torch.device("cpu"))["perf/mfu"] == pytest.approx(0.1)
