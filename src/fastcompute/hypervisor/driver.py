"""What the manager needs of a hypervisor, independent of libvirt."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec


class DomainInfo(msgspec.Struct, frozen=True):
    """A domain as the hypervisor sees it."""

    uuid: str
    power_state: str
    ours: bool
    has_managed_save: bool = False


class PowerEvent(msgspec.Struct, frozen=True):
    """A change of a domain's power state reported by the hypervisor."""

    uuid: str
    power_state: str


class Driver(Protocol):
    """The operations the manager drives; every method may raise HypervisorError."""

    uri: str

    @property
    def connection(self) -> Any: ...

    async def connect(self, on_power_event: Callable[[PowerEvent], None]) -> None: ...
    async def close(self) -> None: ...
    async def host_facts(self) -> tuple[str, list[Any], dict[str, Any]]: ...
    async def launch(self, xml: str, start: bool) -> str: ...
    async def power_on(self, uuid: str) -> str: ...
    async def power_off(self, uuid: str, timeout_s: float) -> str: ...
    async def pause(self, uuid: str) -> str: ...
    async def unpause(self, uuid: str) -> str: ...
    async def suspend(self, uuid: str) -> str: ...
    async def reboot(self, uuid: str, hard: bool) -> str: ...
    async def destroy(self, uuid: str) -> None: ...
    async def info(self, uuid: str) -> DomainInfo | None: ...
    async def list_domains(self) -> list[DomainInfo]: ...
