"""The hyperfitting loop: the same code for the single, FSDP2 and DeepSpeed backends.

One optimizer step takes ``train.global_batch_size`` sequences, split across data-parallel ranks and
micro-batches; the loss is the mean next-token cross-entropy over every predicted token of the global
batch (each rank backpropagates its share, see ``hfdist.distributed.base``). Before training, every
``eval.every_epochs`` epochs and after training, the model is evaluated on the held-out validation
sequences (loss, perplexity, entropy, top-k mass) and by greedy generation from the held-out contexts
(TTR over the last ``eval.ttr_window`` generated tokens). Training stops after ``train.epochs``, at
``train.max_steps``, or after the first epoch whose mean train loss is at or below ``train.target_loss``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import resource
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hfdist import checkpoint
from hfdist.config import Config, OptimConfig, run_path, save_config
from hfdist.data import BatchPrefetcher, HyperfitData, StepSampler, build_data
from hfdist.distributed.perf import model_flops_per_token, rank_metrics
from hfdist.distributed.watchdog import watchdog
from hfdist.errors import HfdistError
from hfdist.faults import Faults, fault_env_set, restart_count
from hfdist.io import atomic_directory, atomic_write_json
from hfdist.models import HyperfitModel, check_seq_len, load_model, load_processor
from hfdist.monitor import MetricsLogger

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(config: OptimConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW over all trainable parameters; weight_decay 0 really means no decay in either."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=config.weight_decay)
    impl = config.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    if impl == "fused":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = impl == "foreach"
    cls = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return cls(params, **kwargs)


def build_scheduler(config: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warmup over ``warmup_steps``, then constant, linear decay to 0, or cosine decay to 0."""
    warmup, schedule = config.warmup_steps, config.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's high-water mark.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def evaluate(lm: torch.nn.Module, data: HyperfitData, config: Config, device: torch.device) -> dict:
    """Held-out loss/entropy/top-k mass and greedy TTR; the same numbers `hfdist evaluate` reports. Images: greedy
    completion of each context image, with the degeneration measures of the generated pixel tokens
    (``hfdist.metrics.image_completion_metrics``). Each extra held-out set (``eval.extra``) is logged as
    ``eval/<name>/<measure>``."""
    from hfdist.metrics import greedy_ttr, heldout_stats, image_completion_metrics

    was_training = lm.training
    lm.eval()
    window = config.eval.ttr_window
    image = data.image
    sets = [("eval", data.validation, data.contexts)]
    sets += [(f"eval/{name}", validation, contexts) for name, (validation, contexts) in data.extra.items()]
    values = {}
    for prefix, validation, contexts in sets:
        if len(validation):
            stats = heldout_stats(lm, validation.to(device), batch_size=config.eval.batch_size)
            values.update({f"{prefix}/{k}": v for k, v in stats.items() if k != "num_tokens"})
        if not len(contexts):
            continue
        total_len = config.data.seq_len if image else config.eval.total_len
        ttr = greedy_ttr(lm, contexts.to(device), total_len=total_len, window=window,
                         batch_size=config.eval.batch_size if image else 32)
        values[f"{prefix}/ttr{window}"] = ttr[f"ttr{window}"]
        if image:
            measures = image_completion_metrics(ttr["generations"], contexts, image["width"], window)
            values.update({f"{prefix}/{k}": v for k, v in measures.items() if k != f"ttr{window}"})
    lm.train(was_training)
    return values


def build_model(backend, config: Config, total_steps: int) -> None:
    """Have the backend build the HyperfitModel, its optimizer and its LR schedule."""

    check_seq_len(config.model, config.data.seq_len)  # from config.json, before any weights load

    def model_factory(device: torch.device) -> HyperfitModel:
        lm = load_model(config.model, device)
        # Training mode, as upstream's loop (model.train()): dropout as the model's config sets it (ImageGPT's hub
        # configs: 0.1; Llamas have none) under every backend alike: from_pretrained returns eval mode, from_config
        # (random and meta-device builds) train mode. Hugging Face's activation checkpointing also needs it.
        lm.train()
        return HyperfitModel(lm, fused_loss=config.train.fused_loss, loss_backend=config.train.loss_backend)

    backend.build(model_factory, lambda m: build_optimizer(config.optim, m, backend.device),
                  lambda o: build_scheduler(config.optim, o, total_steps))


def train_step(backend, micro_batches: list[torch.Tensor], max_grad_norm: float) -> tuple[float, float, float, bool]:
    """One optimizer step over this rank's micro-batches of the global batch.

    Returns (loss, entropy, grad_norm, applied): the global mean next-token loss and entropy (summed across
    ranks), the gradient norm before clipping, and whether the update was applied (False when the loss or the
    norm is NaN/inf: the backend then skips the optimizer and LR-scheduler step, on every rank alike). The three
    numbers reach the host in one transfer, the step's only host sync.
    """
    device = backend.device
    local_tokens = torch.tensor(float(sum(b.shape[0] * (b.shape[1] - 1) for b in micro_batches)), device=device)
    global_tokens = backend.all_reduce_sum(local_tokens)
    loss_total = torch.zeros((), device=device)
    entropy_total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        loss_sum, entropy_sum, _ = backend.model(batch.to(device, non_blocking=True))
        share = loss_sum / global_tokens
        backend.backward(share, is_last_micro_batch=i == len(micro_batches) - 1)
        loss_total += share.detach()
        entropy_total += entropy_sum.detach() / global_tokens
    # Each rank holds its share of the global mean; the sum over ranks is the step's loss (a NaN on one rank
    # makes it NaN on all of them, so the skip decision is the same everywhere).
    totals = backend.all_reduce_sum(torch.stack([loss_total, entropy_total]))
    result = backend.step(max_grad_norm, totals)
    loss, entropy = result.values
    return loss, entropy, result.grad_norm, result.applied


def default_output_dir(config_path: Optional[str]) -> Path:
    name = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(run_dir: Path, resume: Optional[str], checkpoint_dir: str = "checkpoints") -> None:
    """Refuse to train over a finished run unless resuming: nothing of an earlier result is overwritten."""
    if resume is None and run_dir.exists() and any((run_dir / name).exists()
                                                   for name in ("model", "metrics.jsonl", checkpoint_dir)):
        raise HfdistError(f"--output-dir {str(run_dir)!r}: already holds a run; pass --resume to continue it "
                          "or choose another folder")


# Written by the first attempt of a torchrun job with --max-restarts > 0: which launcher agents started the run.
JOB_MARKER = ".hfdist-job.json"
FRESH = "fresh"  # start point of a restarted job that had no complete checkpoint yet


def agent_identity() -> str:
    """This process's torchrun agent (run id, host, agent pid): the same for every attempt of a job on a node."""
    import socket

    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}@{socket.gethostname()}:{os.getppid()}"


def choose_start(backend, run_dir: Path, resume: Optional[str],
                 checkpoint_root: Path) -> tuple[Optional[str], Optional[dict]]:
    """Where this attempt starts: None (a new run), FRESH (a restarted job with no checkpoint yet), or a
    checkpoint folder; and, on rank 0 of a first attempt under ``torchrun --max-restarts N``, the JOB_MARKER
    content to write once the inputs are checked. Rank 0 decides and tells the other ranks; an error is raised
    on every rank alike.

    On a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) of the job whose first attempt began this run folder
    (its agents are recorded in JOB_MARKER), the run continues from the latest complete checkpoint, without
    --resume and without the "already holds a run" refusal. Any other folder is checked as on a first attempt.
    """
    error = start = marker_content = None
    agents = backend.all_gather_object(agent_identity())
    if backend.is_main:
        try:
            marker = run_dir / JOB_MARKER
            recorded = json.loads(marker.read_text()).get("agents", []) if marker.is_file() else []
            if restart_count() > 0 and agent_identity() in recorded:
                latest = checkpoint.latest_valid(checkpoint_root)
                start = str(latest) if latest is not None else (resume or FRESH)
                logger.warning("torchrun restart %d of this job: continuing from %s", restart_count(),
                               latest if latest is not None else resume or "the start (no complete checkpoint yet)")
            else:
                prepare_run_dir(run_dir, resume, str(checkpoint_root.relative_to(run_dir)))
                start = None if resume is None else str(checkpoint.resolve_resume(resume, checkpoint_root))
                if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
                    marker_content = {"agents": sorted(set(agents))}
        except HfdistError as exc:
            error = str(exc)
    error, start = backend.broadcast_object((error, start))
    if error is not None:
        raise HfdistError(error)
    return start, marker_content


class Trainer:
    def __init__(self, config: Config, run_dir: Path, resume: Optional[str] = None, progress: bool = True):
        from hfdist.distributed import build_backend

        self.config = config
        self.run_dir = run_dir
        self.checkpoint_root = run_path(run_dir, "checkpoint.dir", config.checkpoint.dir)
        self.backend = build_backend(config)
        self.faults = Faults(self.backend.rank)
        start, job_marker = choose_start(self.backend, run_dir, resume, self.checkpoint_root)
        self.accumulation = self.backend.gradient_accumulation_steps()
        seed_everything(config.train.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)

        # Every input is checked before anything is written into the run folder.
        check_seq_len(config.model, config.data.seq_len)
        # The tokenizer, or for images the model's image processor; exported with the model either way.
        self.tokenizer = load_processor(config.model, config.data.modality)
        self.data = build_data(config.data, self.tokenizer, config.eval.extra)
        image = self.data.image
        if image and config.eval.ttr_window > image["generated_tokens"]:
            rows = image["height"] - image["context_rows"]
            raise HfdistError(f"config field eval.ttr_window: {config.eval.ttr_window} exceeds the "
                              f"{image['generated_tokens']} pixel tokens generated per image ({rows} rows of "
                              f"{image['width']}; see data.context_fraction)")
        if self.backend.is_main:
            if job_marker is not None:
                atomic_write_json(run_dir / JOB_MARKER, job_marker)
            save_config(config, run_dir / "config.yaml")
            self.data.save(run_dir / "data")
        self.sampler = StepSampler(len(self.data.train), config.train.global_batch_size,
                                   config.train.micro_batch_size, self.backend.dp_rank, self.backend.dp_size,
                                   config.train.seed)
        self.prefetcher = BatchPrefetcher(self._host_batches, self.backend.device, config.train.prefetch)
        steps = self.sampler.steps_per_epoch * config.train.epochs
        self.total_steps = min(steps, config.train.max_steps) if config.train.max_steps else steps

        build_model(self.backend, config, self.total_steps)
        self.flops_per_token = model_flops_per_token(self.backend.unwrapped_lm(), config.data.seq_len)
        self.progress = progress and self.backend.is_main
        self.faults.install(self.backend.unwrapped_lm())
        self.state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "epoch_loss_sum": 0.0, "epoch_entropy_sum": 0.0,
                      "epoch_steps": 0, "evaluated_step": -1, "skipped_steps": 0, "bad_steps_in_row": 0}
        if start not in (None, FRESH):
            folder = Path(start)
            self.state.update(checkpoint.load(folder, self.backend))
            logger.info("resumed from %s at step %d", folder, self.state["step"])
        # On resume, records logged after the checkpoint (by the run that stopped) are dropped first; a restarted
        # job with no checkpoint drops all of the failed attempt's records.
        resume_step = -1 if start == FRESH else None if start is None else self.state["step"]
        self.metrics = MetricsLogger(run_dir, enabled=self.backend.is_main, resume_step=resume_step)
        if fault_env_set() and self.backend.is_main:
            logger.warning("fault injection (testing hooks) is on: %s", fault_env_set())

    # -------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        config, backend, state = self.config, self.backend, self.state
        seq_len = config.data.seq_len
        if state["step"] == 0:
            self._evaluate()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=state["step"], desc="hyperfit", unit="step", file=sys.stderr,
                       dynamic_ncols=True)
        stopped_by = None
        while stopped_by is None:
            if state["epoch"] >= config.train.epochs:
                stopped_by = "epochs"
                break
            if state["step"] >= self.total_steps:
                stopped_by = "max_steps"
                break
            started = time.perf_counter()
            watchdog.mark(f"training step {state['step'] + 1}")
            batch_position = (state["epoch"], state["step_in_epoch"])
            loss_value, entropy_value, grad_norm, applied = self._train_step(*batch_position)
            state["step"] += 1
            state["step_in_epoch"] += 1
            self.faults.after_step(state["step"])
            watchdog.mark(f"bookkeeping after training step {state['step']}")
            if applied:
                state["bad_steps_in_row"] = 0
            else:
                self._skipped_step(*batch_position, loss_value, grad_norm)
            if state["step"] % config.train.log_every_steps == 0 or state["step"] == self.total_steps or not applied:
                elapsed = time.perf_counter() - started
                tokens_per_s = config.train.global_batch_size * seq_len / elapsed
                # All ranks take part: per-rank peak memory is gathered, then MFU (CUDA) from the global rate.
                per_rank = rank_metrics(peak_memory_gib(backend.device), tokens_per_s, self.flops_per_token,
                                        backend.device)
                self.metrics.log("step", state["step"], {
                    "train/loss": loss_value, "train/entropy": entropy_value,
                    "train/grad_norm": grad_norm, "train/lr": backend.current_lr(),
                    "train/skipped_steps": state["skipped_steps"],
                    "perf/tokens_per_s": tokens_per_s, "perf/step_time_s": elapsed, **per_rank},
                    epoch=state["epoch"] + state["step_in_epoch"] / self.sampler.steps_per_epoch)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:.0f}")
            if state["bad_steps_in_row"] > config.train.max_bad_steps_in_row:
                raise HfdistError(
                    f"step {state['step']} (epoch {batch_position[0] + 1}): {state['bad_steps_in_row']} consecutive "
                    f"steps with a non-finite loss or gradient norm, more than train.max_bad_steps_in_row="
                    f"{config.train.max_bad_steps_in_row}; stopping (those steps did not change the weights; the "
                    "checkpoints are intact)")
            if applied:  # the epoch's mean loss is over the steps that trained
                state["epoch_loss_sum"] += loss_value
                state["epoch_entropy_sum"] += entropy_value
                state["epoch_steps"] += 1
            if bar is not None:
                bar.update(1)
            if state["step_in_epoch"] == self.sampler.steps_per_epoch and self._end_epoch():
                stopped_by = "target_loss"
            # Saved last, after the epoch's bookkeeping, so that a resumed run logs nothing twice.
            if config.checkpoint.every_steps and state["step"] % config.checkpoint.every_steps == 0:
                watchdog.mark(f"checkpoint at step {state['step']}")
                checkpoint.save(self.checkpoint_root, state["step"], backend, dict(state), config.checkpoint.keep_last)
        if bar is not None:
            bar.close()
        if state["evaluated_step"] != state["step"]:
            self._evaluate()
        if config.checkpoint.save_final_model:
            self.export(self.run_dir / "model")
        summary = self._summary(stopped_by)
        self.metrics.close()
        return summary

    def _end_epoch(self) -> bool:
        """Log the epoch's mean train loss and entropy, evaluate when due; True if the target loss is reached."""
        state, config = self.state, self.config
        # An epoch whose every step was skipped has no mean loss (NaN: never meets the target).
        steps = state["epoch_steps"] or float("nan")
        epoch_loss = state["epoch_loss_sum"] / steps
        state["epoch"] += 1
        watchdog.mark(f"end of epoch {state['epoch']}")
        self.backend.monitored_barrier()  # cheap once an epoch; on gloo it names a rank that fell behind
        self.metrics.log("epoch", state["step"], {
            "train/loss": epoch_loss, "train/entropy": state["epoch_entropy_sum"] / steps}, epoch=state["epoch"])
        state.update(step_in_epoch=0, epoch_loss_sum=0.0, epoch_entropy_sum=0.0, epoch_steps=0)
        if config.eval.every_epochs and state["epoch"] % config.eval.every_epochs == 0:
            self._evaluate()
        return bool(config.train.target_loss) and epoch_loss <= config.train.target_loss

    def _host_batches(self, position: tuple[int, int]) -> list[torch.Tensor]:
        return [self.data.train[indices] for indices in self.sampler.micro_batches(*position)]

    def _train_step(self, epoch: int, step_in_epoch: int) -> tuple[float, float, float, bool]:
        following = (epoch, step_in_epoch + 1)
        if following[1] == self.sampler.steps_per_epoch:
            following = (epoch + 1, 0)
        last = self.state["step"] + 1 >= self.total_steps or following[0] >= self.config.train.epochs
        micro_batches = self.prefetcher.get((epoch, step_in_epoch), None if last else following)
        with self.faults.step(self.state["step"] + 1):
            return train_step(self.backend, micro_batches, self.config.optim.max_grad_norm)

    def _skipped_step(self, epoch: int, step_in_epoch: int, loss: float, grad_norm: float) -> None:
        """Count a step whose update was skipped (NaN/inf loss or gradient norm) and say which batch it was."""
        state = self.state
        state["skipped_steps"] += 1
        state["bad_steps_in_row"] += 1
        if self.backend.is_main:
            indices = self.sampler.global_batch(epoch, step_in_epoch).tolist()
            logger.warning("step %d (epoch %d, batch %d of %d): non-finite loss (%s) or gradient norm (%s): the "
                           "optimizer step is skipped, the batch consumed (%d in a row, %d in total); its training "
                           "sequences (rows of data/train_token_ids.npy): %s", state["step"], epoch + 1,
                           step_in_epoch + 1, self.sampler.steps_per_epoch, loss, grad_norm,
                           state["bad_steps_in_row"], state["skipped_steps"], indices)

    def _evaluate(self) -> None:
        watchdog.mark(f"evaluation at step {self.state['step']}")
        lm = self.backend.unwrapped_lm()
        values = evaluate(lm, self.data, self.config, self.backend.device)
        state = self.state
        self.metrics.log("eval", state["step"], values,
                         epoch=state["epoch"] + state["step_in_epoch"] / self.sampler.steps_per_epoch)
        state["evaluated_step"] = state["step"]
        if self.backend.is_main:
            logger.info("eval at step %d: %s", state["step"],
                        ", ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def export(self, folder: Path) -> None:
        """Save the final model and tokenizer with save_pretrained (safetensors), atomically; never NaN/inf weights."""
        watchdog.mark("export of the final model")
        bad = checkpoint.nonfinite_parameters(self.backend)
        if bad:
            raise HfdistError(f"{folder}: refusing to export non-finite weights ({bad} parameter tensors hold NaN or "
                              "inf)")
        state_dict = self.backend.full_state_dict()
        if self.backend.is_main:
            lm = self.backend.unwrapped_lm()
            with atomic_directory(folder) as tmp:
                lm.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
        self.backend.barrier()

    def _summary(self, stopped_by: str) -> dict:
        from hfdist.monitor import read_metrics

        summary = {"stopped_by": stopped_by, "steps": self.state["step"], "epochs": self.state["epoch"],
                   "skipped_steps": self.state["skipped_steps"]}
        if self.backend.is_main:
            records = read_metrics(self.run_dir / "metrics.jsonl")
            evals = [r for r in records if r["kind"] == "eval"]
            epochs = [r for r in records if r["kind"] == "epoch"]
            steps = [r for r in records if r["kind"] == "step"]
            summary["base"] = {k: v for k, v in evals[0].items() if k.startswith("eval/")} if evals else {}
            summary["hyperfitted"] = {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
            summary["train_loss_first_step"] = steps[0]["train/loss"] if steps else None
            summary["train_loss_last_epoch"] = epochs[-1]["train/loss"] if epochs else None
            summary["tokens_per_s_median"] = float(np.median([r["perf/tokens_per_s"] for r in steps])) if steps else None
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


def train(config: Config, run_dir: Path, resume: Optional[str] = None, progress: bool = True) -> dict:
    """Train (see Trainer). A collective that times out or loses a peer becomes one HfdistError line naming this
    rank, where it waited, and the ranks that fell behind (hfdist.distributed.watchdog)."""
    trainer = None
    try:
        trainer = Trainer(config, run_dir, resume=resume, progress=progress)
        return trainer.run()
    except RuntimeError as exc:
        failure = watchdog.failure(exc)
        if failure is None:
            raise
        trainer = None  # the process group is unusable now (gloo closes a timed-out operation's pairs): no close
        raise failure from exc
    finally:
        if trainer is not None:
            trainer.backend.close()


def format_summary(summary: dict) -> str:
    """The base-vs-hyperfitted table the demo prints."""
    rows = [("train loss (first step, last epoch)", summary.get("train_loss_first_step"), summary.get("train_loss_last_epoch"))]
    base, hyper = summary.get("base", {}), summary.get("hyperfitted", {})
    # One block per held-out set: the main one ("eval/...") and each eval.extra set ("eval/<name>/...").
    prefixes = ["eval"] + sorted({k.rsplit("/", 1)[0] for k in base if k.count("/") == 2})
    windows = sorted({k.rsplit("/ttr", 1)[1] for k in base if re.search(r"/ttr\d+$", k)}, key=int)
    measures = (("loss", "validation loss (nats/token)"), ("perplexity", "validation perplexity"),
                ("entropy", "validation entropy (nats)"), ("top1_mass", "top-1 probability mass"),
                *((f"ttr{w}", f"greedy TTR over last {w} tokens") for w in windows),
                ("distinct_colors", "distinct colour tokens"), ("repeated_rows", "rows repeating the row above"))
    for prefix in prefixes:
        where = "" if prefix == "eval" else f" [{prefix.split('/', 1)[1]}]"
        for key, label in measures:
            if f"{prefix}/{key}" in base or f"{prefix}/{key}" in hyper:
                rows.append((label + where, base.get(f"{prefix}/{key}"), hyper.get(f"{prefix}/{key}")))
    width = max(32, *(len(label) for label, _, _ in rows))
    lines = [f"| {'measure':{width}} | {'base':>10} | {'hyperfitted':>11} |", f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 13}|"]
    for label, before, after in rows:
        fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines.append(f"| {label:{width}} | {fmt(before):>10} | {fmt(after):>11} |")
    return "\n".join(lines)
