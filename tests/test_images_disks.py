"""The disk model: each role's file in the instance directory, making a disk from a base,
and removing every disk file an instance has."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastcompute.images import disks


def test_every_role_with_a_file_has_its_own_file() -> None:
    files = [r.file for r in disks.ROLES.values() if r.file is not None]
    assert len(files) == len(set(files))
    assert disks.path(Path("/i"), "root") == Path("/i/disk")
    with pytest.raises(ValueError):
        disks.path(Path("/i"), "volume")


@pytest.mark.parametrize("mode", ["cow", "flat"])
def test_a_disk_made_from_a_base_and_every_disk_file_removed(tmp_path: Path, mode: str) -> None:
    base = tmp_path / "base"
    base.write_bytes(b"\x01" * 4096)
    idir = tmp_path / "instances" / "u"
    idir.mkdir(parents=True)
    root = disks.path(idir, "root")
    disks.make_from_base(root, 1 << 20, base, mode)
    data = root.read_bytes()
    if mode == "cow":
        assert data[:4] == b"QFI\xfb" and str(base).encode() in data  # an overlay on the base
    else:
        assert len(data) == 1 << 20 and data[:4096] == b"\x01" * 4096  # a copy, grown to size
    assert not (idir / ".disk.tmp").exists()
    for role in ("ephemeral", "swap", "config", "rescue"):
        disks.path(idir, role).write_bytes(b"")
    (idir / disks.INFO).write_bytes(b"{}")
    disks.remove_files(idir)
    assert not idir.exists()


def test_removal_keeps_a_directory_with_other_files(tmp_path: Path) -> None:
    disks.path(tmp_path, "root").write_bytes(b"")
    (tmp_path / "console.log").write_bytes(b"boot")
    disks.remove_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log"]
