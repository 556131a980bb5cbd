"""HSDP communicates as documented: in one real training step on 4 gloo ranks (replicate 2 x shard 2, 3 micro-batches
per rank), every collective is recorded with its process group and the micro-batch that issued it
(tests/collectives_probe.py). Each micro-batch reduce-scatters every FSDP unit's gradient inside the rank's shard
group; the all-reduce across the replicas (the slow inter-node exchange) happens once per unit and step, in the last
micro-batch only; the parameters' all-gathers never leave the shard group; the step's bookkeeping adds three
all-reduces over all ranks (the token count before the micro-batches; after them the loss, entropy and preemption
flag, then the gradient norm)."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from launch_helpers import launch_env, run, tiny_run_setup

pytestmark = pytest.mark.distributed
PROBE = Path(__file__).resolve().parent / "collectives_probe.py"
CONFIG = """\
model: {{path: {model}}}
data: {{source: austen, mode: chunk, seq_len: 32, num_samples: 12, num_validation: 0, num_contexts: 0, context_len: 8}}
optim: {{name: adam, lr: 1.0e-3}}
train: {{epochs: 1, global_batch_size: 12, micro_batch_size: 1, seed: 0}}
eval: {{every_epochs: 0, total_len: 48, ttr_window: 16, batch_size: 4}}
distributed: {{backend: fsdp, replicate_degree: 2}}
"""


def test_hsdp_all_reduces_across_replicas_once_per_step_on_the_last_micro_batch(tmp_path, capsys):
    setup = tiny_run_setup(tmp_path, CONFIG)
    out = tmp_path / "collectives"
    out.mkdir()
    env = launch_env()
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "4",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{env['MASTER_PORT']}",
            PROBE,
            setup["config"],
            tmp_path / "run",
            out,
        ],
        env,
    )
    for rank in range(4):
        record = json.loads((out / f"rank{rank}.json").read_text())
        assert record["mesh"] == {"dp_replicate": 2, "dp_shard": 2} and record["micro_batches"] == 3
        shard, replicate = record["groups"]["dp_shard"], record["groups"]["dp_replicate"]
        assert rank in shard and rank in replicate and set(shard) & set(replicate) == {rank}
        units = record["units"]  # 2 decoder layers, the (untied) input embedding, the root with the head
        assert units == 4
        calls = record["calls"]
        names = {tuple(shard): "shard", tuple(replicate): "replicate"}
        counts = Counter(
            (c["op"].split(".")[0], names.get(tuple(c["ranks"]), "all"), c["phase"]) for c in calls
        )
        reduce_scatters = [c for c in calls if "reduce_scatter" in c["op"]]
        assert all(c["ranks"] == shard for c in reduce_scatters)
        assert Counter(c["phase"] for c in reduce_scatters) == {0: units, 1: units, 2: units}
        across_replicas = [c for c in calls if c["ranks"] == replicate]
        assert [(c["op"].split(".")[0], c["phase"]) for c in across_replicas] == [("allreduce_", 2)] * units
        all_gathers = [c for c in calls if "gather" in c["op"]]
        assert all_gathers and all(c["ranks"] == shard for c in all_gathers)
        world = [c for c in calls if c["ranks"] == [0, 1, 2, 3]]
        assert [(c["op"].split(".")[0], c["phase"]) for c in world] == [
            ("allreduce_", "before"),
            ("allreduce_", "after"),
            ("allreduce_", "after"),
        ]
        if rank == 0:
            with capsys.disabled():
                print("\nrank 0, one step, collectives by (op, group, phase):")
                for key, n in sorted(counts.items(), key=str):
                    print(f"  {key}: {n}")
