"""GET /api/v1/workspaces/<slug>/events: the workspace's events as Server-Sent Events.

For agents with no public URL for webhooks. A key with the read scope opens a
stream of its own workspace's events (a key of another workspace gets 404, as
everywhere in the API). Each SSE message is one outbox row: `id` its numeric id,
`event` its type, `data` `Event.body()` as JSON. A client that reconnects with
`Last-Event-ID` (EventSource does it by itself) or `?after=<id>` gets every event
after that one, in the outbox's order, with no gap and no repeat; without either
the stream starts at the newest event (`?after=0`: from the first). `?types=` keeps
some types only (comma-separated).

Retention (events/retention.py) deletes old events. A client resuming after an id
older than the newest event retention deleted from its workspace has missed events:
the stream says so first with one SSE message of its own type, `gap` (no `id`, so a
client's Last-Event-ID stays put), data {"type": "gap", "last_event_id": <its id>,
"pruned_through": <newest deleted id>, "retention_days": <retention.events_days>},
then goes on with every event still kept after that id. The client resynchronises
from the API (threads, messages) for what it missed. `?after=0` asks for whatever is
kept and gets no gap.

Bounded: events are read a page at a time and each write waits for the socket to
take it, so a slow reader holds at most one page plus the socket buffers; a
reader that takes nothing for `http.events_send_timeout` is cut off (aiohttp-sse
aborts the connection). Streams per key and per workspace are capped (429 above).
Heartbeat comments every `http.events_heartbeat` seconds. New events wake the
stream through the outbox's NOTIFY (Runtime.event_wakeups); it still re-reads every
POLL seconds in case a notification was lost. `close()` (server shutdown) ends
every stream cleanly: the chunked response is finished, the client reconnects
elsewhere or later with its Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Iterator

import asyncpg
import structlog
from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from ..config import HttpSettings
from ..metrics import Metrics
from ..store import events, retention
from ..store.apikeys import KeyOwner, Scope
from ..store.database import CONNECTION_ERRORS
from ..store.events import EVENT_TYPES, Wakeups
from ..http.api import BIGINT_MAX, InboxApi
from ..http.responses import HttpError

log = structlog.get_logger(__name__)

PAGE = 20  # events read and written per round: the most a stream holds in memory
POLL = 30.0  # seconds between reads when no NOTIFY came (one lost while reconnecting)
HELD_RETRY = 0.2  # seconds before reading again when events wait behind an open transaction
RECONNECT_MS = 2000  # the `retry:` a client waits before reconnecting after we close
# The SSE type of "events after your id were deleted by retention" (no dot: never an
# outbox event's type).
GAP = "gap"


def parse_cursor(request: web.Request) -> int | None:
    """The id to resume after: Last-Event-ID (a reconnecting EventSource) over ?after=;
    None when neither is given (start at the newest). 400 for anything but an id."""
    for value, name in ((request.headers.get("Last-Event-ID"), "Last-Event-ID"),
                        (request.query.get("after"), "after")):
        if value is None or (name == "Last-Event-ID" and not value.strip()):
            continue
        value = value.strip()
        if not value.isascii() or not value.isdigit() or len(value) > 19 or \
                int(value) > BIGINT_MAX:
            raise HttpError(400, f"{name}: an event id (digits)")
        return int(value)
    return None


def parse_types(request: web.Request) -> list[str] | None:
    raw = request.query.get("types")
    if raw is None or not raw.strip():
        return None
    wanted = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in EVENT_TYPES]
    if unknown or len(wanted) > len(EVENT_TYPES):
        raise HttpError(400, "types: comma-separated event types, of "
                        + ", ".join(sorted(EVENT_TYPES)))
    return sorted(set(wanted))


class EventStreams:
    """The stream handler and the streams it has open in this process."""

    def __init__(self, api: InboxApi, db: asyncpg.Pool, wakeups: Wakeups,
                 settings: HttpSettings, metrics: Metrics, retention_days: int = 0) -> None:
        self.api = api
        self.db = db
        self.wakeups = wakeups
        self.settings = settings
        self.retention_days = retention_days
        self.metrics = metrics
        self._open: set[EventSourceResponse] = set()
        self._per_key: Counter[int] = Counter()
        self._per_workspace: Counter[int] = Counter()
        self._closing = asyncio.Event()

    @property
    def open_streams(self) -> int:
        return len(self._open)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        owner = await self.api.owner(request, Scope.READ)
        after = parse_cursor(request)
        types = parse_types(request)
        if self._closing.is_set():
            raise HttpError(503, "shutting down", {"Retry-After": "5"})
        with self._slot(owner):
            resumed = after is not None and after > 0
            if after is None:
                after = await events.last_id(self.db, owner.workspace_id)
            async with sse_response(request, ping_interval=self.settings.events_heartbeat,
                                    send_timeout=self.settings.events_send_timeout) as response:
                self._open.add(response)
                self.metrics.event_streams.inc()
                log.info("events.stream_opened", key_id=owner.key_id,
                         workspace=owner.workspace_slug, after=after, types=types)
                reason = "gone"
                try:
                    reason, after = await self._pump(response, owner, after, types, resumed)
                finally:
                    self._open.discard(response)
                    self.metrics.event_streams.dec()
                    self.metrics.event_streams_ended.labels(reason).inc()
                    log.info("events.stream_closed", key_id=owner.key_id,
                             workspace=owner.workspace_slug, last_id=after, reason=reason)
            return response

    @contextlib.contextmanager
    def _slot(self, owner: KeyOwner) -> Iterator[None]:
        settings = self.settings
        if self._per_key[owner.key_id] >= settings.events_streams_per_key:
            self.metrics.event_streams_refused.labels("per_key").inc()
            log.info("events.stream_refused", key_id=owner.key_id, reason="per key",
                     limit=settings.events_streams_per_key)
            raise HttpError(429, f"at most {settings.events_streams_per_key} event streams "
                            "per key", {"Retry-After": "10"})
        if self._per_workspace[owner.workspace_id] >= settings.events_streams_per_workspace:
            self.metrics.event_streams_refused.labels("per_workspace").inc()
            log.info("events.stream_refused", key_id=owner.key_id, reason="per workspace",
                     limit=settings.events_streams_per_workspace)
            raise HttpError(429, f"at most {settings.events_streams_per_workspace} event "
                            "streams per workspace", {"Retry-After": "10"})
        self._per_key[owner.key_id] += 1
        self._per_workspace[owner.workspace_id] += 1
        try:
            yield
        finally:
            for counter, key in ((self._per_key, owner.key_id),
                                 (self._per_workspace, owner.workspace_id)):
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

    async def _pump(self, response: EventSourceResponse, owner: KeyOwner, after: int,
                    types: list[str] | None, resumed: bool) -> tuple[str, int]:
        """Send pages of events until the reader goes, stalls, or we close; why (gone,
        stalled, closing, database), and the last id sent."""
        # a comment first: the headers and this reach the client at once
        await response.write(f": stream after {after}\r\nretry: {RECONNECT_MS}\r\n\r\n".encode())
        if resumed:
            try:
                through = await retention.pruned_through(self.db, owner.workspace_id)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
                log.warning("events.stream_database_unavailable", error=type(error).__name__)
                return "database", after
            if after < through:
                self.metrics.event_stream_gaps.inc()
                log.info("events.stream_gap", key_id=owner.key_id,
                         workspace=owner.workspace_slug, after=after, pruned_through=through)
                try:
                    await response.send(json.dumps(
                        {"type": GAP, "last_event_id": after, "pruned_through": through,
                         "retention_days": self.retention_days}), event=GAP)
                except TimeoutError:
                    return "stalled", after
                except (ConnectionResetError, RuntimeError):
                    return "gone", after
        closing = asyncio.ensure_future(self._closing.wait())
        gone = asyncio.ensure_future(response.wait())
        try:
            with self.wakeups.watch(owner.workspace_id) as signal:
                while not self._closing.is_set() and response.is_connected():
                    signal.clear()
                    try:
                        page = await events.after(self.db, owner.workspace_id, after, PAGE,
                                                  types)
                    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
                        log.warning("events.stream_database_unavailable",
                                    error=type(error).__name__)
                        return "database", after
                    for event in page:
                        try:
                            await response.send(json.dumps(event.body()), id=str(event.id),
                                                event=event.type)
                        except TimeoutError:
                            return "stalled", after
                        except (ConnectionResetError, RuntimeError):
                            # also how a reader that stopped reading ends when the
                            # kernel's TCP_USER_TIMEOUT (same send_timeout) fires first
                            return "gone", after
                        after = event.id
                        self.metrics.events_streamed.inc()
                    if len(page) == PAGE:
                        continue
                    woken = asyncio.ensure_future(signal.wait())
                    try:
                        await asyncio.wait((woken, closing, gone),
                                           timeout=HELD_RETRY if page.held else POLL,
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        woken.cancel()
            return ("closing" if self._closing.is_set() else "gone"), after
        finally:
            closing.cancel()
            gone.cancel()

    async def close(self) -> None:
        """Server shutdown: every stream ends now, its response finished cleanly."""
        self._closing.set()
        for response in list(self._open):
            with contextlib.suppress(RuntimeError):
                response.stop_streaming()
