#!/usr/bin/env python3
"""The GPU suite: hfdist's GPU measurements in one unattended call of at most 8 minutes on one
Hopper GPU, side by side with their baselines, and its rehearsal on a CPU.

  python3 benchmarks/gpu_suite.py OUT              # on the GPU machine: install, then every default step
  python3 benchmarks/gpu_suite.py OUT --dry-run    # rehearsal: every default step at tiny shapes on the CPU
  python3 benchmarks/gpu_suite.py OUT --steps cross_entropy,train   # install, env, then these (name prefixes)
  python3 benchmarks/gpu_suite.py --list [--dry-run]                # steps, budgets, estimates, commands

Steps, in order (``--list`` prints each with its budget, its estimated time on an H100/H200 and its command):
``install`` (the wheels in ``.whl/`` into a scratch site folder, hfdist editable, offline), ``env`` (device,
versions, the code paths the kernels resolve to here), ``compile_check`` beside ``kernel_tests`` (the ahead-of-time
compile check for sm_90 needs no GPU, so it shares that window with the compiled kernel tests), ``cross_entropy``
(fused loss in both accumulation modes vs eager, torch.compile and Liger), ``sampling``, ``train_<BxT>_<impl>``
(one process each, as ``bench_train.py`` runs them), ``generate_b1``/``generate_b32``, and last the compiled
training variants. ``scale_check`` (``gpu_scale_check.sh``) is not a default step: it does not fit
the 8 minutes beside the rest; ``--steps scale_check`` runs it alone (it needs ``fetch_gpu_wheels.sh
--with-scale-check``). Nor are the what-trains rows ``train_<BxT>_hfdist-lora`` and ``train_<BxT>_hfdist-last5``
(LoRA and last-5-blocks training of the 1.24B shape): ``--steps train_8x256_hfdist,train_8x256_hfdist-lora,...``
runs them beside the full-training row (they need peft, which ``fetch_gpu_wheels.sh`` fetches).

Each step is one command in its own process group under its own time budget: a step past its budget is killed
and keeps the rows it already printed; a failing step does not stop the others; the whole run stops starting
steps at ``--limit`` seconds. Rows are the JSON lines the benchmarks print, test outcomes read off pytest's
lines, and the compile check's results, each tagged with its step and appended to ``OUT/rows.jsonl`` as it
arrives. OUT gets four files, no folders: ``rows.jsonl``; ``suite.json`` (meta: mode, device, versions, code
paths; each step's budget, estimate, seconds and status; every row; the ``provenance`` block of
``benchmarks/provenance.py``, read by the ``env`` step), rewritten after every step;
``tables.md`` (the side-by-side tables); ``suite.log`` (every step's output). The driver needs only the standard
library: it runs before hfdist is installed.

``--dry-run`` forces the CPU (CUDA_VISIBLE_DEVICES empty) and sets TORCH_COMPILE_DISABLE=1 (the compiled
variants run eager there: inductor's cold C++ builds alone would take minutes on two cores); the Triton kernels
run in the interpreter in the kernel tests and the sampling benchmark, and the compile check compiles the
sampler's kernels for sm_90; the fused-loss benchmark uses the torch backend (its CPU path). It writes the same
files and rows as a GPU run, in minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SELF = Path(__file__).resolve()
WHEELS = ROOT / ".whl"  # git-ignored; filled by benchmarks/fetch_gpu_wheels.sh, carried to the GPU machine
GPU_LIMIT_S = (
    450  # no step starts or runs past this: the whole run stays inside one 8-minute call (timeout_s=480)
)
DRY_LIMIT_S = 300
KERNEL_TESTS = [
    "tests/test_kernels_cross_entropy.py",
    "tests/test_kernels_sampling.py",
    "tests/test_kernels_training.py",
]  # tests/test_kernels_compile.py is the compile_check step
TRAIN_SHAPES = [(8, 256), (4, 2048)]  # the Llama 3.2 1B shape's two batches
DRY_TRAIN_SHAPES = [(2, 32), (1, 64)]  # data.seq_len must hold the default context_len (32)
# What trains (hfdist.adapters), beside the full-training rows: LoRA on every block and the last 5 blocks trained.
WHAT_TRAINS_IMPLS = ("hfdist-lora", "hfdist-last5")
OPTIONAL_STEPS = ("scale_check",) + tuple(
    f"train_{b}x{t}_{impl}" for b, t in TRAIN_SHAPES + DRY_TRAIN_SHAPES for impl in WHAT_TRAINS_IMPLS
)


@dataclasses.dataclass
class Step:
    name: str
    budget_s: float  # killed past this
    estimate_s: float  # expected on an H100/H200 (GPU plan) or on two CPU cores (dry run)
    command: list
    env: dict = dataclasses.field(default_factory=dict)  # extra environment (None: removed)
    tags: dict = dataclasses.field(default_factory=dict)  # merged into each of the step's rows
    parse: str = "json"  # how output lines become rows: "json" (JSON object lines), "pytest", "scale"
    after: Optional[Callable[[], list]] = None  # rows from files the step wrote, read when it ends
    group: Optional[str] = None  # consecutive steps of one group run side by side


# ---------------------------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------------------------


def tiny_llama_folder(folder: Path) -> Path:
    """A config-only tiny Llama folder for the dry run's training steps (``--init random`` needs no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-6,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def compile_check_rows(path: Path) -> Callable[[], list]:
    def read():
        report = json.loads(path.read_text())
        rows = []
        for r in report["results"]:
            row = {
                "module": r["module"].rsplit(".", 1)[-1],
                "variant": r["variant"],
                "arch": r["arch"],
                "ok": r["ok"],
                "seconds": r["seconds"],
            }
            if r["ok"]:
                row.update(
                    {
                        k: r.get(k)
                        for k in (
                            "num_warps",
                            "registers",
                            "spill_store_bytes",
                            "spill_load_bytes",
                            "stack_bytes",
                            "shared_bytes",
                        )
                    }
                )
            else:
                row["error"] = r["error"][-400:]
            rows.append(row)
        rows.append(
            {
                "summary": True,
                "compiled": sum(r["ok"] for r in report["results"]),
                "variants": len(report["results"]),
                "coverage_problems": report["coverage_problems"],
                "seconds": report["seconds"],
                "workers": report["workers"],
                "archs": report["archs"],
            }
        )
        return rows

    return read


def plan(dry_run: bool, scratch: Path) -> list:
    py = sys.executable
    bench = lambda name: str(BENCH / name)  # noqa: E731
    out = str(
        scratch / "bench"
    )  # the benchmarks' own JSON/markdown: scratch, the rows come from their stdout
    steps = [
        Step(
            "install",
            30 if dry_run else 15,
            3 if dry_run else 8,
            [
                py,
                str(SELF),
                "--worker",
                "install",
                "--scratch",
                str(scratch),
                *(["--check-only"] if dry_run else []),
            ],
        ),
        Step("env", 30 if dry_run else 12, 4 if dry_run else 6, [py, str(SELF), "--worker", "env"]),
    ]
    check_json = scratch / "compile_check.json"
    if dry_run:  # the sampler's 9 variants for sm_90 (the full check runs in tests/test_kernels_compile.py)
        check_args = ["--modules", "hfdist.kernels._triton_sampling", "--arch", "90", "--workers", "1"]
        test_args = [
            *KERNEL_TESTS[:2],
            "-k",
            "out_of_range_label or batch_invariance or invalid_and_greedy_across",
        ]
    else:
        check_args = ["--arch", "90", "--workers", "8"]
        xdist = (
            ["-n", "4"] if _has_module("xdist") else []
        )  # Triton compilation dominates: compile in parallel
        test_args = [*xdist, *KERNEL_TESTS]
    steps += [
        Step(
            "compile_check",
            60 if dry_run else 55,
            15 if dry_run else 30,
            [py, "-m", "hfdist.kernels.compile_check", *check_args, "--json", str(check_json)],
            env={"TRITON_INTERPRET": "0"},
            after=compile_check_rows(check_json),
            group="compile",
        ),
        # tests/conftest.py compiles the kernels where CUDA is present and interprets them where it is not.
        Step(
            "kernel_tests",
            60 if dry_run else 55,
            6 if dry_run else 45,
            [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs", *test_args],
            env={"TRITON_INTERPRET": None},
            parse="pytest",
            group="compile",
        ),
    ]
    if dry_run:
        steps += [
            Step(
                "cross_entropy",
                60,
                12,
                [
                    py,
                    bench("bench_cross_entropy.py"),
                    "--device",
                    "cpu",
                    "--quick",
                    "--entropy",
                    "--reps",
                    "2",
                    "--no-md",
                    "--out",
                    out,
                ],
            ),
            Step(
                "sampling",
                60,
                6,
                [
                    py,
                    bench("bench_sampling.py"),
                    "--device",
                    "cpu",
                    "--quick",
                    "--batch",
                    "1",
                    "2",
                    "--reps",
                    "2",
                    "--no-md",
                    "--out",
                    out,
                ],
                env={"TRITON_INTERPRET": "1"},
            ),
        ]
    else:
        steps += [
            Step(
                "cross_entropy",
                55,
                40,
                [
                    py,
                    bench("bench_cross_entropy.py"),
                    "--device",
                    "cuda",
                    "--entropy",
                    "--n",
                    "16384",
                    "4096",
                    "8192",
                    "--reps",
                    "5",
                    "--no-md",
                    "--out",
                    out,
                ],
            ),
            Step(
                "sampling",
                25,
                12,
                [
                    py,
                    bench("bench_sampling.py"),
                    "--device",
                    "cuda",
                    "--batch",
                    "1",
                    "8",
                    "32",
                    "128",
                    "256",
                    "--reps",
                    "20",
                    "--no-md",
                    "--out",
                    out,
                ],
            ),
        ]

    model = (
        ["--model", str(tiny_llama_folder(scratch / "tiny-llama")), "--dtype", "float32"]
        if dry_run
        else ["--model", "llama-3.2-1b", "--dtype", "bfloat16"]
    )
    run = ["--steps", "2", "--warmup", "1"] if dry_run else ["--steps", "5", "--warmup", "2"]

    def train(batch, seq_len, impl, budget, estimate):
        return Step(
            f"train_{batch}x{seq_len}_{impl}",
            budget,
            estimate,
            [
                py,
                bench("bench_train.py"),
                *model,
                "--init",
                "random",
                "--batch",
                str(batch),
                "--seq-len",
                str(seq_len),
                *run,
                "--impl",
                impl,
                "--scratch",
                str(scratch / "train"),
            ],
            tags={"batch": batch, "seq_len": seq_len},
        )

    shapes = DRY_TRAIN_SHAPES if dry_run else TRAIN_SHAPES
    steps += [
        train(b, t, impl, 60 if dry_run else 16, 5 if dry_run else 11)
        for b, t in shapes
        for impl in ("plain", "hfdist")
    ]
    generate = [
        py,
        bench("bench_generate.py"),
        "--init",
        "random",
        "--strategies",
        "greedy,top-p",
        "--no-drafting",
        "--blocker-rows",
        "0",
        "--impls",
        "hfdist_static_compile,hf_static,hf,hfdist",
    ]  # most wanted first
    if dry_run:
        generate += ["--model", "tiny", "--new-tokens", "4", "--repeats", "1"]
    else:
        generate += ["--model", "llama-3.2-1b", "--new-tokens", "128", "--repeats", "2"]
    for batch in [1, 2] if dry_run else [1, 32]:
        steps.append(
            Step(
                f"generate_b{batch}",
                60 if dry_run else 80,
                7 if dry_run else 70,
                [*generate, "--batch-sizes", str(batch)],
            )
        )
    # Last: the compiled training variants (compilation is the largest unknown of the run).
    steps += [train(b, t, "hfdist-compile", 60 if dry_run else 30, 5 if dry_run else 25) for b, t in shapes]
    # Optional (they do not fit beside the default steps): `--steps train_8x256_hfdist-lora,...` in a call of their
    # own, with `train_8x256_hfdist` for the full-training row of the same machine.
    steps += [train(b, t, impl, 16, 11) for b, t in shapes for impl in WHAT_TRAINS_IMPLS]
    if not dry_run:
        steps.append(
            Step(
                "scale_check",
                150,
                100,
                ["bash", bench("gpu_scale_check.sh"), str(scratch / "scale_check")],
                env={"PYTHON": py},
                parse="scale",
            )
        )
    return steps


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def select(steps: list, wanted: Optional[str]) -> list:
    """Default: every step but the optional ones. ``wanted``: install and env, then the steps whose names start
    with one of the comma-separated names."""
    if not wanted:
        return [s for s in steps if s.name not in OPTIONAL_STEPS]
    prefixes = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [p for p in prefixes if not any(s.name.startswith(p) for s in steps)]
    if unknown:
        raise SystemExit(f"gpu_suite: --steps {', '.join(unknown)}: no such step (see --list)")
    return [s for s in steps if s.name in ("install", "env") or any(s.name.startswith(p) for p in prefixes)]


# ---------------------------------------------------------------------------------------------------------
# Running the steps.
# ---------------------------------------------------------------------------------------------------------

PYTEST_LINE = re.compile(
    r"(?:^|\s)(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
    r"|\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+)"
)
PYTEST_SUMMARY = re.compile(r"^=+ (.*\d+ (?:passed|failed|error|errors|skipped|deselected).*) in ([\d.]+)s")


class Suite:
    def __init__(self, out: Path, scratch: Path, meta: dict, limit_s: float):
        self.out, self.scratch, self.meta, self.limit_s = out, scratch, meta, limit_s
        out.mkdir(parents=True, exist_ok=True)
        self.rows_file = open(out / "rows.jsonl", "w")
        self.log = open(out / "suite.log", "w")
        self.lock = threading.Lock()
        self.rows: list = []
        self.rows_per_step: dict = {}
        self.records: list = []
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add_row(self, step: Step, row: dict) -> None:
        with self.lock:
            row = {"step": step.name, **step.tags, **row}
            self.rows.append(row)
            self.rows_per_step[step.name] = self.rows_per_step.get(step.name, 0) + 1
            self.rows_file.write(json.dumps(row) + "\n")
            self.rows_file.flush()

    def log_line(self, step: Step, line: str) -> None:
        with self.lock:
            self.log.write(f"[{self.elapsed():6.1f}s {step.name}] {line}\n")
            self.log.flush()

    def child_env(self, step: Step) -> dict:
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        paths = [str(self.scratch / "site")]  # the carried wheels (install step)
        extra = (
            self.scratch / "pythonpath.txt"
        )  # written by the install step only when pip could not install hfdist
        if extra.exists():
            paths += extra.read_text().split()
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.pop(
            "TRITON_INTERPRET", None
        )  # compiled unless a step asks for the interpreter (an inherited 1 would
        # time interpreted kernels on a GPU)
        if self.meta["mode"] == "dry-run":
            env.update(CUDA_VISIBLE_DEVICES="", TORCH_COMPILE_DISABLE="1", DS_ACCELERATOR="cpu")
        for key, value in step.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def handle(self, step: Step, line: str, seen: set) -> None:
        self.log_line(step, line)
        text = line.strip()
        if step.parse == "json" and text.startswith("{"):
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                return
            if isinstance(row, dict):
                self.add_row(step, row)
        elif step.parse == "pytest":
            found = PYTEST_LINE.search(text)
            if found:
                test = found.group(1) or found.group(4)
                outcome = found.group(2) or found.group(3)
                if test not in seen:  # the short summary repeats failures
                    seen.add(test)
                    self.add_row(step, {"test": test, "outcome": outcome.lower()})
            summary = PYTEST_SUMMARY.match(text)
            if summary:
                self.add_row(step, {"summary": summary.group(1), "seconds": float(summary.group(2))})
        elif step.parse == "scale" and text.startswith(("gpu_scale_check:", "export:")):
            self.add_row(step, {"line": text})

    def run_step(self, step: Step) -> dict:
        record = {
            "name": step.name,
            "budget_s": step.budget_s,
            "estimate_s": step.estimate_s,
            "command": " ".join(str(c) for c in step.command),
        }
        remaining = self.limit_s - self.elapsed()
        timeout = min(step.budget_s, remaining)
        if remaining < min(step.budget_s, 3):
            record.update(
                status=f"skipped: the run's limit of {self.limit_s:.0f} s was reached", seconds=0.0, rows=0
            )
            return record
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [str(c) for c in step.command],
                cwd=ROOT,
                env=self.child_env(step),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,
            )
        except OSError as exc:
            record.update(status=f"failed to start: {exc}", seconds=0.0, rows=0)
            return record
        seen: set = set()
        reader = threading.Thread(
            target=lambda: [self.handle(step, line.rstrip("\n"), seen) for line in proc.stdout], daemon=True
        )
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, f"timeout after {timeout:.0f} s"
        reader.join(timeout=10)
        if step.after is not None:
            try:
                for row in step.after():
                    self.add_row(step, row)
            except (OSError, ValueError, KeyError) as exc:
                self.log_line(step, f"no rows from its files: {type(exc).__name__}: {exc}")
        record.update(
            status=status,
            rc=rc,
            seconds=round(time.monotonic() - start, 1),
            rows=self.rows_per_step.get(step.name, 0),
        )
        if step.name == "env":
            env_rows = [r for r in self.rows if r["step"] == "env" and r.get("what") == "env"]
            if env_rows:
                self.meta["env"] = {k: v for k, v in env_rows[-1].items() if k not in ("step", "what")}
        return record

    def run(self, steps: list) -> int:
        groups: list = []
        for step in steps:  # consecutive steps of one group run side by side
            if groups and step.group and groups[-1][0].group == step.group:
                groups[-1].append(step)
            else:
                groups.append([step])
        for group in groups:
            results: dict = {}
            threads = [
                threading.Thread(target=lambda s=s: results.__setitem__(s.name, self.run_step(s)))
                for s in group
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for step in group:
                record = results[step.name]
                self.records.append(record)
                print(
                    f"[{self.elapsed():6.1f}s] {step.name}: {record['status']} ({record['seconds']} s of "
                    f"{step.budget_s:.0f}, {record['rows']} rows)",
                    flush=True,
                )
            self.write()
        return 0 if all(r["status"] == "ok" for r in self.records) else 1

    def write(self) -> None:
        self.meta["seconds"] = round(self.elapsed(), 1)
        report = {
            "meta": self.meta,
            "steps": self.records,
            "rows": self.rows,
            "provenance": self.meta.get("env", {}).get("provenance"),
        }
        _write_atomic(self.out / "suite.json", json.dumps(report, indent=1) + "\n")
        try:
            text = tables(report)
        except Exception as exc:  # a row of an unexpected shape must not end an unattended run: say so, go on
            text = f"# tables.md could not be made: {type(exc).__name__}: {exc}\n(suite.json has every row)\n"
        _write_atomic(self.out / "tables.md", text)

    def close(self) -> None:
        self.rows_file.close()
        self.log.close()


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------------------------------


def _table(header: list, rows: list) -> list:
    return (
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        + [""]
    )


def _gib(b):
    return f"{b / 2**30:.2f} GiB" if b is not None else "-"


def tables(report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    by_step = lambda prefix: [r for r in rows if r["step"].startswith(prefix)]  # noqa: E731
    env = meta.get("env", {})
    lines = [
        f"# hfdist GPU suite ({meta['mode']}): {env.get('device', '?')}",
        "",
        f"Started {meta['started_utc']}, {meta['seconds']} s in all (limit {meta['limit_s']} s). "
        f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
        f"liger-kernel {env.get('liger_kernel')}, flashinfer {env.get('flashinfer')}; git {meta.get('git')}.",
        "",
    ]
    paths = env.get("code_paths")
    if paths:
        lines += ["Code paths here: " + "; ".join(f"{k}: {v}" for k, v in paths.items()), ""]
    lines += ["## Steps", ""] + _table(
        ["step", "budget (s)", "estimate (s)", "took (s)", "status", "rows"],
        [
            [r["name"], r["budget_s"], r["estimate_s"], r["seconds"], r["status"], r["rows"]]
            for r in report["steps"]
        ],
    )

    checks = [r for r in by_step("compile_check") if "variant" in r]
    if checks:
        failed = [f"{r['module']}.{r['variant']} sm_{r['arch']}" for r in checks if not r["ok"]]
        regs = [r["registers"] for r in checks if r.get("registers") is not None]
        spills = [r for r in checks if r.get("spill_store_bytes")]
        lines += [
            "## Compile check",
            "",
            f"{len(checks) - len(failed)}/{len(checks)} variants compiled"
            + (f"; registers {min(regs)}-{max(regs)}" if regs else "")
            + f"; {len(spills)} with spills"
            + (f"; FAILED: {', '.join(failed)}" if failed else ""),
            "",
        ]
    tests = [r for r in by_step("kernel_tests") if "test" in r]
    if tests:
        counts: dict = {}
        for r in tests:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        bad = [r["test"] for r in tests if r["outcome"] in ("failed", "error")]
        lines += [
            "## Kernel tests",
            "",
            ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            + (f"; failing: {', '.join(bad)}" if bad else ""),
            "",
        ]

    loss = [r for r in by_step("cross_entropy") if "method" in r]
    if loss:
        lines += ["## Fused linear cross-entropy, forward + backward", ""] + _table(
            ["N", "H", "V", "method", "time", "extra memory", "entropy", "weight-gradient accumulation"],
            [
                [
                    r.get("n"),
                    r.get("h"),
                    r.get("v"),
                    r["method"],
                    f"{1e3 * r['time_s']:.1f} ms" if r["status"] == "ok" else r["status"],
                    _gib(r.get("extra_bytes")),
                    "yes" if r.get("entropy") else "no",
                    r.get("accumulation") or "-",
                ]
                for r in sorted(loss, key=lambda r: r.get("n") or 0)
            ],
        )
    sampling = [r for r in by_step("sampling") if "method" in r]
    if sampling:
        lines += [f"## Top-p sampling, fp32 logits, V={sampling[0].get('vocab')}", ""] + _table(
            ["B", "top_p", "method", "time", "GB/s", "resolve paths (rows)"],
            [
                [
                    r["batch"],
                    r["top_p"],
                    r["method"],
                    f"{1e6 * r['time_s']:.0f} us" if r["status"] == "ok" else r["status"],
                    f"{r['gb_per_s']:.1f}" if "gb_per_s" in r else "-",
                    ", ".join(f"{k} {v}" for k, v in r.get("resolve_paths", {}).items() if v) or "-",
                ]
                for r in sampling
            ],
        )
    train = [r for r in by_step("train_") if "tokens_per_s" in r]
    if train:
        plain = {(r["batch"], r["seq_len"]): r["tokens_per_s"] for r in train if r["impl"] == "plain"}
        lines += ["## Training step (random weights)", ""] + _table(
            ["batch x seq", "implementation", "tokens/s", "MFU", "peak memory", "vs plain"],
            [
                [
                    f"{r['batch']}x{r['seq_len']}",
                    r["impl"],
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-",
                    f"{r['peak_memory_gib']:.2f} GiB",
                    f"{r['tokens_per_s'] / plain[(r['batch'], r['seq_len'])]:.2f}x"
                    if (r["batch"], r["seq_len"]) in plain
                    else "-",
                ]
                for r in train
            ],
        )
    decode = [r for r in by_step("generate") if "tokens_per_s" in r]
    if decode:
        same = {
            (r["strategy"], r["batch"], r["impl"]): r["equals_hf_greedy"]
            for r in by_step("generate")
            if "equals_hf_greedy" in r
        }
        base = {(r["strategy"], r["batch"]): r["tokens_per_s"] for r in decode if r["impl"] == "hf"}
        lines += ["## Decoding (random weights)", ""] + _table(
            [
                "strategy",
                "batch",
                "implementation",
                "new tokens",
                "tokens/s",
                "vs HF generate",
                "greedy equals HF",
            ],
            [
                [
                    r["strategy"],
                    r["batch"],
                    r["impl"],
                    r["new_tokens"],
                    f"{r['tokens_per_s']:,.1f}",
                    f"{r['tokens_per_s'] / base[(r['strategy'], r['batch'])]:.2f}x"
                    if (r["strategy"], r["batch"]) in base
                    else "-",
                    {True: "yes", False: "NO"}.get(same.get((r["strategy"], r["batch"], r["impl"])), "-"),
                ]
                for r in decode
            ],
        )
    scale = by_step("scale_check")
    if scale:
        lines += ["## The scale check (gpu_scale_check.sh)", ""] + [r["line"] for r in scale] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Workers: steps that run this file in a child process (they may import torch and hfdist).
# ---------------------------------------------------------------------------------------------------------


def worker_install(scratch: Path, check_only: bool) -> int:
    """The carried wheels into ``scratch/site``, then hfdist editable, all offline. ``check_only`` (dry run):
    install nothing, report what is there."""
    py = sys.executable
    site = scratch / "site"
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    row = {
        "what": "wheels",
        "folder": str(WHEELS),
        "files": [w.name for w in wheels],
        "megabytes": round(sum(w.stat().st_size for w in wheels) / 2**20, 1),
        "target": str(site),
    }
    status = 0
    if check_only or not wheels:
        row["installed"] = False
        row["note"] = "dry run: nothing installed" if check_only else "no wheels carried"
    else:
        done = subprocess.run(
            [
                py,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--upgrade",
                "--target",
                str(site),
                *map(str, wheels),
            ],
            capture_output=True,
            text=True,
        )
        row["installed"] = done.returncode == 0
        if done.returncode:
            row["error"] = (done.stderr or done.stdout)[-600:]
            status = 1
    print(json.dumps(row), flush=True)

    def importable() -> Optional[str]:  # asked from outside the checkout, so that ./hfdist cannot stand in
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        )
        probe = subprocess.run(
            [py, "-c", "import hfdist.kernels, hfdist; print(hfdist.__file__)"],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
        )
        return probe.stdout.strip() if probe.returncode == 0 else None

    row = {"what": "hfdist", "root": str(ROOT)}
    location = importable()
    if location:
        row.update(how="already importable", location=location)
    elif check_only:
        row.update(how="not importable (dry run: not installed)")
        status = 1
    else:
        done = subprocess.run(
            [
                py,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-build-isolation",
                "-e",
                str(ROOT),
            ],
            capture_output=True,
            text=True,
        )
        location = importable() if done.returncode == 0 else None
        if location:
            row.update(how="pip install --no-deps --no-build-isolation --no-index -e .", location=location)
        else:
            # Fallback: the checkout on PYTHONPATH, with kernels/ linked where the package maps it (hfdist.kernels).
            reason = (done.stderr or done.stdout or "installed but not importable")[-400:]
            print(
                f"install: pip could not install hfdist, falling back to PYTHONPATH={ROOT}: {reason}",
                flush=True,
            )
            link = ROOT / "hfdist" / "kernels"
            if not link.exists():
                link.symlink_to(Path("..") / "kernels")
            (scratch / "pythonpath.txt").write_text(str(ROOT))
            os.environ["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
            )
            location = importable()
            row.update(
                how="fallback: PYTHONPATH=checkout, hfdist/kernels -> kernels/",
                pip_error=reason,
                location=location,
            )
            status = 0 if location else 1
    print(json.dumps(row), flush=True)
    return status


def worker_env() -> int:
    """One row: machine, versions, and the code paths hfdist's kernels resolve to on this device; with the
    provenance block of a results file, read here where the measured packages are installed."""
    import importlib.metadata as metadata

    import torch
    from provenance import provenance

    info: dict = {
        "what": "env",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for name, dist in (
        ("triton", "triton"),
        ("transformers", "transformers"),
        ("accelerate", "accelerate"),
        ("safetensors", "safetensors"),
        ("liger_kernel", "liger-kernel"),
        ("flashinfer", "flashinfer-python"),
        ("datasets", "datasets"),
        ("xdist", "pytest-xdist"),
    ):
        try:
            info[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[name] = None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run(
                [smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            )
            info["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    else:
        info.update(device=f"cpu ({platform.machine()}, {os.cpu_count()} cores)")
    import hfdist
    import hfdist.kernels
    from hfdist.kernels.utils import GRAD_ACCUMULATIONS, grad_accumulation_path, resolve_backend
    from hfdist.models import choose_attn_implementation

    info["hfdist"] = str(Path(hfdist.__file__).parent)
    info["code_paths"] = {
        "fused loss backend (auto)": resolve_backend("auto", device, "fused_linear_cross_entropy"),
        "sampler backend (auto)": resolve_backend("auto", device, "sample"),
        **{
            f"bf16 weight, {mode}": grad_accumulation_path(mode, torch.bfloat16, device).describe()
            for mode in GRAD_ACCUMULATIONS
        },
        "attention (auto)": choose_attn_implementation("auto", device),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
        "torch.compile": "disabled (TORCH_COMPILE_DISABLE=1)"
        if os.environ.get("TORCH_COMPILE_DISABLE") == "1"
        else "on",
    }
    info["provenance"] = provenance()
    print(json.dumps(info), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "out", nargs="?", type=Path, help="folder for the four result files (the device's $OUT)"
    )
    parser.add_argument("--dry-run", action="store_true", help="every step at tiny shapes on the CPU")
    parser.add_argument("--steps", help="comma-separated step names or prefixes (install and env always run)")
    parser.add_argument(
        "--limit",
        type=float,
        help=f"seconds for the whole run (default {GPU_LIMIT_S}; dry run {DRY_LIMIT_S})",
    )
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    parser.add_argument("--worker", choices=["install", "env"], help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "install":
        return worker_install(args.scratch, args.check_only)
    if args.worker == "env":
        return worker_env()

    scratch = Path(tempfile.mkdtemp(prefix="hfdist-gpu-suite-"))
    try:
        steps = select(plan(args.dry_run, scratch), args.steps)
        if args.list:
            for s in steps:
                print(
                    f"{s.name:28} budget {s.budget_s:4.0f} s  estimate {s.estimate_s:4.0f} s"
                    f"{'  (side by side: ' + s.group + ')' if s.group else ''}\n    "
                    + " ".join(str(c) for c in s.command)
                )
            print(
                f"{'total (side-by-side steps counted once)':40} budget "
                f"{budget_total(steps):.0f} s, estimate {budget_total(steps, 'estimate_s'):.0f} s"
            )
            return 0
        if args.out is None:
            parser.error("OUT is required (the folder for the results)")
        limit = args.limit or (DRY_LIMIT_S if args.dry_run else GPU_LIMIT_S)
        from provenance import git_commit, uncommitted_changes  # beside this file; standard library only

        meta = {
            "suite": "hfdist GPU suite",
            "mode": "dry-run" if args.dry_run else "gpu",
            "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "limit_s": limit,
            "budget_total_s": budget_total(steps),
            "git": git_commit()[:7] + ("+changes" if uncommitted_changes() else ""),
            "host": platform.node(),
            "driver_python": platform.python_version(),
        }
        suite = Suite(args.out, scratch, meta, limit)
        try:
            status = suite.run(steps)
        finally:
            suite.write()
            suite.close()
        print((args.out / "tables.md").read_text(), flush=True)
        return status
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def budget_total(steps: list, key: str = "budget_s") -> float:
    """Sum over the steps, side-by-side steps counted once (their longest)."""
    total, group_max, group = 0.0, 0.0, None
    for s in steps:
        if s.group and s.group == group:
            group_max = max(group_max, getattr(s, key))
            continue
        total += group_max
        group, group_max = s.group, getattr(s, key)
    return total + group_max


if __name__ == "__main__":
    sys.exit(main())
