"""Guest counters from libvirt's ``getAllDomainStats``, as :class:`DomainStats`."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import libvirt

from fastcompute.hypervisor.spec import DomainStats


def domain_stats_flags() -> tuple[int, int]:
    """``(stats, flags)`` for ``conn.getAllDomainStats``: what :func:`from_domain_stats` reads."""
    stats = (
        libvirt.VIR_DOMAIN_STATS_STATE
        | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
        | libvirt.VIR_DOMAIN_STATS_BALLOON
        | libvirt.VIR_DOMAIN_STATS_BLOCK
        | libvirt.VIR_DOMAIN_STATS_INTERFACE
    )
    return stats, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE


def _sum(record: Mapping[str, Any], kind: str, suffix: str) -> int | None:
    count = record.get(f"{kind}.count")
    if count is None:
        return None
    return sum(int(record.get(f"{kind}.{i}.{suffix}", 0)) for i in range(int(count)))


def from_domain_stats(
    raw: Iterable[tuple[Any, Mapping[str, Any]]],
    uuids: Mapping[str, str],
    at: float | None = None,
) -> dict[str, DomainStats]:
    """Stats from what libvirt-python's ``conn.getAllDomainStats(...)`` returned.

    ``raw`` is its list of ``(virDomain, {stat: value})``; ``uuids`` maps domain UUIDs to the
    keys to report them under (domains not in it are skipped). Memory is the QEMU process's
    resident size (``balloon.rss``) when known, else the balloon size; block and interface
    counters are summed over devices.
    """
    at = time.monotonic() if at is None else at
    out: dict[str, DomainStats] = {}
    for dom, rec in raw:
        key = uuids.get(dom.UUIDString())
        if key is None:
            continue
        kib = rec.get("balloon.rss", rec.get("balloon.current"))
        out[key] = DomainStats(
            at=at,
            cpu_ns=rec.get("cpu.time"),
            user_ns=rec.get("cpu.user"),
            system_ns=rec.get("cpu.system"),
            memory_bytes=None if kib is None else int(kib) * 1024,
            read_bytes=_sum(rec, "block", "rd.bytes"),
            write_bytes=_sum(rec, "block", "wr.bytes"),
            read_ops=_sum(rec, "block", "rd.reqs"),
            write_ops=_sum(rec, "block", "wr.reqs"),
            net_rx_bytes=_sum(rec, "net", "rx.bytes"),
            net_tx_bytes=_sum(rec, "net", "tx.bytes"),
        )
    return out


def read(conn: Any, domains: Mapping[str, str]) -> dict[str, DomainStats]:
    """One ``getAllDomainStats`` call on ``conn`` for the active domains in ``domains``."""
    return from_domain_stats(conn.getAllDomainStats(*domain_stats_flags()), domains)
