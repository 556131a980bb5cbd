"""Every Triton kernel of hfdist.kernels compiles ahead of time for sm_90 and sm_80 (no GPU needed).

The interpreter accepts code the compiler refuses, so the kernels' semantic tests alone do not make them
GPU-ready. ``python -m hfdist.kernels.compile_check`` compiles each module's ``compile_variants()`` (every
form its launch code can ask for) and checks that they cover every kernel. It runs in a subprocess with
TRITON_INTERPRET=0: conftest sets TRITON_INTERPRET=1 on machines without a GPU, and a jit function
decorated under the interpreter cannot be compiled. Run with ``-rA`` to see the register/spill table;
the JSON report lands in the test's tmp dir. About 1.5-2.5 min on 2 cores from a cold Triton cache
(258 compilations, ~90% of them the cross-entropy kernel's flag combinations), seconds from a warm one.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from hfdist.kernels import compile_check  # noqa: E402  (imports no triton)


def _run_check(args, tmp_path, timeout):
    env = dict(os.environ, TRITON_INTERPRET="0")
    report = tmp_path / "compile_check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hfdist.kernels.compile_check", "--json", str(report), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(proc.stdout)
    return proc, json.loads(report.read_text()) if report.exists() else None


def test_every_kernel_variant_compiles_for_sm90_and_sm80(tmp_path):
    proc, report = _run_check([], tmp_path, timeout=1500)
    assert report is not None, proc.stderr[-3000:]
    assert report["coverage_problems"] == []
    modules = set(compile_check.module_names())
    assert {"hfdist.kernels._triton_sampling", "hfdist.kernels._triton_cross_entropy"} <= modules
    assert set(report["modules"]) == modules
    for module in modules:
        archs = {r["arch"] for r in report["results"] if r["module"] == module}
        assert archs == {90, 80}, module
    failed = [f"{r['variant']} sm_{r['arch']}: {r['error'][:500]}" for r in report["results"] if not r["ok"]]
    assert not failed, "\n".join(failed)
    if compile_check.cuobjdump_path() is not None:  # shipped with Triton's NVIDIA backend: usage is read
        assert all(r["registers"] for r in report["results"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


BROKEN_MODULE = """
import triton
import triton.language as tl

from hfdist.kernels.utils import KernelVariant


@triton.jit
def _double(x):
    return 2 * x


@triton.jit
def _covered_kernel(out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _double(offs.to(tl.float32)), mask=offs < n)


@triton.jit
def _type_changing_loop(out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros((), tl.float32)
    for start in range(0, n, BLOCK):
        acc = tl.zeros([BLOCK], tl.float32) + start  # a scalar re-assigned to a block: the sampler's old bug
    tl.store(out_ptr, tl.sum(acc, 0))


@triton.jit
def _forgotten_kernel(out_ptr):
    tl.store(out_ptr, 1.0)


def compile_variants():
    return [KernelVariant(name, kernel, {"out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 64})
            for name, kernel in (("covered", _covered_kernel), ("loop", _type_changing_loop))]
"""


def test_check_reports_uncovered_kernels_and_compile_errors(tmp_path):
    """The check fails on a kernel missing from compile_variants() and on a kernel the compiler refuses."""
    path = tmp_path / "_triton_broken.py"
    path.write_text(textwrap.dedent(BROKEN_MODULE))
    proc, report = _run_check(
        ["--modules", str(path), "--arch", "90", "--workers", "1"], tmp_path, timeout=600
    )
    assert proc.returncode == 1
    assert len(report["coverage_problems"]) == 1
    assert "_forgotten_kernel has no variant" in report["coverage_problems"][0]  # _double is a helper
    by_name = {r["variant"]: r for r in report["results"]}
    assert by_name["covered"]["ok"] and by_name["covered"]["registers"] > 0
    assert not by_name["loop"]["ok"] and "Loop-carried variable" in by_name["loop"]["error"]
