"""pipeline/files.py: outputs are replaced whole or not at all."""
import pytest

from pipeline.files import atomic_dir, atomic_path


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) != "0o600"


def test_atomic_dir_replaces_whole_directories(tmp_path):
    target = tmp_path / "repo"
    (target / "stale").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["stale"] and [p.name for p in tmp_path.iterdir()] == ["repo"]
    with atomic_dir(target) as tmp:
        (tmp / "fresh").write_text("x")
    assert [p.name for p in target.iterdir()] == ["fresh"] and [p.name for p in tmp_path.iterdir()] == ["repo"]
