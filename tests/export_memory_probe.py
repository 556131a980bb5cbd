"""Run under a launcher (torchrun, deepspeed): train a few steps with `hfdist hyperfit`'s Trainer, then export the
model while measuring each rank's peak host memory of the export alone.

The peak is the kernel's high-water mark of resident memory (VmHWM), reset to the current resident size just before
the export (``/proc/self/clear_refs`` = 5), read right after it: memory the allocator frees and hands out again
cannot hide a moment when a rank held more. Usage: export_memory_probe.py CONFIG RUN_DIR OUT_JSON [--set ...].
"""
import gc
import json
import re
import sys
from pathlib import Path


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
        model_bytes = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainer.backend.model.parameters()) * 4
        gc.collect()
        rss_before = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        trainer.export(Path(run_dir) / "model")
        peak = status_kib("VmHWM")
        Path(f"{out}.rank{trainer.backend.rank}").write_text(json.dumps(
            {"rss_before_kib": rss_before, "peak_kib": peak, "export_extra_bytes": (peak - rss_before) * 1024,
             "model_fp32_bytes": model_bytes}))
    finally:
        trainer.backend.close()


if __name__ == "__main__":
    main()
