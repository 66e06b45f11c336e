"""libvirt secrets of volumes: the CHAP password of an iSCSI volume the agent keeps as a
secret of its own (private: libvirt never hands its value back), and the operator's Ceph
secrets, which it only checks for.

Each secret the agent defines carries a usage naming its instance (``fastcompute-<instance>-``),
so everything of an instance is found and removed with its domain, also after a crash.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from xml.sax.saxutils import escape

import libvirt

from fastcompute.errors import NotFound
from fastcompute.hypervisor.spec import DiskAuth

PREFIX = "fastcompute-"


def _xml(instance: str, auth: DiskAuth) -> str:
    usage = escape(f"{PREFIX}{instance}-{auth.secret_uuid}")
    inner = f"<target>{usage}</target>" if auth.secret_type == "iscsi" else f"<name>{usage}</name>"
    return (f"<secret ephemeral='no' private='yes'><uuid>{escape(auth.secret_uuid)}</uuid>"
            f"<usage type='{auth.secret_type}'>{inner}</usage></secret>")


def define(conn: Any, instance: str, auths: Iterable[DiskAuth]) -> list[Any]:
    """Define (or update) the secrets the agent keeps for an instance's disks and check that
    the operator's exist (NotFound naming the one missing); returns those defined."""
    made = []
    for auth in auths:
        if auth.value is None:
            try:
                conn.secretLookupByUUIDString(auth.secret_uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                    raise
                raise NotFound(f"libvirt has no secret {auth.secret_uuid} (the operator defines Ceph secrets)",
                               {"secret_uuid": auth.secret_uuid}) from None
            continue
        secret = conn.secretDefineXML(_xml(instance, auth))
        secret.setValue(auth.value.encode())
        made.append(secret)
    return made


def remove(conn: Any, auth: DiskAuth | None) -> None:
    """Remove the secret the agent kept for a disk (none to remove for an operator's)."""
    if auth is None or auth.value is None:
        return
    try:
        conn.secretLookupByUUIDString(auth.secret_uuid).undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
            raise


def remove_instance(conn: Any, instance: str) -> int:
    """Remove every secret the agent kept for an instance's volumes; how many."""
    mine = PREFIX + instance + "-"
    gone = 0
    for secret in conn.listAllSecrets():
        try:
            if (secret.usageID() or "").startswith(mine):
                secret.undefine()
                gone += 1
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                raise
    return gone
