"""What the listener lets any one client hold: connections and in-flight DATA bytes.

Connections are counted per client key (an IPv4 address, or the /64 of an IPv6
address, where one host usually has a whole /64 to pick from) and in total,
across every process accepting on the port (smtp.processes). The counts live
in a small table in shared memory (CounterTable) that the first process
creates and hands to the others as an inherited file descriptor: each process
writes only its own row, and a row counts only while its process is alive: it
holds a POSIX lock on its row, which the kernel drops when the process dies
(zombie or not), so a child that crashes stops counting within LIVENESS_TTL.
Checking a connection is one keyed hash and a read of each row (a lock probe
per other row at most once a second): no round trip to another process; two
processes admitting at the same instant may each let one more in.

Clients share a bucket when their keys hash alike (65,536 buckets, keyed with
a secret per start so a client cannot aim at another's bucket); the global cap
bounds how many buckets can be full at once (max_connections / per-IP limit of
65,536).

The same rows also count per-client rates (issue 17: connections, messages and
failed RCPTs per fixed window of edge.rate_window seconds) and hold bans: each
process counts into its own row, a bucket's rate is the sum over every row in
the current window (a process that died still counted what it saw), and a
bucket is banned while any row's ban time lies ahead (ClientRates). Bans live
as long as the table, that is until the main process restarts: a restart lifts
them, as Postfix's anvil forgets its counts.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import fcntl
import hashlib
import ipaddress
import math
import mmap
import os
import secrets
import struct
import time
from collections.abc import Callable
from typing import Final

from ..addresses import client_key
from ..config import EdgeSettings, SmtpSettings

MAGIC: Final = b"SMTPLIM2"
HEADER = struct.Struct("<8sII16s")  # magic, slots, buckets, hash key
ROW_HEAD = struct.Struct("<qq")  # pid, open sessions of that process
BUCKETS: Final = 65_536
LIVENESS_TTL: Final = 1.0  # seconds another row's liveness is trusted before checking again


class RateKind(enum.IntEnum):
    """What a per-client rate counts (edge.connection_rate, message_rate, failed_rcpt_rate)."""

    CONNECTION = 0
    MESSAGE = 1
    FAILED_RCPT = 2


RATE_KINDS: Final = len(RateKind)
# Bytes per bucket in a row: open sessions (H), the window its rates count in (I), one
# count per RateKind (H each), the time its ban ends (I, Unix seconds).
BUCKET_BYTES: Final = 2 + 4 + 2 * RATE_KINDS + 4


class CounterTable:
    """Open-session counts of every accepting process, in shared memory (one row each).

    `create` makes a table in an anonymous memory file; its descriptor, passed to a
    child (pass_fds) with the child's slot number, lets `attach` map the same table.
    """

    def __init__(self, header: bytes, slot: int, fd: int = -1,
                 mapping: mmap.mmap | None = None) -> None:
        self.fd = fd
        magic, self.slots, self.buckets, self.key = HEADER.unpack_from(header, 0)
        if magic != MAGIC or not 0 <= slot < self.slots:
            raise ValueError("not a connection table, or no such slot")
        self.slot = slot
        self._row_size = ROW_HEAD.size + BUCKET_BYTES * self.buckets
        self._rows = [HEADER.size + index * self._row_size for index in range(self.slots)]
        own = self._rows[slot]
        if fd >= 0:
            # Held while this process lives; raises if a live process has this slot. Taken
            # before mmap() dups the descriptor: closing any descriptor of the file drops
            # every POSIX lock this process holds on it.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, self._row_size, own)
        if mapping is None:
            mapping = mmap.mmap(fd, os.fstat(fd).st_size)
        self._map = mapping
        view = memoryview(mapping)
        b = self.buckets
        # Per row: open sessions, then the rate window, rate counts and ban end per bucket.
        areas = [(start + ROW_HEAD.size, start + ROW_HEAD.size + 2 * b) for start in self._rows]
        self._counts = [view[first:end].cast("H") for first, end in areas]
        self._windows = [view[end:end + 4 * b].cast("I") for _, end in areas]
        self._events = [view[end + 4 * b:end + (4 + 2 * RATE_KINDS) * b].cast("H")
                        for _, end in areas]
        self._bans = [view[end + (4 + 2 * RATE_KINDS) * b:end + (8 + 2 * RATE_KINDS) * b]
                      .cast("I") for _, end in areas]
        mapping[own:own + self._row_size] = bytes(self._row_size)  # a previous owner's counts
        ROW_HEAD.pack_into(mapping, own, os.getpid(), 0)
        self._liveness: dict[int, tuple[int, bool, float]] = {}  # row: pid, alive, when

    @classmethod
    def create(cls, slots: int = 1, buckets: int = BUCKETS) -> CounterTable:
        """A table for `slots` processes; this one is slot 0. Shared (a memory file
        whose descriptor children inherit) only when there are other slots."""
        size = HEADER.size + slots * (ROW_HEAD.size + BUCKET_BYTES * buckets)
        header = HEADER.pack(MAGIC, slots, buckets, secrets.token_bytes(16))
        if slots == 1:
            mapping = mmap.mmap(-1, size)
            mapping[:len(header)] = header
            return cls(header, 0, mapping=mapping)
        fd = os.memfd_create("smtpd-agent-connections", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        os.pwrite(fd, header, 0)
        return cls(header, 0, fd)

    @classmethod
    def attach(cls, fd: int, slot: int) -> CounterTable:
        """The table a parent created, from the descriptor it passed; this process is `slot`."""
        return cls(os.pread(fd, HEADER.size, 0), slot, fd)

    def bucket(self, key: str) -> int:
        digest = hashlib.blake2b(key.encode(), key=self.key, digest_size=4).digest()
        return int.from_bytes(digest, "little") % self.buckets

    def _alive(self, index: int, pid: int) -> bool:
        """Whether row `index`'s process holds its lock: checked at most once per TTL for
        the same pid (a row taken over by a new process is checked at once)."""
        now = time.monotonic()
        seen, alive, checked = self._liveness.get(index, (0, False, -LIVENESS_TTL))
        if seen == pid and now - checked < LIVENESS_TTL:
            return alive
        start = self._rows[index]
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB, self._row_size, start)
        except OSError:
            alive = True
        else:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, self._row_size, start)
            alive = False
        self._liveness[index] = (pid, alive, now)
        return alive

    def counts(self, bucket: int) -> tuple[int, int]:
        """(sessions open in `bucket`, sessions open in total), over every live process."""
        in_bucket = total = 0
        for index, start in enumerate(self._rows):
            pid, row_total = ROW_HEAD.unpack_from(self._map, start)
            if row_total and (index == self.slot or self._alive(index, pid)):
                in_bucket += self._counts[index][bucket]
                total += row_total
        return in_bucket, total

    def add(self, bucket: int, delta: int) -> None:
        """Change this process's own row (its only writer)."""
        counts = self._counts[self.slot]
        counts[bucket] = max(0, min(0xFFFF, counts[bucket] + delta))
        start = self._rows[self.slot]
        pid, total = ROW_HEAD.unpack_from(self._map, start)
        ROW_HEAD.pack_into(self._map, start, pid, max(0, total + delta))

    def note(self, bucket: int, kind: RateKind, window: int) -> int:
        """Count one event of `kind` in this process's row; the bucket's count of that kind
        in `window` over every row (a crashed process's count still counts)."""
        own_windows, own_events = self._windows[self.slot], self._events[self.slot]
        if own_windows[bucket] != window:
            own_windows[bucket] = window
            for other in range(RATE_KINDS):
                own_events[bucket * RATE_KINDS + other] = 0
        index = bucket * RATE_KINDS + kind
        own_events[index] = min(0xFFFF, own_events[index] + 1)
        return sum(events[index] for windows, events in zip(self._windows, self._events)
                   if windows[bucket] == window)

    def banned_until(self, bucket: int) -> int:
        """When the latest ban of `bucket` in any row ends (Unix seconds; 0: never banned)."""
        return max(bans[bucket] for bans in self._bans)

    def ban(self, bucket: int, until: int) -> None:
        own = self._bans[self.slot]
        own[bucket] = max(own[bucket], min(until, 0xFFFFFFFF))

    def close(self) -> None:
        for view in (*self._counts, *self._windows, *self._events, *self._bans):
            view.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ConnectionLimits:
    """Open sessions, in total and per client key (IPv4 address or IPv6 /64).

    Without a table the counts are this process's own; with one (smtp.processes > 1)
    they are every accepting process's.
    """

    def __init__(self, total: int, per_ip: int, table: CounterTable | None = None) -> None:
        self.total = total
        self.per_ip = per_ip
        self.table = table if table is not None else CounterTable.create()

    @property
    def open_total(self) -> int:
        return self.table.counts(0)[1]

    def acquire(self, ip: str) -> bool:
        bucket = self.table.bucket(client_key(ip))
        in_bucket, total = self.table.counts(bucket)
        if total >= self.total or in_bucket >= self.per_ip:
            return False
        self.table.add(bucket, 1)
        return True

    def release(self, ip: str) -> None:
        self.table.add(self.table.bucket(client_key(ip)), -1)


class DataBudget:
    """In-flight DATA/BDAT bytes of one process, over what each session may always hold.

    A session holding more than `free` bytes of message content must reserve the
    excess here; when the budget is spent the message is read to its end without
    being kept and answered 452 4.3.1, so slow or huge uploads cannot add up past
    the budget, while a typical message (under `free`) is never refused for it.
    """

    def __init__(self, limit: int, free: int = 262_144) -> None:
        self.limit = limit
        self.free = free
        self.used = 0

    def reserve(self, size: int) -> bool:
        if self.limit and self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used = max(0, self.used - size)


class RateVerdict(enum.Enum):
    """A per-client rate's decision on one event."""

    WITHIN = "within"
    EXCEEDED = "exceeded"  # this event went over the limit: the client is banned from now
    BANNED = "banned"  # an earlier ban still holds


class ClientRates:
    """Per-client rates and temporary bans, in the connection table (every process's).

    Fixed windows of edge.rate_window seconds (a client may reach twice a limit across
    a window boundary, never more); going over any limit bans the client's bucket for
    edge.ban_seconds, during which every connection gets 421 4.7.0.
    """

    def __init__(self, table: CounterTable, settings: EdgeSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.window = settings.rate_window
        self.ban_seconds = settings.ban_seconds
        self.limits = {RateKind.CONNECTION: settings.connection_rate,
                       RateKind.MESSAGE: settings.message_rate,
                       RateKind.FAILED_RCPT: settings.failed_rcpt_rate}
        self.clock = clock
        self.exempt = [ipaddress.ip_network(n, strict=False) for n in settings.rate_exempt]
        self._exempt_seen: dict[str, bool] = {}

    def exempt_client(self, ip: str) -> bool:
        """Whether `ip` is in edge.rate_exempt (remembered: the same few clients recur)."""
        known = self._exempt_seen.get(ip)
        if known is None:
            try:
                address = ipaddress.ip_address(ip.split("%", 1)[0])
            except ValueError:
                known = False
            else:
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                known = any(address in network for network in self.exempt)
            if len(self._exempt_seen) >= 4096:
                self._exempt_seen.clear()
            self._exempt_seen[ip] = known
        return known

    def ban_left(self, ip: str) -> float:
        """Seconds the client's ban still runs (0: not banned)."""
        until = self.table.banned_until(self.table.bucket(client_key(ip)))
        return max(0.0, until - self.clock())

    def note(self, ip: str, kind: RateKind) -> RateVerdict:
        if self.exempt and self.exempt_client(ip):
            return RateVerdict.WITHIN
        bucket = self.table.bucket(client_key(ip))
        now = self.clock()
        if self.table.banned_until(bucket) > now:
            return RateVerdict.BANNED
        limit = self.limits[kind]
        if not limit:
            return RateVerdict.WITHIN
        count = self.table.note(bucket, kind, int(now // self.window) & 0xFFFFFFFF)
        if count <= limit:
            return RateVerdict.WITHIN
        self.table.ban(bucket, math.ceil(now + self.ban_seconds))
        return RateVerdict.EXCEEDED


class Transfer:
    """One session's transaction content: its share of the process's DataBudget and the
    smtp.min_data_rate timer. Both session layers (smtp/server.py, smtp/session.py) use
    it, so a slow or greedy client meets the same rules whichever layer serves it."""

    def __init__(self, settings: SmtpSettings, loop: asyncio.AbstractEventLoop,
                 budget: DataBudget | None, too_slow: Callable[[float], None],
                 context: contextvars.Context | None = None, reserve_step: int = 262_144) -> None:
        self.settings = settings
        self.loop = loop
        self.budget = budget
        self.held = 0  # bytes reserved in budget by this session's transaction
        self.window_bytes = 0
        self._too_slow = too_slow
        self._context = context
        self._reserve_step = reserve_step
        self._handle: asyncio.TimerHandle | None = None

    def hold(self, size: int) -> bool:
        """Reserve what a message of `size` bytes needs beyond the free share; False if
        the process's budget cannot give it."""
        budget = self.budget
        if budget is None:
            return True
        need = size - budget.free
        if need <= self.held:
            return True
        extra = max(need - self.held, self._reserve_step)
        if not budget.reserve(extra):
            return False
        self.held += extra
        return True

    def release(self) -> None:
        if self.held and self.budget is not None:
            self.budget.release(self.held)
            self.held = 0

    def start_rate_watch(self) -> None:
        """Check smtp.min_data_rate at the end of every smtp.data_rate_window while a
        transaction's content is being read: one timer per window, not per read."""
        if self._handle is None and self.settings.min_data_rate:
            self.window_bytes = 0
            self._handle = self.loop.call_later(self.settings.data_rate_window, self._rate_due,
                                                context=self._context)

    def stop_rate_watch(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _rate_due(self) -> None:
        window = self.settings.data_rate_window
        rate = self.window_bytes / window
        if rate < self.settings.min_data_rate:
            self._handle = None
            self._too_slow(rate)
            return
        self.window_bytes = 0
        self._handle = self.loop.call_later(window, self._rate_due, context=self._context)

    def end(self) -> None:
        """The transaction is over (finished, reset or abandoned)."""
        self.stop_rate_watch()
        self.release()

