"""Helpers of the multi-process tests: launch the real CLI under the real launchers, read back what a run wrote.

Parity helpers compare a run with a reference run of the same config: per-step loss and gradient norm within a
relative tolerance, exported weights (read back with ``from_pretrained``) within an absolute one.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
LAUNCHERS = REPO / "launchers"
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        **extra,
    )
    return env


def run(cmd: list, env: dict, timeout: int = 240) -> str:
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{output[-6000:]}")
    return output


def hyperfit_args(setup, run_dir: Path, *extra) -> list:
    return [setup["config"], "--output-dir", run_dir, "--no-progress", *extra]


def step_records(run_dir: Path) -> dict:
    """step -> (loss, grad norm); a step logged twice (before a kill and after the resume) keeps the last."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "step":
            records[record["step"]] = (record["train/loss"], record["train/grad_norm"])
    return records


def exported_weights(run_dir: Path) -> dict:
    from transformers import AutoConfig

    from hfdist.models import model_class_for  # AutoModelForCausalLM, or ImageGPT's class for image runs

    model_class = model_class_for(AutoConfig.from_pretrained(run_dir / "model"))
    model = model_class.from_pretrained(run_dir / "model", dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_matches(run_dir: Path, reference: Path, steps=None):
    """Every step of ``reference`` (or ``steps``) has the same loss and gradient norm in ``run_dir`` (LOSS_RTOL), and
    the exported weights agree (WEIGHT_ATOL)."""
    got, want = step_records(run_dir), step_records(reference)
    for step in steps or sorted(want):
        assert got[step][0] == pytest.approx(want[step][0], rel=LOSS_RTOL), f"loss at step {step}"
        assert got[step][1] == pytest.approx(want[step][1], rel=LOSS_RTOL), f"grad norm at step {step}"
    a, b = exported_weights(run_dir), exported_weights(reference)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < WEIGHT_ATOL, f"final weights differ by up to {worst}"


def tiny_run_setup(root: Path, config_template: str, **model_kwargs) -> dict:
    """A tiny Llama folder (``hfdist.testing.tiny_model_folder(**model_kwargs)``) and a run config written from
    ``config_template`` with ``{model}`` filled in: the ``setup`` of the parity tests."""
    from hfdist.testing import tiny_model_folder

    model = tiny_model_folder(root / "tiny-model", **model_kwargs)
    config = root / "tiny.yaml"
    config.write_text(config_template.format(model=model))
    return {"root": root, "model": model, "config": config}
