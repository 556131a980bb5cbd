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
from hfdist.optim import build_optimizer, build_scheduler
from hfdist.testing import tiny_llama


def _backend(seed=0):
    backend = SingleBackend(Config(), device=torch.device("cpu"))
    backend.build(
        lambda device: HyperfitModel(tiny_llama(seed=seed), fused_loss=False),
        lambda m: build_optimizer(Config().optim, m, torch.device("cpu")),
        lambda o: build_scheduler(Config().optim, o, 10),
    )
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


def test_disk_full_while_the_shards_are_written(tmp_path, monkeypatch):
    """ENOSPC inside DCP's write (wrapped by DCP in its CheckpointException): one line, the previous checkpoint
    intact and still the latest."""
    backend = _backend()
    checkpoint.save(tmp_path, 1, backend, {"step": 1}, keep_last=2)

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint._HashingStream, "write", full_disk)
    with pytest.raises(
        HfdistError, match=r"write failed \(No space left on device\); the previous checkpoint"
    ):
        checkpoint.save(tmp_path, 2, backend, {"step": 2}, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_prune_reads_no_file_and_legacy_sha256_manifests_still_verify(tmp_path, monkeypatch):
    """prune keeps the newest complete checkpoints from the manifest and the file sizes alone; a manifest of the
    SHA-256 era still verifies (and still catches corruption)."""
    import hashlib
    import json

    backend = _backend()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, backend, {"step": step}, keep_last=5)

    def no_reading(*args, **kwargs):
        raise AssertionError("prune read a file")

    monkeypatch.setattr(checkpoint, "file_checksum", no_reading)
    checkpoint.prune(tmp_path, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002"]
    folder = tmp_path / "step_00000002"
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {
        name: {"bytes": e["bytes"], "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}
        for name, e in manifest["files"].items()
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.verify(folder) is None
    shard = next((folder / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert "checksum" in checkpoint.verify(folder)


def test_async_save_equals_sync_save(tmp_path):
    """checkpoint.async on one process: save returns before the write completes; training goes on (the weights
    change); once completed, the checkpoint holds the state of the moment of the save, like a synchronous one."""
    backend = _backend()
    _train_one_step(backend)
    checkpoint.save(tmp_path / "sync", 1, backend, {"step": 1}, keep_last=2)
    final = checkpoint.save(tmp_path / "async", 1, backend, {"step": 1}, keep_last=2, async_=True)
    assert backend.pending_checkpoint is not None
    _train_one_step(backend)  # while the background thread writes
    checkpoint.wait_pending(backend)
    assert checkpoint.verify(final) is None
    a, b = _backend(seed=1), _backend(seed=2)
    checkpoint.load(tmp_path / "sync" / "step_00000001", a)
    checkpoint.load(final, b)
    assert all(
        torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values())
    )
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_checksum_cost_against_the_write(tmp_path):
    """Each rank checksums its files while writing them: the time spent in the checksum, measured in the same
    process around the hash updates, against the time of the whole write (DCP serialisation, writes, fsync).
    A model of 26 M parameters: 420 MB of weights and Adam moments. SHA-256 (the former manifest) at ~1 GB/s
    would cost about as much as the write itself here; XXH3-128 a few percent (the bound leaves room for a loaded
    machine; the measured ratio is printed)."""
    from hfdist.testing import tiny_llama

    backend = SingleBackend(Config(), device=torch.device("cpu"))
    backend.build(
        lambda device: HyperfitModel(
            tiny_llama(hidden_size=1024, num_layers=2, num_heads=8, vocab_size=256), fused_loss=False
        ),
        lambda m: build_optimizer(Config().optim, m, torch.device("cpu")),
        lambda o: build_scheduler(Config().optim, o, 10),
    )
    _train_one_step(backend)
    ratios = []
    for step in (1, 2, 3):
        future = backend.save_checkpoint(_fresh(tmp_path / f"s{step}"))
        timer = future.result()["_timer"]
        ratios.append(timer["checksum_s"] / timer["write_s"])
        print(
            f"write {timer['write_s']:.3f} s, checksums {timer['checksum_s']:.4f} s ({100 * ratios[-1]:.1f}%)"
        )
    assert min(ratios) < 0.15


def _fresh(folder):
    folder.mkdir(parents=True)
    return folder
