"""Config loading: YAML + --set overrides, typed, validated up front, errors that name the field."""

from pathlib import Path

import pytest

from hfdist.config import load_config, save_config
from hfdist.errors import HfdistError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.train.global_batch_size == 8


def test_paper_recipe():
    config = load_config(Path(__file__).parent.parent / "configs" / "paper-llama-3.1-8b.yaml")
    assert (config.data.num_samples, config.data.seq_len, config.train.epochs) == (2000, 256, 20)
    assert config.optim.lr == 1e-6 and config.optim.weight_decay == 0.0 and config.optim.name == "adam"


def test_overrides_are_typed():
    config = load_config(None, ["optim.lr=3e-5", "train.epochs=2", "train.fused_loss=false", "model.path=/x"])
    assert config.optim.lr == 3e-5 and isinstance(config.optim.lr, float)
    assert config.train.epochs == 2 and config.train.fused_loss is False and config.model.path == "/x"


def test_int_accepted_for_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=abc", "train.epochs: expected int"),
        ("train.epochs=1.5", "train.epochs: expected int"),
        ("train.fused_loss=3", "train.fused_loss: expected bool"),
        ("train.nonsense=1", "unknown config field 'train.nonsense'"),
        ("nonsense.x=1", "unknown config field 'nonsense'"),
        ("train=3", "config section 'train' must be a mapping"),
        ("train.epochs=0", "train.epochs: must be > 0"),
        ("optim.lr=-1e-6", "optim.lr: must be > 0"),
        ("optim.name=sgd", "optim.name: 'sgd' is not one of adam, adamw"),
        ("data.mode=sliding", "data.mode"),
        (
            "train.micro_batch_size=3",
            "train.global_batch_size: 8 is not a multiple of train.micro_batch_size 3",
        ),
        ("eval.ttr_window=400", "eval.ttr_window"),
        ("data.context_len=300", "data.context_len"),
        ("optim.beta1=1.5", "optim.beta1"),
        ("trainepochs", "expected section.field=value"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(HfdistError, match=None) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(HfdistError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(HfdistError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(HfdistError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("train:\n  epochs: '3'\n")
    with pytest.raises(HfdistError, match="train.epochs: expected int, got '3'"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["optim.lr=2e-5", "data.seq_len=64"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config


def test_checkpoint_async_key_and_phase_timeouts(tmp_path):
    """`checkpoint.async` is the YAML key (a Python keyword, so the field is async_); it survives the saved config;
    the phase timeouts are their own fields and an old config with only distributed.timeout_s still loads."""
    config = load_config(
        None, ["checkpoint.async=true", "distributed.timeout_s=60", "distributed.checkpoint_timeout_s=7200"]
    )
    assert config.checkpoint.async_ is True and config.distributed.timeout_s == 60
    assert (config.distributed.startup_timeout_s, config.distributed.checkpoint_timeout_s) == (3600, 7200)
    save_config(config, tmp_path / "config.yaml")
    assert "async: true" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml").checkpoint.async_ is True
    with pytest.raises(
        HfdistError, match="config field checkpoint.async: supported with distributed.backend single"
    ):
        load_config(None, ["checkpoint.async=true", "distributed.backend=deepspeed"])
    with pytest.raises(HfdistError, match="distributed.export_timeout_s: must be > 0"):
        load_config(None, ["distributed.export_timeout_s=0"])
    with pytest.raises(
        HfdistError, match="export.dtype: 'int8' is not one of auto, float32, bfloat16, float16"
    ):
        load_config(None, ["export.dtype=int8"])


PAPER_CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_paper_experiment_configs_load(path):
    """configs/paper/: ImageGPT-Large on CIFAR-10, and 3 models x 3 text datasets with the paper's recipe."""
    config = load_config(path)
    assert (config.train.epochs, config.train.global_batch_size, config.optim.lr, config.optim.name) == (
        20,
        8,
        1e-6,
        "adam",
    )
    assert config.data.num_samples == 2000 and config.optim.weight_decay == 0.0
    if config.data.modality == "image":
        assert (config.model.path, config.data.source, config.data.image_field) == (
            "openai/imagegpt-large",
            "uoft-cs/cifar10",
            "img",
        )
        assert config.data.seq_len == 1 + 32 * 32 and config.data.num_validation == 128
    else:
        assert (config.data.mode, config.data.seq_len, config.data.num_validation) == ("exact", 256, 128)


def test_paper_configs_cover_every_model_and_dataset():
    names = {p.stem for p in PAPER_CONFIGS}
    for model in ("tinyllama-1.1b", "deepseek-7b", "llama-3.1-8b"):
        for dataset in ("fiction", "wikitext103", "bbc-news"):
            assert f"{model}-{dataset}" in names
    assert "imagegpt-large-cifar10" in names


def test_image_and_extra_heldout_fields():
    config = load_config(Path(__file__).parent.parent / "configs" / "demo-image.yaml")
    assert config.data.modality == "image" and config.data.source == "digits"
    with pytest.raises(HfdistError, match=r"config field data.context_fraction: 1.0 must lie in \(0, 1\)"):
        load_config(None, ["data.modality=image", "data.context_fraction=1.0"])
    with pytest.raises(HfdistError, match="config field data.modality: 'audio' is not one of text, image"):
        load_config(None, ["data.modality=audio"])
    config = load_config(None, ["eval.extra.source=sqlite_docs", "eval.extra.name=sqlite"])
    assert (config.eval.extra.source, config.eval.extra.num_validation) == ("sqlite_docs", 16)
    with pytest.raises(HfdistError, match="config field eval.extra.name: 'a/b' must be letters"):
        load_config(None, ["eval.extra.source=x", "eval.extra.name=a/b"])
    with pytest.raises(HfdistError, match="config field eval.extra.source: an extra held-out set is text"):
        load_config(None, ["eval.extra.source=x", "data.modality=image"])
    with pytest.raises(HfdistError, match="config field eval.extra.num_validation: must be >= 0"):
        load_config(None, ["eval.extra.num_validation=-1"])
