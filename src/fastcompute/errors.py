"""The typed errors of the agent; each carries the wire error code the client sees.

Every module raises these (never bare exceptions for expected failures); the server turns
them into ``{ok: false, error: {code, message, details}}`` replies. Anything else that
escapes is a bug and becomes ``INTERNAL``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AgentError(Exception):
    """Base of the errors that map to a wire error code."""

    code: ClassVar[str] = "INTERNAL"

    # Free-form: each code has its own details (a field, a resource class, a uuid...).
    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(AgentError):
    """The request is malformed: a field missing, of the wrong type, out of range or unknown."""

    code = "BAD_REQUEST"


class UnknownOp(AgentError):
    """The op is not one the agent serves."""

    code = "UNKNOWN_OP"


class NotFound(AgentError):
    """The named object does not exist."""

    code = "NOT_FOUND"


class Conflict(AgentError):
    """The object's state does not allow the op, or an id is reused with other arguments."""

    code = "CONFLICT"


class NoCapacity(AgentError):
    """The host cannot fit the request (CPU, memory, disk, NUMA, pinning, hugepages)."""

    code = "NO_CAPACITY"


class QuotaExceeded(AgentError):
    """The project's quota would be exceeded."""

    code = "QUOTA_EXCEEDED"


class ImageError(AgentError):
    """The image is unreachable, fails verification, or has an unsupported or unsafe format."""

    code = "IMAGE_ERROR"


class HypervisorError(AgentError):
    """libvirt or the hypervisor refused or failed."""

    code = "HYPERVISOR_ERROR"


class Busy(AgentError):
    """The agent is overloaded or shutting down: retry later."""

    code = "BUSY"


class Forbidden(AgentError):
    """The client's key may not do this op, or not in this project (CURVE tenants)."""

    code = "FORBIDDEN"
