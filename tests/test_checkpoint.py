"""Checkpoints are atomic and verified: a damaged newest file is skipped with a warning, a full disk
fails loudly without touching the previous checkpoint, and nothing but tensors/primitives is loaded."""

import errno
import os

import pytest
import torch

from seqmarl.checkpoint import atomic_save, load_checkpoint, save_checkpoint
from seqmarl.errors import UserError


def _payload(step):
    return {"step": step, "weights": torch.full((4,), float(step))}


def _run_dir(tmp_path, steps=(10, 20, 30)):
    for step in steps:
        save_checkpoint(tmp_path / "checkpoints", step, _payload(step), keep=3)
    return tmp_path


def test_round_trip_and_keep_last_k(tmp_path):
    _run_dir(tmp_path, steps=(10, 20, 30, 40))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"step_{s:012d}.pt{x}" for s in (20, 30, 40) for x in ("", ".sha256")]
    assert load_checkpoint(tmp_path)["step"] == 40


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_checksum"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(damage, tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    newest = run_dir / "checkpoints" / f"step_{30:012d}.pt"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:  # killed after the checkpoint's rename, before its checksum was written
        (run_dir / "checkpoints" / f"step_{30:012d}.pt.sha256").unlink()
    loaded = load_checkpoint(run_dir)
    assert loaded["step"] == 20
    torch.testing.assert_close(loaded["weights"], torch.full((4,), 20.0))
    err = capsys.readouterr().err
    assert "warning: skipping checkpoint" in err and newest.name in err
    with pytest.raises(UserError, match="cannot be trusted"):
        load_checkpoint(newest)  # named explicitly: refused, not silently replaced


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    run_dir = _run_dir(tmp_path, steps=(10,))
    (run_dir / "checkpoints" / f"step_{10:012d}.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no intact checkpoint"):
        load_checkpoint(run_dir)


def test_full_disk_fails_loudly_and_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    run_dir = _run_dir(tmp_path, steps=(10,))
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoints are intact"):
        save_checkpoint(run_dir / "checkpoints", 20, _payload(20), keep=3)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert load_checkpoint(run_dir)["step"] == 10


class NotATensor:
    pass


def test_checkpoints_never_unpickle_arbitrary_objects(tmp_path):
    path = atomic_save({"step": 1, "object": NotATensor()}, tmp_path / "evil.pt")  # checksum is valid
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)
