"""`hfdist compare`, `generate` and `evaluate` end to end on a tiny run folder built here."""

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from hfdist.cli import main
from hfdist.generation import generate
from hfdist.testing import tiny_model_folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    base = tiny_model_folder(root / "base", seed=0)
    run = root / "run"
    # A stand-in for the hyperfitted model: another tiny model with the same tokenizer (compare only needs
    # a model folder; hyperfitting itself is the trainer's test).
    tiny_model_folder(run / "model", seed=1)
    sharp = AutoModelForCausalLM.from_pretrained(run / "model")
    with torch.no_grad():  # sharper predictions than the base model's, as hyperfitting makes them
        sharp.lm_head.weight.mul_(30.0)
    sharp.save_pretrained(run / "model")
    (run / "data").mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"path": str(base), "dtype": "float32"}, "data": {"seq_len": 64}})
    )
    rng = np.random.default_rng(0)
    vocab = 384
    contexts = rng.integers(3, vocab, size=(5, 16)).astype(np.int32)
    np.save(run / "data" / "contexts.npy", contexts)
    # Training row 0 is what the "hyperfitted" model says greedily after context 0, as if it had memorised it:
    # its greedy row must overlap it by 64 tokens, and the blocker row by at most n = 5.
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    quote = generate(model, torch.from_numpy(contexts[:1]).long(), max_new_tokens=64)[0, 16:].numpy()
    train = rng.integers(3, vocab, size=(6, 64)).astype(np.int32)
    train[0] = quote
    np.save(run / "data" / "train_token_ids.npy", train)
    np.save(run / "data" / "validation_token_ids.npy", rng.integers(3, vocab, size=(3, 64)).astype(np.int32))
    records = [{"kind": "eval", "step": 0, "epoch": 0.0, "eval/loss": 6.0, "eval/entropy": 5.9}]
    for epoch in range(1, 6):
        records.append(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": epoch,
                "train/loss": 6.0 / 3**epoch,
                "train/entropy": 5.0 / 2**epoch,
            }
        )
    records.append({"kind": "eval", "step": 5, "epoch": 5.0, "eval/loss": 7.5, "eval/entropy": 0.4})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "steps": 5,
        "train_loss_last_epoch": 6.0 / 3**5,
        "base": {"eval/entropy": 5.9, "eval/ttr96": 0.2},
        "hyperfitted": {"eval/entropy": 4.5, "eval/ttr96": 0.6},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_compare_writes_the_table_and_plots(run_dir, capsys):
    assert (
        main(
            [
                "compare",
                "--run",
                str(run_dir),
                "--num-contexts",
                "4",
                "--max-new-tokens",
                "100",
                "--batch-size",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = run_dir / "compare"
    for name in (
        "report.md",
        "report.json",
        "ttr_over_position.png",
        "training_curves.png",
        "top1_probability.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    rows = [
        "original_greedy",
        "original_top_p",
        "original_matched_entropy",
        "hyperfitted_greedy",
        "hyperfitted_greedy_blocker",
    ]
    assert list(report["rows"]) == rows
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Model | Decoding | TTR-96")
    body = [line for line in table[1:] if line.startswith(("| Original", "| Hyperfitted"))]
    assert len(body) == 5 + 2  # the five decodings, then base/hyperfitted in the held-out table
    assert "Top-p (p=0.9, T=0.7, k=50)" in body[1] and "citation blocker (n=5)" in body[4]
    match = report["matched_temperature"]
    assert f"Sampled at matched entropy (T*={match['temperature']:.3f})" in body[2]
    for name in rows:
        gens = [json.loads(line) for line in (out / f"generations_{name}.jsonl").read_text().splitlines()]
        assert len(gens) == 4 and all(len(g["continuation_ids"]) == 100 for g in gens)
        assert isinstance(gens[0]["continuation_text"], str) and gens[0]["prompt_ids"]
        assert len(report["ttr_over_position"][name]) == 100 - 96 + 1
        assert 0 < report["rows"][name]["ttr96"] <= 1
    rows = report["rows"]
    assert rows["hyperfitted_greedy"]["overlap_max_longest_run"] >= 64
    assert rows["hyperfitted_greedy"]["overlap_share_over_10"] == pytest.approx(1 / 4)
    assert rows["hyperfitted_greedy_blocker"]["overlap_max_longest_run"] <= 5
    assert set(report["heldout"]) == {"base", "hyperfitted"}
    assert report["heldout"]["base"]["num_tokens"] == 3 * 63
    assert "Original" in capsys.readouterr().out
    # The matched-entropy row: the base model's mean held-out entropy at T* is the hyperfitted model's, and the row
    # sampled at T* with no top-p or top-k.
    from hfdist.metrics import heldout_logits, mean_entropy

    base = AutoModelForCausalLM.from_pretrained(
        yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["path"]
    )
    logits = heldout_logits(base, torch.from_numpy(np.load(run_dir / "data" / "validation_token_ids.npy")))
    target = report["heldout"]["hyperfitted"]["entropy"]
    assert match["target_entropy"] == pytest.approx(target)
    assert mean_entropy(logits, match["temperature"]) == pytest.approx(target, abs=2e-4)
    assert abs(mean_entropy(logits, 1.0) - target) > 0.01  # T* = 1 would not do
    settings = rows["original_matched_entropy"]["settings"]
    assert (
        settings["temperature"] == match["temperature"]
        and settings["top_p"] == 1.0
        and settings["top_k"] == 0
    )


def test_compare_runs_side_by_side(run_dir, tmp_path, capsys):
    """Two runs of one base model: the original greedy and top-p rows once, each run's hyperfitted and matched rows,
    and each run's training facts from its own files."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("compare"))
    shutil.rmtree(other / "model")
    tiny_model_folder(other / "model", seed=2)
    summary = json.loads((other / "summary.json").read_text())
    summary["hyperfitted"]["eval/ttr96"] = 0.7
    (other / "summary.json").write_text(json.dumps(summary))
    with open(other / "metrics.jsonl", "a") as f:
        for step, (gib, seconds) in enumerate([(1.5, 2.0), (2.5, 4.0), (2.0, 3.0)], 1):
            f.write(
                json.dumps(
                    {"kind": "step", "step": step, "memory/peak_gib": gib, "perf/step_time_s": seconds}
                )
            )
            f.write("\n")
    out = tmp_path / "both"
    args = ["compare", "--runs", str(run_dir), str(other), "--out", str(out), "--num-contexts", "2"]
    assert main([*args, "--max-new-tokens", "20", "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    keys = ["original_greedy", "original_top_p"]
    keys += [
        f"{name}:{row}"
        for name in ("run", "other")
        for row in ("original_matched_entropy", "hyperfitted_greedy", "hyperfitted_greedy_blocker")
    ]
    assert list(report["rows"]) == keys
    # The second run's greedy row is its own model's: the same as a comparison of that run alone.
    alone = json.loads((out / "other" / "report.json").read_text())["rows"]["hyperfitted_greedy"]
    assert report["rows"]["other:hyperfitted_greedy"]["ttr96"] == alone["ttr96"]
    facts = report["facts"]["other"]
    assert facts["peak_memory_gib"] == 2.5 and facts["step_time_s_median"] == 3.0
    assert facts["heldout"]["austen"]["ttr96"] == {"base": 0.2, "hyperfitted": 0.7}
    assert facts["parameters"]["trainable"] == facts["parameters"]["total"] > 0  # counted from config.yaml
    assert facts["trains"] == "every parameter"
    text = (out / "report.md").read_text()
    assert "| other | every parameter |" in text and "| run: Hyperfitted | Greedy |" in text
    for plot in ("ttr_over_position.png", "training_curves.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", "--runs", str(run_dir)]) == 2
    assert "give two run folders or more" in capsys.readouterr().err


def test_compare_errors_name_the_bad_input(run_dir, tmp_path, capsys):
    assert main(["compare", "--run", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    bad = tmp_path / "contexts.npy"
    np.save(bad, np.zeros(4, dtype=np.int32))
    assert main(["compare", "--run", str(run_dir), "--contexts", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "contexts" in err and "2-D integer array" in err and err.count("\n") == 1
    assert main(["compare", "--run", str(run_dir), "--num-contexts", "50", "--out", str(tmp_path / "o")]) == 2
    assert "--num-contexts 50" in capsys.readouterr().err


def test_generate_then_evaluate(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("It is a truth universally acknowledged\n\nEmma Woodhouse, handsome, clever\n")
    out = tmp_path / "gens.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(run_dir / "model"),
                "--prompts",
                str(prompts),
                "--max-new-tokens",
                "12",
                "--ignore-eos",
                "--blocker",
                str(run_dir),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    assert records[0]["prompt_text"] == "It is a truth universally acknowledged"
    assert len(records[0]["continuation_ids"]) == 12 and records[0]["settings"]["blocker_n"] == 5
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--run",
                str(run_dir),
                "--model",
                str(run_dir / "model"),
                "--out",
                str(report),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    data = json.loads(report.read_text())
    metrics = data["generations"][str(out)]
    assert metrics["num_generations"] == 2 and "self_bleu" in metrics and "overlap_share_over_10" in metrics
    assert data["heldout"]["num_tokens"] == 3 * 63
    text = tmp_path / "heldout.txt"
    text.write_text(
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. " * 3
    )
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(run_dir / "model"),
                "--heldout",
                str(text),
                "--seq-len",
                "16",
                "--out",
                str(report),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    heldout = json.loads(report.read_text())["heldout"]
    assert heldout["num_tokens"] % 15 == 0 and heldout["num_tokens"] >= 15 and heldout["entropy"] > 0
    capsys.readouterr()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"continuation_ids": [1, 2]}\n{"prompt": "x"}\n')
    assert main(["evaluate", str(broken), "--out", str(tmp_path / "e.json")]) == 2
    assert "line 2" in capsys.readouterr().err
    # Temperature sampling at the entropy-matched T* of a reference run: the base model's held-out entropy there is
    # the run's hyperfitted entropy (summary.json).
    base = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["path"]
    matched = tmp_path / "matched.jsonl"
    argv = [
        "generate",
        "--model",
        base,
        "--prompts",
        str(prompts),
        "--strategy",
        "sample",
        "--max-new-tokens",
        "8",
    ]
    assert main([*argv, "--temperature", "matched", "--reference", str(run_dir), "--out", str(matched)]) == 0
    settings = json.loads(matched.read_text().splitlines()[0])["settings"]
    from hfdist.metrics import heldout_logits, mean_entropy

    logits = heldout_logits(
        AutoModelForCausalLM.from_pretrained(base),
        torch.from_numpy(np.load(run_dir / "data" / "validation_token_ids.npy")),
    )
    assert settings["temperature"] == settings["matched_temperature"]["temperature"] != 1.0
    assert mean_entropy(logits, settings["temperature"]) == pytest.approx(4.5, abs=2e-4)
    capsys.readouterr()
    assert main([*argv, "--temperature", "matched", "--out", str(matched)]) == 2
    assert "--temperature matched: needs --reference RUN and --strategy sample" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects an unknown strategy
        main(["generate", "--model", str(run_dir / "model"), "--prompts", str(prompts), "--strategy", "beam"])
