"""Every op of the contract, declared once.

An ``Op`` says what the op is called, the struct its ``args`` decode into, whether its reply is
kept across restarts (mutating), the instance states it needs with the task it runs under and
the state it leads to (lifecycle ops), and its verb and help in the ``fastcompute`` command.
The protocol table (``OP_ARGS``, ``MUTATING_OPS``), the agent's handlers, the command's verbs
and the manager's state transitions are all read from ``OPS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

import msgspec
from msgspec import Raw

from fastcompute.errors import BadRequest, UnknownOp
from fastcompute.protocol.schema import (
    TOO_DEEP,
    AttachPortArgs,
    AttachVolumeArgs,
    ConsoleArgs,
    DetachPortArgs,
    DetachVolumeArgs,
    DrainArgs,
    EvacuateArgs,
    EvacuatedArgs,
    ExtendVolumeArgs,
    FinishArgs,
    GetConsoleArgs,
    ListArgs,
    LiveMigrateArgs,
    LivePrepareArgs,
    MigrateArgs,
    MoveRequest,
    NoArgs,
    PeerArgs,
    PeerHostArgs,
    PruneArgs,
    ReadArgs,
    RebootArgs,
    RebuildArgs,
    RescueArgs,
    ResizeArgs,
    SecurityGroupsArgs,
    SetEnabledArgs,
    SetPasswordArgs,
    SnapshotArgs,
    SpawnArgs,
    StatsArgs,
    StopArgs,
    UnshelveArgs,
    UuidArgs,
    _Args,
    invalid,
    invalid_from,
)

_ALIVE: Final = frozenset({"active", "paused", "stopped", "suspended"})
CRASH_DUMP_STATES: Final = frozenset({"active", "paused", "rescued", "error"})
"""Where ``instance.crash_dump`` may run (Nova's ALLOW_TRIGGER_CRASH_DUMP): no task, no change of
state; the domain must run as well."""
_SHELVED: Final = frozenset({"shelved", "shelved_offloaded"})

Access = Literal["open", "host-read", "host-write", "spawn", "list", "stats", "read", "write", "peer"]
"""What an op does, for authorization (``rpc.auth``): ``open`` anyone; ``host-read`` keys that
read every project; ``host-write`` admins; ``spawn`` a member of the new instance's project;
``list``/``stats`` anyone, the result filtered; ``read``/``write`` a reader/member of the
instance's project; ``peer`` only the agents of ``[[migration.peers]]`` (not even admins)."""


class Transition(NamedTuple):
    """A lifecycle op's rule (Nova's): the vm_states it runs from, its task, where it leads."""

    needs: frozenset[str]
    task: str
    target: str


@dataclass(frozen=True, slots=True)
class Op:
    """One op of the contract."""

    name: str
    args: type[_Args]
    help: str
    mutating: bool = True
    access: Access = "write"
    verb: str | None = None
    """The ``fastcompute`` verb that sends it (None: no verb of its own)."""
    transition: Transition | None = None
    """For lifecycle ops: the state rule the manager enforces."""
    hard: Transition | None = None
    """The rule when ``args.hard`` is true (reboot)."""

    def rule(self, hard: bool = False) -> Transition:
        """The transition this op makes (its hard variant when asked for and declared)."""
        if hard and self.hard is not None:
            return self.hard
        assert self.transition is not None, f"{self.name} is not a lifecycle op"
        return self.transition


def _lifecycle(verb: str, args: type[_Args], help_: str, needs: frozenset[str], task: str, target: str,
               hard: Transition | None = None) -> Op:
    return Op(f"instance.{verb}", args, help_, verb=verb, transition=Transition(needs, task, target), hard=hard)


OPS: Final[dict[str, Op]] = {op.name: op for op in (
    Op("ping", NoArgs, "check that the agent answers", mutating=False, access="open", verb="ping"),
    Op("host.info", NoArgs, "host inventory and usage", mutating=False, access="host-read", verb="host"),
    Op("host.set_enabled", SetEnabledArgs, "take the host out of scheduling, or back in", access="host-write"),
    Op("images.list", NoArgs, "the base image cache (size, age, users)", mutating=False, access="host-read",
       verb="images"),
    Op("images.prune", PruneArgs, "remove cached base images no instance uses", access="host-write"),
    Op("instance.spawn", SpawnArgs, "spawn one or many instances", access="spawn", verb="boot"),
    _lifecycle("start", UuidArgs, "start stopped instances", frozenset({"stopped"}), "powering-on", "active"),
    _lifecycle("stop", StopArgs, "stop instances (graceful, then forced)",
               frozenset({"active", "paused", "suspended"}), "powering-off", "stopped"),
    _lifecycle("pause", UuidArgs, "pause instances", frozenset({"active"}), "pausing", "paused"),
    _lifecycle("unpause", UuidArgs, "unpause instances", frozenset({"paused"}), "unpausing", "active"),
    _lifecycle("suspend", UuidArgs, "suspend instances to disk",
               frozenset({"active", "paused"}), "suspending", "suspended"),
    _lifecycle("resume", UuidArgs, "resume suspended instances", frozenset({"suspended"}), "resuming", "active"),
    # A hard reboot re-creates the domain from the record, so it also recovers a stopped,
    # suspended or failed instance.
    _lifecycle("reboot", RebootArgs, "reboot instances", frozenset({"active"}), "rebooting", "active",
               hard=Transition(_ALIVE | {"error"}, "rebooting-hard", "active")),
    Op("instance.delete", UuidArgs, "delete instances", verb="delete"),
    Op("instance.get", UuidArgs, "one instance in detail", mutating=False, access="read", verb="show"),
    Op("instance.list", ListArgs, "list instances", mutating=False, access="list", verb="list"),
    Op("instance.console", ConsoleArgs, "the serial console log", mutating=False, access="read", verb="console"),
    # Not mutating: its reply holds a live one-time token, which must never be written to the
    # store's reply log (the store keeps only its hash). A member's op: it opens the guest.
    Op("instance.get_console", GetConsoleArgs, "a one-time URL of an instance's noVNC, serial or spice-html5 console",
       mutating=False, access="write", verb="console-url"),
    # Not mutating: nothing of it is kept for a retry (its reply holds no secret either, and
    # setting the same password again is harmless). A member's op: it opens the guest.
    Op("instance.set_password", SetPasswordArgs, "set a user's password in the guest (through its guest agent)",
       mutating=False, access="write", verb="set-password"),
    Op("instance.quiesce", UuidArgs, "freeze the guest's file systems (through its guest agent)", verb="quiesce"),
    Op("instance.unquiesce", UuidArgs, "thaw the guest's file systems (through its guest agent)", verb="unquiesce"),
    Op("instance.stats", StatsArgs, "usage statistics of instances", mutating=False, access="stats"),
    Op("instance.attach_port", AttachPortArgs, "plug a port and add it to an instance"),
    Op("instance.detach_port", DetachPortArgs, "remove a port from an instance and unplug it"),
    Op("instance.set_security_groups", SecurityGroupsArgs, "replace a port's security groups"),
    # Image workflows (compute/rebuild.py, rescue.py, softdelete.py, crashdump.py). Their rules
    # are Nova's check_instance_state decorators; each has a handler of its own, not _drive.
    _lifecycle("rebuild", RebuildArgs, "re-make instances' root disks from an image (same uuid, ports, claim)",
               frozenset({"active", "stopped", "error"}), "rebuilding", "active"),
    _lifecycle("rescue", RescueArgs, "boot instances from a rescue image, their root disk second",
               frozenset({"active", "stopped", "error"}), "rescuing", "rescued"),
    _lifecycle("unrescue", UuidArgs, "boot rescued instances from their own root disk again",
               frozenset({"rescued"}), "unrescuing", "active"),
    _lifecycle("restore", UuidArgs, "bring soft-deleted instances back (powered on)",
               frozenset({"soft_deleted"}), "restoring", "active"),
    Op("instance.force_delete", UuidArgs, "delete instances at once, soft-deleted ones too", verb="force-delete"),
    Op("instance.crash_dump", UuidArgs, "inject an NMI into guests (their kernel's crash dump)", verb="crash-dump"),
    Op("instance.attach_volume", AttachVolumeArgs, "attach a volume (Cinder's connection info) to an instance",
       verb="attach-volume"),
    Op("instance.detach_volume", DetachVolumeArgs, "detach a volume from an instance (the guest releases it first)",
       verb="detach-volume"),
    Op("instance.extend_volume", ExtendVolumeArgs, "tell an instance one of its volumes has grown",
       verb="extend-volume"),
    # Image workflows (compute/snapshot.py, compute/shelve.py): their own handlers, since each
    # runs through several task states; the target "" of a snapshot is "as it was".
    Op("instance.snapshot", SnapshotArgs, "save an instance's root disk as a new image in the Image service",
       verb="snapshot", transition=Transition(_ALIVE, "image_snapshot", "")),
    Op("instance.shelve", UuidArgs, "stop an instance and save it as an image, to be offloaded",
       verb="shelve", transition=Transition(_ALIVE, "shelving", "shelved")),
    Op("instance.shelve_offload", UuidArgs, "give back a shelved instance's disk, ports and claim",
       verb="shelve-offload", transition=Transition(frozenset({"shelved"}), "shelving_offloading",
                                                    "shelved_offloaded")),
    Op("instance.unshelve", UnshelveArgs, "bring a shelved instance back (here, or from another agent)",
       verb="unshelve", transition=Transition(_SHELVED, "unshelving", "active")),
    # Not mutating: a read. A member's: it holds the user data the guest is given at boot.
    Op("instance.get_shelved", UuidArgs, "an offloaded instance as another agent unshelves it",
       mutating=False, verb="shelved"),
    # Moves: the client's ops go to the instance's host (confirm and revert to its new one).
    Op("instance.migrate", MigrateArgs, "move instances to another host (cold: stopped while they move)",
       access="host-write", verb="migrate"),
    Op("instance.resize", ResizeArgs, "give an instance a new flavor (cold; on this host or another)", verb="resize"),
    Op("instance.confirm_resize", UuidArgs, "keep a resized or migrated instance where it is now",
       verb="resize-confirm"),
    Op("instance.revert_resize", UuidArgs, "take a resized or migrated instance back to its old host and flavor",
       verb="resize-revert"),
    # Between agents only: not kept for retries (each is idempotent, and a read's reply is data).
    Op("migration.prepare", MoveRequest, "claim for an incoming move", mutating=False, access="peer"),
    Op("migration.finish", FinishArgs, "copy an incoming move's files and start it", mutating=False, access="peer"),
    Op("migration.read", ReadArgs, "a chunk of an outgoing move's file", mutating=False, access="peer"),
    Op("migration.status", PeerArgs, "the state of an incoming move", mutating=False, access="peer"),
    Op("migration.abort", PeerArgs, "undo an incoming move", mutating=False, access="peer"),
    Op("migration.confirm", PeerArgs, "drop what an outgoing move kept for a revert", mutating=False, access="peer"),
    Op("migration.revert", PeerArgs, "bring an outgoing move back", mutating=False, access="peer"),
    # Evacuate (compute/evacuate.py): a member's export (it holds the user data); the rebuild
    # on another host is an admin's, sent to that host (the instance's own is down).
    Op("instance.export", UuidArgs, "an instance as another host rebuilds it if this one goes down",
       mutating=False, verb="export"),
    Op("instance.evacuate", EvacuateArgs, "rebuild an instance of a host that is down on this one",
       access="host-write", verb="evacuate"),
    Op("migration.evacuated", EvacuatedArgs, "instances evacuated from the callee: its copies go",
       mutating=False, access="peer"),
    Op("migration.evacuees", EvacuatedArgs, "which of the caller's instances were evacuated from it",
       mutating=False, access="peer"),
    # Live moves: the client's ops go to the instance's host; no confirm (the move is final).
    Op("instance.live_migrate", LiveMigrateArgs, "move running instances to another host while they run",
       access="host-write", verb="live-migrate"),
    Op("instance.live_migrate_abort", UuidArgs, "abort an instance's live migration under way (it goes on here)",
       access="host-write", verb="live-migrate-abort"),
    Op("migration.live_prepare", LivePrepareArgs, "claim, disks and ports for an incoming live migration",
       mutating=False, access="peer"),
    Op("migration.live_finish", PeerArgs, "take over an instance live-migrated here", mutating=False, access="peer"),
    Op("migration.live_status", PeerArgs, "where an incoming live migration stands", mutating=False, access="peer"),
    Op("migration.live_abort", PeerArgs, "undo an incoming live migration", mutating=False, access="peer"),
    # Draining (compute/drain.py): the host's live moves placed among its peers by their host.info.
    Op("host.drain", DrainArgs, "take the host out of scheduling and live-migrate its instances away",
       access="host-write", verb="drain"),
    Op("migration.host_info", PeerHostArgs, "the callee's host.info, for a drain's placement", mutating=False,
       access="peer"),
)}

OP_ARGS: Final[dict[str, type[_Args]]] = {name: op.args for name, op in OPS.items()}

# Ops whose replies are persisted for idempotent retries across restarts; read-only ops are
# answered again from memory within the window but need no durable log.
MUTATING_OPS: Final = frozenset(name for name, op in OPS.items() if op.mutating)

_args_decoders = {name: msgspec.msgpack.Decoder(op.args) for name, op in OPS.items()}


def decode_args(op: str, raw: Raw) -> _Args:
    """Decode and validate an op's arguments against its struct."""
    decoder = _args_decoders.get(op)
    if decoder is None:
        raise UnknownOp(f"unknown op {op!r}; known ops: {', '.join(OPS)}", {"op": op})
    try:
        return decoder.decode(raw)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"invalid request: args: {exc}", {"field": "args", "reason": "invalid UTF-8"}) from None
    except msgspec.MsgspecError as exc:
        raise invalid_from(exc, "args") from None
    except RecursionError:
        raise invalid("args", TOO_DEEP) from None
