"""`hfdist compare` on an image run: completions of held-out images from their first rows, the degeneration
measures of the generated pixel tokens, and the PNG grid of originals and completions."""

import json

import numpy as np
import pytest
import yaml

from hfdist.cli import main
from hfdist.testing import tiny_imagegpt_folder

SIZE = 8


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from transformers import AutoImageProcessor

    from hfdist.config import DataConfig
    from hfdist.data import build_data

    root = tmp_path_factory.mktemp("compare-images")
    base = tiny_imagegpt_folder(root / "base", size=SIZE, levels=8, seed=0)
    run = root / "run"
    tiny_imagegpt_folder(run / "model", size=SIZE, levels=8, seed=1)  # stands in for the hyperfitted model
    data = build_data(
        DataConfig(
            source="digits",
            modality="image",
            seq_len=1 + SIZE * SIZE,
            num_samples=8,
            num_validation=3,
            num_contexts=4,
            context_fraction=0.5,
        ),
        AutoImageProcessor.from_pretrained(base),
    )
    data.save(run / "data")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(base), "dtype": "float32"}}))
    return run


def test_compare_image_run_writes_measures_and_grid(image_run, capsys):
    from PIL import Image

    from hfdist.metrics import image_completion_metrics

    assert main(["compare", "--run", str(image_run), "--device", "cpu", "--batch-size", "3"]) == 0
    out = image_run / "compare"
    report = json.loads((out / "report.json").read_text())
    assert list(report["rows"]) == [
        "original_greedy",
        "original_top_p",
        "hyperfitted_greedy",
    ]  # no blocker row
    assert report["image"]["context_rows"] == 4 and report["settings"]["max_new_tokens"] == 32
    contexts = np.load(image_run / "data" / "contexts.npy")
    for name, row in report["rows"].items():
        records = [json.loads(line) for line in (out / f"generations_{name}.jsonl").read_text().splitlines()]
        generations = [r["continuation_ids"] for r in records]
        assert all(
            len(g) == 32 and max(g) < 512 for g in generations
        )  # the other 4 rows; never the start token
        expected = image_completion_metrics(generations, contexts, SIZE, 32)
        assert row["ttr32"] == pytest.approx(
            expected["ttr32"]
        )  # the window shrinks to the 32 generated tokens
        assert row["distinct_colors"] == pytest.approx(expected["distinct_colors"])
        assert row["repeated_rows"] == pytest.approx(expected["repeated_rows"])
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Model | Decoding | Distinct colours ↑ | Repeated rows ↓ | TTR-32 ↑")
    assert "![completions_grid](completions_grid.png)" in (out / "report.md").read_text()
    assert "Distinct colours" in capsys.readouterr().out
    grid = Image.open(out / "completions_grid.png")
    assert grid.format == "PNG" and grid.width > 300 and grid.height > 300
    # The grid is not blank: it shows dark digit ink on white paper.
    pixels = np.asarray(grid.convert("L"))
    assert pixels.min() < 60 and pixels.max() > 200
