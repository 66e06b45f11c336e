"""Block storage on loopback for the volume tests: an iSCSI target (``tgtd``, Debian's tgt)
exporting a file as a LUN with CHAP, an NBD export (``qemu-storage-daemon``), and a listener
that accepts and never answers (a target that hangs). Each is started by its fixture and torn
down at the end, whatever the test did. QEMU reaches them itself (no host iSCSI session, no
host NBD device: this kernel has neither).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import free_port

CHAP_USER = "fcuser"
CHAP_PASSWORD = "Chap-Secret-4b1e9"


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, address: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
            return
        time.sleep(0.05)
    pytest.fail(f"{what} did not listen on {address}:{port}")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a daemon told to stop; killed when it has not within 10 s."""
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class IscsiTarget:
    """``tgtd`` on ``address``:``port`` with its own control port; LUNs added with :meth:`lun`,
    open to the initiators at ``initiators`` (an address, or ``ALL``)."""

    def __init__(self, workdir: Path, address: str = "127.0.0.1", initiators: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.address, self.initiators = address, initiators
        self.port = free_port()
        # tgtd's management socket is /var/run/tgtd/socket.<N>: one of our own.
        self.control = str(random.randrange(1000, 30000))  # tgtd takes up to 32767
        self.log = (workdir / "tgtd.log").open("ab")
        self.proc = subprocess.Popen(["tgtd", "-f", "-C", self.control, "--iscsi", f"portal={address}:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, "tgtd", address)
        self.tids = 0

    def adm(self, *args: str) -> str:
        """One ``tgtadm`` command on this daemon."""
        return subprocess.run(["tgtadm", "-C", self.control, "--lld", "iscsi", *args],
                              capture_output=True, text=True, check=True).stdout

    def lun(self, name: str, backing: Path, chap: bool = True) -> dict[str, Any]:
        """A new target exporting ``backing`` as LUN 1 (with CHAP); Cinder's connection info of it."""
        self.tids += 1
        tid, iqn = str(self.tids), f"iqn.2026-12.org.fastcompute:{name}"
        self.adm("--op", "new", "--mode", "target", "--tid", tid, "-T", iqn)
        self.adm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", "1", "-b", str(backing))
        self.adm("--op", "bind", "--mode", "target", "--tid", tid, "-I", self.initiators)
        data: dict[str, Any] = {"target_portal": f"{self.address}:{self.port}", "target_iqn": iqn, "target_lun": 1}
        if chap:
            if self.tids == 1:
                self.adm("--op", "new", "--mode", "account", "--user", CHAP_USER, "--password", CHAP_PASSWORD)
            self.adm("--op", "bind", "--mode", "account", "--tid", tid, "--user", CHAP_USER)
            data.update(auth_method="CHAP", auth_username=CHAP_USER, auth_password=CHAP_PASSWORD)
        return {"driver_volume_type": "iscsi", "data": data}

    def stop(self) -> None:
        """tgtd ignores SIGTERM: its targets are deleted, then the daemon is told to exit."""
        for tid in range(1, self.tids + 1):
            with contextlib.suppress(subprocess.CalledProcessError):
                self.adm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force")
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["tgtadm", "-C", self.control, "--op", "delete", "--mode", "system"], check=True,
                           capture_output=True)
        _reap(self.proc)
        for leftover in (f"socket.{self.control}", f"socket.{self.control}.lock"):
            Path("/var/run/tgtd", leftover).unlink(missing_ok=True)
        self.log.close()


class NbdExport:
    """``qemu-storage-daemon`` exporting a raw file over NBD on ``host``:``port`` as ``name``."""

    def __init__(self, workdir: Path, backing: Path, name: str = "vol", host: str = "127.0.0.1") -> None:
        self.port, self.name, self.host = free_port(), name, host
        self.log = (workdir / f"qsd-{name}.log").open("ab")
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f0,filename={backing}",
            "--nbd-server", f"addr.type=inet,addr.host={host},addr.port={self.port}",
            "--export", f"type=nbd,id=e0,node-name=f0,name={name},writable=on",
        ], stdout=self.log, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, "qemu-storage-daemon", host)

    def connection_info(self) -> dict[str, Any]:
        """Cinder's shape of this export."""
        return {"driver_volume_type": "nbd", "data": {"host": self.host, "port": self.port, "export_name": self.name}}

    def stop(self) -> None:
        """Stop the daemon."""
        self.proc.terminate()
        _reap(self.proc)
        self.log.close()


class SilentTarget:
    """A TCP listener on 127.0.0.1 that accepts connections and never says a word: a storage
    target that hangs whoever connects, until :meth:`stop` closes everything."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = self.sock.accept()
                self.held.append(c)
                self.accepted.set()

    def stop(self) -> None:
        """Close the listener and every connection it holds."""
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def iscsi(tmp_path: Path) -> Iterator[IscsiTarget]:
    """An iSCSI target on loopback (skips without tgtd)."""
    if shutil.which("tgtd") is None:
        pytest.skip("tgtd is not installed (Debian package tgt)")
    t = IscsiTarget(tmp_path)
    yield t
    t.stop()


@pytest.fixture
def nbd_exports(tmp_path: Path) -> Iterator[list[NbdExport]]:
    """A list the test appends its NBD exports to; each stopped at the end."""
    exports: list[NbdExport] = []
    yield exports
    for e in exports:
        e.stop()


def raw_file(path: Path, size: int) -> Path:
    """A sparse raw file of ``size`` bytes."""
    with path.open("wb") as f:
        f.truncate(size)
    return path
