"""Where a process sits in the job, read from what each launcher sets: torchrun, SLURM, mpirun (real MPI)."""

import json
import os
import subprocess
import sys

import pytest

from hfdist.distributed.env import LaunchEnv, discover, first_slurm_host

LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMIX_RANK",
    "MPI_LOCALRANKID",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_launcher_is_one_process(clean_env):
    assert discover() == LaunchEnv()


def test_torchrun_variables(clean_env):
    for name, value in dict(
        RANK="5", WORLD_SIZE="16", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", MASTER_ADDR="n0", MASTER_PORT="29411"
    ).items():
        clean_env.setenv(name, value)
    env = discover()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 16, 1, 4)
    assert (env.master_addr, env.master_port, env.launcher, env.num_nodes) == ("n0", 29411, "torchrun", 4)


def test_slurm_variables(clean_env):
    for name, value in dict(
        SLURM_PROCID="9",
        SLURM_NTASKS="16",
        SLURM_LOCALID="1",
        SLURM_TASKS_PER_NODE="8(x2)",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_JOB_ID="123456",
    ).items():
        clean_env.setenv(name, value)
    env = discover()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)
    assert (env.master_addr, env.master_port, env.launcher) == ("gpu07", 20000 + 123456 % 20000, "slurm")


@pytest.mark.parametrize(
    "nodelist, first",
    [("node1", "node1"), ("gpu[03-05,09],cpu1", "gpu03"), ("a100-[12,14]", "a100-12"), ("h1,h2", "h1")],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_torchrun_takes_precedence_over_slurm(clean_env):
    """Under `srun torchrun` both are set; the per-GPU ranks are torchrun's."""
    for name, value in dict(
        SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="n[0-1]", RANK="9", WORLD_SIZE="16"
    ).items():
        clean_env.setenv(name, value)
    assert discover().launcher == "torchrun"


@pytest.mark.distributed
def test_mpirun_discovery(tmp_path):
    """Two real MPI ranks: rank, size, local rank from COMM_WORLD; rank 0's host and port broadcast to all."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("no mpiexec next to the Python interpreter (pip install mpich)")
    # Each rank writes its own file: the ranks' stdout would interleave.
    code = (
        "import json, sys; from hfdist.distributed.env import discover; e = discover(); "
        "open(f'{sys.argv[1]}/rank{e.rank}.json', 'w').write(json.dumps([e.rank, e.world_size, e.local_rank, "
        "e.local_world_size, e.master_addr, e.master_port, e.launcher]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r[:4] for r in rows] == [[0, 2, 0, 2], [1, 2, 1, 2]]
    assert rows[0][4:] == rows[1][4:] and rows[0][6] == "mpi" and rows[0][5] > 0


def test_single_backend_refuses_many_processes(clean_env):
    from hfdist.config import load_config
    from hfdist.distributed.backends import build_backend
    from hfdist.errors import HfdistError

    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(HfdistError, match="distributed.backend"):
        build_backend(load_config(None, []))


def test_global_batch_must_divide(clean_env):
    """global batch = micro-batch x accumulation x data-parallel ranks, or a one-line error naming the field."""
    from hfdist.config import load_config
    from hfdist.distributed.single import SingleBackend
    from hfdist.errors import HfdistError

    backend = SingleBackend(load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=2"]))
    assert backend.gradient_accumulation_steps() == 4
    backend.world_size = 3  # what the FSDP/DeepSpeed backends see under a 3-process launch
    with pytest.raises(HfdistError, match=r"train.global_batch_size: 8 is not divisible .* \(3\)"):
        backend.gradient_accumulation_steps()


def test_offload_under_cuda_asks_for_a_cpu_backend():
    """FSDP's CPU offload keeps gradients on the host and the clipping norm all-reduces them there: on CUDA the
    group must have gloo beside NCCL; on a CPU it is gloo alone (what the CPU tests run)."""
    from hfdist.config import load_config
    from hfdist.distributed.env import process_group_backend
    from hfdist.distributed.fsdp import FSDPBackend

    assert process_group_backend("cuda", host_collectives=True) == "cuda:nccl,cpu:gloo"
    assert process_group_backend("cuda", host_collectives=False) == "nccl"
    assert process_group_backend("cpu", host_collectives=True) == "gloo"
    for offload in (True, False):
        backend = FSDPBackend.__new__(FSDPBackend)  # the decision alone, without joining a process group
        backend.config = load_config(None, ["distributed.backend=fsdp", f"distributed.cpu_offload={offload}"])
        assert process_group_backend("cuda", backend.uses_host_collectives()) == (
            "cuda:nccl,cpu:gloo" if offload else "nccl"
        )
        assert backend.optimizer_on_host() is offload


def test_host_optimizer_threads():
    from hfdist.distributed.env import host_threads

    assert host_threads("cuda", True, local_world_size=8, cpus=96) == 12  # Adam on the host: the rank's cores
    assert host_threads("cuda", True, local_world_size=8, cpus=4) == 1
    assert (
        host_threads("cuda", True, local_world_size=8, requested=6, cpus=96) == 6
    )  # distributed.host_threads
    assert host_threads("cuda", False, local_world_size=8, cpus=96) is None  # optimizer on the GPU: untouched
    assert (
        host_threads("cpu", True, local_world_size=2, cpus=2) is None
    )  # CPU ranks share the cores: untouched


def test_deepspeed_reduces_gradients_in_fp32():
    """bf16 compute, gradients reduced in fp32 (as FSDP does): in the shipped JSONs, and filled in for a JSON that
    says nothing."""
    from pathlib import Path

    from hfdist.config import load_config
    from hfdist.distributed.deepspeed import resolve_deepspeed_config

    repo = Path(__file__).resolve().parent.parent
    for name in ("zero3.json", "zero3_offload.json", "zero3_fp32.json"):
        assert (
            json.loads((repo / "configs" / "deepspeed" / name).read_text())["communication_data_type"]
            == "fp32"
        )
    config = load_config(None, ["distributed.backend=deepspeed", "distributed.mixed_precision=true"])
    assert resolve_deepspeed_config(config, 8, 1)["communication_data_type"] == "fp32"


def test_deepspeed_hostfile_launch_forwards_the_environment(tmp_path):
    """launchers/deepspeed.sh with a hostfile writes a DeepSpeed env file (DS_ENV_FILE) with the variables the
    remote ranks need, after the user's own ~/.deepspeed_env; DRY_RUN prints it and the command."""
    from pathlib import Path

    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("MY_SETTING=1\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    env = {
        **os.environ,
        "HOME": str(home),
        "HOSTFILE": str(hostfile),
        "DRY_RUN": "1",
        "HF_HOME": "/shared/hf",
        "HF_HUB_OFFLINE": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "DS_ENV_VARS": "WANDB_PROJECT",
        "WANDB_PROJECT": "hyperfit",
        "TMPDIR": str(tmp_path),
    }
    env.pop("TORCH_EXTENSIONS_DIR", None)  # the launcher's default then
    launcher = Path(__file__).resolve().parent.parent / "launchers" / "deepspeed.sh"
    out = subprocess.run(
        [str(launcher), "cfg.yaml", "--output-dir", "/shared/runs/x"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    env_file = Path(out.splitlines()[0].split("=", 1)[1])
    lines = env_file.read_text().splitlines()
    assert lines[0] == "MY_SETTING=1"
    for expected in (
        "HF_HOME=/shared/hf",
        "HF_HUB_OFFLINE=1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=3",
        "WANDB_PROJECT=hyperfit",
        f"TORCH_EXTENSIONS_DIR={home}/.cache/hfdist/torch_extensions",
    ):
        assert expected in lines, expected
    assert "--hostfile" in out and "distributed.backend=deepspeed" in out
