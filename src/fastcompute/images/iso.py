"""ISO 9660 images (with Joliet and Rock Ridge) written in-process: config drives.

pycdlib writes the image from memory, where Nova writes the tree to a temporary directory
and runs ``genisoimage`` on it (a file per document and a process per instance). Readers see
the Rock Ridge names (Linux, isoinfo -R) or the Joliet ones (Windows); the plain ISO 9660
names, in upper case and with ``_`` for other characters, are for readers of neither.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path

import pycdlib

_NOT_DCHAR = re.compile(r"[^A-Z0-9_]")


def _iso_name(part: str, is_file: bool) -> str:
    """A path component as an interchange level 3 identifier (d-characters, 30 at most)."""
    if not is_file:
        return _NOT_DCHAR.sub("_", part.upper())[:30]
    stem, _, ext = part.rpartition(".") if "." in part else (part, "", "")
    stem, ext = _NOT_DCHAR.sub("_", stem.upper()), _NOT_DCHAR.sub("_", ext.upper())
    return f"{stem[:29 - len(ext)]}.{ext};1"


def image(files: Mapping[str, bytes], label: str, publisher: str = "fastcompute") -> bytes:
    """The ISO image of ``files`` (relative paths with ``/``, directories made as needed),
    labelled ``label``."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label, pub_ident_str=publisher)
    made: dict[str, str] = {"": ""}
    try:
        for path, data in files.items():
            parts = path.split("/")
            for i in range(1, len(parts)):
                rel = "/".join(parts[:i])
                if rel not in made:
                    made[rel] = made["/".join(parts[:i - 1])] + "/" + _iso_name(parts[i - 1], False)
                    iso.add_directory(made[rel], rr_name=parts[i - 1], joliet_path="/" + rel)
            parent = made["/".join(parts[:-1])]
            iso.add_fp(io.BytesIO(data), len(data), parent + "/" + _iso_name(parts[-1], True),
                       rr_name=parts[-1], joliet_path="/" + path)
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def write(path: Path, files: Mapping[str, bytes], label: str) -> None:
    """Write the image of ``files`` to ``path``, readable by its owner only (a config drive
    holds the tenant's user data and password), replacing it whole or not at all."""
    data = image(files, label)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
