"""Live serving: the server of serve.py plus an event store and model swaps.

- `POST /events` stores one event or {"events": [...]}; the answer comes after the transaction is on disk, so an
  acknowledged event survives a crash. Appends that arrive while one is being written are committed together in
  the next transaction (one fsync for all of them).
- `GET /users/{user}/recommendations?k=` ranks with the user's stored history and excludes what they have seen;
  items the served model does not know yet (they arrived after it) are left out of its input.
- A versioned bundle root (versions.py) is watched: when `current` names another version, the new bundle is loaded
  in a worker thread and swapped in between requests (ModelSlot); requests in flight finish on the old model.
  `POST /admin/reload` (bearer token from $LLMD4REC_ADMIN_TOKEN; absent: the endpoint answers 404) does the same
  at once; `?version=N` makes version N current first (a rollback).

No `from __future__ import annotations`: FastAPI and pydantic read the annotations as live objects.
"""

import asyncio
import hmac
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import versions
from .errors import InputError
from .events import Event, SQLiteEventStore
from .serve import MAX_BODY_BYTES, Query, Recommender, body_json, create_app, load_bundle, reply

MAX_EVENTS = 1000  # events per POST /events: bounds one transaction
TOKEN_ENV = "LLMD4REC_ADMIN_TOKEN"
log = logging.getLogger("llmd4rec.live")


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    id: str = Field(min_length=1, max_length=256)
    user: str = Field(min_length=1, max_length=256)
    item: str = Field(min_length=1, max_length=256)
    timestamp: Optional[float] = None  # seconds since the epoch; default: when the server received it
    title: Optional[str] = Field(default=None, max_length=1000)

    @field_validator("timestamp")
    @classmethod
    def _finite(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)


def parse(model: type, obj: Any) -> Any:
    """A pydantic model from JSON, or an InputError (422) naming the first faulty field."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise InputError(f"{where}: {err['msg']}") from None


class GroupCommit:
    """Appends queue here; one writer task commits everything queued in one transaction, then answers each."""

    def __init__(self, store: SQLiteEventStore):
        self.store = store
        self.pending: list[tuple[list[Event], asyncio.Future]] = []
        self.writing = False

    async def append(self, events: list[Event]) -> list[bool]:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((events, future))
        if not self.writing:
            self.writing = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    flags = await asyncio.to_thread(self.store.append, [e for events, _ in batch for e in events])
                except Exception as e:  # nothing of this batch was stored: every waiting request fails (500)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                start = 0
                for events, future in batch:
                    if not future.done():
                        future.set_result(flags[start:start + len(events)])
                    start += len(events)
        finally:
            self.writing = False


class Swapper:
    """Loads a bundle off the event loop and swaps it into the slot; one load at a time."""

    def __init__(self, app: Any, root: Path, empty_history: str):
        self.slot, self.root, self.empty_history = app.state.slot, root, empty_history
        self.version = versions.current_version(root)
        self.failed: str | None = None
        self.lock = asyncio.Lock()

    async def to(self, version: str) -> None:
        async with self.lock:
            path = versions.bundle_path(self.root, version or None)
            rec = await asyncio.to_thread(lambda: Recommender(load_bundle(path), self.empty_history))
            self.slot.swap(rec)
            self.version, self.failed = version, None
            log.info("now serving %s", path)

    async def watch(self, interval: float) -> None:
        """Poll `current`; a version that fails to load is logged once and skipped until `current` changes."""
        while True:
            await asyncio.sleep(interval)
            name = None
            try:
                name = versions.current_version(self.root)
                if name not in (self.version, self.failed):
                    await self.to(name)
            except Exception as e:  # a broken version must not stop the server or the watcher
                self.failed = name
                log.error("bundle swap skipped, still serving version %r: %s", self.version, e)


def create_live_app(root: str | Path, events: str | Path | None = None, *, empty_history: str = "error",
                    watch_interval: float = 2.0, admin_token: str | None = None,
                    max_body_bytes: int = MAX_BODY_BYTES):
    """serve.create_app for the current version of `root`, with the event and admin routes and the watcher."""
    from fastapi import HTTPException, Request
    from fastapi.responses import Response

    root = Path(root)
    store = SQLiteEventStore(events) if events is not None else None

    @asynccontextmanager
    async def lifespan(app: Any):
        task = asyncio.get_running_loop().create_task(app.state.swapper.watch(watch_interval)) \
            if versions.is_versioned(root) and watch_interval > 0 else None
        yield
        if task is not None:
            task.cancel()
        if store is not None:
            store.close()

    app = create_app(versions.bundle_path(root), max_body_bytes=max_body_bytes, empty_history=empty_history,
                     lifespan=lifespan)
    slot = app.state.slot
    swapper = app.state.swapper = Swapper(app, root, empty_history)

    @app.post("/admin/reload")
    async def reload(request: Request, version: Optional[str] = None) -> Response:
        if not admin_token:
            raise HTTPException(404, "Not Found")
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            raise HTTPException(401, "missing or wrong admin token")
        if version is not None:
            if not versions.is_versioned(root) or not version.isdigit():
                raise InputError("version must be a version number of a versioned bundle folder")
            versions.set_current(root, version)
        await swapper.to(versions.current_version(root))
        rec = slot.current[0]
        return reply({**rec.info(), "bundle_version": rec.bundle.path.name})

    if store is None:
        return app
    writer = GroupCommit(store)

    @app.post("/events")
    async def post_events(request: Request) -> Response:
        obj = await body_json(request, max_body_bytes)
        batch = parse(EventBatch, obj) if isinstance(obj, dict) and "events" in obj \
            else EventBatch(events=[parse(EventIn, obj)])
        received = time.time()
        flags = await writer.append([Event(e.id, e.user, e.item, received if e.timestamp is None else e.timestamp,
                                           e.title) for e in batch.events])
        return reply({"stored": sum(flags), "duplicates": len(flags) - sum(flags)})

    @app.get("/users/{user}/recommendations")
    async def user_recommendations(user: str, k: int = 10) -> Response:
        rec, batcher = slot.current
        if not 1 <= k <= rec.n_items:
            raise InputError(f"k must be an integer between 1 and {rec.n_items}, got {k}")
        history = store.history(user)
        if history is None:
            raise HTTPException(404, f"unknown user {user!r}")
        known = [rec.index[i] for i in history if i in rec.index]
        if not known and rec.empty_history == "error":
            raise InputError(f"user {user!r} has no item the served model knows yet (a server started with "
                             "--empty-history popular answers with the most popular items)")
        result = await batcher.recommend(Query(known, k, True))
        return reply({"user": user, "history_length": len(history), "bundle_version": rec.bundle.path.name,
                      **result})

    return app


def admin_token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None
