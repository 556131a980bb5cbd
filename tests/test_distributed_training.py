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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import (
    LAUNCHERS,
    REPO,
    assert_matches,
    exported_weights,
    hyperfit_args,
    launch_env,
    run,
    step_records,
    tiny_run_setup,
)

DS_FP32 = REPO / "configs" / "deepspeed" / "zero3_fp32.json"
STEPS = 8
pytestmark = pytest.mark.distributed

CONFIG = """\
model: {{path: {model}}}
data: {{source: austen, mode: chunk, seq_len: 32, num_samples: 16, num_validation: 4, num_contexts: 2, context_len: 8}}
optim: {{name: adam, lr: 3.0e-3}}
train: {{epochs: 4, global_batch_size: 8, micro_batch_size: 2, seed: 0}}
eval: {{every_epochs: 0, total_len: 48, ttr_window: 16, batch_size: 4}}
checkpoint: {{every_steps: 2, keep_last: 2}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("distributed"), CONFIG)


@pytest.fixture(scope="module")
def single_run(setup):
    run_dir = setup["root"] / "single"
    run([sys.executable, "-m", "hfdist.cli", "hyperfit", *hyperfit_args(setup, run_dir)], launch_env())
    assert len(step_records(run_dir)) == STEPS
    return run_dir


@pytest.fixture(scope="module")
def fsdp_run(setup):
    run_dir = setup["root"] / "fsdp"
    run(
        [LAUNCHERS / "torchrun.sh", *hyperfit_args(setup, run_dir, "--set", "distributed.backend=fsdp")],
        launch_env(GPUS_PER_NODE="2"),
    )
    return run_dir


@pytest.fixture(scope="module")
def deepspeed_run(setup):
    pytest.importorskip("deepspeed")
    run_dir = setup["root"] / "deepspeed"
    run(
        [LAUNCHERS / "deepspeed.sh", *hyperfit_args(setup, run_dir)],
        launch_env(NUM_GPUS="2", DS_CONFIG=str(DS_FP32)),
    )
    return run_dir


def test_fsdp_two_processes_match_single(single_run, fsdp_run):
    assert_matches(fsdp_run, single_run)
    # The shards FSDP2 built on the gloo ranks are those `hfdist plan` builds on the meta device.
    from transformers import AutoConfig

    from hfdist.distributed.layout import Layout
    from hfdist.distributed.plan import fsdp_shard_numels, meta_model

    topology = json.loads((fsdp_run / "checkpoints" / "step_00000008" / "topology.json").read_text())
    meta = meta_model(AutoConfig.from_pretrained(fsdp_run / "model"), torch.float32)
    assert topology["world_size"] == 2
    assert (
        topology["params_per_rank0"]
        == fsdp_shard_numels(meta, Layout(world_size=2, ranks_per_node=2))["rank0"]
    )


def test_deepspeed_zero3_two_processes_match_single(single_run, deepspeed_run):
    assert_matches(deepspeed_run, single_run)
    from transformers import AutoConfig

    from hfdist.distributed.plan import deepspeed_partition_numel, meta_model

    topology = json.loads((deepspeed_run / "checkpoints" / "step_00000008" / "topology.json").read_text())
    meta = meta_model(AutoConfig.from_pretrained(deepspeed_run / "model"), torch.float32)
    assert topology["params_per_rank0"] == deepspeed_partition_numel(meta, 2)


def test_two_nodes_on_loopback_with_hsdp(setup, single_run):
    """Two torchrun agents (`--nnodes 2 --node-rank 0/1`) meet at one c10d rendezvous; HSDP replicates across
    the two "nodes" (replicate_degree 2) and shards within each."""
    run_dir = setup["root"] / "two-nodes"
    env = launch_env(NNODES="2", GPUS_PER_NODE="1", RDZV_ID="loopback")
    args = hyperfit_args(
        setup, run_dir, "--set", "distributed.backend=fsdp", "--set", "distributed.replicate_degree=2"
    )
    nodes = [
        subprocess.Popen(
            [str(LAUNCHERS / "torchrun.sh"), *map(str, args)],
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
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
    args = hyperfit_args(
        setup,
        run_dir,
        "--set",
        "distributed.backend=fsdp",
        "--set",
        "distributed.weight_loading=rank0_broadcast",
        "--set",
        "train.activation_checkpointing=true",
    )
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
    run(
        [
            sys.executable,
            "-m",
            "hfdist.cli",
            "hyperfit",
            *hyperfit_args(setup, run_dir, "--resume", checkpoint),
        ],
        launch_env(),
    )
    assert_matches(run_dir, fsdp_run, steps=(7, 8))


def test_killed_fsdp_run_resumes_exactly(setup, fsdp_run):
    """SIGKILL every process of a 2-rank run once a checkpoint is complete; `--resume` (latest) continues the
    loss curve bit for bit, and the final weights are those of the uninterrupted run."""
    import psutil

    run_dir = setup["root"] / "fsdp-killed"
    cmd = [LAUNCHERS / "torchrun.sh", *hyperfit_args(setup, run_dir, "--set", "distributed.backend=fsdp")]
    env = launch_env(GPUS_PER_NODE="2")
    launcher = subprocess.Popen(
        [str(c) for c in cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
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
    resumed_from = int(
        json.loads((max((run_dir / "checkpoints").glob("step_*")) / "trainer_state.json").read_text())["step"]
    )
    run([LAUNCHERS / "torchrun.sh", *cmd[1:], "--resume"], launch_env(GPUS_PER_NODE="2"))
    got, want = step_records(run_dir), step_records(fsdp_run)
    assert resumed_from < STEPS
    assert [got[s] for s in range(resumed_from + 1, STEPS + 1)] == [
        want[s] for s in range(resumed_from + 1, STEPS + 1)
    ]
    a, b = exported_weights(run_dir), exported_weights(fsdp_run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deepspeed_checkpoint_resumes_exactly(setup, deepspeed_run):
    run_dir = setup["root"] / "deepspeed-resumed"
    shutil.copytree(deepspeed_run, run_dir)
    shutil.rmtree(run_dir / "model")
    checkpoint = run_dir / "checkpoints" / "step_00000006"
    assert (checkpoint / "deepspeed").is_dir()
    run(
        [LAUNCHERS / "deepspeed.sh", *hyperfit_args(setup, run_dir, "--resume", checkpoint)],
        launch_env(NUM_GPUS="2", DS_CONFIG=str(DS_FP32)),
    )
    got, want = step_records(run_dir), step_records(deepspeed_run)
    assert [got[7], got[8]] == [want[7], want[8]]


# ---- export, mixed precision with offload, asynchronous checkpoints (tests/test_export.py has the in-process ones) --
def checkpoint_weights(folder: Path) -> dict:
    """The model weights a DCP checkpoint holds (HF names), read by torch's own converter, not by hfdist."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.parent / f"{folder.name}-weights.pt"
    dcp_to_torch_save(folder / "dcp", target)
    state = torch.load(target, weights_only=True)["model"]
    return {k[len("lm.") :]: v for k, v in state.items()}


@pytest.mark.distributed
def test_fsdp_export_equals_the_trained_weights(fsdp_run):
    """Each rank wrote its own rows into the safetensors files: the export equals, bit for bit, the weights of the
    step-8 checkpoint (the last step), and carries the index, the config and the tokenizer."""
    exported = exported_weights(fsdp_run)
    trained = checkpoint_weights(fsdp_run / "checkpoints" / "step_00000008")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in exported)
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json"):
        assert (fsdp_run / "model" / name).is_file(), name


@pytest.mark.distributed
def test_deepspeed_export_equals_the_fp32_master_weights(deepspeed_run):
    """ZeRO-3's ranks wrote their fp32 master partitions straight into the files: the export equals, bit for bit,
    DeepSpeed's own consolidation (zero_to_fp32) of the step-8 checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(
        str(deepspeed_run / "checkpoints" / "step_00000008"), tag="deepspeed"
    )
    trained = {k[len("lm.") :]: v for k, v in state.items() if k.startswith("lm.")}
    exported = exported_weights(deepspeed_run)
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in exported)


# bf16 compute (FSDP MixedPrecisionPolicy), fp32 master weights and gradient reduction, CPU offload and clipping at a
# norm the gradients exceed, on 2 ranks against 1 process with the same settings. Step 1 starts from identical
# weights: each micro-batch's bf16 forward/backward is the same computation, only the fp32 sums of the micro-batch
# gradients run in another order (2 ranks: reduce-scatter of per-rank sums), so loss and gradient norm agree to fp32
# rounding (rel 1e-5). After it, an fp32 master weight that differs in its last bit can round to another bf16
# value (relative step 2^-8 = 3.9e-3), so later steps agree to a few bf16 roundings of the activations: losses and
# norms within rel 2e-2, and the weights' difference below 5% of how far training moved them.
BF16_STEP1_RTOL = 1e-5
BF16_LATER_RTOL = 2e-2
BF16_WEIGHT_REL = 0.05
BF16_OFFLOAD = [
    "--set",
    "distributed.backend=fsdp",
    "--set",
    "distributed.mixed_precision=true",
    "--set",
    "distributed.cpu_offload=true",
    "--set",
    "optim.max_grad_norm=0.5",
]


@pytest.mark.distributed
def test_fsdp_bf16_offload_clipping_two_ranks_match_one(setup):
    runs = {}
    for ranks in (1, 2):
        run_dir = setup["root"] / f"bf16-offload-{ranks}"
        output = run(
            [LAUNCHERS / "torchrun.sh", *hyperfit_args(setup, run_dir, *BF16_OFFLOAD)],
            launch_env(GPUS_PER_NODE=str(ranks)),
        )
        assert "process group: gloo" in output
        runs[ranks] = run_dir
    one, two = step_records(runs[1]), step_records(runs[2])
    for step in range(1, STEPS + 1):
        print(
            f"step {step}: loss rel diff {abs(two[step][0] / one[step][0] - 1):.1e}, grad norm "
            f"{one[step][1]:.3f} rel diff {abs(two[step][1] / one[step][1] - 1):.1e}"
        )
    assert all(norm > 0.5 for _, norm in one.values())  # clipping is active at every step
    assert two[1][0] == pytest.approx(one[1][0], rel=BF16_STEP1_RTOL)
    assert two[1][1] == pytest.approx(one[1][1], rel=BF16_STEP1_RTOL)
    for step in range(2, STEPS + 1):
        assert two[step][0] == pytest.approx(one[step][0], rel=BF16_LATER_RTOL), f"loss at step {step}"
        assert two[step][1] == pytest.approx(one[step][1], rel=BF16_LATER_RTOL), f"grad norm at step {step}"
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).state_dict()
    a, b = exported_weights(runs[2]), exported_weights(runs[1])
    moved = sum((b[k] - start[k]).pow(2).sum() for k in b).sqrt()
    differ = sum((a[k] - b[k]).pow(2).sum() for k in b).sqrt()
    print(f"weights: differ by {differ:.3g} (L2), training moved them {moved:.3g}")
    assert differ < BF16_WEIGHT_REL * moved, (
        f"weights differ by {differ:.3g}, training moved them {moved:.3g}"
    )


@pytest.mark.distributed
def test_kill_during_async_checkpoint_keeps_the_previous_one_and_resumes_exactly(setup, fsdp_run):
    """checkpoint.async: training goes on while the checkpoint of step 4 is written; SIGKILL of a rank during that
    write (after step 5 has trained) ends the job. The step-4 folder never appears, the step-2 checkpoint is the
    latest complete one, and --resume from it ends with the weights of the uninterrupted (synchronous) run."""
    run_dir = setup["root"] / "async-killed"
    args = hyperfit_args(
        setup, run_dir, "--set", "distributed.backend=fsdp", "--set", "checkpoint.async=true"
    )
    env = launch_env(GPUS_PER_NODE="2", HFDIST_FAULT_KILL_IN_CHECKPOINT="4", HFDIST_FAULT_RANK="1")
    proc = subprocess.run(
        [str(LAUNCHERS / "torchrun.sh"), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert "kills itself (SIGKILL) while writing the checkpoint of step 4, training at step 5" in output, (
        output[-4000:]
    )
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in (checkpoints).glob("step_*")] == ["step_00000002"]
    from hfdist.checkpoint import latest_valid

    assert latest_valid(checkpoints).name == "step_00000002"
    run([LAUNCHERS / "torchrun.sh", *args, "--resume"], launch_env(GPUS_PER_NODE="2"))
    got, want = step_records(run_dir), step_records(fsdp_run)
    assert [got[s] for s in range(3, STEPS + 1)] == [want[s] for s in range(3, STEPS + 1)]
    a, b = exported_weights(run_dir), exported_weights(fsdp_run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000006", "step_00000008"]


PROBE = Path(__file__).resolve().parent / "export_memory_probe.py"
# A model whose size dominates a process's other memory: 4 layers of hidden 1024 (38.5 M parameters, 154 MB fp32).
PROBE_MODEL = {"hidden_size": 1024, "num_layers": 4, "num_heads": 8}
PROBE_CONFIG = """\
model: {{path: {model}}}
data: {{source: austen, mode: chunk, seq_len: 32, num_samples: 8, num_validation: 0, num_contexts: 0, context_len: 8}}
optim: {{name: adam, lr: 1.0e-3}}
train: {{epochs: 1, global_batch_size: 8, micro_batch_size: 4, seed: 0}}
eval: {{every_epochs: 0, total_len: 48, ttr_window: 16, batch_size: 4}}
"""
EXPORT_MEMORY_FRACTION = 0.25  # gathering the model on rank 0 takes 1.0 (the probe's control measures it)


@pytest.fixture(scope="module")
def probe_setup(setup):
    from hfdist.testing import tiny_model_folder

    model = tiny_model_folder(setup["root"] / "probe-model", **PROBE_MODEL)
    config = setup["root"] / "probe.yaml"
    config.write_text(PROBE_CONFIG.format(model=model))
    return config


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_export_peak_memory_stays_far_below_the_model(setup, probe_setup, backend):
    run_dir = setup["root"] / f"probe-{backend}"
    out = setup["root"] / f"probe-{backend}.json"
    if backend == "fsdp":
        env = launch_env()
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            env["MASTER_PORT"],
            PROBE,
            probe_setup,
            run_dir,
            out,
            "--set",
            "distributed.backend=fsdp",
            "--set",
            "export.dtype=bfloat16",
        ]
    else:
        pytest.importorskip("deepspeed")
        env = launch_env()
        cmd = [
            "deepspeed",
            "--master_port",
            env["MASTER_PORT"],
            "--num_gpus",
            "2",
            "--no_local_rank",
            PROBE,
            probe_setup,
            run_dir,
            out,
            "--set",
            "distributed.backend=deepspeed",
            "--set",
            f"distributed.deepspeed_config={DS_FP32}",
            "--set",
            "export.dtype=bfloat16",
        ]
    run(cmd, env, timeout=400)
    rank0 = json.loads(Path(f"{out}.rank0").read_text())
    extra, gather, size = rank0["export_extra_bytes"], rank0["gather_extra_bytes"], rank0["model_fp32_bytes"]
    print(
        f"{backend}: rank 0 export (bf16) peak +{extra / 2**20:.1f} MiB, gathering on rank 0 (the control) "
        f"+{gather / 2**20:.1f} MiB, for a {size / 2**20:.1f} MiB (fp32) model"
    )
    assert size > 140e6
    assert gather > 0.9 * size  # the probe sees a gather of the model
    assert extra < EXPORT_MEMORY_FRACTION * size, (
        f"rank 0 held {extra / 2**20:.1f} MiB more during the export"
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert sum(p.numel() for p in model.parameters()) * 4 == size
