"""Bad input is refused before any compute, through the real CLI entry point: exit status non-zero, exactly one
line on stderr naming the field, file or value, no traceback, and nothing in the output folder changed.

One table: configs (YAML, --set, values, batch split over ranks, paths that would escape the run folder, resume),
models (missing, no config.json, no EOS token, seq_len beyond the model's positions), data files (empty, wrong
column, not UTF-8, unsupported, too few sequences, broken JSON), prompts (missing, empty, bad JSON line, missing
field, not UTF-8) and command-line arguments (unknown strategy, negative counts, unknown options). Each case runs
``hfdist.cli.main([...])`` in this process with stderr captured at the file-descriptor level, so that messages
from libraries (transformers, datasets, gloo) would count too; the cases in SUBPROCESS run ``python -m hfdist.cli``
in a process of their own, with the CLI's real logging set-up.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hfdist.cli import main

BASE_CONFIG = """\
model: {{path: {model}}}
data: {{source: austen, mode: chunk, seq_len: 32, num_samples: 16, num_validation: 4, num_contexts: 2, context_len: 8}}
optim: {{name: adam, lr: 3.0e-3}}
train: {{epochs: 1, global_batch_size: 8, micro_batch_size: 2, seed: 0}}
eval: {{every_epochs: 0, total_len: 48, ttr_window: 16, batch_size: 4}}
"""
SENTINELS = {
    "summary.json": '{"sentinel": true}\n',
    "generations.jsonl": '{"continuation_ids": [1, 2]}\n',
    "evaluation.json": '{"sentinel": true}\n',
}
HF = ["hyperfit", "{CFG}", "--output-dir", "{OUT}", "--no-progress"]
GEN = ["generate", "--model", "{M}", "--out", "{OUT}/generations.jsonl"]
TORCHRUN_3 = {
    "RANK": "0",
    "WORLD_SIZE": "3",
    "LOCAL_RANK": "0",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29999",
}
TORCHRUN_4 = {**TORCHRUN_3, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}

# (id, argv, expected substring of the one stderr line, extra environment, extra file in the output folder)
CASES = [
    # ---- configs -----------------------------------------------------------------------------------------
    (
        "config-missing",
        ["hyperfit", "{D}/missing.yaml", "--output-dir", "{OUT}"],
        "missing.yaml' does not exist",
    ),
    (
        "config-not-yaml",
        ["hyperfit", "{D}/broken.yaml", "--output-dir", "{OUT}"],
        "broken.yaml' line 2: not valid YAML",
    ),
    (
        "config-not-mapping",
        ["hyperfit", "{D}/list.yaml", "--output-dir", "{OUT}"],
        "top level must be a mapping",
    ),
    ("config-unknown-field", [*HF, "--set", "train.epoch=3"], "unknown config field 'train.epoch'"),
    (
        "config-wrong-type",
        [*HF, "--set", "train.epochs=abc"],
        "config field train.epochs: expected int, got 'abc'",
    ),
    ("config-negative", [*HF, "--set", "train.epochs=-1"], "config field train.epochs: must be > 0, got -1"),
    ("config-bad-choice", [*HF, "--set", "optim.name=sgd"], "config field optim.name: 'sgd' is not one of"),
    (
        "config-set-no-value",
        [*HF, "--set", "train.epochs"],
        "--set 'train.epochs': expected section.field=value",
    ),
    (
        "batch-vs-micro",
        [*HF, "--set", "train.micro_batch_size=3"],
        "train.global_batch_size: 8 is not a multiple of train.micro_batch_size 3",
    ),
    (
        "batch-vs-world-size",
        [*HF, "--set", "distributed.backend=fsdp"],
        "train.global_batch_size: 8 is not divisible by train.micro_batch_size (2) x data-parallel size (3)",
        TORCHRUN_3,
    ),
    (
        "tensor-parallel-one-process",
        [*HF, "--set", "distributed.tensor_parallel=2"],
        "config field distributed.tensor_parallel: needs several ranks (distributed.backend=fsdp)",
    ),
    (
        "tensor-parallel-vs-world-size",
        [*HF, "--set", "distributed.backend=fsdp", "--set", "distributed.tensor_parallel=2"],
        "config field distributed.tensor_parallel: 2 does not divide the 3 ranks",
        TORCHRUN_3,
    ),
    (
        "tensor-parallel-vs-heads",
        [*HF, "--set", "distributed.backend=fsdp", "--set", "distributed.tensor_parallel=4"],
        "config field distributed.tensor_parallel: 4 exceeds the model's 2 key/value heads",
        TORCHRUN_4,
    ),
    (
        "preempt-signal-unknown",
        [*HF, "--set", "train.preempt_signals=SIGTERM,SIGKILL"],
        "config field train.preempt_signals: 'SIGKILL' is not one of SIGTERM, SIGUSR1, SIGUSR2, SIGHUP, SIGINT",
    ),
    (
        "seq-len-beyond-model",
        [*HF, "--set", "data.seq_len=1024"],
        "data.seq_len: 1024 exceeds the model's max_position_embeddings 512",
    ),
    (
        "context-vs-total-len",
        [*HF, "--set", "data.context_len=48"],
        "data.context_len: 48 must be below eval.total_len",
    ),
    (
        "samples-below-batch",
        [*HF, "--set", "data.num_samples=4"],
        "data.num_samples: 4 is below train.global_batch_size",
    ),
    (
        "max-bad-steps-negative",
        [*HF, "--set", "train.max_bad_steps_in_row=-1"],
        "train.max_bad_steps_in_row: must be >= 0, got -1",
    ),
    ("timeout-zero", [*HF, "--set", "distributed.timeout_s=0"], "distributed.timeout_s: must be > 0, got 0"),
    (
        "deepspeed-config-missing",
        [*HF, "--set", "distributed.backend=deepspeed", "--set", "distributed.deepspeed_config=nope.json"],
        "file 'nope.json' does not exist",
    ),
    (
        "checkpoint-dir-dotdot",
        [*HF, "--set", "checkpoint.dir=../elsewhere"],
        "config field checkpoint.dir: '../elsewhere' must be a relative path inside the run folder",
    ),
    (
        "checkpoint-dir-absolute",
        [*HF, "--set", "checkpoint.dir=/tmp/hfdist-ckpt"],
        "config field checkpoint.dir: '/tmp/hfdist-ckpt' must be a relative path inside the run folder",
    ),
    (
        "checkpoint-dir-symlink-out",
        [*HF, "--set", "checkpoint.dir=link/ckpt"],
        "config field checkpoint.dir: 'link/ckpt' leads outside the run folder",
        None,
        "link",
    ),
    ("resume-without-output-dir", ["hyperfit", "{CFG}", "--resume"], "--resume needs --output-dir"),
    ("resume-no-checkpoint", [*HF, "--resume"], "--resume: no complete checkpoint under"),
    ("resume-missing-folder", [*HF, "--resume", "{D}/nope"], "no such checkpoint folder"),
    ("output-dir-holds-a-run", HF, "already holds a run; pass --resume", None, "metrics.jsonl"),
    # ---- what trains (hfdist.adapters): refused before any loading ------------------------------------------
    (
        "adapter-rank-zero",
        [*HF, "--set", "adapter.type=lora", "--set", "adapter.rank=0"],
        "config field adapter.rank: must be > 0, got 0",
    ),
    (
        "trainable-layers-zero",
        [*HF, "--set", "train.trainable_layers=last:0"],
        "config field train.trainable_layers: 'last:0' must be 'all' or 'last:N' with N >= 1",
    ),
    (
        "trainable-layers-beyond-depth",
        [*HF, "--set", "train.trainable_layers=last:3"],
        "config field train.trainable_layers: 'last:3' asks for more blocks than the model's 2 decoder blocks",
    ),
    (
        "adapter-layers-beyond-depth",
        [*HF, "--set", "adapter.type=lora", "--set", "adapter.layers=last:5"],
        "config field adapter.layers: 'last:5' asks for more blocks than the model's 2 decoder blocks",
    ),
    (
        "adapter-target-missing",
        [*HF, "--set", "adapter.type=lora", "--set", "adapter.target_modules=[q_proj, wq]"],
        "config field adapter.target_modules: 'wq' names no linear layer of LlamaDecoderLayer",
    ),
    (
        "adapter-target-not-linear",
        [*HF, "--set", "adapter.type=lora", "--set", "adapter.target_modules=[mlp]"],
        "config field adapter.target_modules: 'mlp' names no linear layer of LlamaDecoderLayer",
    ),
    (
        "adapter-with-tensor-parallel",
        [*HF, "--set", "adapter.type=lora", "--set", "distributed.backend=fsdp"]
        + ["--set", "distributed.tensor_parallel=2"],
        "config field adapter.type: adapter.type lora is not supported with distributed.tensor_parallel 2",
        TORCHRUN_4,
    ),
    (
        "last-layers-with-tensor-parallel",
        [*HF, "--set", "train.trainable_layers=last:1", "--set", "distributed.backend=fsdp"]
        + ["--set", "distributed.tensor_parallel=2"],
        "config field train.trainable_layers: train.trainable_layers last:1 is not supported with "
        "distributed.tensor_parallel 2",
        TORCHRUN_4,
    ),
    (
        "adapter-with-last-layers",
        [*HF, "--set", "adapter.type=lora", "--set", "train.trainable_layers=last:1"],
        "config field train.trainable_layers: 'last:1' trains base blocks fully, but adapter.type lora freezes",
    ),
    (
        "lm-head-without-last-layers",
        [*HF, "--set", "train.train_lm_head=true"],
        "config field train.train_lm_head: needs train.trainable_layers last:N",
    ),
    (
        "export-adapter-without-adapter",
        [*HF, "--set", "export.adapter=both"],
        "config field export.adapter: 'both' needs adapter.type lora",
    ),
    (
        "resume-other-adapter",
        [*HF, "--set", "adapter.type=lora", "--set", "adapter.rank=8", "--resume", "{D}/ckpt-rank4"],
        "the checkpoint trained something else: adapter.rank 4 in the checkpoint, 8 in the config",
    ),
    (
        "resume-adapter-onto-full",
        [*HF, "--resume", "{D}/ckpt-rank4"],
        "the checkpoint trained something else: adapter.type 'lora' in the checkpoint, 'none' in the config",
    ),
    (
        "resume-other-base",
        [*HF, "--set", "adapter.type=lora", "--set", "adapter.rank=4", "--resume", "{D}/ckpt-other-base"],
        "the checkpoint was made on base model /elsewhere/other-model (config sha256 000000000000",
    ),
    (
        "fault-hook-malformed",
        HF,
        "environment variable HFDIST_FAULT_NAN_AT_STEP: expected step numbers",
        {"HFDIST_FAULT_NAN_AT_STEP": "three"},
    ),
    # ---- models ------------------------------------------------------------------------------------------
    (
        "model-missing",
        [*HF, "--set", "model.path=./no/such/model"],
        "model.path './no/such/model': no such file",
    ),
    ("model-no-config-json", [*HF, "--set", "model.path={D}/empty-model"], "folder has no config.json"),
    ("tokenizer-no-eos", [*HF, "--set", "model.path={NOEOS}"], "the tokenizer has no EOS token"),
    # ---- data ----------------------------------------------------------------------------------------------
    ("data-empty-file", [*HF, "--set", "data.source={D}/empty.txt"], "empty.txt': file is empty"),
    (
        "data-wrong-column-jsonl",
        [*HF, "--set", "data.source={D}/body.jsonl"],
        "data.text_field 'text': not a column of",
    ),
    (
        "data-wrong-column-csv",
        [*HF, "--set", "data.source={D}/body.csv"],
        "data.text_field 'text': not a column of",
    ),
    (
        "data-not-utf8",
        [*HF, "--set", "data.source={D}/latin1.txt"],
        "latin1.txt': cannot be read (not UTF-8 text",
    ),
    ("data-unsupported-type", [*HF, "--set", "data.source={D}/data.xml"], "unsupported file type '.xml'"),
    ("data-too-few-samples", [*HF, "--set", "data.source={D}/short.txt"], "need 22"),
    (
        "data-broken-json",
        [*HF, "--set", "data.source={D}/broken.jsonl"],
        "broken.jsonl': cannot be read (JSON parse error",
    ),
    (
        "data-missing-file",
        [*HF, "--set", "data.source=./nope.jsonl"],
        "data.source './nope.jsonl': no such file",
    ),
    # ---- prompts ---------------------------------------------------------------------------------------
    ("prompts-missing", [*GEN, "--prompts", "{D}/nope.txt"], "nope.txt': no such file"),
    ("prompts-empty", [*GEN, "--prompts", "{D}/empty.txt"], "empty.txt': no prompts"),
    (
        "prompts-bad-json-line",
        [*GEN, "--prompts", "{D}/prompts-bad.jsonl"],
        "prompts-bad.jsonl' line 2: not JSON",
    ),
    ("prompts-missing-field", [*GEN, "--prompts", "{D}/body.jsonl"], "line 1: no text field 'text'"),
    ("prompts-not-utf8", [*GEN, "--prompts", "{D}/latin1.txt"], "latin1.txt': not UTF-8 text"),
    # ---- command-line arguments --------------------------------------------------------------------------
    (
        "cli-unknown-strategy",
        [*GEN, "--prompts", "{D}/prompts.txt", "--strategy", "beam"],
        "argument --strategy: invalid choice: 'beam'",
    ),
    (
        "cli-negative-max-new-tokens",
        [*GEN, "--prompts", "{D}/prompts.txt", "--max-new-tokens", "-5"],
        "--max-new-tokens: must be >= 1, got -5",
    ),
    (
        "cli-non-integer",
        [*GEN, "--prompts", "{D}/prompts.txt", "--max-new-tokens", "ten"],
        "argument --max-new-tokens: invalid int value: 'ten'",
    ),
    (
        "cli-negative-num-prompts",
        [*GEN, "--prompts", "{D}/prompts.txt", "--num-prompts", "-1"],
        "--num-prompts: must be >= 1, got -1",
    ),
    (
        "cli-required-missing",
        ["generate", "--prompts", "{D}/prompts.txt"],
        "the following arguments are required: --model",
    ),
    ("cli-unknown-option", [*HF, "--bogus"], "unrecognized arguments: --bogus"),
    ("cli-unknown-command", ["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
    ("evaluate-nothing", ["evaluate", "--out", "{OUT}/evaluation.json"], "evaluate: give generations files"),
    (
        "evaluate-window-zero",
        ["evaluate", "{OUT}/generations.jsonl", "--window", "0", "--out", "{OUT}/evaluation.json"],
        "--window: must be >= 1, got 0",
    ),
    (
        "evaluate-generations-missing",
        ["evaluate", "{D}/nope.jsonl", "--out", "{OUT}/evaluation.json"],
        "generations file '{D}/nope.jsonl': no such file",
    ),
    (
        "compare-zero-tokens",
        ["compare", "--run", "{OUT}", "--max-new-tokens", "0", "--out", "{OUT}"],
        "--max-new-tokens: must be >= 1, got 0",
    ),
]
# Run as a separate process (the real logging configuration, nothing shared with pytest).
SUBPROCESS = {
    "data-broken-json",
    "data-not-utf8",
    "tokenizer-no-eos",
    "seq-len-beyond-model",
    "prompts-bad-json-line",
    "cli-unknown-strategy",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from transformers import AutoTokenizer

    from hfdist.testing import tiny_model_folder

    root = tmp_path_factory.mktemp("inputs")
    model = tiny_model_folder(root / "tiny-model")
    no_eos = root / "no-eos-model"
    shutil.copytree(model, no_eos)
    tokenizer = AutoTokenizer.from_pretrained(no_eos)
    tokenizer.eos_token = tokenizer.pad_token = None
    tokenizer.save_pretrained(no_eos)
    d = root / "files"
    d.mkdir()
    (d / "broken.yaml").write_text("model: [unclosed\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "empty-model").mkdir()
    (d / "empty.txt").write_text("")
    (d / "body.jsonl").write_text(json.dumps({"body": "It is a truth universally acknowledged."}) + "\n")
    (d / "body.csv").write_text("body\nIt is a truth universally acknowledged.\n")
    (d / "latin1.txt").write_bytes(
        "Élinor était à Norland, où la société était agréable.\n".encode("latin-1")
    )
    (d / "data.xml").write_text("<texts/>\n")
    (d / "short.txt").write_text("Only a few words here, far too short for twenty-two windows.\n")
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (d / "prompts.txt").write_text("It is a truth\n")
    (d / "prompts-bad.jsonl").write_text('{"text": "It is a truth"}\n{not json}\n')
    config = d / "base.yaml"
    config.write_text(BASE_CONFIG.format(model=model))
    _fake_checkpoint(d / "ckpt-rank4", model, base_model=None)
    other = {"path": "/elsewhere/other-model", "revision": None, "config_sha256": "0" * 64}
    _fake_checkpoint(d / "ckpt-other-base", model, base_model={**other, "weights_index_sha256": "1" * 64})
    return {"M": str(model), "NOEOS": str(no_eos), "D": str(d), "CFG": str(config), "root": root}


def _fake_checkpoint(folder: Path, model: Path, base_model) -> None:
    """A checkpoint folder that passes verification and records a LoRA of rank 4 on ``base_model`` (default: the
    tiny model's identity); it holds no training state: a resume must refuse it before loading anything."""
    from hfdist.adapters import training_setup
    from hfdist.checkpoint import SETUP, write_file, write_manifest
    from hfdist.config import load_config
    from hfdist.models import model_identity

    config = load_config(None, [f"model.path={model}", "adapter.type=lora", "adapter.rank=4"])
    setup = {"base_model": base_model or model_identity(config.model), "trains": training_setup(config)}
    folder.mkdir()
    records: dict = {}
    write_file(folder, SETUP, json.dumps(setup).encode(), records, 0)
    write_manifest(folder, records)


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else "dir/link")
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(case, inputs, tmp_path, capfd, monkeypatch):
    name, argv, expected, env, extra = (*case, None, None)[:5]
    out = tmp_path / "out"
    out.mkdir()
    for file, text in SENTINELS.items():
        (out / file).write_text(text)
    if extra == "link":
        outside = tmp_path / "outside"
        outside.mkdir()
        (out / "link").symlink_to(outside, target_is_directory=True)
    elif extra:
        (out / extra).write_text('{"kind": "step", "step": 1}\n')
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    values = {**{k: v for k, v in inputs.items() if k != "root"}, "OUT": str(out)}
    args = [a.format(**values) for a in argv]
    expected = expected.format(**values)
    before = _snapshot(out)
    if name in SUBPROCESS:
        proc = subprocess.run(
            [sys.executable, "-m", "hfdist.cli", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, **(env or {})},
            timeout=300,
        )
        code, err, stdout = proc.returncode, proc.stderr, proc.stdout
    else:
        capfd.readouterr()
        try:
            code = main(args)
        except SystemExit as exc:  # argparse
            code = exc.code
        captured = capfd.readouterr()
        err, stdout = captured.err, captured.out
    assert code not in (0, None), f"{name}: exit status {code}"
    lines = err.splitlines()
    assert len(lines) == 1, f"{name}: stderr is not one line:\n{err}"
    assert lines[0].startswith("hfdist: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err + stdout
    assert _snapshot(out) == before, f"{name}: the output folder changed"
    if extra == "link":
        assert not any((tmp_path / "outside").iterdir())


def test_the_table_is_broad():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
