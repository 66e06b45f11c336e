"""SQLite persistence: instances, their claims, and the request log for idempotent retries.

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
from collections.abc import Iterable, Sequence
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
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    reply BLOB NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_expires ON requests (expires);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""

Statement = tuple[str, Sequence[Any]]


class Loaded(msgspec.Struct):
    """Everything the store holds, as read at start-up."""

    instances: list[tuple[str, str | None, bytes]]
    claims: list[tuple[str, bytes]]
    replies: dict[str, bytes]
    settings: dict[str, Any]


class Store:
    """The agent's durable state in one SQLite database (WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = Workers(1, "store")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[list[Statement], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self.commits = 0

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
        self._conn = conn

    async def close(self) -> None:
        """Flush pending writes and close the database."""
        if self._flusher is not None:
            await self._flusher
        if self._conn is not None:
            await self._thread.run(self._conn.close)
            self._conn = None
        self._thread.shutdown()

    # -- writes ---------------------------------------------------------------------------

    def encode(self, obj: Any) -> bytes:
        """Encode a row body."""
        return self._encoder.encode(obj)

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
        self.commits += 1

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

    @staticmethod
    def put_reply(request_id: str, reply: bytes, ttl_s: float) -> Statement:
        """Remember a reply for retries of the same request id."""
        return (
            "INSERT OR REPLACE INTO requests (id, reply, expires) VALUES (?, ?, ?)",
            (request_id, reply, time.time() + ttl_s),
        )

    def put_setting(self, key: str, value: Any) -> Statement:
        """Remember a host-wide setting (e.g. whether the operator disabled the host)."""
        return ("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, self._encoder.encode(value)))

    @staticmethod
    def expire_replies(now: float) -> Statement:
        """Forget replies past their retention window."""
        return ("DELETE FROM requests WHERE expires < ?", (now,))

    # -- reads (start-up only; the manager keeps the live state in memory) ------------------

    async def load(self) -> Loaded:
        """Instances (uuid, request_id, body), claims (uuid, body), unexpired replies, settings."""
        return await self._thread.run(self._load)

    def _load(self) -> Loaded:
        conn = self._conn
        assert conn is not None
        instances = list(conn.execute("SELECT uuid, request_id, body FROM instances"))
        claims = list(conn.execute("SELECT uuid, body FROM claims"))
        replies = dict(
            conn.execute("SELECT id, reply FROM requests WHERE expires >= ?", (time.time(),))
        )
        settings = {k: msgspec.msgpack.decode(v) for k, v in conn.execute("SELECT key, value FROM settings")}
        return Loaded(instances, claims, replies, settings)

    @staticmethod
    def decode_rows(rows: Iterable[tuple[str, bytes]], type_: type[Any]) -> dict[str, Any]:
        """Decode row bodies keyed by uuid."""
        dec = msgspec.msgpack.Decoder(type_)
        return {uuid: dec.decode(body) for uuid, body in rows}
