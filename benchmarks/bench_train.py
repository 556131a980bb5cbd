"""Training throughput and memory: hfdist against the paper's plain PyTorch loop and `transformers.Trainer`.

Each implementation runs in its own subprocess (so each peak-memory figure is that process's own
high-water mark) on the same model, batch, sequence length and data, ``--repeats`` times; every run
times ``--steps`` optimizer steps after ``--warmup`` untimed ones. Results: JSON (median, min, max per
implementation, the machine and versions) and a markdown table, ratios against the plain loop.

- ``plain``: the paper's released loop: HF forward with ``labels`` (full logits), ``loss.backward()``,
  ``torch.optim.AdamW`` with its defaults for the device, weight decay 0.
- ``trainer``: ``transformers.Trainer`` (``adamw_torch``), batch and dtype as above, no logging/saving.
- ``hfdist``: hfdist's own step (``hfdist.trainer.train_step``): fused linear cross-entropy, foreach (CPU)
  or fused (CUDA) Adam, no host syncs inside the step. Each switch is measured as its own implementation:
  ``hfdist-compile`` (``train.compile``: each decoder layer through ``torch.compile``; the warm-up steps
  pay the compilation), ``hfdist-unfused`` (``train.fused_loss=false``: HF logits and torch's loss),
  ``hfdist-ckpt`` (``train.activation_checkpointing``), ``hfdist-noprefetch`` (``train.prefetch=false``: the
  batch is copied to the GPU inside the step; on a CPU the switch changes nothing), and what trains:
  ``hfdist-last5`` (``train.trainable_layers=last:5``), ``hfdist-lora`` (``adapter.type=lora``: rank 16 on every
  projection of every block) and ``hfdist-lora-last5`` (the same on the last 5 blocks).

MFU (GPU) is the PaLM formula of ``hfdist.distributed.perf``: model FLOPs per token = 6 N + 12 L H Q T, with
N the parameters outside the input embedding, L layers, H heads, Q head dim, T sequence length; MFU =
tokens/s x FLOPs per token / the device's dense bf16 peak.
Usage: python benchmarks/bench_train.py --model smollm2-135m --batch 8 --seq-len 128 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import provenance

# hfdist's switches, each benchmarked as an implementation of its own.
HFDIST_VARIANTS = {
    "hfdist": [],
    "hfdist-compile": ["train.compile=true"],
    "hfdist-unfused": ["train.fused_loss=false"],
    "hfdist-ckpt": ["train.activation_checkpointing=true"],
    "hfdist-noprefetch": ["train.prefetch=false"],
    # What trains (hfdist.adapters): the last 5 decoder blocks and the final norm; LoRA (rank 16, alpha 32) on every
    # attention and MLP projection of all blocks, or of the last 5.
    "hfdist-last5": ["train.trainable_layers=last:5"],
    "hfdist-lora": ["adapter.type=lora"],
    "hfdist-lora-last5": ["adapter.type=lora", "adapter.layers=last:5"],
}


def _config(args):
    from hfdist.config import load_config

    overrides = [
        f"model.path={args.model}",
        f"model.dtype={args.dtype}",
        f"model.init={args.init}",
        f"data.seq_len={args.seq_len}",
        f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        "optim.lr=1e-5",
        *HFDIST_VARIANTS.get(args.impl, []),
    ]
    return load_config(None, overrides)


def run_one(args) -> dict:
    """Time one implementation in this process."""
    import torch

    from hfdist.models import load_model
    from hfdist.trainer import seed_everything

    seed_everything(0)
    config = _config(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    vocab = None
    total = args.warmup + args.steps
    step_times = []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if args.impl in HFDIST_VARIANTS:
        from hfdist.data import BatchPrefetcher
        from hfdist.distributed.single import SingleBackend
        from hfdist.trainer import build_model, train_step

        backend = SingleBackend(config, device=device)
        build_model(backend, config, total)
        lm = backend.model.lm
        vocab = lm.config.vocab_size
        batches = [
            torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator) for _ in range(total)
        ]
        prefetcher = BatchPrefetcher(lambda i: [batches[i]], device, config.train.prefetch)
        for i in range(total):
            sync()
            start = time.perf_counter()
            train_step(backend, prefetcher.get(i, i + 1 if i + 1 < total else None), 0.0)
            sync()
            step_times.append(time.perf_counter() - start)
    elif args.impl == "plain":
        lm = load_model(config.model, device)
        lm.train()
        vocab = lm.config.vocab_size
        optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-5, weight_decay=0.0)
        batches = [
            torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator) for _ in range(total)
        ]
        for batch in batches:
            sync()
            start = time.perf_counter()
            batch = batch.to(device)
            loss = lm(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # the paper's loop logs every step
            sync()
            step_times.append(time.perf_counter() - start)
    elif args.impl == "trainer":
        from transformers import Trainer, TrainerCallback, TrainingArguments

        lm = load_model(config.model, device)
        vocab = lm.config.vocab_size
        rows = [
            {"input_ids": torch.randint(0, vocab, (args.seq_len,), generator=generator)}
            for _ in range(total * args.batch)
        ]
        rows = [dict(r, labels=r["input_ids"]) for r in rows]

        class Timer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                sync()
                self.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                sync()
                step_times.append(time.perf_counter() - self.start)

        training_args = TrainingArguments(
            output_dir=args.scratch,
            per_device_train_batch_size=args.batch,
            max_steps=total,
            learning_rate=1e-5,
            weight_decay=0.0,
            optim="adamw_torch",
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            use_cpu=device.type == "cpu",
            bf16=args.dtype == "bfloat16" and device.type == "cuda",
            disable_tqdm=True,
            seed=0,
        )
        Trainer(model=lm, args=training_args, train_dataset=rows, callbacks=[Timer()]).train()
    else:
        raise SystemExit(
            f"--impl {args.impl!r}: expected plain, trainer or one of {', '.join(HFDIST_VARIANTS)}"
        )

    timed = step_times[args.warmup :]
    step_time = statistics.median(timed)
    tokens_per_s = args.batch * args.seq_len / step_time
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "impl": args.impl,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "peak_memory_gib": peak_gib,
        "step_times_s": timed,
    }
    from hfdist.distributed.perf import mfu, model_flops_per_token, peak_flops

    utilisation = mfu(tokens_per_s, model_flops_per_token(lm, args.seq_len), 1, peak_flops(device))
    if utilisation is not None:
        result["mfu"] = utilisation
    return result


def summarize(runs: list[dict]) -> dict:
    def stats(key):
        values = [r[key] for r in runs if key in r]
        return (
            {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None
        )

    return {
        key: stats(key) for key in ("tokens_per_s", "step_time_s", "peak_memory_gib", "mfu") if stats(key)
    }


def markdown(results: dict) -> str:
    impls = results["implementations"]
    base, trainer = impls.get("plain"), impls.get("trainer")
    machine = results["provenance"]["machine"]
    lines = [
        f"Training: {results['settings']['model']}, batch {results['settings']['batch']} x seq "
        f"{results['settings']['seq_len']}, {results['settings']['dtype']}, on {machine} "
        f"(median of {results['settings']['repeats']} runs x {results['settings']['steps']} steps)",
        "",
        "| implementation | tokens/s | step time (s) | peak memory (GiB) | MFU | tokens/s vs plain | memory vs plain "
        "| tokens/s vs Trainer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in impls.items():
        tps, step, mem = (
            summary["tokens_per_s"]["median"],
            summary["step_time_s"]["median"],
            summary["peak_memory_gib"]["median"],
        )
        mfu = f"{summary['mfu']['median']:.1%}" if "mfu" in summary else "-"
        ratio = f"{tps / base['tokens_per_s']['median']:.2f}x" if base else "-"
        mem_ratio = f"{mem / base['peak_memory_gib']['median']:.2f}x" if base else "-"
        vs_trainer = f"{tps / trainer['tokens_per_s']['median']:.2f}x" if trainer else "-"
        lines.append(
            f"| {name} | {tps:,.0f} | {step:.3f} | {mem:.2f} | {mfu} | {ratio} | {mem_ratio} | {vs_trainer} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="model path, hub id or shipped architecture name"
    )
    parser.add_argument("--init", default="pretrained", choices=["pretrained", "random"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--impls",
        default="plain,trainer,hfdist,hfdist-compile",
        help=f"comma-separated: plain, trainer, {', '.join(HFDIST_VARIANTS)}",
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for JSON and markdown")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--impl", help=argparse.SUPPRESS)  # internal: run one implementation in this process
    parser.add_argument("--scratch", default="/tmp/hfdist-bench", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.impl:
        print(json.dumps(run_one(args)))
        return 0
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for impl in args.impls.split(","):
            command = [
                sys.executable,
                __file__,
                *(argv if argv is not None else sys.argv[1:]),
                "--impl",
                impl,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"bench train: {impl} failed (exit {done.returncode})")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs.setdefault(impl, []).append(result)
            print(
                f"{impl} run {repeat + 1}: {result['tokens_per_s']:.1f} tokens/s, "
                f"peak {result['peak_memory_gib']:.2f} GiB",
                file=sys.stderr,
            )
    results = {
        "benchmark": "train",
        "settings": {
            k: getattr(args, k)
            for k in ("model", "init", "dtype", "batch", "seq_len", "steps", "warmup", "repeats")
        },
        "implementations": {name: summarize(r) for name, r in runs.items()},
        "runs": runs,
        "provenance": provenance(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_{args.tag}" if args.tag else "train"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
