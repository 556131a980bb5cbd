"""What trains (hfdist.adapters) on every backend: a LoRA adapter (peft) and last-layers training of a tiny Llama on
1 process, FSDP2 on 2 processes (launchers/torchrun.sh) and ZeRO-3 on 2 processes (launchers/deepspeed.sh).

The runs are the parity runs of test_distributed_training.py shortened to 4 optimizer steps (2 micro-batches of 2
per rank on 2 ranks): per-step loss and gradient norm within 1e-5 relative, exported weights and the adapter within
1e-5 absolute. Frozen parameters leave training bit for bit unchanged; the merged export equals base + alpha / r x
B A (one fp32 rounding); the adapter folder loads with peft and gives the merged model's logits; checkpoints hold
only what trains, and a resume from one continues bit for bit."""

import json
import shutil
import sys

import pytest
import torch
from launch_helpers import (
    LAUNCHERS,
    WEIGHT_ATOL,
    assert_matches,
    exported_weights,
    hyperfit_args,
    launch_env,
    run,
    step_records,
    tiny_run_setup,
)
from safetensors.torch import load_file
from test_distributed_training import CONFIG, DS_FP32

pytestmark = pytest.mark.distributed

# The parity runs' config (checkpoints every 2 steps), 2 epochs of 2 steps.
STEPS = ["--set", "train.epochs=2"]
# LoRA on the last of the two blocks (the first block has no adapter: frozen as it is), every projection.
LORA = ["--set", "adapter.type=lora", "--set", "adapter.rank=4", "--set", "adapter.alpha=8"]
LORA += ["--set", "adapter.layers=last:1", "--set", "export.adapter=both"]
LAST = ["--set", "train.trainable_layers=last:1"]
BACKENDS = ("single", "fsdp", "deepspeed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("adapters"), CONFIG)


def launch(setup, name: str, backend: str, *extra) -> object:
    run_dir = setup["root"] / name
    if backend == "single":
        cmd, env = [sys.executable, "-m", "hfdist.cli", "hyperfit"], launch_env()
    elif backend == "fsdp":
        cmd, env = [LAUNCHERS / "torchrun.sh"], launch_env(GPUS_PER_NODE="2")
        extra = (*extra, "--set", "distributed.backend=fsdp")
    else:
        pytest.importorskip("deepspeed")
        cmd, env = [LAUNCHERS / "deepspeed.sh"], launch_env(NUM_GPUS="2", DS_CONFIG=str(DS_FP32))
    run([*cmd, *hyperfit_args(setup, run_dir, *STEPS, *extra)], env, timeout=600)
    return run_dir


@pytest.fixture(scope="module")
def lora_runs(setup):
    runs = {backend: launch(setup, f"lora-{backend}", backend, *LORA) for backend in ("single", "deepspeed")}
    # FSDP2 also through the other weight-loading path (rank 0 reads the base model, shards are broadcast; the
    # adapters filled as with per-rank loading) and with activation checkpointing: neither may change the result.
    other = [
        "--set",
        "distributed.weight_loading=rank0_broadcast",
        "--set",
        "train.activation_checkpointing=true",
    ]
    runs["fsdp"] = launch(setup, "lora-fsdp", "fsdp", *LORA, *other)
    return runs


@pytest.fixture(scope="module")
def last_runs(setup):
    return {backend: launch(setup, f"last-{backend}", backend, *LAST) for backend in BACKENDS}


def base_weights(setup) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def adapter_weights(run_dir) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_lora_matches_single_process(lora_runs, backend):
    assert len(step_records(lora_runs["single"])) == 4
    assert_matches(lora_runs[backend], lora_runs["single"])
    got, want = adapter_weights(lora_runs[backend]), adapter_weights(lora_runs["single"])
    assert got.keys() == want.keys() and len(want) == 14  # A and B of 7 projections of the last block
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < WEIGHT_ATOL, f"adapters differ by up to {worst}"
    assert any(v.abs().max() > 0 for k, v in want.items() if "lora_B" in k)  # B left zero: nothing trained


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_last_layers_match_single_process(last_runs, backend):
    assert len(step_records(last_runs["single"])) == 4
    assert_matches(last_runs[backend], last_runs["single"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters_are_unchanged_bit_for_bit(setup, lora_runs, last_runs, backend):
    base = base_weights(setup)
    trained = exported_weights(last_runs[backend])
    moved = {k for k in base if not torch.equal(trained[k], base[k])}
    # last:1 trains block 1 and the final norm; the embedding, block 0 and the (untied) LM head stay.
    assert moved and all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in moved), moved
    assert "model.norm.weight" in moved and any(k.startswith("model.layers.1.") for k in moved)
    merged = exported_weights(lora_runs[backend])
    adapted = {
        f"{k.removeprefix('base_model.model.').rsplit('.lora_', 1)[0]}.weight"
        for k in adapter_weights(lora_runs[backend])
    }
    assert {k for k in base if not torch.equal(merged[k], base[k])} == adapted


@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_export_is_base_plus_scaled_delta(setup, lora_runs, backend):
    base, merged = base_weights(setup), exported_weights(lora_runs[backend])
    adapters = adapter_weights(lora_runs[backend])
    config = json.loads((lora_runs[backend] / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    for name in [k for k in adapters if ".lora_A." in k]:
        module = name.removeprefix("base_model.model.").rsplit(".lora_A.", 1)[0]
        b = adapters[name.replace(".lora_A.", ".lora_B.")]
        expected = (
            base[f"{module}.weight"].double() + scale * (b.double() @ adapters[name].double())
        ).float()
        # One fp32 rounding of the sum: within half an ulp of the exact value, here below 1e-7 of the weights' size.
        torch.testing.assert_close(merged[f"{module}.weight"], expected, rtol=2e-7, atol=1e-8)


def test_adapter_folder_loads_with_peft_and_gives_the_merged_logits(setup, lora_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = lora_runs["fsdp"]
    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
        # hfdist's own loading of an adapter folder (generate/compare --model RUN/adapter) merges it the same way.
        from hfdist.models import load_model, model_config_for

        loaded = load_model(model_config_for(run_dir / "adapter", None, "float32")).eval()
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
        # The adapter changes the base model's logits by more than the tolerance above (peft injected it into
        # ``base`` in place: a fresh copy of the base model).
        plain = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
        assert (plain(ids).logits - merged(ids).logits).abs().max() > 1e-4


def test_checkpoints_hold_only_what_trains(lora_runs, last_runs):
    from torch.distributed.checkpoint import FileSystemReader

    for runs, trains in (
        (lora_runs, lambda k: ".lora_" in k),
        (last_runs, lambda k: "layers.1." in k or "norm" in k),
    ):
        folder = runs["fsdp"] / "checkpoints" / "step_00000004"
        keys = FileSystemReader(str(folder / "dcp")).read_metadata().state_dict_metadata
        model_keys = [k for k in keys if k.startswith("model.")]
        assert model_keys and all(trains(k) for k in model_keys), model_keys
        setup = json.loads((folder / "training_setup.json").read_text())
        assert setup["base_model"]["weights_index_sha256"] and setup["trains"]


@pytest.mark.parametrize("backend", ["single", "deepspeed"])
def test_lora_resumes_bit_for_bit(setup, lora_runs, backend):
    """From the step-2 checkpoint (adapter and its Adam state; the frozen base reloaded from its files) the run
    continues with the uninterrupted run's losses and adapter, bit for bit."""
    full = lora_runs[backend]
    resumed = setup["root"] / f"lora-{backend}-resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    launch(setup, resumed.name, backend, *LORA, "--resume")
    got, want = step_records(resumed), step_records(full)
    assert sorted(got) == [3, 4] and all(got[s] == want[s] for s in got)
    a, b = adapter_weights(resumed), adapter_weights(full)
    assert all(torch.equal(a[k], b[k]) for k in b)
