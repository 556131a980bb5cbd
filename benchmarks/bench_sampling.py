"""Benchmark: top-p sampling of one token per row from fp32 logits [B, V].

Compares hfdist.kernels.sample (Triton on CUDA, or on a CPU inside the Triton interpreter when
TRITON_INTERPRET=1; the torch reference too; both with ``on_invalid="flag"``, the no-sync path decoding uses)
with plain torch (sort, softmax, cumulative-mass cut, ``torch.multinomial``), Hugging Face's way
(``TopPLogitsWarper`` + softmax + ``torch.multinomial``) and FlashInfer's
``top_p_sampling_from_probs`` (softmax included) where installed. Each Triton row records the resolve path
its rows took (``resolve_paths``: rows per path, from one extra call with the kernel's diagnostics). The
logits are made on the device once per batch size. Writes ``bench_sampling_<device>.json`` and ``.md`` into
``--out``, and prints each row as a JSON line.

  python benchmarks/bench_sampling.py --device cuda            # B in 1..256, V=128256, p in {0.5, 0.9, 0.95}
  python benchmarks/bench_sampling.py --device cpu --quick     # seconds: checks the script runs

Logits: N(0, 1) * 4 plus a few spikes, a peaked distribution like an LM's. GB/s counts one fp32 read
of the logits; "of peak" divides by the HBM bandwidth (3.35 TB/s H100 SXM, 4.8 TB/s H200).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from provenance import provenance

ROOT = Path(__file__).resolve().parent
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def make_logits(batch, vocab, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=gen, device=device) * 4.0
    spikes = torch.randint(0, vocab, (batch, 4), generator=gen, device=device)
    logits.scatter_add_(1, spikes, torch.full((batch, 4), 12.0, device=device))
    return logits


def triton_runs_here(device):
    """Compiled on CUDA; on a CPU only inside the Triton interpreter (slow: tiny shapes only)."""
    from hfdist.kernels.utils import interpreter_enabled, triton_available

    return device == "cuda" or (triton_available() and interpreter_enabled())


def resolve_paths(logits, top_p, seeds):
    """Rows of one call per path of the Triton sampler's resolve, read from its diagnostics (top-p only):
    ``whole_row`` (no candidate bins chosen: the searches stream the row), else by candidate count:
    ``all_pairs`` (<= SMALL), ``resident`` (<= RESIDENT, searched in registers), ``streamed`` (more)."""
    from hfdist.kernels._triton_sampling import RESIDENT, SMALL, sample_triton

    seen = {}
    sample_triton(logits, temperature=1.0, top_p=top_p, top_k=0, min_p=0.0, seeds=seeds, diagnostics=seen)
    n, kept = seen["candidates"].cpu(), seen["bins"].cpu() >= 0
    return {
        "chunks_per_row": int(seen["chunks_per_row"]),
        "all_pairs": int((kept & (n <= SMALL)).sum()),
        "resident": int((kept & (n > SMALL) & (n <= RESIDENT)).sum()),
        "streamed": int((kept & (n > RESIDENT)).sum()),
        "whole_row": int((~kept).sum()),
    }


def methods(device):
    from hfdist.kernels import sample

    found = {}
    # on_invalid="flag", as decoding calls it: no host synchronisation inside the timed call ("raise" reads
    # the invalid-row flags back every call).
    if triton_runs_here(device):
        found["hfdist-triton"] = lambda x, p, seeds: sample(
            x, top_p=p, seed=seeds, backend="triton", on_invalid="flag"
        )
    found["hfdist-torch-reference"] = lambda x, p, seeds: sample(
        x, top_p=p, seed=seeds, backend="torch", on_invalid="flag"
    )

    def sort_multinomial(x, p, seeds):  # the textbook way: sort the row, cut the cumulative mass, multinomial
        values, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(values, -1)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > p, 0.0)  # keep the shortest prefix reaching p
        return order.gather(1, torch.multinomial(probs, 1)).squeeze(1)

    found["torch-sort-multinomial"] = sort_multinomial
    try:
        from transformers.generation.logits_process import TopPLogitsWarper

        def hf(x, p, seeds, warpers={}):
            warper = warpers.setdefault(p, TopPLogitsWarper(top_p=p))
            scores = warper(None, x)
            return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)

        found["hf-topp-multinomial"] = hf
    except ImportError:
        pass
    if device == "cuda":
        try:
            import flashinfer

            def fi(x, p, seeds):
                return flashinfer.sampling.top_p_sampling_from_probs(torch.softmax(x, -1), p)

            found["flashinfer"] = fi
        except ImportError:
            pass
    return found


def time_call(fn, device, reps):
    fn()  # warm-up (compilation)
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_reports(stem, meta, measured_on, rows, vocab, markdown=True):
    report = {"meta": meta, "results": rows, "provenance": measured_on}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [
        f"Top-p sampling, fp32 logits, V={vocab}, {meta['device']}, torch {meta['torch']}",
        "",
        "| B | top_p | method | time | GB/s | of peak | resolve paths (rows) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['batch']} | {r['top_p']} | {r['method']} | {r['status']} | | | |")
            continue
        frac = f"{100 * r['fraction_of_peak']:.0f}%" if "fraction_of_peak" in r else "-"
        paths = ", ".join(f"{k} {v}" for k, v in r.get("resolve_paths", {}).items() if v) or "-"
        lines.append(
            f"| {r['batch']} | {r['top_p']} | {r['method']} | {1e6 * r['time_s']:.0f} us | "
            f"{r['gb_per_s']:.1f} | {frac} | {paths} |"
        )
    if markdown:
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--batch", type=int, nargs="+")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--top-p", type=float, nargs="+", default=[0.5, 0.9, 0.95])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: check that the script runs")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--no-md", action="store_true", help="write only the JSON (the table goes to stdout)")
    args = parser.parse_args(argv)
    batches = args.batch or ([1, 8, 32, 128, 256] if not args.quick else [1, 8])
    vocab = args.vocab if not args.quick else 4096
    reps = args.reps if not args.quick else 3
    device = args.device
    bandwidth = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        bandwidth = next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)

    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "peak_bandwidth": bandwidth,
    }
    measured_on = provenance()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_sampling_{device}{'_quick' if args.quick else ''}"
    rows = []
    found = methods(device)
    for batch in batches:
        logits = make_logits(batch, vocab, device)
        seeds = torch.arange(batch, device=device)
        for p in args.top_p:
            for name, fn in found.items():
                try:
                    seconds = time_call(lambda: fn(logits, p, seeds), device, reps)
                    result = {"method": name, "status": "ok", "time_s": seconds}
                    result["gb_per_s"] = batch * vocab * 4 / seconds / 1e9
                    if bandwidth:
                        result["fraction_of_peak"] = batch * vocab * 4 / seconds / bandwidth
                    if name == "hfdist-triton":
                        result["resolve_paths"] = resolve_paths(logits, p, seeds)
                except Exception as exc:  # report, keep going with the other methods
                    result = {"method": name, "status": f"failed: {type(exc).__name__}: {exc}"[:200]}
                result.update(batch=batch, vocab=vocab, top_p=p)
                rows.append(result)
                print(json.dumps(result), flush=True)
                table = write_reports(
                    stem, meta, measured_on, rows, vocab, not args.no_md
                )  # after every row: a timeout keeps what ran
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
