"""Benchmark: LM-head + cross-entropy, forward + backward, time and peak extra memory.

Compares hfdist.kernels.fused_linear_cross_entropy in both weight-gradient accumulation modes ("hfdist":
the default, ``grad_accumulation="weight_dtype"``; "hfdist-fp32") with torch eager (``F.cross_entropy`` on
the full logits), torch.compile of the same, and Liger-Kernel's fused linear cross-entropy when installed.
Each hfdist row records the accumulation path that actually ran (``accumulation``: e.g. "bfloat16
accumulator, addmm" or, for fp32 on a GPU whose mixed-dtype addmm fails, the fallback and why).
With ``--entropy`` every method that can also returns the per-token entropy (hfdist: ``return_entropy=True``,
as training calls it; eager and torch.compile: from the fp32 logits under ``no_grad``; Liger has no entropy
output and runs loss-only): each row says ``entropy`` true or false.
The inputs are made on the device once per N and shared by the methods (gradients reset in between).
Writes ``bench_cross_entropy_<device>.json`` and ``.md`` into ``--out``, and prints each row as a JSON line.

  python benchmarks/bench_cross_entropy.py --device cuda                  # Llama 3 8B head, N = 4K..32K
  python benchmarks/bench_cross_entropy.py --device cuda --entropy --n 16384 4096 8192   # as the GPU suite
  python benchmarks/bench_cross_entropy.py --device cpu                   # N=8192, H=1024, V=32000, fp32
  python benchmarks/bench_cross_entropy.py --device cpu --quick           # seconds: checks the script runs

"Extra memory" is the peak above what the inputs (hidden, weight, labels) already hold, gradients of
hidden and weight included. On CUDA it is torch's allocator peak; on CPU each method runs in a fresh
subprocess and the peak is the process's RSS high-water mark (getrusage) minus its RSS before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import provenance

ROOT = Path(__file__).resolve().parent
PEAK_TFLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def gpu_peak_flops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def make_inputs(n, h, v, dtype, device, seed=0):
    """hidden [N, H], weight [V, H] (both requiring grad), labels [N] (every 17th ignored), made on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device=device, dtype=dtype) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    labels[::17] = -100
    return hidden, weight, labels


HFDIST_METHODS = {  # method -> (backend on CUDA, grad_accumulation)
    "hfdist": ("triton", "weight_dtype"),
    "hfdist-fp32": ("triton", "fp32"),
    "hfdist-torch": ("torch", "weight_dtype"),
}


def accumulation_path(name, dtype, device):
    """The weight-gradient accumulation an hfdist method ran with (call after it ran: the probe is cached)."""
    if name not in HFDIST_METHODS:
        return None
    from hfdist.kernels.utils import grad_accumulation_path

    return grad_accumulation_path(HFDIST_METHODS[name][1], dtype, torch.device(device)).describe()


class Unavailable(Exception):
    """A method that cannot run here (not installed, or not on this device); the message says why."""


def computes_entropy(name, entropy):
    return entropy and name != "liger"  # Liger's fused loss has no entropy output


def method_fn(name, device, entropy=False):
    """A callable(hidden, weight, labels) -> loss for one method; raises Unavailable when it cannot run."""
    from hfdist.kernels import fused_linear_cross_entropy

    def eager(hidden, weight, labels):
        logits = (hidden @ weight.T).float()
        loss = F.cross_entropy(logits, labels)
        if not entropy:
            return loss
        with (
            torch.no_grad()
        ):  # a metric, as in training: -sum p log p of each predicted token, 0 where ignored
            logp = torch.log_softmax(logits, -1)
            token_entropy = -(logp.exp() * logp).sum(-1) * (labels != -100)
        return loss, token_entropy

    def first(fn):  # the loss, the entropy computed and dropped (as a logging step would after reading it)
        return (lambda h, w, y: fn(h, w, y)[0]) if entropy else fn

    if name in HFDIST_METHODS:
        backend, accumulation = HFDIST_METHODS[name]
        backend = backend if device == "cuda" else "torch"
        return first(
            lambda h, w, y: fused_linear_cross_entropy(
                h, w, y, backend=backend, return_entropy=entropy, grad_accumulation=accumulation
            )
        )
    if name == "torch-eager":
        return first(eager)
    if name == "torch-compile":
        return first(torch.compile(eager, dynamic=True))
    if name == "liger":
        if device != "cuda":
            raise Unavailable("skipped: needs CUDA")
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:  # not installed, or no GPU support in this build
            raise Unavailable(f"not installed ({type(exc).__name__}: {exc})"[:200]) from None
        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: loss(w, h, y)
    raise ValueError(name)


def run_cuda(name, inputs, reps, entropy=False):
    """Time one method on the shared inputs (hidden, weight, labels) of one N; their gradients are reset."""
    try:
        fn = method_fn(name, "cuda", entropy)
    except Unavailable as why:
        return {"method": name, "status": str(why)}
    hidden, weight, labels = inputs
    dtype = weight.dtype
    try:
        for _ in range(2):  # warm-up: compile, autotune, allocator
            fn(hidden, weight, labels).backward()
            hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(hidden, weight, labels).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(reps):
            hidden.grad = weight.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(hidden, weight, labels).backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    except torch.cuda.OutOfMemoryError:
        return {"method": name, "status": "out of memory"}
    except Exception as exc:  # report it and go on with the other methods (a compile or kernel failure)
        return {"method": name, "status": f"failed: {type(exc).__name__}: {exc}"[:300]}
    finally:
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
    return {
        "method": name,
        "status": "ok",
        "time_s": statistics.median(times),
        "extra_bytes": extra,
        "accumulation": accumulation_path(name, dtype, "cuda"),
    }


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_cpu(name, n, h, v, dtype, reps, entropy=False):
    """Runs in a fresh process: one measured call for memory, then timed calls."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    try:
        fn = method_fn(name, "cpu", entropy)
    except Unavailable as why:
        return {"method": name, "status": str(why)}
    hidden, weight, labels = make_inputs(n, h, v, dtype, "cpu")
    if name == "torch-compile":  # compile on a small copy so that compilation is not counted as memory
        small = make_inputs(64, h, v, dtype, "cpu")
        fn(*small).backward()
    base = rss_bytes()
    t0 = time.perf_counter()
    fn(hidden, weight, labels).backward()
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = [first]
    for _ in range(reps - 1):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        fn(hidden, weight, labels).backward()
        times.append(time.perf_counter() - t0)
    return {
        "method": name,
        "status": "ok",
        "time_s": statistics.median(times),
        "extra_bytes": peak - base,
        "accumulation": accumulation_path(name, dtype, "cpu"),
    }


def run_cpu(name, n, h, v, dtype, reps, entropy=False):
    if name == "liger":  # GPU-only: no process started for it
        return {"method": name, "status": "skipped: needs CUDA"}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--n",
        str(n),
        "--h",
        str(h),
        "--v",
        str(v),
        "--dtype",
        str(dtype).replace("torch.", ""),
        "--reps",
        str(reps),
        *(["--entropy"] if entropy else []),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    if out.returncode != 0:
        return {"method": name, "status": f"failed: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_bytes(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def write_reports(stem, meta, measured_on, rows, h, v, dtype, markdown=True):
    report = {"meta": meta, "results": rows, "provenance": measured_on}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [
        f"Fused linear cross-entropy, forward + backward, {meta['device']}, torch {meta['torch']}, "
        f"H={h}, V={v}, {str(dtype).replace('torch.', '')}"
        f"{', with the per-token entropy (not Liger)' if meta.get('entropy') else ''}",
        "",
        "| N | method | time | TFLOP/s | of peak | extra memory | weight-gradient accumulation |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['n']} | {r['method']} | {r['status']} | | | | |")
            continue
        frac = f"{100 * r['fraction_of_peak']:.0f}%" if "fraction_of_peak" in r else "-"
        lines.append(
            f"| {r['n']} | {r['method']} | {1e3 * r['time_s']:.1f} ms | {r['tflops']:.2f} | {frac} | "
            f"{fmt_bytes(r['extra_bytes'])} | {r.get('accumulation') or '-'} |"
        )
    if markdown:
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--n", type=int, nargs="+")
    parser.add_argument("--h", type=int)
    parser.add_argument("--v", type=int)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--methods", nargs="+", default=["hfdist", "hfdist-fp32", "torch-eager", "torch-compile", "liger"]
    )
    parser.add_argument(
        "--entropy",
        action="store_true",
        help="also the per-token entropy (hfdist return_entropy=True; eager/compile from the logits)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes: check that the script runs")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--no-md", action="store_true", help="write only the JSON (the table goes to stdout)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        dtype = getattr(torch, args.dtype)
        print(json.dumps(child_cpu(args.child, args.n[0], args.h, args.v, dtype, args.reps, args.entropy)))
        return 0

    if args.device == "cuda":
        ns, h, v, dtype = [4096, 8192, 16384, 32768], 4096, 128256, "bfloat16"
        if args.quick:
            ns, h, v = [1024], 512, 8192
    else:
        ns, h, v, dtype = [8192], 1024, 32000, "float32"
        if args.quick:
            ns, h, v = [256], 64, 1000
    ns, h, v = args.n or ns, args.h or h, args.v or v
    dtype = getattr(torch, args.dtype or dtype)
    methods = args.methods
    peak = gpu_peak_flops() if args.device == "cuda" else None

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_flops": peak,
        "entropy": args.entropy,
        "note": "6NHV flop per forward+backward; extra memory includes the gradients",
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    measured_on = provenance()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_cross_entropy_{args.device}{'_quick' if args.quick else ''}"
    rows = []
    for n in ns:
        inputs = make_inputs(n, h, v, dtype, "cuda") if args.device == "cuda" else None  # once per shape
        for name in methods:
            if args.device == "cuda":
                result = run_cuda(name, inputs, args.reps, args.entropy)
            else:
                result = run_cpu(name, n, h, v, dtype, args.reps, args.entropy)
            result.update(
                n=n,
                h=h,
                v=v,
                dtype=str(dtype).replace("torch.", ""),
                entropy=computes_entropy(name, args.entropy),
            )
            if result["status"] == "ok":
                flops = 6 * n * h * v  # fwd logits + bwd d_hidden + bwd d_weight
                result["tflops"] = flops / result["time_s"] / 1e12
                if peak:
                    result["fraction_of_peak"] = flops / result["time_s"] / peak
            rows.append(result)
            print(json.dumps(result), flush=True)
            table = write_reports(
                stem, meta, measured_on, rows, h, v, dtype, not args.no_md
            )  # after every row: a timeout keeps what ran
        del inputs
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
