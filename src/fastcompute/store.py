"""SQLite persistence: instances, their claims, moves, and the request log for idempotent retries.

The request log is keyed by (client, request id): a client never gets another's reply.

One connection, owned by one thread: every statement runs there, never on the event loop.
Writes are group-committed: while one transaction commits, the writes that arrive queue up
and go into the next one together, so a storm of spawns costs a handful of fsyncs instead of
one each. ``write`` returns only once its transaction is durable, which is what lets the
manager promise "committed before the reply or the event".
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from fastcompute.workers import Workers

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    uuid TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    request_id TEXT,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    uuid TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS replies (
    client BLOB NOT NULL,
    id TEXT NOT NULL,
    reply BLOB NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (client, id)
);
CREATE INDEX IF NOT EXISTS replies_expires ON replies (expires);
CREATE TABLE IF NOT EXISTS console_tokens (
    hash BLOB PRIMARY KEY,
    uuid TEXT NOT NULL,
    kind TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS console_tokens_uuid ON console_tokens (uuid);
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT NOT NULL,
    role TEXT NOT NULL,
    uuid TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (id, role)
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS evacuations (
    uuid TEXT PRIMARY KEY,
    body BLOB NOT NULL
);
"""

Statement = tuple[str, Sequence[Any]]
SizeOf = Callable[[tuple[bytes, str], bytes], int]


class Loaded(msgspec.Struct):
    """Everything the store holds, as read at start-up."""

    instances: list[tuple[str, str | None, bytes]]
    claims: list[tuple[str, bytes]]
    settings: dict[str, Any]
    migrations: list[bytes] = []


class StoredReplies(msgspec.Struct):
    """The newest unexpired replies of the request log that fit a memory budget."""

    replies: list[tuple[bytes, str, bytes, float]]
    """(client, request id, reply, expires as Unix time), oldest first."""
    left_out_until: float
    """Unix time until which a reply left out (over the budget) stays valid; 0 = none was."""


class Store:
    """The agent's durable state in one SQLite database (WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = Workers(1, "store")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[list[Statement], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._encoder = msgspec.msgpack.Encoder()

    async def open(self) -> None:
        """Open (creating if needed) the database."""
        await self._thread.run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Owner only: instances' bootstrap data (user data, admin passwords) is kept here, and
        # SQLite gives its -wal and -shm files the database's permissions.
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL survives a crash of the agent (the case that matters
        # here: kill -9 mid-storm); only a power loss may drop the last transactions.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'requests'").fetchone():
            # The request log before replies were keyed by client: its replies belong to the
            # anonymous client (no CURVE, no routing id), whom they were served to.
            with conn:
                conn.execute("INSERT OR IGNORE INTO replies SELECT x'', id, reply, expires FROM requests")
                conn.execute("DROP TABLE requests")
        self._conn = conn
        # Guests' records and the request log are tenants' data, whatever the umask was.
        for suffix in ("", "-wal", "-shm"):
            path = self.path.with_name(self.path.name + suffix)
            if path.exists():
                path.chmod(0o600)

    async def close(self) -> None:
        """Flush pending writes and close the database."""
        if self._flusher is not None:
            await self._flusher
        if self._conn is not None:
            await self._thread.run(self._conn.close)
            self._conn = None
        self._thread.shutdown()

    # -- writes ---------------------------------------------------------------------------

    async def write(self, statements: list[Statement]) -> None:
        """Run statements in a transaction (grouped with concurrent writers); wait until durable."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((statements, fut))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        await fut

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._thread.run(self._commit, batch)
                except Exception as exc:  # every waiter of this group must hear of it
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._flusher = None

    def _commit(self, batch: list[tuple[list[Statement], asyncio.Future[None]]]) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN")
        try:
            for statements, _ in batch:
                for sql, params in statements:
                    conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- statement builders -----------------------------------------------------------------

    def put_instance(self, uuid: str, project_id: str, request_id: str | None, body: Any) -> Statement:
        """Insert or replace an instance row."""
        return (
            "INSERT OR REPLACE INTO instances (uuid, project_id, request_id, body) VALUES (?, ?, ?, ?)",
            (uuid, project_id, request_id, self._encoder.encode(body)),
        )

    @staticmethod
    def delete_instance(uuid: str) -> Statement:
        """Delete an instance row."""
        return ("DELETE FROM instances WHERE uuid = ?", (uuid,))

    def put_claim(self, uuid: str, project_id: str, body: Any) -> Statement:
        """Insert or replace a claim row."""
        return (
            "INSERT OR REPLACE INTO claims (uuid, project_id, body) VALUES (?, ?, ?)",
            (uuid, project_id, self._encoder.encode(body)),
        )

    @staticmethod
    def delete_claim(uuid: str) -> Statement:
        """Delete a claim row."""
        return ("DELETE FROM claims WHERE uuid = ?", (uuid,))

    def put_migration(self, move_id: str, role: str, uuid: str, body: Any) -> Statement:
        """Insert or replace a move's record (``role``: this host's side of it)."""
        return ("INSERT OR REPLACE INTO migrations (id, role, uuid, body) VALUES (?, ?, ?, ?)",
                (move_id, role, uuid, self._encoder.encode(body)))

    @staticmethod
    def delete_migration(move_id: str, role: str) -> Statement:
        """Forget one side of a move."""
        return ("DELETE FROM migrations WHERE id = ? AND role = ?", (move_id, role))

    def put_evacuation(self, uuid: str, body: Any) -> Statement:
        """Record an instance evacuated to this host (until its source has dropped its copy)."""
        return ("INSERT OR REPLACE INTO evacuations (uuid, body) VALUES (?, ?)", (uuid, self._encoder.encode(body)))

    @staticmethod
    def delete_evacuation(uuid: str) -> Statement:
        """Forget an evacuation."""
        return ("DELETE FROM evacuations WHERE uuid = ?", (uuid,))

    @staticmethod
    def put_reply(client: bytes, request_id: str, reply: bytes, ttl_s: float) -> Statement:
        """Remember a reply for retries of the same request id by the same client."""
        return (
            "INSERT OR REPLACE INTO replies (client, id, reply, expires) VALUES (?, ?, ?, ?)",
            (client, request_id, reply, time.time() + ttl_s),
        )

    def put_setting(self, key: str, value: Any) -> Statement:
        """Remember a host-wide setting (e.g. whether the operator disabled the host)."""
        return ("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, self._encoder.encode(value)))

    @staticmethod
    def expire_replies(now: float) -> Statement:
        """Forget replies past their retention window."""
        return ("DELETE FROM replies WHERE expires < ?", (now,))

    @staticmethod
    def put_console_token(digest: bytes, uuid: str, kind: str, expires: float) -> Statement:
        """Remember a console token (by its hash only) for an instance's console of a kind."""
        return ("INSERT INTO console_tokens (hash, uuid, kind, expires) VALUES (?, ?, ?, ?)",
                (digest, uuid, kind, expires))

    @staticmethod
    def delete_console_tokens(uuid: str) -> Statement:
        """Forget every console token of an instance."""
        return ("DELETE FROM console_tokens WHERE uuid = ?", (uuid,))

    @staticmethod
    def expire_console_tokens(now: float) -> Statement:
        """Forget console tokens past their expiry."""
        return ("DELETE FROM console_tokens WHERE expires < ?", (now,))

    async def take_console_token(self, digest: bytes) -> tuple[str, str, float] | None:
        """Remove a console token and return its (uuid, kind, expires), or None if there is
        none: in one statement, so that two connections presenting it cannot both have it."""
        return await self._thread.run(self._take_console_token, digest)

    def _take_console_token(self, digest: bytes) -> tuple[str, str, float] | None:
        conn = self._conn
        assert conn is not None
        # fetchall: the statement (and so its implicit transaction) must run to its end.
        rows = conn.execute("DELETE FROM console_tokens WHERE hash = ? RETURNING uuid, kind, expires",
                            (digest,)).fetchall()
        return (str(rows[0][0]), str(rows[0][1]), float(rows[0][2])) if rows else None

    # -- reads (start-up only; the manager keeps the live state in memory) ------------------

    async def load(self) -> Loaded:
        """Instances (uuid, request_id, body), claims (uuid, body), settings, moves (body)."""
        return await self._thread.run(self._load)

    def _load(self) -> Loaded:
        conn = self._conn
        assert conn is not None
        instances = list(conn.execute("SELECT uuid, request_id, body FROM instances"))
        claims = list(conn.execute("SELECT uuid, body FROM claims"))
        settings = {k: msgspec.msgpack.decode(v) for k, v in conn.execute("SELECT key, value FROM settings")}
        migrations = [bytes(b) for (b,) in conn.execute("SELECT body FROM migrations")]
        return Loaded(instances, claims, settings, migrations)

    async def load_evacuations(self) -> list[bytes]:
        """The evacuations to this host (bodies)."""
        return await self._thread.run(self._load_evacuations)

    def _load_evacuations(self) -> list[bytes]:
        conn = self._conn
        assert conn is not None
        return [bytes(b) for (b,) in conn.execute("SELECT body FROM evacuations")]

    async def load_replies(self, max_bytes: int, entry_size: SizeOf) -> StoredReplies:
        """The newest unexpired replies whose ``entry_size`` adds up to at most ``max_bytes``."""
        return await self._thread.run(self._load_replies, max_bytes, entry_size)

    def _load_replies(self, max_bytes: int, entry_size: SizeOf) -> StoredReplies:
        conn = self._conn
        assert conn is not None
        rows: list[tuple[bytes, str, bytes, float]] = []
        used = 0
        left_out_until = 0.0
        for client, rid, reply, expires in conn.execute(
                "SELECT client, id, reply, expires FROM replies WHERE expires >= ? ORDER BY expires DESC",
                (time.time(),)):
            used += entry_size((client, rid), reply)
            if used > max_bytes:
                left_out_until = expires  # the newest left out: every older one expires sooner
                break
            rows.append((client, rid, reply, expires))
        rows.reverse()
        return StoredReplies(rows, left_out_until)

    async def get_reply(self, client: bytes, request_id: str) -> bytes | None:
        """The unexpired reply logged for a client's request id, if any."""
        return await self._thread.run(self._get_reply, client, request_id)

    def _get_reply(self, client: bytes, request_id: str) -> bytes | None:
        conn = self._conn
        assert conn is not None
        row = conn.execute("SELECT reply FROM replies WHERE client = ? AND id = ? AND expires >= ?",
                           (client, request_id, time.time())).fetchone()
        return None if row is None else bytes(row[0])

    @staticmethod
    def decode_rows(rows: Iterable[tuple[str, bytes]], type_: type[Any]) -> dict[str, Any]:
        """Decode row bodies keyed by uuid."""
        dec = msgspec.msgpack.Decoder(type_)
        return {uuid: dec.decode(body) for uuid, body in rows}
