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
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import socket
import struct
import time
from typing import Final

MAGIC: Final = b"SMTPLIM1"
HEADER = struct.Struct("<8sII16s")  # magic, slots, buckets, hash key
ROW_HEAD = struct.Struct("<qq")  # pid, open sessions of that process
BUCKETS: Final = 65_536
IPV4_MAPPED: Final = bytes(10) + b"\xff\xff"
LIVENESS_TTL: Final = 1.0  # seconds another row's liveness is trusted before checking again


def client_key(ip: str) -> str:
    """The unit a per-client limit counts: an IPv4 address, or an IPv6 address's /64.

    Once per connection: socket.inet_pton rather than the ipaddress module (~10x faster).
    """
    if ":" not in ip:
        return ip  # IPv4 as the socket gave it (or not an IP: a Unix socket peer, itself)
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    except OSError:
        return ip
    if packed[:12] == IPV4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


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
        self._row_size = ROW_HEAD.size + 2 * self.buckets
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
        self._counts = [memoryview(mapping)[start + ROW_HEAD.size:start + self._row_size]
                        .cast("H") for start in self._rows]
        mapping[own:own + self._row_size] = bytes(self._row_size)  # a previous owner's counts
        ROW_HEAD.pack_into(mapping, own, os.getpid(), 0)
        self._liveness: dict[int, tuple[int, bool, float]] = {}  # row: pid, alive, when

    @classmethod
    def create(cls, slots: int = 1, buckets: int = BUCKETS) -> CounterTable:
        """A table for `slots` processes; this one is slot 0. Shared (a memory file
        whose descriptor children inherit) only when there are other slots."""
        size = HEADER.size + slots * (ROW_HEAD.size + 2 * buckets)
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

    def close(self) -> None:
        for view in self._counts:
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
