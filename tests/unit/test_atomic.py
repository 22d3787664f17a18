"""Atomic writes leave either the new file or the previous one, never a partial file."""
from __future__ import annotations

import pytest

from utils.atomic import atomic_open, atomic_target, remove_stale_temporaries


def test_atomic_open_replaces_on_success(tmp_path):
    path = tmp_path / "a" / "file.txt"
    with atomic_open(path, "w") as handle:
        handle.write("new")
        assert not path.exists()  # nothing visible before the block ends
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_failure_keeps_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_target(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_remove_stale_temporaries_only_removes_interrupted_writes(tmp_path):
    (tmp_path / "001").mkdir()
    stale = [tmp_path / ".training_state.pth.abc123.tmp", tmp_path / "001" / ".backbone.pth.x.tmp"]
    kept = [tmp_path / "training_state.pth", tmp_path / "notes.tmp", tmp_path / "001" / "backbone.pth"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert remove_stale_temporaries(tmp_path) == []
