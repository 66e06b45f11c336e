"""Who may do what: CURVE client keys mapped to roles on projects.

A client is identified by its CURVE public key (Z85). ``[[security.clients]]`` grants a key a
role (``admin``, ``member``, ``reader``) on projects (``"*"`` = every project); the keys of
``client_public_keys`` and ``client_public_keys_dir`` are admin, as before tenants existed.
Without CURVE the agent binds only loopback or ipc://, and every client is admin.

- ``admin``: every op, every project, the event socket.
- ``member``: the instance ops (spawn, lifecycle, ports, delete, reads) in its projects.
- ``reader``: the instance reads (get, list, console, stats) in its projects.
- ``peer``: the key of another agent of ``[[migration.peers]]``: the ``migration.*`` ops and
  nothing else, and only in its own name (``args.peer`` must be its host). No other key, an
  admin's included, may call them: they act on moves in flight, which only agents drive.
  Without CURVE the agent cannot tell callers apart: the allow-list is then by endpoint only
  (an agent calls, and pulls disks from, only the endpoints it lists; a ``migration.*`` call
  naming an unlisted host is refused), and anyone who reaches the loopback or ipc:// socket
  may call them, as they may call every other op.
- A key with a role on ``"*"`` may also read the host (``host.info``, ``images.list``, stats
  of every instance) and subscribe to events; ``host.set_enabled`` and ``images.prune`` are
  admin only.

An instance of a project the key has no role on is ``NOT_FOUND`` to it, as if it were not
there (its existence is not revealed); a role too weak for the op, a spawn into a project
not granted, or a host op is ``FORBIDDEN``. ``instance.list`` and ``instance.stats`` without
a uuid return only what the key may read. ZeroMQ's PUB socket cannot filter per subscriber,
so the event socket admits only keys that may read every project.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.auth

from fastcompute import protocol
from fastcompute.config import SecurityConfig
from fastcompute.errors import Forbidden, NotFound

ALL_PROJECTS = "*"
ProjectOf = Callable[[str], "str | None"]


class Role(enum.IntEnum):
    """What a key may do in a project; a higher role includes the lower ones."""

    READER = 1
    MEMBER = 2
    ADMIN = 3


@dataclass(frozen=True)
class Grant:
    """The roles of one client: per project, ``"*"`` standing for every project."""

    admin: bool = False
    projects: Mapping[str, Role] = field(default_factory=dict)
    peer: str | None = None
    """The host of the peer agent this key is (then it has no other grant)."""

    def role_on(self, project: str) -> Role | None:
        """The client's role in ``project`` (None: it may not even see it)."""
        if self.admin:
            return Role.ADMIN
        mine, every = self.projects.get(project), self.projects.get(ALL_PROJECTS)
        if mine is None or (every is not None and every > mine):
            return every
        return mine

    @property
    def reads_everything(self) -> bool:
        """Whether the client may see every project (host reads, events)."""
        return self.admin or ALL_PROJECTS in self.projects


ADMIN = Grant(admin=True)
NOBODY = Grant()

def _z85_key(text: str) -> str:
    """A grant's key: a Z85 public key as is, or read from a ``*.key`` file."""
    if len(text) == 40 and not Path(text).exists():
        return text
    public, _ = zmq.auth.load_certificate(text)
    return public.decode()


class Policy:
    """Authorizes each request of a client, and filters what it may read."""

    def __init__(self, grants: Mapping[str, Grant], curve: bool) -> None:
        self.grants = dict(grants)
        self.curve = curve

    @classmethod
    def from_config(cls, sec: SecurityConfig, admin_keys: set[bytes],
                    peers: Mapping[str, str] | None = None) -> Policy:
        """The policy of ``[security]``; ``admin_keys`` are the keys of the plain allow-list,
        ``peers`` the peer agents' keys (as ``[[migration.peers]]`` writes them) to their hosts."""
        roles: dict[str, dict[str, Role]] = {}
        admins = {k.decode() for k in admin_keys}
        for c in sec.clients:
            key = _z85_key(c.key)
            role = Role[c.role.upper()]
            if role is Role.ADMIN:
                admins.add(key)
                continue
            if not c.projects:
                raise ValueError(f"[[security.clients]] {c.key}: a {c.role} needs projects (\"*\" = every project)")
            mine = roles.setdefault(key, {})
            for p in c.projects:
                mine[p] = max(mine.get(p, role), role)
        grants: dict[str, Grant] = {k: Grant(projects=v) for k, v in roles.items()}
        grants.update({k: ADMIN for k in admins})
        # A peer's key is a peer's only: an agent's key must not also act as a tenant or admin.
        grants.update({_z85_key(k): Grant(peer=host) for k, host in (peers or {}).items() if k})
        return cls(grants, curve=bool(sec.server_secret_key_file))

    @property
    def keys(self) -> set[bytes]:
        """Every client key admitted on the control socket."""
        return {k.encode() for k in self.grants}

    def grant(self, client: bytes) -> Grant:
        """The grant of a client identity (its Z85 key under CURVE; anyone is admin without)."""
        if not self.curve:
            return ADMIN
        return self.grants.get(client.decode(errors="replace"), NOBODY)

    def may_subscribe(self, key: str) -> bool:
        """Whether a key may connect to the event socket (it would see every project's events)."""
        g = self.grants.get(key)
        return g is not None and g.reads_everything

    def authorize(self, grant: Grant, op: str, args: Any, project_of: ProjectOf) -> None:
        """Raise FORBIDDEN (or NOT_FOUND, for an instance the client may not see) unless
        ``grant`` allows ``op`` with ``args``."""
        kind = protocol.OPS[op].access
        if kind == "peer":
            if not self.curve:
                return  # by endpoint only: the handler refuses a host it does not list
            if grant.peer is None:
                raise Forbidden(f"{op} is for peer agents only ([[migration.peers]])")
            if args.peer != grant.peer:
                raise Forbidden(f"this key is peer {grant.peer!r}'s, not {args.peer!r}'s",
                                {"peer": args.peer})
            return
        if grant.peer is not None:
            raise Forbidden(f"a peer agent's key may call only migration.* ops, not {op}")
        if grant.admin:
            return
        if kind == "open":
            return
        if kind == "host-read":
            if not grant.reads_everything:
                raise Forbidden(f"{op} needs a key with a role on every project")
            return
        if kind == "host-write":
            raise Forbidden(f"{op} needs an admin key")
        if kind == "spawn":
            role = grant.role_on(args.project_id)
            if role is None or role < Role.MEMBER:
                raise Forbidden(f"this key may not create instances in project {args.project_id!r}",
                                {"project_id": args.project_id})
            return
        if kind == "list":
            if args.project_id is not None and grant.role_on(args.project_id) is None:
                raise Forbidden(f"this key may not read project {args.project_id!r}",
                                {"project_id": args.project_id})
            return
        if kind == "stats" and args.uuid is None:
            return
        shelved = getattr(args, "shelved", None)
        if shelved is not None:
            # An unshelve that brings an instance from another agent creates it here: a spawn's rule.
            role = grant.role_on(shelved.record.project_id)
            if role is None or role < Role.MEMBER:
                raise Forbidden(f"this key may not create instances in project {shelved.record.project_id!r}",
                                {"project_id": shelved.record.project_id})
        uuid = protocol.normalise_uuid(args.uuid)
        project = project_of(uuid)
        if project is None:
            return  # the handler answers NOT_FOUND, as to anyone
        role = grant.role_on(project)
        if role is None:
            raise NotFound(f"no instance {uuid} on this host", {"uuid": uuid})
        if kind == "write" and role < Role.MEMBER:
            raise Forbidden(f"{op} needs the member role in project {project!r}; this key is a reader",
                            {"project_id": project})

    def visible(self, grant: Grant, op: str, result: Any, project_of: ProjectOf) -> Any:
        """``result`` without what ``grant`` may not read (``instance.list``, ``instance.stats``)."""
        if grant.reads_everything:
            return result
        kind = protocol.OPS[op].access
        if kind == "list":
            return [r for r in result if grant.role_on(r.project_id) is not None]
        if kind == "stats" and isinstance(result, dict):
            return {u: r for u, r in result.items()
                    if (p := project_of(u)) is not None and grant.role_on(p) is not None}
        return result
