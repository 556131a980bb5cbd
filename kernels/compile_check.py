"""Ahead-of-time compilation of every Triton kernel of ``hfdist.kernels``, for GPUs this machine need not have.

Triton's interpreter accepts code the compiler refuses, so a kernel is GPU-ready only once it compiles.
Each ``kernels/_triton_*.py`` module lists the variants its launch code can ask for in
``compile_variants()`` (``KernelVariant``: kernel, argument types, constexpr values, warps). This tool
imports every such module, checks that the variants cover every kernel of the module (a ``@triton.jit``
function that no other jit function of the module calls) and name every parameter, compiles each variant
for each target architecture (no GPU needed: Triton's code generator and ptxas only) and reports
registers, spills and shared memory per variant.

    python -m hfdist.kernels.compile_check                      # sm_90 and sm_80, every module
    python -m hfdist.kernels.compile_check --arch 90 --json out.json --workers 2
    python -m hfdist.kernels.compile_check --modules hfdist.kernels._triton_sampling my_kernels.py

Run it with TRITON_INTERPRET unset or 0: a function decorated under the interpreter cannot be compiled
(tests/test_kernels_compile.py runs it in a subprocess for that reason). Exit status: 0 when every
variant compiled and the coverage is complete, 1 otherwise, 2 on misuse.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PACKAGE = "hfdist.kernels"
ARCHS = (90, 80)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def module_names() -> list[str]:
    """Every ``kernels/_triton_*.py`` module of the package, by import name."""
    folder = Path(importlib.import_module(PACKAGE).__file__).parent
    return sorted(f"{PACKAGE}.{p.stem}" for p in folder.glob("_triton_*.py"))


@functools.lru_cache(maxsize=None)
def load_module(spec: str):
    """Import a module by name, or from a ``.py`` file."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        module_spec = importlib.util.spec_from_file_location(f"_compile_check_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _is_jit_function(obj) -> bool:
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction") and hasattr(obj, "fn")


def jit_functions(module) -> dict:
    """name -> jit function, for those defined in ``module`` (not imported into it)."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if _is_jit_function(obj) and getattr(obj.fn, "__module__", None) == module.__name__
    }


def split_kernels(module) -> tuple[list[str], list[str]]:
    """(kernels, helpers): a helper is a jit function that another jit function of the module calls."""
    functions = jit_functions(module)
    called = set()
    for name, fn in functions.items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id != name:
                called.add(node.func.id)
    helpers = sorted(n for n in functions if n in called)
    return sorted(n for n in functions if n not in called), helpers


def _parameters(kernel) -> tuple[list[str], list[str]]:
    """(runtime parameters, constexpr parameters) of a jit function."""
    runtime, constexpr = [], []
    for p in inspect.signature(kernel.fn).parameters.values():
        is_constexpr = "constexpr" in str(p.annotation)
        (constexpr if is_constexpr else runtime).append(p.name)
    return runtime, constexpr


def coverage_problems(module) -> list[str]:
    """What ``compile_variants()`` misses or gets wrong for ``module``: one line each."""
    name = module.__name__
    if not hasattr(module, "compile_variants"):
        return [f"{name}: defines no compile_variants()"]
    functions = jit_functions(module)
    kernels, _ = split_kernels(module)
    variants = module.compile_variants()
    problems = []
    covered = set()
    for v in variants:
        kernel_name = getattr(getattr(v.kernel, "fn", None), "__name__", None)
        if kernel_name not in functions or functions[kernel_name] is not v.kernel:
            problems.append(
                f"{name}: variant {v.name} names a kernel that is not a jit function of the module"
            )
            continue
        covered.add(kernel_name)
        runtime, constexpr = _parameters(v.kernel)
        missing = [p for p in runtime if p not in v.signature] + [
            p for p in constexpr if p not in v.constexprs
        ]
        extra = [p for p in v.constexprs if p not in constexpr]
        extra += [p for p in v.signature if p not in runtime + constexpr]
        if missing or extra:
            problems.append(f"{name}: variant {v.name}: parameters missing {missing}, unknown {extra}")
    for kernel_name in kernels:
        if kernel_name not in covered:
            problems.append(f"{name}: kernel {kernel_name} has no variant in compile_variants()")
    return problems


def cuobjdump_path() -> Path | None:
    """cuobjdump as Triton's NVIDIA backend ships it, if present (it reads a cubin's resource usage)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    tool = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool if tool.exists() else None


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL from the cubin; {} without cuobjdump (the ptxas log may still say)."""
    tool = cuobjdump_path()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}


def compile_one(module_spec: str, index: int, arch: int) -> dict:
    """Compile variant ``index`` of ``module_spec`` for sm_``arch``; never raises."""
    start = time.perf_counter()
    module = load_module(module_spec)
    variant = module.compile_variants()[index]
    result = {
        "module": module.__name__,
        "variant": variant.name,
        "arch": arch,
        "num_warps": variant.num_warps,
    }
    try:
        import triton  # noqa: PLC0415 (optional: triton, imported once TRITON_INTERPRET is settled)
        from triton.backends.compiler import GPUTarget  # noqa: PLC0415 (optional: triton, imported once TRITON_INTERPRET is settled)
        from triton.compiler import ASTSource  # noqa: PLC0415 (optional: triton, imported once TRITON_INTERPRET is settled)

        source = ASTSource(
            fn=variant.kernel, signature=dict(variant.signature), constexprs=dict(variant.constexprs)
        )
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # ptxas -v, printed by Triton when TRITON_DUMP_PTXAS_LOG=1
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": variant.num_warps, **variant.options},
            )
        result.update(ok=True, shared_bytes=compiled.metadata.shared)
        usage = _resource_usage(compiled.asm["cubin"])
        result.update(
            registers=usage.get("reg"), stack_bytes=usage.get("stack"), local_bytes=usage.get("local")
        )
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
        if spills:
            result.update(spill_store_bytes=int(spills.group(1)), spill_load_bytes=int(spills.group(2)))
        registers = re.search(r"Used (\d+) registers", log.getvalue())
        if result["registers"] is None and registers:
            result["registers"] = int(registers.group(1))
    except Exception as exc:  # report every failure, keep compiling the others
        message = f"{type(exc).__name__}: {exc}"
        result.update(ok=False, error=message[:4000])
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def format_table(results: list[dict]) -> str:
    lines = [
        f"{'variant':58} {'arch':>5} {'warps':>5} {'regs':>5} {'spill st/ld':>12} {'stack':>6} {'smem':>7} "
        f"{'s':>6}"
    ]
    for r in results:
        name = f"{r['module'].rsplit('.', 1)[-1]}.{r['variant']}"
        if not r["ok"]:
            message = [line for line in r["error"].splitlines() if line.strip()] or ["?"]
            lines.append(
                f"{name:58} sm_{r['arch']:<2} FAILED: {message[-1].strip()[:200]}"
            )  # Triton's reason
            continue
        spills = f"{r['spill_store_bytes']}/{r['spill_load_bytes']}" if "spill_store_bytes" in r else "-"
        lines.append(
            f"{name:58} sm_{r['arch']:<2} {r['num_warps']:>5} "
            f"{r['registers'] if r['registers'] is not None else '-':>5} "
            f"{spills:>12} {r['stack_bytes'] if r['stack_bytes'] is not None else '-':>6} "
            f"{r['shared_bytes']:>7} {r['seconds']:>6}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 90 80"
    )
    parser.add_argument(
        "--modules",
        nargs="+",
        help="check these modules (import names or .py files) instead of every kernels/_triton_*.py module",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if _interpreted():
        print(
            "compile_check: TRITON_INTERPRET is set; kernels decorated under the interpreter cannot be compiled. "
            "Run with TRITON_INTERPRET=0.",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")  # read by the workers: ptxas's spill report
    specs = args.modules or module_names()
    started = time.perf_counter()
    problems, jobs = [], []
    for spec in specs:
        module = load_module(spec)
        problems += coverage_problems(module)
        if hasattr(module, "compile_variants"):
            jobs += [(spec, i, arch) for i in range(len(module.compile_variants())) for arch in args.arch]
    results = []
    if args.workers > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.workers) as pool:
            futures = [pool.submit(compile_one, *job) for job in jobs]
            results = [f.result() for f in futures]
    else:
        results = [compile_one(*job) for job in jobs]
    report = {
        "seconds": round(time.perf_counter() - started, 1),
        "workers": args.workers,
        "archs": args.arch,
        "modules": [load_module(s).__name__ for s in specs],
        "coverage_problems": problems,
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(format_table(results))
    failed = [r for r in results if not r["ok"]]
    for line in problems:
        print(f"coverage: {line}")
    print(
        f"{len(results) - len(failed)}/{len(results)} compiled, {len(problems)} coverage problem(s), "
        f"{report['seconds']} s with {args.workers} worker(s)"
    )
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
