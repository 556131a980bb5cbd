"""Checkpoint folders: atomic, verified by their manifest, pruned without losing the only good one,
and a failed save (disk full) leaves the previous checkpoint loadable."""
import errno

import pytest
import torch

from hfdist import checkpoint
from hfdist.config import Config
from hfdist.distributed.single import SingleBackend
from hfdist.errors import HfdistError
from hfdist.models import HyperfitModel
from hfdist.testing import tiny_llama
from hfdist.trainer import build_optimizer, build_scheduler


def _backend(seed=0):
    backend = SingleBackend(Config(), device=torch.device("cpu"))
    backend.build(lambda device: HyperfitModel(tiny_llama(seed=seed), fused_loss=False),
                  lambda m: build_optimizer(Config().optim, m, torch.device("cpu")),
                  lambda o: build_scheduler(Config().optim, o, 10))
    return backend


def _train_one_step(backend):
    loss, _, n = backend.model(torch.randint(0, 256, (2, 16)))
    backend.backward(loss / n, True)
    backend.step(0.0)


def test_save_load_round_trip_restores_weights_optimizer_rng(tmp_path):
    backend = _backend()
    _train_one_step(backend)
    folder = checkpoint.save(tmp_path, 1, backend, {"step": 1}, keep_last=2)
    assert folder.name == "step_00000001" and checkpoint.verify(folder) is None
    expected_next = torch.rand(3)
    weights = {k: v.clone() for k, v in backend.model.state_dict().items()}
    exp_avg = next(iter(backend.optimizer.state.values()))["exp_avg"].clone()

    other = _backend(seed=1)
    state = checkpoint.load(folder, other)
    assert state == {"step": 1}
    assert all(torch.equal(weights[k], v) for k, v in other.model.state_dict().items())
    assert torch.equal(next(iter(other.optimizer.state.values()))["exp_avg"], exp_avg)
    assert torch.equal(torch.rand(3), expected_next)  # RNG continues where the save left it


def test_corrupt_truncated_and_partial_checkpoints_are_skipped(tmp_path):
    backend = _backend()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, backend, {"step": step}, keep_last=10)
    (tmp_path / ".step_00000005.tmp").mkdir()  # a save that crashed half way: never a candidate
    shards = sorted((tmp_path / "step_00000004" / "dcp").glob("*.distcp"))
    shards[0].write_bytes(shards[0].read_bytes()[:-10])  # truncated
    data = bytearray((tmp_path / "step_00000003" / "dcp" / shards[0].name).read_bytes())
    data[100] ^= 0xFF
    (tmp_path / "step_00000003" / "dcp" / shards[0].name).write_bytes(bytes(data))  # corrupt, same size
    (tmp_path / "step_00000002" / "manifest.json").unlink()  # incomplete
    assert "truncated" in checkpoint.verify(tmp_path / "step_00000004")
    assert "checksum" in checkpoint.verify(tmp_path / "step_00000003")
    assert checkpoint.latest_valid(tmp_path).name == "step_00000001"
    with pytest.raises(HfdistError, match="truncated"):
        checkpoint.resolve_resume(str(tmp_path / "step_00000004"), tmp_path)


def test_keep_last_never_deletes_the_only_good_checkpoint(tmp_path):
    backend = _backend()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, backend, {"step": step}, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / "step_00000003" / "trainer_state.json").write_text("{}")  # now bad
    checkpoint.save(tmp_path, 4, backend, {"step": 4}, keep_last=1)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert "step_00000004" in names and "step_00000002" not in names


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    backend = _backend()
    checkpoint.save(tmp_path, 1, backend, {"step": 1}, keep_last=2)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_manifest", full_disk)
    with pytest.raises(HfdistError, match="No space left on device.*previous checkpoint is intact"):
        checkpoint.save(tmp_path, 2, backend, {"step": 2}, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
    assert checkpoint.latest_valid(tmp_path).name == "step_00000001"
    checkpoint.load(tmp_path / "step_00000001", _backend())
