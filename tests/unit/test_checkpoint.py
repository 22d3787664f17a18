"""Checkpoint files are written atomically and read with clear errors."""
from __future__ import annotations

import errno

import pytest
import torch

from utils.checkpoint import atomic_save, load_state_dict_file
from utils.errors import SCFeatError


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "w.pth"
    atomic_save({"a": torch.arange(3)}, path)
    assert torch.equal(load_state_dict_file(path)["a"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["w.pth"]  # no temp file left


def test_disk_full_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    atomic_save({"a": torch.ones(2)}, path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SCFeatError, match=r"cannot write .*w.pth.*No space left.*previous file is intact"):
        atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_state_dict_file(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]


def test_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder should be: mkdir fails even for root
    with pytest.raises(SCFeatError, match="cannot write"):
        atomic_save({}, blocker / "w.pth")


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(SCFeatError, match="does not exist"):
        load_state_dict_file(tmp_path / "none.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SCFeatError, match="cannot read checkpoint"):
        load_state_dict_file(bad)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(SCFeatError, match="expected a state_dict"):
        load_state_dict_file(tmp_path / "list.pth")


def test_save_checkpoint_writes_both_parts(tmp_path):
    from utils.checkpoint import checkpoint_files, is_checkpoint, save_checkpoint

    model = torch.nn.Module()
    model.backbone, model.localheader = torch.nn.Linear(2, 3), torch.nn.Conv2d(1, 1, 3)
    folder = tmp_path / "run" / "001"
    assert not is_checkpoint(folder)
    save_checkpoint(model, folder)
    assert is_checkpoint(folder)
    assert [p.name for p in checkpoint_files(folder)] == ["backbone.pth", "localheader.pth"]
    for part, path in zip(("backbone", "localheader"), checkpoint_files(folder)):
        state = load_state_dict_file(path)
        assert state.keys() == getattr(model, part).state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in getattr(model, part).state_dict().items())
