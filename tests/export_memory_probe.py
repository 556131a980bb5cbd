"""Run under a launcher (torchrun, deepspeed): train a few steps with `hfdist hyperfit`'s Trainer, then export the
model while measuring each rank's peak host memory of the export alone.

The peak is the kernel's high-water mark of resident memory (VmHWM), reset to the current resident size just before
the export (``/proc/self/clear_refs`` = 5), read right after it. Before the reset, glibc's ``malloc_trim`` hands the
heap's free pages back to the kernel, so that memory freed earlier (and still resident) cannot absorb the export's
allocations unseen; memory freed and reused during the export cannot hide a moment when a rank held more. The
same probe then measures, as a control, what gathering the whole model on rank 0 costs (what the export did
before it streamed): the probe must see that. Usage:
export_memory_probe.py CONFIG RUN_DIR OUT_JSON [--set ...].
"""

import gc
import json
import re
import sys
from pathlib import Path


def settle() -> int:
    """Collect garbage, return free heap pages to the kernel; the resident size (KiB) of live memory after it."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status_kib("VmRSS")


def status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def main() -> None:
    from hfdist.config import load_config
    from hfdist.trainer import Trainer

    config_path, run_dir, out = sys.argv[1:4]
    overrides = [arg for arg in sys.argv[4:] if arg != "--set"]
    config = load_config(config_path, overrides + ["checkpoint.save_final_model=false"])
    trainer = Trainer(config, Path(run_dir), progress=False)
    try:
        trainer.run()
        model_bytes = (
            sum(
                p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                for p in trainer.backend.model.parameters()
            )
            * 4
        )
        rss_before = settle()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        trainer.export(Path(run_dir) / "model")
        peak = status_kib("VmHWM")
        gather_before = settle()
        Path("/proc/self/clear_refs").write_text("5")
        gathered = gather_on_rank0(trainer.backend)
        gather_peak = status_kib("VmHWM")
        del gathered
        Path(f"{out}.rank{trainer.backend.rank}").write_text(
            json.dumps(
                {
                    "rss_before_kib": rss_before,
                    "peak_kib": peak,
                    "export_extra_bytes": (peak - rss_before) * 1024,
                    "gather_extra_bytes": (gather_peak - gather_before) * 1024,
                    "model_fp32_bytes": model_bytes,
                }
            )
        )
    finally:
        trainer.backend.close()


def gather_on_rank0(backend) -> dict:
    """The control: the whole fp32 state on rank 0, as the export did before (FSDP: torch's full state dict with CPU
    offload; ZeRO-3: every parameter's fp32 master gathered one at a time, kept on rank 0)."""
    if backend.name == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in backend.engine.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            if backend.is_main:
                state[name] = full.detach().to("cpu").clone()
        return state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        backend.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


if __name__ == "__main__":
    main()
