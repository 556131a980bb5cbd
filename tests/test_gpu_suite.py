"""The GPU suite (benchmarks/gpu_suite.py) rehearsed on the CPU: what CI runs of it.

``test_dry_run_runs_every_step`` runs ``gpu_suite.py OUT --dry-run``: every default step at tiny shapes, no
GPU and no carried wheels (about a minute on two cores; marked ``gpu_suite``, and ``distributed`` because it
starts many processes), and checks that each step ran and left the rows a GPU run's tables are made from, and
that OUT holds a few plain files, no folders (what a remote run brings back). The other tests check the driver's
own promises with short real subprocesses: a step past its budget is killed and keeps its rows, a failing step
does not stop the next, and the GPU plan fits one 8-minute call.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
DEFAULT_STEPS = [
    "install",
    "env",
    "compile_check",
    "kernel_tests",
    "cross_entropy",
    "sampling",
    "train_2x32_plain",
    "train_2x32_hfdist",
    "train_1x64_plain",
    "train_1x64_hfdist",
    "generate_b1",
    "generate_b2",
    "train_2x32_hfdist-compile",
    "train_1x64_hfdist-compile",
]
IMPLS = {"hf", "hfdist", "hf_static", "hfdist_static_compile"}


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite") / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the suite decides per step
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SUITE), str(out), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    seconds = time.monotonic() - start
    log = (out / "suite.log").read_text() if (out / "suite.log").exists() else ""
    assert done.returncode == 0, (
        f"dry run failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}\n{log[-4000:]}"
    )
    report = json.loads((out / "suite.json").read_text())
    return out, report, seconds


def rows_of(report, step):
    return [r for r in report["rows"] if r["step"] == step]


@pytest.mark.gpu_suite
@pytest.mark.distributed
def test_dry_run_runs_every_step(dry_run):
    out, report, seconds = dry_run
    # A few plain files, no folders: what a remote run brings back.
    assert sorted(p.name for p in out.iterdir()) == ["rows.jsonl", "suite.json", "suite.log", "tables.md"]
    assert all(p.is_file() for p in out.iterdir())
    assert report["meta"]["mode"] == "dry-run" and report["meta"]["seconds"] < report["meta"]["limit_s"]
    assert [s["name"] for s in report["steps"]] == DEFAULT_STEPS
    for step in report["steps"]:
        assert step["status"] == "ok" and step["rows"] > 0, step
    # rows.jsonl holds every row as it arrived, tagged with its step: the same rows as suite.json.
    streamed = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert streamed == report["rows"]
    assert sum(s["rows"] for s in report["steps"]) == len(streamed)

    install = {r["what"]: r for r in rows_of(report, "install")}
    assert install["wheels"]["installed"] is False and install["hfdist"]["how"] == "already importable"
    env = report["meta"]["env"]
    assert env["device"].startswith("cpu") and env["torch"] and env["transformers"]
    paths = env["code_paths"]
    assert "weight_dtype" in paths["bf16 weight, weight_dtype"] and "'fp32'" in paths["bf16 weight, fp32"]
    assert paths["torch.compile"].startswith("disabled")

    checks = rows_of(report, "compile_check")
    summary = [r for r in checks if r.get("summary")]
    assert len(summary) == 1 and summary[0]["compiled"] == summary[0]["variants"] == len(checks) - 1 > 0
    assert summary[0]["coverage_problems"] == [] and all(r["ok"] for r in checks if "variant" in r)
    tests = [r for r in rows_of(report, "kernel_tests") if "test" in r]
    assert len(tests) >= 5 and {r["outcome"] for r in tests} == {"passed"}
    assert any("triton" in r["test"] for r in tests)  # the kernels ran (interpreted), not only the torch path
    assert any("passed" in r.get("summary", "") for r in rows_of(report, "kernel_tests"))

    loss = {r["method"]: r for r in rows_of(report, "cross_entropy")}
    for method in ("hfdist", "hfdist-fp32", "torch-eager", "torch-compile"):
        assert (
            loss[method]["status"] == "ok" and loss[method]["time_s"] > 0 and loss[method]["entropy"] is True
        )
    assert (
        "'weight_dtype'" in loss["hfdist"]["accumulation"] and "'fp32'" in loss["hfdist-fp32"]["accumulation"]
    )
    assert loss["liger"]["status"].startswith("skipped") and loss["liger"]["entropy"] is False

    sampling = rows_of(report, "sampling")
    cells = {(r["batch"], r["top_p"]) for r in sampling}
    assert cells == {(b, p) for b in (1, 2) for p in (0.5, 0.9, 0.95)}
    for batch, top_p in cells:
        found = {r["method"]: r for r in sampling if (r["batch"], r["top_p"]) == (batch, top_p)}
        assert {
            "hfdist-triton",
            "hfdist-torch-reference",
            "torch-sort-multinomial",
            "hf-topp-multinomial",
        } <= set(found)
        assert all(r["status"] == "ok" and r["time_s"] > 0 for r in found.values())
        paths = dict(found["hfdist-triton"]["resolve_paths"])
        assert paths.pop("chunks_per_row") >= 1 and sum(paths.values()) == batch  # every row took one path

    for batch, seq_len in ((2, 32), (1, 64)):
        for impl in ("plain", "hfdist", "hfdist-compile"):
            (row,) = rows_of(report, f"train_{batch}x{seq_len}_{impl}")
            assert row["impl"] == impl and (row["batch"], row["seq_len"]) == (batch, seq_len)
            assert row["tokens_per_s"] > 0 and row["peak_memory_gib"] > 0

    for batch in (1, 2):
        rows = rows_of(report, f"generate_b{batch}")
        speed = {(r["strategy"], r["impl"]): r for r in rows if "tokens_per_s" in r}
        assert set(speed) == {(s, i) for s in ("greedy", "top-p") for i in IMPLS}
        assert all(
            r["batch"] == batch and r["new_tokens"] == 4 and r["tokens_per_s"] > 0 for r in speed.values()
        )
        same = {r["impl"]: r["equals_hf_greedy"] for r in rows if "equals_hf_greedy" in r}
        assert set(same) == IMPLS - {"hf"} and all(isinstance(v, bool) for v in same.values())
        assert same["hfdist"] is True  # the same dynamic cache and fp32 arithmetic as HF: token for token
        # (the static-cache rows attend over padded slots: equal so far, but a near-tie may flip on another CPU)

    tables = (out / "tables.md").read_text()
    for title in (
        "## Steps",
        "## Compile check",
        "## Kernel tests",
        "## Fused linear cross-entropy",
        "## Top-p sampling",
        "## Training step",
        "## Decoding",
    ):
        assert title in tables
    print(f"dry run: {seconds:.0f} s")


def test_steps_past_budget_keep_rows_and_failures_do_not_stop_the_run(tmp_path):
    """Real subprocesses: one prints a row and overruns its budget (its process group is killed, the row stays),
    one exits 3, one passes; the run goes on and reports each."""
    gpu_suite = load_suite()
    py = sys.executable
    grandchild = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
    )
    steps = [
        gpu_suite.Step(
            "slow",
            2,
            1,
            [py, "-c", grandchild + "print('{\"n\": 1}', flush=True); time.sleep(60)"],
            tags={"shape": "a"},
        ),
        gpu_suite.Step(
            "broken", 10, 1, [py, "-c", "print('{\"n\": 2}'); print('not json'); raise SystemExit(3)"]
        ),
        gpu_suite.Step("fine", 10, 1, [py, "-c", "print('{\"n\": 3}')"]),
    ]
    out = tmp_path / "out"
    suite = gpu_suite.Suite(
        out, tmp_path / "scratch", {"mode": "dry-run", "started_utc": "-", "limit_s": 60}, 60
    )
    start = time.monotonic()
    status = suite.run(steps)
    suite.close()
    assert time.monotonic() - start < 30  # the sleeping child and its own child were killed at the budget
    assert status == 1
    statuses = {r["name"]: r["status"] for r in suite.records}
    assert statuses == {"slow": "timeout after 2 s", "broken": "failed (exit 3)", "fine": "ok"}
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": "slow", "shape": "a", "n": 1},
        {"step": "broken", "n": 2},
        {"step": "fine", "n": 3},
    ]
    report = json.loads((out / "suite.json").read_text())
    assert [s["rows"] for s in report["steps"]] == [1, 1, 1] and "| slow | 2 | 1 |" in (
        out / "tables.md"
    ).read_text()


def test_gpu_plan_fits_one_eight_minute_call(tmp_path):
    """The default GPU steps' budgets (side-by-side steps counted once) stay inside the run's limit, which
    leaves room in the device call's 480 s; every default step has an estimate below its budget."""
    gpu_suite = load_suite()
    steps = gpu_suite.select(gpu_suite.plan(False, tmp_path), None)
    assert "scale_check" not in {s.name for s in steps}
    assert (
        gpu_suite.budget_total(steps) <= gpu_suite.GPU_LIMIT_S <= 480 - 30
    )  # 480 s: the device call's timeout_s
    assert all(0 < s.estimate_s < s.budget_s for s in steps)
    names = [s.name for s in gpu_suite.select(gpu_suite.plan(False, tmp_path), "train_4x2048,scale")]
    assert names == [
        "install",
        "env",
        "train_4x2048_plain",
        "train_4x2048_hfdist",
        "train_4x2048_hfdist-compile",
        "train_4x2048_hfdist-lora",  # optional: what trains, LoRA and the last 5 blocks
        "train_4x2048_hfdist-last5",
        "scale_check",
    ]
    assert not any(s.name.endswith(("hfdist-lora", "hfdist-last5")) for s in steps)  # not default steps
    with pytest.raises(SystemExit, match="no such step"):
        gpu_suite.select(steps, "nonsense")


def test_pytest_lines_become_rows_with_and_without_xdist(tmp_path):
    """The kernel_tests step reads outcomes off pytest -v lines: plain, pytest-xdist's (the GPU run uses -n 4
    where xdist is installed), the short summary's repeats of failures (counted once) and the final line."""
    gpu_suite = load_suite()
    suite = gpu_suite.Suite(tmp_path / "out", tmp_path, {"mode": "gpu"}, 60)
    step = gpu_suite.Step("kernel_tests", 10, 1, [], parse="pytest")
    seen = set()
    for line in [
        "tests/test_kernels_sampling.py::test_batch_invariance[torch] PASSED      [ 80%]",
        "[gw1] [ 12%] FAILED tests/test_kernels_cross_entropy.py::test_row_offsets_past_int32[triton] ",
        "[gw0] [ 13%] SKIPPED tests/test_kernels_sampling.py::test_wide_rows[streamed] ",
        "SKIPPED [1] tests/test_kernels_sampling.py:178: the compiled resident block is fixed",
        "FAILED tests/test_kernels_cross_entropy.py::test_row_offsets_past_int32[triton] - AssertionError",
        "============ 1 failed, 1 passed, 1 skipped in 61.20s (0:01:01) ============",
    ]:
        suite.handle(step, line, seen)
    suite.close()
    assert [{k: v for k, v in r.items() if k != "step"} for r in suite.rows] == [
        {"test": "tests/test_kernels_sampling.py::test_batch_invariance[torch]", "outcome": "passed"},
        {
            "test": "tests/test_kernels_cross_entropy.py::test_row_offsets_past_int32[triton]",
            "outcome": "failed",
        },
        {"test": "tests/test_kernels_sampling.py::test_wide_rows[streamed]", "outcome": "skipped"},
        {"summary": "1 failed, 1 passed, 1 skipped", "seconds": 61.2},
    ]
