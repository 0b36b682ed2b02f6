"""The event store: interactions that arrive after a bundle was trained, kept durably and in arrival order.

Every event gets a sequence number (`seq`, increasing with arrival); a bundle records the last `seq` it has learnt
from (its watermark), so `llmd4rec update` trains on exactly the users whose histories changed after it.
`EventStore` is the interface the server and the updater use; `SQLiteEventStore` is the embedded default (WAL,
synchronous=FULL: an append that returned is on disk, whatever happens to the process afterwards). A server
database can follow by implementing the same few methods.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import InputError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                                   user TEXT NOT NULL, item TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user, ts, seq);
CREATE TABLE IF NOT EXISTS users (user TEXT PRIMARY KEY, first_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (item TEXT PRIMARY KEY, first_seq INTEGER NOT NULL, title TEXT);
"""


@dataclass(frozen=True)
class Event:
    id: str  # idempotency key: a second event with the same id is ignored
    user: str
    item: str
    ts: float  # seconds since the epoch; a history is ordered by ts, then by arrival
    title: str | None = None  # text of an item the catalogue may not know yet


class EventStore(Protocol):
    def append(self, events: list[Event]) -> list[bool]:
        """Store the events in one durable transaction; per event, True if new, False if its id was known."""

    def history(self, user: str, upto: int | None = None) -> list[str] | None:
        """The user's items oldest first (events with seq <= upto); None for a user never seen."""

    def changed_histories(self, watermark: int, upto: int) -> dict[str, list[str]]:
        """Full histories (seq <= upto) of the users with an event in (watermark, upto]."""

    def counts_since(self, watermark: int, upto: int) -> dict[str, int]:
        """Events per item in (watermark, upto]: what the popularity counts of a new bundle add."""

    def items(self, upto: int | None = None) -> list[tuple[str, str | None]]:
        """Every item seen (seq <= upto) with its title, in order of first appearance."""

    def stored(self, ids: list[str]) -> set[str]:
        """Which of these event ids the store holds: a client unsure whether an append landed can ask."""

    def max_seq(self) -> int:
        """The newest event's seq (0 when empty): the watermark an update reading now would record."""

    def close(self) -> None: ...


class SQLiteEventStore:
    """One writer connection behind a lock (appends may come from worker threads) and one reader connection per
    thread, so reads never wait on a writer's fsync (WAL readers see the last committed state)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise InputError("event store must be a file", self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        try:
            self._writer = self._connect()
            self._writer.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise InputError(f"not a usable SQLite event store ({e})", self.path) from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._lock:
                self._readers.append(conn)
        return conn

    def append(self, events: list[Event]) -> list[bool]:
        new = []
        with self._lock:
            cur = self._writer.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for e in events:  # looked up first: an ignored insert would still use up a seq
                    fresh = cur.execute("SELECT 1 FROM events WHERE id = ?", (e.id,)).fetchone() is None
                    new.append(fresh)
                    if fresh:
                        cur.execute("INSERT INTO events (id, user, item, ts) VALUES (?, ?, ?, ?)",
                                    (e.id, e.user, e.item, e.ts))
                        seq = cur.lastrowid
                        cur.execute("INSERT OR IGNORE INTO users VALUES (?, ?)", (e.user, seq))
                        cur.execute("INSERT INTO items VALUES (?, ?, ?) ON CONFLICT (item) DO UPDATE SET "
                                    "title = coalesce(items.title, excluded.title)", (e.item, seq, e.title))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return new

    def history(self, user: str, upto: int | None = None) -> list[str] | None:
        db = self._reader()
        if db.execute("SELECT 1 FROM users WHERE user = ?", (user,)).fetchone() is None:
            return None
        rows = db.execute("SELECT item FROM events WHERE user = ? AND seq <= ? ORDER BY ts, seq",
                          (user, _upto(upto))).fetchall()
        return [r[0] for r in rows]

    def changed_histories(self, watermark: int, upto: int) -> dict[str, list[str]]:
        rows = self._reader().execute(
            "SELECT user, item FROM events WHERE seq <= ? AND user IN "
            "(SELECT DISTINCT user FROM events WHERE seq > ? AND seq <= ?) ORDER BY user, ts, seq",
            (upto, watermark, upto)).fetchall()
        out: dict[str, list[str]] = {}
        for user, item in rows:
            out.setdefault(user, []).append(item)
        return out

    def counts_since(self, watermark: int, upto: int) -> dict[str, int]:
        rows = self._reader().execute("SELECT item, count(*) FROM events WHERE seq > ? AND seq <= ? GROUP BY item",
                                      (watermark, upto)).fetchall()
        return dict(rows)

    def items(self, upto: int | None = None) -> list[tuple[str, str | None]]:
        rows = self._reader().execute("SELECT item, title FROM items WHERE first_seq <= ? ORDER BY first_seq",
                                      (_upto(upto),)).fetchall()
        return [(item, title) for item, title in rows]

    def stored(self, ids: list[str]) -> set[str]:
        db, out = self._reader(), set()
        for start in range(0, len(ids), 500):  # SQLite's bound on query parameters
            part = ids[start:start + 500]
            rows = db.execute(f"SELECT id FROM events WHERE id IN ({','.join('?' * len(part))})", part).fetchall()
            out.update(r[0] for r in rows)
        return out

    def max_seq(self) -> int:
        return self._reader().execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            for conn in [self._writer, *self._readers]:
                conn.close()
            self._readers.clear()


def _upto(upto: int | None) -> int:
    return (1 << 62) if upto is None else upto
