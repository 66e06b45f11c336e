"""A real OpenStack Placement on loopback, once per test session, that tests may stop and start.

Placement runs from its own cached venv (scripts/placement-venv.sh) as its WSGI app under
gunicorn with one sync worker (SQLite gave "database is locked" errors with more), SQLite,
``noauth2`` (any ``X-Auth-Token`` is admin) and ``sync_on_startup`` (the schema is created by
the first start). Stopping and starting again keeps the same port and database, as an
operator's restart would.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"X-Auth-Token": "admin", "OpenStack-API-Version": "placement 1.39"}

_CONF = """\
[DEFAULT]
debug = false
use_stderr = true
log_file =

[api]
auth_strategy = noauth2

[placement_database]
connection = sqlite:///{state}/placement.sqlite
sync_on_startup = true
"""


class PlacementServer:
    """A Placement process: its endpoint, and stop/start for outage tests."""

    def __init__(self, venv: Path, base: Path) -> None:
        self.venv = venv
        self.base = base
        self.conf_dir = base / "etc"
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        state = base / "state"
        state.mkdir(exist_ok=True)
        (self.conf_dir / "placement.conf").write_text(_CONF.format(state=state))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "placement.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start gunicorn and wait until Placement answers its root document."""
        env = {**os.environ, "OS_PLACEMENT_CONFIG_DIR": str(self.conf_dir)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.venv / "bin" / "gunicorn"), "--bind", f"127.0.0.1:{self.port}",
                 "--workers", "1", "--worker-class", "sync", "--timeout", "120",
                 "placement.wsgi.api:application"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.base,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"Placement exited:\n{self.log()}")
            try:
                if httpx.get(self.url + "/", headers=HEADERS, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Placement did not start:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL); the port is refused until ``start``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        """The end of Placement's log."""
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def get(self, path: str) -> Any:
        """GET a Placement resource as admin; the decoded body (asserts 200)."""
        r = httpx.get(self.url + path, headers=HEADERS, timeout=30)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
        return r.json()

    def provider_view(self, name: str) -> dict[str, Any]:
        """What Placement holds for the provider ``name``: inventories, traits, usages and
        allocations (consumer -> resources), in the agent's terms."""
        rps = self.get(f"/resource_providers?name={name}")["resource_providers"]
        assert len(rps) == 1, rps
        uuid = rps[0]["uuid"]
        inv = self.get(f"/resource_providers/{uuid}/inventories")["inventories"]
        traits = self.get(f"/resource_providers/{uuid}/traits")["traits"]
        usages = self.get(f"/resource_providers/{uuid}/usages")["usages"]
        allocs = self.get(f"/resource_providers/{uuid}/allocations")["allocations"]
        return {
            "uuid": uuid,
            "inventory": inv,
            "traits": sorted(traits),
            "usage": {rc: n for rc, n in usages.items() if n},
            "allocations": {c: a["resources"] for c, a in allocs.items()},
        }


@pytest.fixture(scope="session")
def placement_venv() -> Path:
    """Install Placement into its cached venv (seconds when cached) and return the venv."""
    install = subprocess.run(
        ["bash", str(ROOT / "scripts" / "placement-venv.sh")], capture_output=True, text=True
    )
    if install.returncode != 0:
        pytest.fail(f"installing Placement failed:\n{install.stderr[-3000:]}")
    return Path(install.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def placement(placement_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlacementServer]:
    """One Placement for the session; a test that stops it must start it again."""
    server = PlacementServer(placement_venv, tmp_path_factory.mktemp("placement"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
