"""Run under torchrun: `hfdist hyperfit`'s Trainer (its real backend, model and data) builds the run, then one training
step runs with every collective it issues recorded: the c10d op (seen by a dispatch mode, whichever Python API issued
it: FSDP2's hooks, DTensor, hfdist), the ranks of its process group, and the phase of the step that issued it: the
forward and backward of micro-batch 0, 1, ... or the bookkeeping before and after them. Each rank writes
OUT_DIR/rank{R}.json. Usage: collectives_probe.py CONFIG RUN_DIR OUT_DIR [--set ...].
"""

import json
import sys
from pathlib import Path


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.utils._python_dispatch import TorchDispatchMode

    from hfdist.config import load_config
    from hfdist.trainer import Trainer, train_step

    class Collectives(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.phase = "before"
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "c10d":
                group = next(
                    a for a in args if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a)
                )
                ranks = dist.get_process_group_ranks(dist.ProcessGroup.unbox(group))
                self.calls.append({"op": func.__name__, "ranks": ranks, "phase": self.phase})
            return func(*args, **(kwargs or {}))

    config_path, run_dir, out = sys.argv[1:4]
    overrides = [arg for arg in sys.argv[4:] if arg != "--set"]
    config = load_config(config_path, overrides + ["checkpoint.save_final_model=false"])
    trainer = Trainer(config, Path(run_dir), progress=False)
    backend = trainer.backend
    mode = Collectives()
    micro_batch = iter(range(1000))
    # Before FSDP2's own pre-forward hook, so that the root's all-gather counts in its micro-batch.
    backend.model.register_forward_pre_hook(
        lambda *_: setattr(mode, "phase", next(micro_batch)), prepend=True
    )
    totals = backend.all_reduce_step_totals  # the first collective after the micro-batches

    def after_the_micro_batches(*args, **kwargs):
        mode.phase = "after"
        return totals(*args, **kwargs)

    backend.all_reduce_step_totals = after_the_micro_batches
    batches = trainer.prefetcher.get((0, 0), None)
    with mode:
        train_step(backend, batches, config.optim.max_grad_norm)
    record = {
        "rank": backend.rank,
        "micro_batches": len(batches),
        "mesh": dict(zip(backend.mesh.mesh_dim_names, backend.mesh.shape)),
        "groups": {
            name: dist.get_process_group_ranks(backend.mesh.get_group(name))
            for name in backend.mesh.mesh_dim_names
        },
        "units": sum(1 for m in backend.model.modules() if isinstance(m, FSDPModule)),
        "calls": mode.calls,
    }
    Path(out, f"rank{backend.rank}.json").write_text(json.dumps(record))
    backend.close()


if __name__ == "__main__":
    main()
