"""The applier: runs the planner's transactions on our two tables and keeps their state.

One libnftables context, opened on first use. A plan's state is kept only once its
transaction commits, so a refused transaction leaves the state as the tables are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastcompute.network.nft import plan
from fastcompute.network.nft.libnft import Nft, NftError
from fastcompute.network.nft.plan import Listing, SyncPlan, TableState
from fastcompute.network.nft.render import Renderer
from fastcompute.network.ports import Plugged


class Tables:
    """The tables named ``owner`` (families bridge and inet), changed one transaction at a time."""

    def __init__(self, owner: str, zones_from: int, metadata: tuple[str, int] | None = None) -> None:
        self.owner = owner
        self.zones_from = zones_from
        self.render = Renderer(owner, metadata)
        self.state = TableState()
        self._nft: Nft | None = None

    @property
    def ready(self) -> bool:
        """True when the tables were read or written since start-up (the state is theirs)."""
        return self.state.base_ready

    def zones(self) -> dict[str, int]:
        """Bridge -> its conntrack zone, as the tables give them."""
        return dict(self.state.zones)

    def bridge_used(self, bridge: str) -> bool:
        """True when a port the tables were last told about is on ``bridge``."""
        return self.state.bridge_refs[bridge] > 0

    @property
    def nft(self) -> Nft:
        """The libnftables context."""
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    def transact(self, cmds: list[dict[str, Any]]) -> None:
        """Run commands as one transaction (nothing when there are none)."""
        if cmds:
            self.nft.json({"nftables": cmds})

    def change(self, adds: Sequence[Plugged], removes: Sequence[Plugged]) -> None:
        """Ports join and leave, in one transaction; the tables must be :attr:`ready`."""
        cmds, after = plan.plan_change(self.render, self.state, adds, removes, self.zones_from)
        self.transact(cmds)
        self.state = after

    def sync(self, ports: Sequence[Plugged], *, prune: bool = False, forget: Sequence[Plugged] = ()) -> SyncPlan:
        """Bring the tables to what ``ports`` need, from a listing, in one transaction
        (see :func:`plan.plan_sync`); returns the plan that committed."""
        planned = plan.plan_sync(
            self.render, self.read(), self.state, ports, zones_from=self.zones_from, prune=prune, forget=forget
        )
        self.transact(planned.cmds)
        self.state = planned.state
        return planned

    def read(self) -> Listing:
        """List both tables (a missing one lists as empty)."""
        listing: list[dict[str, Any]] = []
        for family in ("bridge", "inet"):
            cmd = {"list": {"table": {"family": family, "name": self.owner}}}
            try:
                out = self.nft.json({"nftables": [cmd]})
            except NftError as exc:
                if "No such file or directory" in exc.message:
                    continue
                raise
            listing += out.get("nftables", [])
        return plan.parse_listing(listing, self.render.base_tag, self.render.base_chains)

    def drop(self) -> bool:
        """Delete both tables; True when there was one to delete."""
        listing = self.nft.json({"nftables": [{"list": {"tables": {}}}]}).get("nftables", [])
        mine = [e["table"] for e in listing if "table" in e and e["table"].get("name") == self.owner]
        self.transact([{"delete": {"table": {"family": t["family"], "name": t["name"]}}} for t in mine])
        self.state = TableState()
        return bool(mine)

    def close(self) -> None:
        """Free the libnftables context (a later call opens another)."""
        if self._nft is not None:
            self._nft.close()
            self._nft = None
