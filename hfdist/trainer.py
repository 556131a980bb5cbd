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

import logging
import os
import random
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from hfdist import checkpoint
from hfdist.adapters import apply_trainable, count_parameters, training_setup
from hfdist.config import Config, run_path, save_config
from hfdist.data import BatchPrefetcher, HyperfitData, StepSampler, build_data
from hfdist.distributed.backends import build_backend
from hfdist.distributed.perf import model_flops_per_token, peak_memory_gib, rank_metrics
from hfdist.errors import HfdistError
from hfdist.export import export_adapter, export_model
from hfdist.faults import FaultInjection, fault_env_set
from hfdist.hooks import Hooks, ProgressBar, WatchdogMarks
from hfdist.io import atomic_write_json
from hfdist.metrics import generation_metrics, greedy_ttr, heldout_stats, summary_measures
from hfdist.models import HyperfitModel, check_seq_len, load_model, load_processor, model_identity
from hfdist.monitor import MetricsLogger, read_metrics
from hfdist.optim import build_optimizer, build_scheduler
from hfdist.preemption import Preempted, PreemptionSignals, write_status
from hfdist.restart import FRESH, JOB_MARKER, choose_start
from hfdist.state import TrainingState
from hfdist.watchdog import watchdog

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """``train.deterministic``: torch's deterministic algorithms (and, with them, NaN-filled new tensors); off,
    neither (CPU runs stay bit-reproducible: their kernels do not depend on timing)."""
    if deterministic and device.type == "cuda":
        # cuBLAS needs a fixed workspace for reproducible results; read when its handle is created.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


@torch.no_grad()
def evaluate(lm: torch.nn.Module, data: HyperfitData, config: Config, device: torch.device) -> dict:
    """The registered measures training logs (``hfdist.metrics.METRICS``, ``during_training``): held-out
    loss/entropy/top-k mass, and greedy TTR of the continuations of the held-out contexts; the same numbers `hfdist
    evaluate` reports. Images: greedy completion of each context image, with the degeneration measures of the
    generated pixel tokens. Each extra held-out set (``eval.extra``) is logged as ``eval/<name>/<measure>``."""

    was_training = lm.training
    lm.eval()
    window = config.eval.ttr_window
    image = data.image
    sets = [("eval", data.validation, data.contexts)]
    sets += [(f"eval/{name}", validation, contexts) for name, (validation, contexts) in data.extra.items()]
    values = {}
    for prefix, validation, contexts in sets:
        if len(validation):
            stats = heldout_stats(
                lm, validation.to(device), batch_size=config.eval.batch_size, during_training=True
            )
            values.update({f"{prefix}/{k}": v for k, v in stats.items()})
        if not len(contexts):
            continue
        total_len = config.data.seq_len if image else config.eval.total_len
        ttr = greedy_ttr(
            lm,
            contexts.to(device),
            total_len=total_len,
            window=window,
            batch_size=config.eval.batch_size if image else 32,
        )
        measures = generation_metrics(
            ttr["generations"],
            window=window,
            modality="image" if image else "text",
            contexts=contexts,
            width=image["width"] if image else None,
            during_training=True,
        )
        values.update({f"{prefix}/{k}": v for k, v in measures.items()})
    lm.train(was_training)
    return values


def build_model(backend, config: Config, total_steps: int) -> None:
    """Have the backend build the HyperfitModel, its optimizer and its LR schedule."""

    check_seq_len(config.model, config.data.seq_len)  # from config.json, before any weights load

    def model_factory(device: torch.device) -> HyperfitModel:
        lm = load_model(config.model, device)
        apply_trainable(lm, config, device)  # what trains: the one transform between loading and sharding
        # Training mode, as upstream's loop (model.train()): dropout as the model's config sets it (ImageGPT's hub
        # configs: 0.1; Llamas have none) under every backend alike: from_pretrained returns eval mode, from_config
        # (random and meta-device builds) train mode. Hugging Face's activation checkpointing also needs it.
        lm.train()
        return HyperfitModel(lm, fused_loss=config.train.fused_loss, loss_backend=config.train.loss_backend)

    backend.build(
        model_factory,
        lambda m: build_optimizer(config.optim, m, backend.device),
        lambda o: build_scheduler(config.optim, o, total_steps),
    )


def train_step(
    backend, micro_batches: list[torch.Tensor], max_grad_norm: float, stop_request: bool = False
) -> tuple[float, float, float, bool, bool]:
    """One optimizer step over this rank's micro-batches of the global batch.

    Returns (loss, entropy, grad_norm, applied, stop): the global mean next-token loss and entropy (summed across
    ranks), the gradient norm before clipping, whether the update was applied (False when the loss or the norm is
    NaN/inf: the backend then skips the optimizer and LR-scheduler step, on every rank alike), and whether any rank
    made a ``stop_request`` (a preemption signal, hfdist.preemption): it rides on the step's collective over every
    rank, so all ranks agree at this step without a collective of its own. The numbers reach the host in one
    transfer, the step's only host sync.
    """
    device = backend.device
    local_tokens = torch.tensor(
        float(sum(b.shape[0] * (b.shape[1] - 1) for b in micro_batches)), device=device
    )
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
    totals = backend.all_reduce_step_totals(
        torch.stack([loss_total, entropy_total]), torch.full((1,), float(stop_request), device=device)
    )
    result = backend.step(max_grad_norm, totals)
    loss, entropy, stops = result.values
    return loss, entropy, result.grad_norm, result.applied, stops > 0


def default_output_dir(config_path: Optional[str]) -> Path:
    name = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class StepOutcome(NamedTuple):
    loss: float  # the global mean next-token loss (nats/token)
    entropy: float  # the global mean next-token entropy (nats)
    grad_norm: float  # before clipping
    applied: bool  # False: the update was skipped (non-finite loss or gradient norm)
    position: tuple[int, int]  # (epoch, step in epoch) of the batch
    seconds: float  # wall-clock time of the step
    stop: bool  # a rank received a preemption signal before the step's collective: stop after this step


class Trainer:
    """The hyperfitting loop over one backend: ``Trainer(config, run_dir).run()`` (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        resume: Optional[str] = None,
        progress: bool = True,
        preemption: Optional[PreemptionSignals] = None,
    ):

        self.config = config
        self.run_dir = run_dir
        self.checkpoint_root = run_path(run_dir, "checkpoint.dir", config.checkpoint.dir)
        # Installed by train() before anything else: a signal during start-up stops training after its first step.
        self.preemption = preemption or PreemptionSignals("")
        self.backend = build_backend(config)
        # The loop's concerns, in the order each point reaches them: a fault (a test hook) happens before the watchdog
        # records the next position, so a hung rank is reported where it hung.
        concerns = [FaultInjection(self.backend.rank), WatchdogMarks()]
        if progress and self.backend.is_main:
            concerns.append(ProgressBar())
        self.hooks = Hooks(*concerns)
        start, job_marker = choose_start(self.backend, run_dir, resume, self.checkpoint_root)
        # The base model's identity and what trains: recorded in every checkpoint, checked before a resume loads.
        self.setup = {"base_model": model_identity(config.model), "trains": training_setup(config)}
        if start not in (None, FRESH):
            checkpoint.check_setup(Path(start), self.setup)
        self.accumulation = self.backend.gradient_accumulation_steps()
        seed_everything(config.train.seed)
        configure_determinism(config.train.deterministic, self.backend.device)

        # Every input is checked before anything is written into the run folder.
        check_seq_len(config.model, config.data.seq_len)
        # The tokenizer, or for images the model's image processor; exported with the model either way.
        self.tokenizer = load_processor(config.model, config.data.modality)
        self.data = build_data(config.data, self.tokenizer, config.eval.extra)
        image = self.data.image
        if image and config.eval.ttr_window > image["generated_tokens"]:
            rows = image["height"] - image["context_rows"]
            raise HfdistError(
                f"config field eval.ttr_window: {config.eval.ttr_window} exceeds the "
                f"{image['generated_tokens']} pixel tokens generated per image ({rows} rows of "
                f"{image['width']}; see data.context_fraction)"
            )
        if self.backend.is_main:
            if job_marker is not None:
                atomic_write_json(run_dir / JOB_MARKER, job_marker)
            save_config(config, run_dir / "config.yaml")
            self.data.save(run_dir / "data")
        self.sampler = StepSampler(
            len(self.data.train),
            config.train.global_batch_size,
            config.train.micro_batch_size,
            self.backend.dp_rank,
            self.backend.dp_size,
            config.train.seed,
        )
        self.prefetcher = BatchPrefetcher(self._host_batches, self.backend.device, config.train.prefetch)
        steps = self.sampler.steps_per_epoch * config.train.epochs
        self.total_steps = min(steps, config.train.max_steps) if config.train.max_steps else steps

        build_model(self.backend, config, self.total_steps)
        self.flops_per_token = model_flops_per_token(self.backend.unwrapped_lm(), config.data.seq_len)
        self.parameters = count_parameters(self.backend.unwrapped_lm())
        if self.backend.is_main:
            logger.info(
                "parameters: %s trainable, %s frozen (train.trainable_layers %s, adapter.type %s)",
                f"{self.parameters['trainable']:,}",
                f"{self.parameters['frozen']:,}",
                config.train.trainable_layers,
                config.adapter.type,
            )
        self.state = TrainingState()
        if start not in (None, FRESH):
            folder = Path(start)
            self.state.load_state_dict(
                checkpoint.load(folder, self.backend), folder / checkpoint.TRAINER_STATE
            )
            logger.info("resumed from %s at step %d", folder, self.state.step)
        # On resume, records logged after the checkpoint (by the run that stopped) are dropped first; a restarted
        # job with no checkpoint drops all of the failed attempt's records.
        resume_step = -1 if start == FRESH else None if start is None else self.state.step
        self.metrics = MetricsLogger(run_dir, enabled=self.backend.is_main, resume_step=resume_step)
        # Start-up is over (rendezvous, weight loading, a resume's verification): collectives now wait timeout_s.
        watchdog.set_timeout(config.distributed.timeout_s, "distributed.timeout_s")
        if fault_env_set() and self.backend.is_main:
            logger.warning("fault injection (testing hooks) is on: %s", fault_env_set())

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Evaluate, train step by step until a stop rule holds, then evaluate, export and summarise."""
        if self.state.step == 0:
            self.evaluate()
        self.hooks.begin(self.backend.unwrapped_lm(), self.state, self.total_steps)
        stopped_by = self.stop_rule()
        while stopped_by is None:
            step = self.train_step()
            self.record(step)
            self.maybe_log(step)
            self.stop_on_bad_steps(step)
            target_reached = self.maybe_end_epoch()
            self.maybe_checkpoint()  # last, after the epoch's bookkeeping, so that a resumed run logs nothing twice
            self.maybe_stop_for_preemption(step)
            stopped_by = "target_loss" if target_reached else self.stop_rule()
        return self.finish(stopped_by)

    def stop_rule(self) -> Optional[str]:
        """Why training stops before the next step (``epochs``, ``max_steps``), or None. The third rule,
        ``target_loss``, is checked at each epoch's end (``maybe_end_epoch``)."""
        if self.state.epoch >= self.config.train.epochs:
            return "epochs"
        if self.state.step >= self.total_steps:
            return "max_steps"
        return None

    def train_step(self) -> StepOutcome:
        """One optimizer step over this rank's micro-batches of the next global batch."""
        state = self.state
        position = (state.epoch, state.step_in_epoch)
        following = (state.epoch, state.step_in_epoch + 1)
        if following[1] == self.sampler.steps_per_epoch:
            following = (state.epoch + 1, 0)
        last = state.step + 1 >= self.total_steps or following[0] >= self.config.train.epochs
        self.hooks.before_step(state)
        started = time.perf_counter()
        micro_batches = self.prefetcher.get(position, None if last else following)
        loss, entropy, grad_norm, applied, stop = train_step(
            self.backend, micro_batches, self.config.optim.max_grad_norm, self.preemption.requested
        )
        return StepOutcome(loss, entropy, grad_norm, applied, position, time.perf_counter() - started, stop)

    def record(self, step: StepOutcome) -> None:
        """Count the step in the state; a skipped step (non-finite loss or gradient norm) is reported with its batch."""
        self.state.count_step(step.loss, step.entropy, step.applied)
        self.hooks.after_step(self.state)
        if not step.applied and self.backend.is_main:
            state, (epoch, step_in_epoch) = self.state, step.position
            indices = self.sampler.global_batch(epoch, step_in_epoch).tolist()
            logger.warning(
                "step %d (epoch %d, batch %d of %d): non-finite loss (%s) or gradient norm (%s): the "
                "optimizer step is skipped, the batch consumed (%d in a row, %d in total); its training "
                "sequences (rows of data/train_token_ids.npy): %s",
                state.step,
                epoch + 1,
                step_in_epoch + 1,
                self.sampler.steps_per_epoch,
                step.loss,
                step.grad_norm,
                state.bad_steps_in_row,
                state.skipped_steps,
                indices,
            )

    def maybe_log(self, step: StepOutcome) -> None:
        """Every ``train.log_every_steps`` steps, the last one and every skipped one: metrics.jsonl and TensorBoard.
        All ranks take part (per-rank peak memory is gathered, then MFU on CUDA from the global rate)."""
        state, config = self.state, self.config
        if state.step % config.train.log_every_steps and state.step != self.total_steps and step.applied:
            return
        tokens_per_s = config.train.global_batch_size * config.data.seq_len / step.seconds
        per_rank = rank_metrics(
            peak_memory_gib(self.backend.device), tokens_per_s, self.flops_per_token, self.backend.device
        )
        values = {
            "train/loss": step.loss,
            "train/entropy": step.entropy,
            "train/grad_norm": step.grad_norm,
            "train/lr": self.backend.current_lr(),
            "train/skipped_steps": state.skipped_steps,
            "perf/tokens_per_s": tokens_per_s,
            "perf/step_time_s": step.seconds,
            **per_rank,
        }
        self.metrics.log("step", state.step, values, epoch=state.epoch_position(self.sampler.steps_per_epoch))
        self.hooks.after_log(state, values)

    def stop_on_bad_steps(self, step: StepOutcome) -> None:
        """More than ``train.max_bad_steps_in_row`` skipped steps in a row end the run (the weights are untouched)."""
        state, limit = self.state, self.config.train.max_bad_steps_in_row
        if state.bad_steps_in_row > limit:
            raise HfdistError(
                f"step {state.step} (epoch {step.position[0] + 1}): {state.bad_steps_in_row} consecutive steps with a "
                f"non-finite loss or gradient norm, more than train.max_bad_steps_in_row={limit}; stopping (those "
                "steps did not change the weights; the checkpoints are intact)"
            )

    def maybe_end_epoch(self) -> bool:
        """At an epoch's end: log its mean train loss and entropy, evaluate when due; True if the mean loss reached
        ``train.target_loss``."""
        state, config = self.state, self.config
        if state.step_in_epoch != self.sampler.steps_per_epoch:
            return False
        epoch_loss, epoch_entropy = state.end_epoch()
        self.hooks.after_epoch(state)
        self.backend.monitored_barrier()  # cheap once an epoch; on gloo it names a rank that fell behind
        self.metrics.log(
            "epoch", state.step, {"train/loss": epoch_loss, "train/entropy": epoch_entropy}, epoch=state.epoch
        )
        if config.eval.every_epochs and state.epoch % config.eval.every_epochs == 0:
            self.evaluate()
        return bool(config.train.target_loss) and epoch_loss <= config.train.target_loss

    def maybe_checkpoint(self) -> None:
        """Every ``checkpoint.every_steps`` steps (see hfdist.checkpoint)."""
        state, every = self.state, self.config.checkpoint.every_steps
        if not every or state.step % every:
            return
        self.hooks.before_checkpoint(state)
        step = state.step
        checkpoint.save(
            self.checkpoint_root,
            step,
            self.backend,
            state.state_dict(),
            self.config.checkpoint.keep_last,
            async_=self.config.checkpoint.async_,
            on_written=lambda: self.hooks.checkpoint_written(step),
            setup=self.setup,
        )

    def maybe_stop_for_preemption(self, step: StepOutcome) -> None:
        """After a step at which a rank had received a preemption signal (every rank learnt it from the step's
        collective): write this step's checkpoint (the ordinary one; one that maybe_checkpoint has just begun is
        awaited instead), log one line and stop with hfdist.preemption.PREEMPTED_EXIT_CODE."""
        if not step.stop:
            return
        state, every = self.state, self.config.checkpoint.every_steps
        if every and state.step % every == 0:
            checkpoint.wait_pending(self.backend)
            folder = self.checkpoint_root / checkpoint.step_folder_name(state.step)
        else:
            self.hooks.before_checkpoint(state)
            step_number = state.step
            folder = checkpoint.save(
                self.checkpoint_root,
                step_number,
                self.backend,
                state.state_dict(),
                self.config.checkpoint.keep_last,
                on_written=lambda: self.hooks.checkpoint_written(step_number),
            )
        received = [name for name in self.backend.all_gather_object(self.preemption.received) if name]
        if self.backend.is_main:
            ignored = self.preemption.count - 1
            logger.info(
                "preempted by %s%s: stopped after step %d of %d with checkpoint %s; exiting with code %d (the "
                "job continues from it with --resume; launchers/slurm.sbatch requeues itself)",
                received[0],
                f" (and {ignored} more signal{'s' * (ignored > 1)}, ignored)" if ignored > 0 else "",
                state.step,
                self.total_steps,
                folder,
                Preempted.exit_code,
            )
        write_status(received[0], state.step, str(folder))
        self.hooks.end()
        self.metrics.close()
        raise Preempted(f"preempted by {received[0]} after step {state.step}")

    def finish(self, stopped_by: str) -> dict:
        """After the last step: complete an asynchronous checkpoint, evaluate (unless the last step was), export."""
        checkpoint.wait_pending(self.backend)
        self.hooks.end()
        if self.state.evaluated_step != self.state.step:
            self.evaluate()
        if self.config.checkpoint.save_final_model:
            self.export(self.run_dir / "model")
        summary = self._summary(stopped_by)
        self.metrics.close()
        return summary

    # ---- the pieces the loop calls ----------------------------------------------------------------------------
    def _host_batches(self, position: tuple[int, int]) -> list[torch.Tensor]:
        return [self.data.train[indices] for indices in self.sampler.micro_batches(*position)]

    def evaluate(self) -> None:
        """Held-out measures of the model now (see ``evaluate``), logged under ``eval/``."""
        state = self.state
        self.hooks.before_evaluation(state)
        values = evaluate(self.backend.unwrapped_lm(), self.data, self.config, self.backend.device)
        self.metrics.log("eval", state.step, values, epoch=state.epoch_position(self.sampler.steps_per_epoch))
        state.evaluated_step = state.step
        if self.backend.is_main:
            logger.info(
                "eval at step %d: %s", state.step, ", ".join(f"{k}={v:.4f}" for k, v in values.items())
            )

    def export(self, folder: Path) -> None:
        """Save the final model (safetensors shards in ``export.dtype``, every rank writing its own part) and the
        tokenizer, atomically; never NaN/inf weights. With an adapter, ``export.adapter`` says whether ``folder`` gets
        the merged model, its sibling ``adapter`` the PEFT adapter folder, or both. See hfdist.export."""

        self.hooks.before_export()
        checkpoint.wait_pending(self.backend)
        bad = checkpoint.nonfinite_parameters(self.backend)
        if bad:
            raise HfdistError(
                f"{folder}: refusing to export non-finite weights ({bad} parameter tensors hold NaN or inf)"
            )
        self.backend.monitored_barrier()  # distributed.timeout_s: every rank reached the export
        with watchdog.phase_timeout(self.config.distributed.export_timeout_s, "distributed.export_timeout_s"):
            if self.config.export.adapter in ("adapter", "both"):
                export_adapter(self.backend, folder.with_name("adapter"), self.tokenizer, self.config)
            if self.config.export.adapter in ("merged", "both"):
                export_model(self.backend, folder, self.tokenizer, self.config)

    def _summary(self, stopped_by: str) -> dict:

        summary = {
            "stopped_by": stopped_by,
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "skipped_steps": self.state.skipped_steps,
            "parameters": self.parameters,
        }
        if self.backend.is_main:
            records = read_metrics(self.run_dir / "metrics.jsonl")
            evals = [r for r in records if r["kind"] == "eval"]
            epochs = [r for r in records if r["kind"] == "epoch"]
            steps = [r for r in records if r["kind"] == "step"]
            summary["base"] = {k: v for k, v in evals[0].items() if k.startswith("eval/")} if evals else {}
            summary["hyperfitted"] = (
                {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
            )
            summary["train_loss_first_step"] = steps[0]["train/loss"] if steps else None
            summary["train_loss_last_epoch"] = epochs[-1]["train/loss"] if epochs else None
            summary["tokens_per_s_median"] = (
                float(np.median([r["perf/tokens_per_s"] for r in steps])) if steps else None
            )
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


def train(config: Config, run_dir: Path, resume: Optional[str] = None, progress: bool = True) -> dict:
    """Train (see Trainer), stopping with a checkpoint on a preemption signal (hfdist.preemption: raises Preempted).
    A collective that times out or loses a peer becomes one HfdistError line naming this rank, where it waited, and
    the ranks that fell behind (hfdist.watchdog)."""
    trainer = None
    preemption = PreemptionSignals(config.train.preempt_signals)
    try:
        trainer = Trainer(config, run_dir, resume=resume, progress=progress, preemption=preemption)
        return trainer.run()
    except RuntimeError as exc:
        failure = watchdog.failure(exc)
        if failure is None:
            raise
        trainer = (
            None  # the process group is unusable now (gloo closes a timed-out operation's pairs): no close
        )
        raise failure from exc
    finally:
        preemption.restore()
        if trainer is not None:
            trainer.backend.close()


def format_summary(summary: dict) -> str:
    """The base-vs-hyperfitted table the demo prints."""
    rows = [
        (
            "train loss (first step, last epoch)",
            summary.get("train_loss_first_step"),
            summary.get("train_loss_last_epoch"),
        )
    ]
    base, hyper = summary.get("base", {}), summary.get("hyperfitted", {})
    # One block per held-out set: the main one ("eval/...") and each eval.extra set ("eval/<name>/...").
    prefixes = ["eval"] + sorted({k.rsplit("/", 1)[0] for k in base if k.count("/") == 2})
    measures = summary_measures(base)  # the registered measures with a summary label
    for prefix in prefixes:
        where = "" if prefix == "eval" else f" [{prefix.split('/', 1)[1]}]"
        for key, label in measures:
            if f"{prefix}/{key}" in base or f"{prefix}/{key}" in hyper:
                rows.append((label + where, base.get(f"{prefix}/{key}"), hyper.get(f"{prefix}/{key}")))
    width = max(32, *(len(label) for label, _, _ in rows))
    lines = [
        f"| {'measure':{width}} | {'base':>10} | {'hyperfitted':>11} |",
        f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 13}|",
    ]
    for label, before, after in rows:
        fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines.append(f"| {label:{width}} | {fmt(before):>10} | {fmt(after):>11} |")
    return "\n".join(lines)
