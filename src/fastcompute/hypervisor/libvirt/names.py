"""How libvirt names an instance's domain, and where it keeps the pid of a QEMU domain."""

from __future__ import annotations

from pathlib import Path

from fastcompute.errors import NotFound


def domain_name(uuid: str) -> str:
    """libvirt's name of an instance's domain."""
    return "fc-" + uuid


def qemu_pid(domain: str, run_dir: str = "/run/libvirt/qemu") -> int:
    """The pid of a running libvirt QEMU domain, from the pid file libvirt writes for it."""
    try:
        return int(Path(run_dir, f"{domain}.pid").read_text().strip())
    except (OSError, ValueError) as exc:
        raise NotFound(f"no QEMU pid for domain {domain}") from exc
