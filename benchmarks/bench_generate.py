"""Generation speed: hfdist.generation.generate against Hugging Face ``model.generate`` in the same process.

Same model, same prompts (32-token windows of the embedded Austen corpus, or random ids for a model
without a tokenizer), same settings, exactly ``--new-tokens`` new tokens per row (EOS disabled on both
sides), for greedy and the paper's top-p (p 0.9, temperature 0.7, top-k 50) at each batch size. Every
configuration runs ``--repeats`` times after one short warm-up; tokens/s = rows x new tokens / wall time
(prefill included), median over repeats. Greedy outputs are also compared token for token.

Also measured: the citation blocker's cost per decoding step (greedy with and without a blocker built over
``--blocker-rows`` x 256 training ids, and ``CitationBlocker.block_`` alone), and on a GPU with
``--compile`` hfdist with the static cache + torch.compile (CUDA graphs on a GPU) and HF with its static cache.
Greedy at batch 1 also runs prompt-lookup speculative decoding on both sides: HF's assisted generation
(``prompt_lookup_num_tokens=8``) and hfdist's ``draft="ngram"`` (same tokens as greedy, fewer passes where the
text repeats, so its gain depends on the prompts: here, the original model's greedy continuations of Austen).

Each row is also printed as a JSON line as soon as it is measured.

Usage:
  python benchmarks/bench_generate.py --model smollm2-135m --out benchmarks/results          # the real numbers
  python benchmarks/bench_generate.py --quick                                               # a quick check
  python benchmarks/bench_generate.py --model llama-3.2-1b --init random --batch-sizes 1 --compile \
      --impls hf,hfdist_static_compile,hf_static --no-drafting --blocker-rows 0             # as the GPU suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provenance import provenance  # noqa: E402

from hfdist.generation import CitationBlocker, generate  # noqa: E402

TOP_P = {"top_p": 0.9, "temperature": 0.7, "top_k": 50}


def load(model_name: str, device: torch.device, dtype: torch.dtype, init: str = "pretrained"):
    """The model and, if it has one, its tokenizer. ``tiny`` is a random 2-layer Llama (no tokenizer);
    ``init="random"`` builds a shipped architecture (e.g. llama-3.2-1b) with random weights and no tokenizer."""
    if model_name == "tiny":
        from hfdist.testing import tiny_llama

        return tiny_llama(vocab_size=4096, hidden_size=128, num_layers=2).to(device, dtype), None
    from hfdist.config import ModelConfig
    from hfdist.models import load_model, load_tokenizer

    config = ModelConfig(path=model_name, init=init, dtype=str(dtype).removeprefix("torch."))
    model = load_model(config, device).eval()
    return model, (load_tokenizer(config) if init == "pretrained" else None)


def make_prompts(tokenizer, vocab: int, rows: int, length: int) -> torch.Tensor:
    if tokenizer is not None:
        import gzip

        from hfdist.data import EMBEDDED

        ids: list[int] = []
        with gzip.open(EMBEDDED["austen"], "rt") as f:
            for line in f:
                ids.extend(tokenizer(json.loads(line)["text"][:20000], add_special_tokens=False)["input_ids"])
                if len(ids) >= rows * length * 4:
                    break
        windows = [ids[i * length * 4 : i * length * 4 + length] for i in range(rows)]
        return torch.tensor(windows, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (rows, length), generator=g)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def hf_generate(
    model, ids, new_tokens: int, strategy: str, pad: int, static: bool = False, prompt_lookup: int = 0
):
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=0,
        do_sample=strategy != "greedy",
        eos_token_id=None,
        pad_token_id=pad,
        **(TOP_P if strategy != "greedy" else {}),
    )
    if static:
        config.cache_implementation = "static"
    if prompt_lookup:
        config.prompt_lookup_num_tokens = prompt_lookup
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)


def ours_generate(model, ids, new_tokens: int, strategy: str, pad: int, **kwargs):
    extra = dict(TOP_P, seed=0) if strategy != "greedy" else {}
    # model.generate fills an unset eos_token_id from the model's generation config and stops rows there: do the
    # same, so both produce the same tokens (greedy) and the same amount of work.
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return generate(
        model,
        ids,
        max_new_tokens=new_tokens,
        strategy="sample" if strategy != "greedy" else "greedy",
        pad_token_id=pad,
        eos_token_id=eos,
        **extra,
        **kwargs,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="model folder/hub id/alias, or 'tiny'")
    parser.add_argument(
        "--init",
        default="pretrained",
        choices=["pretrained", "random"],
        help="random: a shipped architecture (llama-3.2-1b, ...) with random weights, random prompts",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: float32 on CPU, bfloat16 on GPU",
    )
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--new-tokens", type=int, default=224)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategies", default="greedy,top-p")
    parser.add_argument(
        "--blocker-rows",
        type=int,
        default=2000,
        help="training rows (x 256) for the blocker; 0 skips the blocker's measurement",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also hfdist static+compile and HF static cache"
    )
    parser.add_argument(
        "--impls",
        default=None,
        help="comma-separated implementations, in this order (default: hf,hfdist, plus "
        "hf_static,hfdist_static_compile with --compile)",
    )
    parser.add_argument(
        "--no-drafting",
        dest="drafting",
        action="store_false",
        help="skip the prompt-lookup drafting rows (greedy, batch 1)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, short runs: checks the script works"
    )
    parser.add_argument(
        "--out", default=None, help="folder for generate_<device>.json/.md (default: print only)"
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.batch_sizes, args.new_tokens, args.repeats, args.blocker_rows = (
            "tiny",
            "1,4",
            24,
            1,
            200,
        )
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tokenizer = load(args.model, device, dtype, args.init)
    vocab = model.config.vocab_size
    pad = (
        tokenizer.pad_token_id
        if tokenizer is not None and tokenizer.pad_token_id is not None
        else model.config.pad_token_id
        if model.config.pad_token_id is not None
        else 0
    )
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = make_prompts(tokenizer, vocab, max(batch_sizes), args.prompt_len).to(device)

    available = {
        "hf": lambda ids, s: hf_generate(model, ids, args.new_tokens, s, pad),
        "hfdist": lambda ids, s: ours_generate(model, ids, args.new_tokens, s, pad),
        "hf_static": lambda ids, s: hf_generate(model, ids, args.new_tokens, s, pad, static=True),
        "hfdist_static_compile": lambda ids, s: ours_generate(
            model, ids, args.new_tokens, s, pad, cache="static", compile=True
        ),
    }
    chosen_names = (
        args.impls.split(",")
        if args.impls
        else ["hf", "hfdist", *(["hf_static", "hfdist_static_compile"] if args.compile else [])]
    )
    unknown = [name for name in chosen_names if name not in available]
    if unknown:
        parser.error(f"--impls: unknown {', '.join(unknown)} (choose from {', '.join(available)})")
    impls = {name: available[name] for name in chosen_names}
    # Greedy at batch 1 only: prompt-lookup drafting, HF's (assisted generation) and hfdist's (draft="ngram").
    drafting = {
        "hf_prompt_lookup": lambda ids, s: hf_generate(model, ids, args.new_tokens, s, pad, prompt_lookup=8),
        "hfdist_ngram": lambda ids, s: ours_generate(model, ids, args.new_tokens, s, pad, draft="ngram"),
    }
    results = []
    for strategy in args.strategies.split(","):
        for batch in batch_sizes:
            ids = prompts[:batch]
            outputs = {}
            chosen = dict(
                impls, **(drafting if strategy == "greedy" and batch == 1 and args.drafting else {})
            )
            for name, fn in chosen.items():
                # Warm-up at the timed shapes: compilation (and HF's static cache, sized prompt + new tokens, which a
                # shorter warm-up prompt would make recompile inside the timed runs) stays out of the times.
                fn(ids, strategy)
                times, out = timed(lambda: fn(ids, strategy), device, args.repeats)
                outputs[name] = out
                new = out.shape[1] - ids.shape[1]
                row = {
                    "impl": name,
                    "strategy": strategy,
                    "batch": batch,
                    "new_tokens": new,
                    "seconds_median": statistics.median(times),
                    "seconds": times,
                    "tokens_per_s": batch * new / statistics.median(times),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
            if strategy == "greedy" and "hf" in outputs:
                for name in outputs:
                    if name != "hf":
                        same = torch.equal(outputs[name], outputs["hf"])
                        results.append(
                            {"impl": name, "strategy": "greedy", "batch": batch, "equals_hf_greedy": same}
                        )
                        print(json.dumps(results[-1]), flush=True)

    report = {
        "model": args.model,
        "dtype": str(dtype),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "results": results,
        "blocker": measure_blocker(args, model, prompts, pad, batch_sizes, device)
        if args.blocker_rows > 0
        else None,
        "provenance": provenance(),
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = "gpu" if device.type == "cuda" else "cpu"
        (out / f"generate_{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"generate_{slug}.md").write_text(markdown(report))
        print(f"wrote {out}/generate_{slug}.json and .md")
    print(markdown(report))
    return 0


def measure_blocker(args, model, prompts, pad, batch_sizes, device) -> dict:
    """The citation blocker's cost: a greedy run with and without it, and ``block_`` alone on [B, V] logits."""
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    blocker = CitationBlocker(rng.integers(3, vocab, size=(args.blocker_rows, 256)), n=5)

    batch = max(batch_sizes)
    ids = prompts[:batch]
    run_plain = lambda: ours_generate(model, ids, args.new_tokens, "greedy", pad)  # noqa: E731
    run_blocked = lambda: ours_generate(model, ids, args.new_tokens, "greedy", pad, blocker=blocker)  # noqa: E731
    run_blocked()  # warm-up: moves the index to the device
    plain, blocked = [], []
    for _ in range(args.repeats):  # interleaved, and the minimum is used: the machine may be shared
        plain += timed(run_plain, device, 1)[0]
        blocked += timed(run_blocked, device, 1)[0]
    logits = torch.randn(batch, vocab, device=device)
    grams = torch.from_numpy(rng.integers(3, vocab, size=(batch, 5))).to(device)
    grams[: batch // 2] = torch.from_numpy(blocker._host["grams"][: batch // 2]).to(device)  # half are hits
    blocker.block_(logits, grams)
    iters = 200
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        blocker.block_(logits, grams)
    sync(device)
    per_call = (time.perf_counter() - start) / iters
    blocker_row = {
        "batch": batch,
        "training_ngrams": blocker.num_ngrams,
        "table_size": blocker.table_size,
        "max_probe": blocker.max_probe,
        "max_next": blocker.max_next,
        "greedy_seconds": min(plain),
        "greedy_blocker_seconds": min(blocked),
        "overhead_ms_per_step": 1000 * (min(blocked) - min(plain)) / args.new_tokens,
        "block_call_ms": 1000 * per_call,
    }
    print(
        f"blocker: {blocker.num_ngrams} n-grams; block_ {1000 * per_call:.3f} ms/call; greedy batch {batch} "
        f"{min(plain):.2f} s -> {min(blocked):.2f} s with the blocker "
        f"({blocker_row['overhead_ms_per_step']:.3f} ms/step)"
    )
    return blocker_row


def markdown(report: dict) -> str:
    measured_on, versions = report["provenance"], report["provenance"]["versions"]
    lines = [
        f"# Generation speed: {report['model']} ({report['dtype']}), {measured_on['machine']}",
        "",
        f"torch {versions['torch']}, transformers {versions['transformers']}; "
        f"prompt {report['prompt_len']} tokens, {report['new_tokens']} new tokens, median of "
        f"{report['repeats']}.",
        "",
        "| Strategy | Batch | Implementation | Tokens/s | vs HF generate |",
        "|---|---|---|---|---|",
    ]
    speed = {
        (r["strategy"], r["batch"], r["impl"]): r["tokens_per_s"]
        for r in report["results"]
        if "tokens_per_s" in r
    }
    for (strategy, batch, impl), tps in speed.items():
        base = speed.get((strategy, batch, "hf"))
        lines.append(
            f"| {strategy} | {batch} | {impl} | {tps:.1f} | {tps / base:.2f}x |"
            if base
            else f"| {strategy} | {batch} | {impl} | {tps:.1f} | - |"
        )
    checks = [r for r in report["results"] if "equals_hf_greedy" in r]
    if checks:
        lines += [
            "",
            "Greedy output equal to HF generate: "
            + ", ".join(
                f"{r['impl']} batch {r['batch']}: {'yes' if r['equals_hf_greedy'] else 'NO'}" for r in checks
            ),
        ]
    b = report["blocker"]
    if b is None:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Citation blocker over {b['training_ngrams']} training 5-grams (table {b['table_size']} slots, "
        f"longest probe {b['max_probe']}): `block_` {b['block_call_ms']:.3f} ms per step for batch "
        f"{b['batch']}; greedy run (best of {report['repeats']}) {b['greedy_seconds']:.2f} s without, "
        f"{b['greedy_blocker_seconds']:.2f} s "
        f"with ({b['overhead_ms_per_step']:.3f} ms per step).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
