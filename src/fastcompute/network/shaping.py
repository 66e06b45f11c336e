"""A port's bandwidth limits (a flavor's ``quota:vif_*``) and the tap's traffic control that
applies its inbound half.

The limits are Nova's: averages and peaks in KiB/s, bursts in KiB, "inbound" and "outbound"
as the guest sees them. What the guest receives leaves the host through its tap, so the
inbound limit is an htb qdisc at the root of the tap with one class, which everything goes
to: rate the average, ceiling the peak, bucket the burst (htb alone: no sfq under it and no
police action, which kernels like this project's machine lack). What the guest sends enters
the bridge from its tap, so the outbound limit is a token bucket in the agent's bridge table
(``nft/``: a named limit per port, found through a map keyed by the tap); a token bucket has
no peak, so ``vif_outbound_peak`` is accepted and not applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

KIB: Final = 1024
_ROOT: Final = 0x10000  # handle 1:, the htb qdisc
_CLASS: Final = 0x10001  # classid 1:1, its one class


@dataclass(frozen=True)
class Shaping:
    """A port's bandwidth limits: averages and peaks in KiB/s, bursts in KiB (None: unset)."""

    inbound_average: int | None = None
    inbound_peak: int | None = None
    inbound_burst: int | None = None
    outbound_average: int | None = None
    outbound_peak: int | None = None  # a token bucket has none: not applied
    outbound_burst: int | None = None

    def __bool__(self) -> bool:
        return self.inbound_average is not None or self.outbound_average is not None

    def outbound(self) -> tuple[int, int] | None:
        """The outbound token bucket, (rate in bytes/s, burst in bytes); None when unlimited.
        Without a burst the bucket holds one second's worth (libvirt's default)."""
        if self.outbound_average is None:
            return None
        return self.outbound_average * KIB, (self.outbound_burst or self.outbound_average) * KIB

    def inbound_class(self) -> dict[str, int] | None:
        """The htb class's rate, ceiling (bytes/s) and burst (bytes); None when unlimited."""
        if self.inbound_average is None:
            return None
        rate = self.inbound_average * KIB
        params = {"rate": rate, "ceil": max(rate, (self.inbound_peak or 0) * KIB)}
        if self.inbound_burst is not None:
            params["burst"] = self.inbound_burst * KIB
        return params


def shape_tap(ipr: Any, index: int, shaping: Shaping | None, *, fresh: bool) -> None:
    """Give the tap ``index`` the inbound limit of ``shaping`` (or none).

    A ``fresh`` tap has no qdisc of ours and only gets one when limited. An existing one (a
    retried plug, reconciliation, a tap whose guest was just started) is brought to what
    ``shaping`` says: an htb of the same rate and ceiling stays, another one goes, and one is
    made where missing (libvirt puts a ``noqueue`` qdisc at the root of the taps of every
    guest it starts, in place of ours)."""
    want = shaping.inbound_class() if shaping is not None else None
    if not fresh:
        have = _htb_of(ipr, index)
        if have is not None and want is not None and have == (want["rate"], want["ceil"]):
            return
        if have is not None:
            ipr.tc("del", "htb", index=index, handle=_ROOT)
    if want is not None:
        ipr.tc("replace", "htb", index=index, handle=_ROOT, default=1)
        ipr.tc("add-class", "htb", index=index, handle=_CLASS, parent=_ROOT, **want)


def _htb_of(ipr: Any, index: int) -> tuple[int, int] | None:
    """(rate, ceiling) of our htb class at the tap's root; (0, 0) for an htb root of another
    make; None when the root is no htb."""
    if not any(q.get_attr("TCA_KIND") == "htb" and q["handle"] == _ROOT for q in ipr.get_qdiscs(index=index)):
        return None
    for c in ipr.get_classes(index=index):
        if c["handle"] == _CLASS:
            params = c.get_nested("TCA_OPTIONS", "TCA_HTB_PARMS") or {}
            return params.get("rate", 0), params.get("ceil", 0)
    return 0, 0
