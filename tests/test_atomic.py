"""llamba.atomic: the one writer every saved file goes through."""

import os

import pytest

from llamba.atomic import atomic_dir, atomic_write, clean_stale, recover_dir, replace_dir


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    f = tmp_path / "a" / "x.json"
    atomic_write(f, "one")
    atomic_write(f, b"two")
    assert f.read_text() == "two" and oct(f.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in f.parent.iterdir()) == ["x.json"]


def test_atomic_dir_replace_keep_merge_and_failure(tmp_path):
    dest = tmp_path / "ckpt"
    with atomic_dir(dest) as tmp:
        (tmp / "config.json").write_text("1")
    with atomic_dir(dest) as tmp:  # replace: the old content goes as a whole
        (tmp / "weights").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["weights"]
    with atomic_dir(dest, mode="keep") as tmp:  # keep: dest appeared meanwhile, it wins
        (tmp / "other").write_text("3")
    assert sorted(p.name for p in dest.iterdir()) == ["weights"]
    order = []
    real = os.replace

    def spy(a, b):
        order.append(os.path.basename(b))
        real(a, b)

    os.replace = spy
    try:
        with atomic_dir(dest, mode="merge", last="config.json") as tmp:
            for name in ("config.json", "model.safetensors", "tokenizer.json"):
                (tmp / name).write_text(name)
    finally:
        os.replace = real
    assert order[-1] == "config.json" and sorted(order) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    before = {p.name: p.read_text() for p in dest.iterdir()}
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert {p.name: p.read_text() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_recover_dir_and_clean_stale(tmp_path):
    dest, new = tmp_path / "resume", tmp_path / "resume.tmp"
    dest.mkdir()
    new.mkdir()
    (new / "f").write_text("new")
    replace_dir(new, dest)
    assert (dest / "f").read_text() == "new" and not new.exists()
    dest.rename(tmp_path / "resume.old")  # a kill between the two renames
    assert recover_dir(dest) and (dest / "f").read_text() == "new"
    assert not recover_dir(dest)
    (tmp_path / ".save-abc").mkdir()
    (tmp_path / ".spec.json.123.tmp").write_text("{")
    removed = clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == [".save-abc", ".spec.json.123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume"]
