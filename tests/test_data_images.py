"""Images as data: the embedded digits, a folder of PNG/JPEG files, CIFAR-10-shaped parquet/arrow files, the
processor's tokens and their way back to pixels, the same seeded and recorded selection as text."""

import numpy as np
import pytest
import torch
from PIL import Image

from hfdist.config import DataConfig
from hfdist.data import build_data, image_token_ids, load_run_data, token_ids_to_pixels
from hfdist.errors import HfdistError
from hfdist.models import uniform_colour_clusters
from hfdist.testing import tiny_imagegpt_folder

SIZE = 4


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoImageProcessor

    folder = tiny_imagegpt_folder(tmp_path_factory.mktemp("igpt") / "model", size=SIZE, levels=2)
    return AutoImageProcessor.from_pretrained(folder)


def random_images(count: int, size: int = SIZE, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def config(source, **kwargs) -> DataConfig:
    values = dict(
        source=str(source),
        modality="image",
        seq_len=1 + SIZE * SIZE,
        num_samples=6,
        num_validation=2,
        num_contexts=2,
        context_fraction=0.5,
    )
    values.update(kwargs)
    return DataConfig(**values)


def test_round_trip_image_tokens_image_equals_the_clustered_image(processor):
    """image -> tokens -> image gives each pixel its nearest cluster's colour: with the 8 corners of the RGB cube
    as clusters, each channel is 255 where it is at least 128 (127.5 in ImageGPT's [-1, 1] scale), else 0."""
    images = random_images(5)
    ids = image_token_ids(processor, images, start_token=8)
    assert ids.shape == (5, 1 + SIZE * SIZE) and (ids[:, 0] == 8).all() and (ids[:, 1:] < 8).all()
    pixels = token_ids_to_pixels(ids[:, 1:], processor.clusters, SIZE, SIZE)
    clustered = np.stack([np.where(np.asarray(im) >= 128, 255, 0) for im in images]).astype(np.uint8)
    assert np.array_equal(pixels, clustered)
    # An image of cluster colours comes back exactly, and its tokens again.
    again = image_token_ids(processor, [Image.fromarray(p) for p in pixels], start_token=8)
    assert torch.equal(again, ids)


def test_round_trip_with_512_clusters():
    """The demo model's 512 uniform clusters: a pixel comes back as the nearest of 8 levels per channel."""
    from hfdist.models import _imagegpt_processor_class

    processor = _imagegpt_processor_class()(
        clusters=uniform_colour_clusters(8), size={"height": SIZE, "width": SIZE}
    )
    images = random_images(3, seed=1)
    ids = image_token_ids(processor, images, start_token=512)
    pixels = token_ids_to_pixels(ids[:, 1:], processor.clusters, SIZE, SIZE)
    levels = np.rint(127.5 * (np.linspace(-1, 1, 8) + 1)).astype(int)  # 0, 36, 73, ..., 255
    scaled = np.stack([np.asarray(im) for im in images]) / 127.5 - 1.0
    nearest = levels[np.abs(scaled[..., None] - np.linspace(-1, 1, 8)).argmin(-1)]
    assert np.array_equal(pixels, nearest.astype(np.uint8))


def test_digits_selection_is_seeded_recorded_and_disjoint(processor, tmp_path):
    data = build_data(config("digits", num_samples=20, num_validation=5, num_contexts=3), processor)
    assert data.train.shape == (20, 17) and data.validation.shape == (5, 17)
    assert data.contexts.shape == (3, 1 + 2 * SIZE)  # start token + the first 2 of 4 rows
    assert torch.equal(data.context_images[:, :9], data.contexts)
    assert data.image == {
        "height": 4,
        "width": 4,
        "num_clusters": 8,
        "start_token": 8,
        "context_rows": 2,
        "context_len": 9,
        "generated_tokens": 8,
    }
    chosen = (
        data.selection["train_origins"]
        + data.selection["validation_origins"]
        + data.selection["context_origins"]
    )
    assert len(set(chosen)) == 28 and data.selection["num_images"] == 1797
    again = build_data(config("digits", num_samples=20, num_validation=5, num_contexts=3), processor)
    assert torch.equal(again.train, data.train) and again.selection == data.selection
    other = build_data(config("digits", num_samples=20, num_validation=5, num_contexts=3, seed=1), processor)
    assert other.selection["train_origins"] != data.selection["train_origins"]
    # The tokens are those of the chosen digit: ink dark on white paper.
    from sklearn.datasets import load_digits

    digit = load_digits().images[chosen[0]]
    image = Image.fromarray(
        np.repeat(np.rint(255 * (1 - digit / 16)).astype(np.uint8)[:, :, None], 3, axis=2)
    )
    assert torch.equal(data.train[0], image_token_ids(processor, [image], 8)[0])
    data.save(tmp_path / "data")
    loaded = load_run_data(tmp_path / "data")
    assert torch.equal(loaded.context_images, data.context_images) and loaded.image == data.image


def test_image_folder(processor, tmp_path):
    images = random_images(10, seed=2)
    for i, image in enumerate(images):
        sub = tmp_path / "photos" / ("cats" if i % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / f"{i:02d}.png")
    data = build_data(config(tmp_path / "photos"), processor)
    assert data.selection["num_images"] == 10
    rows = {tuple(r) for r in torch.cat([data.train, data.validation, data.context_images]).tolist()}
    expected = {tuple(r) for r in image_token_ids(processor, images, 8).tolist()}
    assert rows == expected  # 6 + 2 + 2 = all ten images, each exactly once


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_cifar10_shaped_files(processor, tmp_path, kind):
    """The layout of the hub's CIFAR-10 (columns img, label) in a local parquet or arrow file."""
    import datasets

    images = random_images(12, seed=3)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    dataset = datasets.Dataset.from_dict(
        {"img": images, "label": [i % 10 for i in range(12)]}, features=features
    )
    if kind == "parquet":
        path = tmp_path / "cifar10.parquet"
        dataset.to_parquet(str(path))
    else:
        dataset.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    data = build_data(config(path, image_field="img"), processor)
    chosen = data.selection["train_origins"]
    assert torch.equal(data.train, image_token_ids(processor, [images[i] for i in chosen], 8))
    with pytest.raises(
        HfdistError, match=r"data.image_field 'image': not a column of .* \(columns: img, label\)"
    ):
        build_data(config(path), processor)
    with pytest.raises(HfdistError, match=r"data.image_field 'label': column of .* does not hold images"):
        build_data(config(path, image_field="label"), processor)


def test_image_errors(processor, tmp_path):
    with pytest.raises(
        HfdistError,
        match=r"data.seq_len: 256, but the model's image processor makes 4x4 images: "
        r"set it to 17",
    ):
        build_data(config("digits", seq_len=256), processor)
    with pytest.raises(
        HfdistError,
        match=r"has 1797 images, but data.num_samples \(1797\) \+ num_validation \(2\) "
        r"\+ num_contexts \(2\) need 1801",
    ):
        build_data(config("digits", num_samples=1797), processor)
    with pytest.raises(HfdistError, match="no such file or folder"):
        build_data(config("./missing-folder"), processor)
