"""A real OpenStack Image service (Glance) on loopback, once per test session.

Glance runs from its own cached venv (scripts/glance-venv.sh) as its WSGI app under gunicorn
with one sync worker, SQLite and the filesystem store. There is no Keystone: the paste
pipeline is Glance's keystone one without the token middleware, so the real default policies
apply to the identity headers the clients send (``X-Identity-Status: Confirmed``,
``X-Project-Id``, ``X-User-Id``, ``X-Roles``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent

_CONF = """\
[DEFAULT]
enabled_backends = fs:file
worker_self_reference_url = {endpoint}
use_stderr = true
log_file =
debug = false
image_size_cap = 1073741824
enabled_import_methods = []

[database]
connection = sqlite:///{state}/glance.sqlite

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = {state}/images

[os_glance_staging_store]
filesystem_store_datadir = {state}/staging

[os_glance_tasks_store]
filesystem_store_datadir = {state}/tasks

[paste_deploy]
flavor = fastcompute
config_file = {conf_dir}/glance-api-paste.ini

[oslo_policy]
enforce_scope = true
enforce_new_defaults = true
"""

_PASTE = """\
[composite:glance-api-fastcompute]
paste.composite_factory = glance.api:root_app_factory
/: api
/healthcheck: healthcheck

[composite:api]
paste.composite_factory = glance.api:pipeline_factory
fastcompute = http_proxy_to_wsgi versionnegotiation context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[app:healthcheck]
paste.app_factory = oslo_middleware:Healthcheck.app_factory
backends = disable_by_file
disable_by_file_path = {state}/healthcheck_disable

[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory
"""


def identity(project: str, roles: str = "member,reader") -> dict[str, str]:
    """The headers Keystone's middleware would have set for a user of ``project``."""
    return {
        "X-Identity-Status": "Confirmed",
        "X-Project-Id": project,
        "X-User-Id": f"user-of-{project}",
        "X-Roles": roles,
    }


@dataclass
class Glance:
    """A running Glance and helpers to put images in it."""

    endpoint: str
    state: Path
    pid: int = 0
    """Glance's process (a test stops it with SIGSTOP to hold a request where it is)."""

    def upload(
        self,
        data: bytes,
        *,
        project: str,
        disk_format: str = "raw",
        visibility: str = "private",
        name: str = "test-image",
    ) -> dict[str, Any]:
        """Create an image as ``project`` (admin, so it may be public) and upload ``data``."""
        headers = identity(project, "admin,member,reader")
        with httpx.Client(base_url=self.endpoint, timeout=60) as c:
            r = c.post(
                "/v2/images",
                headers=headers,
                json={
                    "name": name, "disk_format": disk_format, "container_format": "bare",
                    "visibility": visibility,
                },
            )
            assert r.status_code == 201, r.text
            image = r.json()
            r = c.put(
                f"/v2/images/{image['id']}/file",
                headers={**headers, "Content-Type": "application/octet-stream"},
                content=data,
            )
            if r.status_code != 204:
                raise UploadRefused(r.status_code, r.text)
            r = c.get(f"/v2/images/{image['id']}", headers=headers)
            assert r.status_code == 200, r.text
            return dict(r.json())

    def stored_file(self, image_id: str) -> Path:
        """Where the filesystem store keeps an image's bytes (to tamper with them)."""
        return self.state / "images" / image_id


class UploadRefused(Exception):
    """Glance refused the image data (e.g. its own format inspection failed)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text[:300]}")
        self.status = status


@pytest.fixture(scope="session")
def glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Glance]:
    """Install (cached), configure and start Glance; stop it at the end of the session."""
    install = subprocess.run(
        ["bash", str(ROOT / "scripts" / "glance-venv.sh")], capture_output=True, text=True
    )
    if install.returncode != 0:
        pytest.fail(f"installing Glance failed:\n{install.stderr[-3000:]}")
    venv = Path(install.stdout.strip().splitlines()[-1])
    base = tmp_path_factory.mktemp("glance")
    conf_dir, state = base / "etc", base / "state"
    conf_dir.mkdir()
    for sub in ("images", "staging", "tasks"):
        (state / sub).mkdir(parents=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    (conf_dir / "glance-api.conf").write_text(
        _CONF.format(endpoint=endpoint, state=state, conf_dir=conf_dir)
    )
    (conf_dir / "glance-api-paste.ini").write_text(_PASTE.format(state=state))
    env = {**os.environ, "OS_GLANCE_CONFIG_DIR": str(conf_dir)}

    # The schema takes ~10 s to create: do it once per venv and copy the database after.
    synced = venv / ".fastcompute-glance.sqlite"
    if not synced.exists():
        sync = subprocess.run(
            [str(venv / "bin" / "glance-manage"), "--config-dir", str(conf_dir), "db", "sync"],
            env=env, capture_output=True, text=True,
        )
        if sync.returncode != 0:
            pytest.fail(f"glance-manage db sync failed:\n{sync.stderr[-3000:]}")
        shutil.copyfile(state / "glance.sqlite", synced.with_suffix(".tmp"))
        os.replace(synced.with_suffix(".tmp"), synced)
    else:
        shutil.copyfile(synced, state / "glance.sqlite")

    log = (base / "glance.log").open("wb")
    proc = subprocess.Popen(
        [str(venv / "bin" / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "1",
         "--worker-class", "sync", "--timeout", "120", "glance.wsgi.api:application"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=base,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Glance exited:\n{(base / 'glance.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{endpoint}/versions", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Glance did not start:\n{(base / 'glance.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield Glance(endpoint=endpoint, state=state, pid=proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
