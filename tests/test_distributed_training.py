"""Sharded hyperfitting on this CPU with real gloo process groups, launched the ways users launch it.

One seeded run of a tiny Llama (8 optimizer steps of 8 sequences, 2 micro-batches of 2 per rank on 2 ranks,
so gradient accumulation runs too) is repeated on 1 process, FSDP2 on 2 processes (launchers/torchrun.sh),
ZeRO-3 on 2 processes (launchers/deepspeed.sh), two "nodes" on loopback with HSDP (two torchrun agents, one
c10d rendezvous) and `mpirun -n 2` (launchers/mpirun.sh). Parity tolerances (float32 everywhere):
per-step loss and gradient norm within 1e-5 relative, final weights (read back with from_pretrained)
within 1e-5 absolute (observed at most 1e-7, 4e-7 and 9e-7; Adam moves a weight by up to lr=3e-3 a step).
A gradient summed instead of averaged over ranks shows in the gradient norm (x2), though Adam's update is
scale-free and the losses barely move. Resuming on the
same world size is compared exactly (bitwise); resuming a 2-rank FSDP checkpoint on 1 process within the
parity tolerances.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
LAUNCHERS = REPO / "launchers"
DS_FP32 = REPO / "configs" / "deepspeed" / "zero3_fp32.json"
STEPS = 8
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5

CONFIG = """\
model: {{path: {model}}}
data: {{source: austen, mode: chunk, seq_len: 32, num_samples: 16, num_validation: 4, num_contexts: 2, context_len: 8}}
optim: {{name: adam, lr: 3.0e-3}}
train: {{epochs: 4, global_batch_size: 8, micro_batch_size: 2, seed: 0}}
eval: {{every_epochs: 0, total_len: 48, ttr_window: 16, batch_size: 4}}
checkpoint: {{every_steps: 2, keep_last: 2}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **extra)
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


def assert_matches(run_dir: Path, reference: Path, steps=range(1, STEPS + 1)):
    got, want = step_records(run_dir), step_records(reference)
    for step in steps:
        assert got[step][0] == pytest.approx(want[step][0], rel=LOSS_RTOL), f"loss at step {step}"
        assert got[step][1] == pytest.approx(want[step][1], rel=LOSS_RTOL), f"grad norm at step {step}"
    a, b = exported_weights(run_dir), exported_weights(reference)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < WEIGHT_ATOL, f"final weights differ by up to {worst}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hfdist.testing import tiny_model_folder

    root = tmp_path_factory.mktemp("distributed")
    model = tiny_model_folder(root / "tiny-model")
    config = root / "tiny.yaml"
    config.write_text(CONFIG.format(model=model))
    return {"root": root, "model": model, "config": config}


@pytest.fixture(scope="module")
def single_run(setup):
    run_dir = setup["root"] / "single"
    run([sys.executable, "-m", "hfdist.cli", "hyperfit", *hyperfit_args(setup, run_dir)], launch_env())
    assert len(step_records(run_dir)) == STEPS
    return run_dir


@pytest.fixture(scope="module")
def fsdp_run(setup):
    run_dir = setup["root"] / "fsdp"
    run([LAUNCHERS / "torchrun.sh", *hyperfit_args(setup, run_dir, "--set", "distributed.backend=fsdp")],
        launch_env(GPUS_PER_NODE="2"))
    return run_dir


@pytest.fixture(scope="module")
def deepspeed_run(setup):
    pytest.importorskip("deepspeed")
    run_dir = setup["root"] / "deepspeed"
    run([LAUNCHERS / "deepspeed.sh", *hyperfit_args(setup, run_dir)], launch_env(NUM_GPUS="2", DS_CONFIG=str(DS_FP32)))
    return run_dir


def test_fsdp_two_processes_match_single(single_run, fsdp_run):
    assert_matches(fsdp_run, single_run)
    # The shards FSDP2 built on the gloo ranks are those `hfdist plan` builds on the meta device.
    from hfdist.distributed.plan import fsdp_shard_numels, meta_model
    from transformers import AutoConfig

    topology = json.loads((fsdp_run / "checkpoints" / "step_00000008" / "topology.json").read_text())
    meta = meta_model(AutoConfig.from_pretrained(fsdp_run / "model"), torch.float32)
    assert topology["world_size"] == 2
    assert topology["params_per_rank0"] == fsdp_shard_numels(meta, 2)["rank0"]


def test_deepspeed_zero3_two_processes_match_single(single_run, deepspeed_run):
    assert_matches(deepspeed_run, single_run)
    from hfdist.distributed.plan import deepspeed_partition_numel, meta_model
    from transformers import AutoConfig

    topology = json.loads((deepspeed_run / "checkpoints" / "step_00000008" / "topology.json").read_text())
    meta = meta_model(AutoConfig.from_pretrained(deepspeed_run / "model"), torch.float32)
    assert topology["params_per_rank0"] == deepspeed_partition_numel(meta, 2)


def test_two_nodes_on_loopback_with_hsdp(setup, single_run):
    """Two torchrun agents (`--nnodes 2 --node-rank 0/1`) meet at one c10d rendezvous; HSDP replicates across
    the two "nodes" (replicate_degree 2) and shards within each."""
    run_dir = setup["root"] / "two-nodes"
    env = launch_env(NNODES="2", GPUS_PER_NODE="1", RDZV_ID="loopback")
    args = hyperfit_args(setup, run_dir, "--set", "distributed.backend=fsdp", "--set", "distributed.replicate_degree=2")
    nodes = [subprocess.Popen([str(LAUNCHERS / "torchrun.sh"), *map(str, args)], env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-6000:]
    topology = json.loads((run_dir / "checkpoints" / "step_00000008" / "topology.json").read_text())
    assert topology["mesh"] == {"dp_replicate": 2, "dp_shard": 1}
    assert_matches(run_dir, single_run)


def test_mpirun_two_ranks(setup, single_run):
    """`mpirun -n 2`: ranks, world size and the rendezvous found through MPI."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to the Python interpreter (pip install mpich)")
    run_dir = setup["root"] / "mpirun"
    env = launch_env(NP="2", MPIRUN=str(mpiexec))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(name)  # found through MPI: rank 0's host and a free port, broadcast
    # Also the other weight-loading path (rank 0 reads, shards are broadcast) and activation checkpointing,
    # neither of which may change a float32 result.
    args = hyperfit_args(setup, run_dir, "--set", "distributed.backend=fsdp", "--set",
                         "distributed.weight_loading=rank0_broadcast", "--set", "train.activation_checkpointing=true")
    output = run([LAUNCHERS / "mpirun.sh", *args], env)
    assert "via mpi" in output
    assert_matches(run_dir, single_run)


def test_fsdp_checkpoint_resumes_on_one_process(setup, fsdp_run):
    """A checkpoint written by 2 FSDP ranks (DCP shards) resumes on 1 process; the curve continues."""
    run_dir = setup["root"] / "fsdp-resumed-on-one"
    shutil.copytree(fsdp_run, run_dir)
    checkpoint = run_dir / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in (checkpoint / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    shutil.rmtree(run_dir / "model")
    run([sys.executable, "-m", "hfdist.cli", "hyperfit", *hyperfit_args(setup, run_dir, "--resume", checkpoint)],
        launch_env())
    assert_matches(run_dir, fsdp_run, steps=(7, 8))


def test_killed_fsdp_run_resumes_exactly(setup, fsdp_run):
    """SIGKILL every process of a 2-rank run once a checkpoint is complete; `--resume` (latest) continues the
    loss curve bit for bit, and the final weights are those of the uninterrupted run."""
    import psutil

    run_dir = setup["root"] / "fsdp-killed"
    cmd = [LAUNCHERS / "torchrun.sh", *hyperfit_args(setup, run_dir, "--set", "distributed.backend=fsdp")]
    env = launch_env(GPUS_PER_NODE="2")
    launcher = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run_dir / "checkpoints" / "step_00000002" / "manifest.json"
    deadline = time.monotonic() + 180
    while not first.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    processes = [launcher_proc := psutil.Process(launcher.pid), *launcher_proc.children(recursive=True)]
    for process in reversed(processes):  # the training ranks first, then their torchrun agent
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    launcher.wait(timeout=30)
    assert first.exists(), "no checkpoint appeared before the deadline"
    assert not (run_dir / "model").exists(), "the run finished before it could be killed"
    resumed_from = int(json.loads((max((run_dir / "checkpoints").glob("step_*")) / "trainer_state.json")
                                  .read_text())["step"])
    run([LAUNCHERS / "torchrun.sh", *cmd[1:], "--resume"], launch_env(GPUS_PER_NODE="2"))
    got, want = step_records(run_dir), step_records(fsdp_run)
    assert resumed_from < STEPS
    assert [got[s] for s in range(resumed_from + 1, STEPS + 1)] == [want[s] for s in range(resumed_from + 1, STEPS + 1)]
    a, b = exported_weights(run_dir), exported_weights(fsdp_run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deepspeed_checkpoint_resumes_exactly(setup, deepspeed_run):
    run_dir = setup["root"] / "deepspeed-resumed"
    shutil.copytree(deepspeed_run, run_dir)
    shutil.rmtree(run_dir / "model")
    checkpoint = run_dir / "checkpoints" / "step_00000006"
    assert (checkpoint / "deepspeed").is_dir()
    run([LAUNCHERS / "deepspeed.sh", *hyperfit_args(setup, run_dir, "--resume", checkpoint)],
        launch_env(NUM_GPUS="2", DS_CONFIG=str(DS_FP32)))
    got, want = step_records(run_dir), step_records(deepspeed_run)
    assert [got[7], got[8]] == [want[7], want[8]]
