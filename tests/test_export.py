"""The streaming safetensors export (hfdist.export): every rank writes its pieces into the final files.

In one process: pieces of every placement a 2-D (dp, tp) mesh gives a parameter (row shards, column shards, both,
replicated on one mesh dimension), each piece taken as the DTensor of its rank reports it (a fake process group
per rank) and written into one file layout, read back with safetensors and compared with the whole tensor; ZeRO-3's
flat partitions likewise; and the export of a model on the single backend: the default dtype is the model's own
(config.json), several shards with an index that ``from_pretrained`` loads, and the config and tokenizer beside.
The multi-process exports (FSDP2 and ZeRO-3 on gloo, their peak memory) are in test_distributed_training.py.
"""

import json
from pathlib import Path

import pytest
import torch

from hfdist.export import ExportTensor, Piece, plan_layout, runs, write_shards


def _read(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _write(
    folder: Path, whole: dict, pieces_by_rank: list[dict], dtype=torch.float32, max_bytes=1 << 30
) -> None:
    """Write the pieces of every "rank" in turn into one layout (rank 0 first: it writes the headers)."""
    names = list(whole)
    for rank, pieces in enumerate(pieces_by_rank):
        tensors = [ExportTensor(n, tuple(whole[n].shape), pieces.get(n, [])) for n in names]
        layouts = plan_layout(tensors, dtype, max_bytes)
        write_shards(folder, tensors, layouts, dtype, rank, barrier=lambda: None)


def _dtensor_pieces(full: torch.Tensor, placements, mesh_shape=(2, 2)) -> list[list[Piece]]:
    """Each rank's piece of ``full`` distributed over a (dp, tp) mesh, as hfdist.export.dtensor_piece sees it: the
    local data is cut with torch.chunk (DTensor's own rule), the offsets come from the DTensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from hfdist.export import dtensor_piece

    world = mesh_shape[0] * mesh_shape[1]
    result = []
    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
            coordinate = mesh.get_coordinate()
            local = full
            for placement, index, size in zip(placements, coordinate, mesh_shape):
                if placement.is_shard():
                    local = local.chunk(size, dim=placement.dim)[index]
            tensor = DTensor.from_local(
                local.contiguous(), mesh, placements, run_check=False, shape=full.shape, stride=full.stride()
            )
            piece = dtensor_piece(tensor)
            result.append([piece] if piece is not None else [])
        finally:
            dist.destroy_process_group()
    return result


@pytest.mark.parametrize("placements", ["S0,S0", "S0,S1", "S1,S0", "R,S0", "S1,R", "R,R"])
def test_dtensor_pieces_of_any_placement_reassemble_the_tensor(tmp_path, placements):
    from torch.distributed.tensor import Replicate, Shard

    parse = {"S0": Shard(0), "S1": Shard(1), "R": Replicate()}
    placement = tuple(parse[p] for p in placements.split(","))
    full = torch.randn(7, 5)  # uneven: 7 rows and 5 columns over 2 x 2 ranks
    bias = torch.randn(7)
    pieces = _dtensor_pieces(full, placement)
    bias_pieces = _dtensor_pieces(bias, tuple(p if p != Shard(1) else Shard(0) for p in placement))
    per_rank = [{"w": pieces[r], "b": bias_pieces[r]} for r in range(4)]
    replicas = sum(1 for p in placement if p.is_replicate())
    assert sum(len(p) for p in pieces) == 4 // 2**replicas  # a replicated piece is written once
    _write(tmp_path, {"w": full, "b": bias}, per_rank)
    got = _read(tmp_path)
    assert torch.equal(got["w"], full) and torch.equal(got["b"], bias)


def test_runs_of_boxes_and_flat_ranges():
    shape = (4, 6)
    assert list(runs(shape, Piece((2, 0), (2, 6), None))) == [(12, 12)]  # rows: one run
    assert list(runs(shape, Piece((0, 3), (4, 3), None))) == [
        (3, 3),
        (9, 3),
        (15, 3),
        (21, 3),
    ]  # columns: per row
    assert list(runs(shape, Piece((1, 2), (2, 2), None))) == [(8, 2), (14, 2)]  # a block
    assert list(runs((3, 4, 5), Piece((0, 2, 0), (3, 2, 5), None))) == [(10, 10), (30, 10), (50, 10)]
    assert list(runs(shape, Piece((5,), (7,), None, flat=True))) == [(5, 7)]
    assert list(runs((), Piece((), (), None))) == [(0, 1)]
    assert list(runs(shape, Piece((4, 0), (0, 6), None))) == []  # an empty shard (more ranks than rows)


def test_zero3_flat_partitions_in_bf16_across_shards(tmp_path):
    """ZeRO-3 cuts the flattened parameter into equal partitions (the last one padded); each rank writes its
    range. In bf16, with a shard limit that puts each tensor in a file of its own."""
    whole = {"a": torch.randn(5, 3), "b": torch.randn(11), "c": torch.randn(2, 2, 2)}
    world = 3
    per_rank = [{} for _ in range(world)]
    for name, tensor in whole.items():
        partition = -(-tensor.numel() // world)
        padded = torch.cat(
            [tensor.reshape(-1), torch.full((partition * world - tensor.numel(),), float("nan"))]
        )
        for rank in range(world):
            start = rank * partition
            count = max(0, min(partition, tensor.numel() - start))
            local = padded[start : start + partition]
            per_rank[rank][name] = [Piece((start,), (count,), local[:count], flat=True)]
    _write(tmp_path, whole, per_rank, dtype=torch.bfloat16, max_bytes=30)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    got = _read(tmp_path)
    assert all(torch.equal(got[n], t.to(torch.bfloat16)) for n, t in whole.items())


def test_single_backend_export_defaults_to_the_models_dtype(tmp_path):
    """config.json says bfloat16: the export is bf16 (the trained weights rounded once), in several shards with an
    index, config.json's dtype bfloat16, the tokenizer beside; from_pretrained loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfdist.config import load_config
    from hfdist.distributed.single import SingleBackend
    from hfdist.export import export_model
    from hfdist.models import HyperfitModel
    from hfdist.testing import tiny_llama, tiny_model_folder

    source = tiny_model_folder(
        tmp_path / "source", hidden_size=256
    )  # 2.2 MB in bf16: 3 files of at most 1 MB
    config_json = json.loads((source / "config.json").read_text())
    config_json["dtype"] = "bfloat16"
    (source / "config.json").write_text(json.dumps(config_json))
    config = load_config(None, [f"model.path={source}", "export.max_shard_size_mb=1"])
    backend = SingleBackend(config, device=torch.device("cpu"))
    lm = tiny_llama(vocab_size=config_json["vocab_size"], hidden_size=256, seed=3)  # fp32 training weights
    backend.build(lambda device: HyperfitModel(lm, fused_loss=False), lambda m: None, lambda o: None)
    tokenizer = AutoTokenizer.from_pretrained(source)
    result = export_model(backend, tmp_path / "model", tokenizer, config)
    out = tmp_path / "model"
    assert result["dtype"] == torch.bfloat16 and len(result["files"]) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(lm.state_dict())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    want = lm.state_dict()
    assert all(torch.equal(v, want[k].to(torch.bfloat16)) for k, v in loaded.state_dict().items())
    # export.dtype=float32 keeps the training weights exactly; an existing export is replaced atomically.
    config.export.dtype = "float32"
    export_model(backend, out, tokenizer, config)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.float32 and all(
        torch.equal(v, want[k]) for k, v in loaded.state_dict().items()
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model")] == []


def test_tied_embeddings_are_written_once(tmp_path):
    from transformers import AutoModelForCausalLM

    from hfdist.config import load_config
    from hfdist.distributed.single import SingleBackend
    from hfdist.export import export_model
    from hfdist.models import HyperfitModel
    from hfdist.testing import tiny_model_folder

    source = tiny_model_folder(tmp_path / "source", tie_word_embeddings=True)
    config = load_config(None, [f"model.path={source}"])
    backend = SingleBackend(config, device=torch.device("cpu"))
    lm = AutoModelForCausalLM.from_pretrained(source)
    backend.build(lambda device: HyperfitModel(lm, fused_loss=False), lambda m: None, lambda o: None)
    export_model(backend, tmp_path / "model", None, config)
    names = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.lm_head.weight, lm.lm_head.weight)
