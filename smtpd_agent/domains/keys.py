"""The DKIM key store: one place for every signing key, shared by receiving and sending.

`domain add` and `dns-records` create keys here and publish their public
halves; outbound signing (issue 7) reads `signing_keys()`; delegated zones
(issue 11) serve `active_keys()` and rotate with `create_keys()` + `retire()`.

Each sending domain has two active keys: RSA-2048 (what every verifier
understands) and Ed25519 (RFC 8463; short, fast, signed alongside RSA because
not every verifier knows it yet). Private keys are PKCS#8, encrypted with
Fernet under a secret that only the service user can read (a 0600 file), so a
database dump alone does not leak them. They never appear in a repr, a log
event or any command's output: only `SigningKey.dkimpy_private_key()` hands
one out, to the signer.
"""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeAlias

import asyncpg
import structlog
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

log = structlog.get_logger(__name__)

Algorithm = Literal["rsa-2048", "ed25519"]
ALGORITHMS: tuple[Algorithm, ...] = ("rsa-2048", "ed25519")
# RFC 6376 3.6.1 k= tag; RFC 8463 3 for ed25519
K_TAG = {"rsa-2048": "rsa", "ed25519": "ed25519"}
SUFFIX = {"rsa-2048": "rsa", "ed25519": "ed25519"}
DbLike: TypeAlias = asyncpg.Pool | asyncpg.Connection


class KeyStoreError(RuntimeError):
    """The key secret is missing, unreadable by us, readable by others, or wrong."""


@dataclass(frozen=True)
class DkimKey:
    """A key's public side: what DNS publishes and what any command may print."""

    id: int
    workspace_id: int
    domain: str
    selector: str
    algorithm: Algorithm
    public_key: str
    created_at: datetime
    retired_at: datetime | None
    # None while a rotated-in key is published but does not sign yet (migration 0007)
    activated_at: datetime | None = None
    retire_after: datetime | None = None

    @property
    def name(self) -> str:
        """Where the key record lives (RFC 6376 3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def txt(self) -> str:
        return f"v=DKIM1; k={K_TAG[self.algorithm]}; p={self.public_key}"


@dataclass(frozen=True)
class SigningKey:
    """A key with its private half, for the signer only (never logged: repr hides it)."""

    domain: str
    selector: str
    algorithm: Algorithm
    private_pkcs8: bytes = field(repr=False)

    @property
    def dkimpy_algorithm(self) -> bytes:
        return b"rsa-sha256" if self.algorithm == "rsa-2048" else b"ed25519-sha256"

    def dkimpy_private_key(self) -> bytes:
        """The form `dkim.sign(privkey=...)` takes: PEM for RSA, base64 seed for Ed25519."""
        key = serialization.load_der_private_key(self.private_pkcs8, password=None)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
            return base64.b64encode(raw)
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def generate(algorithm: Algorithm) -> tuple[bytes, str]:
    """(PKCS#8 DER private key, base64 p= value) for a fresh key."""
    if algorithm == "rsa-2048":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        # RFC 6376 3.6.1: p= is the base64 SubjectPublicKeyInfo
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        der = private.private_bytes(serialization.Encoding.DER,
                                    serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return der, base64.b64encode(public).decode()
    ed = ed25519.Ed25519PrivateKey.generate()
    # RFC 8463 4.2: p= is the bare 32-octet public key, base64
    public = ed.public_key().public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw)
    der = ed.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())
    return der, base64.b64encode(public).decode()


def load_secret(path: Path, create: bool = True) -> Fernet:
    """The Fernet cipher from the key file; refuses a file others can read (it is a key)."""
    if not path.exists():
        if not create:
            raise KeyStoreError(f"DKIM key secret {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes starting at once must not write two different secrets
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(Fernet.generate_key() + b"\n")
            log.info("dkim.secret_created", path=str(path))
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyStoreError(f"DKIM key secret {path} is readable by others "
                            f"(mode {stat.filemode(mode)}): chmod 600 it")
    try:
        return Fernet(path.read_bytes().strip())
    except (OSError, ValueError) as error:
        raise KeyStoreError(f"DKIM key secret {path}: {error}") from None


def selector_for(prefix: str, algorithm: Algorithm, when: datetime, attempt: int = 0) -> str:
    day = when.strftime("%Y%m%d")
    middle = f"{day}-{attempt + 1}" if attempt else day
    return f"{prefix}-{middle}-{SUFFIX[algorithm]}"


KEY_COLUMNS = ("id, workspace_id, domain, selector, algorithm, public_key, created_at, retired_at, "
               "activated_at, retire_after")


class KeyStore:
    """DKIM keys in Postgres; every query is scoped to a workspace.

    The interface outbound signing and delegated zones build on:
    `create_keys`, `active_keys`, `signing_keys`, `retire`, `delete_domain_keys`; rotation
    adds `create_keys(activate=False)`, `activate` and `retire_due`.
    """

    def __init__(self, db: DbLike, secret_file: Path, selector_prefix: str) -> None:
        self._db = db
        self._secret_file = secret_file
        self._fernet: Fernet | None = None
        self._prefix = selector_prefix

    def _cipher(self, create: bool) -> Fernet:
        """Loaded on first use, so publishing and checking never need the secret; only making
        a key may create it (decrypting with a fresh secret could only fail)."""
        if self._fernet is None:
            self._fernet = load_secret(self._secret_file, create=create)
        return self._fernet

    async def create_keys(self, workspace_id: int, domain: str,
                          algorithms: tuple[Algorithm, ...] = ALGORITHMS,
                          db: DbLike | None = None, activate: bool = True) -> list[DkimKey]:
        """A new active key per algorithm for `domain` (new selectors; old keys stay active).

        activate=False (rotation): published at once, but signs only after `activate()`,
        once DNS serves it: a signature nobody can verify yet is worse than the old key's.
        """
        db = db or self._db
        now = datetime.now(UTC)
        created = []
        for algorithm in algorithms:
            private, public = generate(algorithm)
            sealed = self._cipher(create=True).encrypt(private)
            for attempt in range(100):
                selector = selector_for(self._prefix, algorithm, now, attempt)
                row = await db.fetchrow(
                    f"""INSERT INTO dkim_keys (workspace_id, domain, selector, algorithm,
                                               private_key, public_key, activated_at)
                        VALUES ($1, $2, $3, $4, $5, $6,
                                CASE WHEN $7::boolean THEN now() END)
                        ON CONFLICT (domain, selector) DO NOTHING
                        RETURNING {KEY_COLUMNS}""",
                    workspace_id, domain, selector, algorithm, sealed, public, activate)
                if row is not None:
                    break
            else:  # pragma: no cover - a hundred rotations in one day
                raise KeyStoreError(f"no free DKIM selector for {domain} today")
            key = DkimKey(**dict(row))
            log.info("dkim.key_created", domain=domain, selector=key.selector,
                     algorithm=algorithm, workspace_id=workspace_id)
            created.append(key)
        return created

    async def active_keys(self, workspace_id: int, domain: str) -> list[DkimKey]:
        """Keys to publish and sign with, oldest first (RSA before Ed25519 on a tie)."""
        rows = await self._db.fetch(
            f"""SELECT {KEY_COLUMNS} FROM dkim_keys
                WHERE workspace_id = $1 AND domain = $2 AND retired_at IS NULL
                ORDER BY created_at, algorithm DESC, selector""", workspace_id, domain)
        return [DkimKey(**dict(row)) for row in rows]

    async def signing_keys(self, workspace_id: int, domain: str) -> list[SigningKey]:
        """The newest active key of each algorithm, decrypted, for signing mail from `domain`."""
        rows = await self._db.fetch(
            """SELECT DISTINCT ON (algorithm) domain, selector, algorithm, private_key
               FROM dkim_keys
               WHERE workspace_id = $1 AND domain = $2 AND retired_at IS NULL
                 AND activated_at IS NOT NULL
               ORDER BY algorithm DESC, activated_at DESC, id DESC""", workspace_id, domain)
        keys = []
        for row in rows:
            try:
                private = self._cipher(create=False).decrypt(bytes(row["private_key"]))
            except InvalidToken:
                raise KeyStoreError(f"DKIM key {row['selector']} of {domain}: cannot decrypt "
                                    "(was domains.key_file changed?)") from None
            keys.append(SigningKey(row["domain"], row["selector"], row["algorithm"], private))
        return keys

    async def check_secret(self) -> None:
        """Raise KeyStoreError unless this host's secret opens the newest key in the database.

        Every host of a cluster signs with keys another host may have made: a host with a
        secret of its own (a state directory's fresh dkim.secret) could sign nothing.
        """
        row = await self._db.fetchrow(
            "SELECT domain, selector, private_key FROM dkim_keys ORDER BY id DESC LIMIT 1")
        if row is None:
            return
        try:
            self._cipher(create=False).decrypt(bytes(row["private_key"]))
        except InvalidToken:
            raise KeyStoreError(
                f"DKIM key secret {self._secret_file} does not open key {row['selector']} of "
                f"{row['domain']}: another host made it with another secret (every host needs "
                "the same domains.key_file)") from None

    async def retire(self, workspace_id: int, domain: str, selector: str) -> bool:
        """Stop publishing and signing with a selector (rotation's last step)."""
        status = await self._db.execute(
            """UPDATE dkim_keys SET retired_at = now()
               WHERE workspace_id = $1 AND domain = $2 AND selector = $3
                 AND retired_at IS NULL""", workspace_id, domain, selector)
        retired = status.endswith(" 1")
        if retired:
            log.info("dkim.key_retired", domain=domain, selector=selector,
                     workspace_id=workspace_id)
        return retired

    async def activate(self, workspace_id: int, domain: str, selectors: list[str],
                       grace_seconds: float) -> None:
        """Sign with `selectors` from now on; the keys they replace (same algorithm, older)
        stay published `grace_seconds` longer, then `retire_due` retires them."""
        async with _transaction(self._db) as connection:
            rows = await connection.fetch(
                """UPDATE dkim_keys SET activated_at = now()
                   WHERE workspace_id = $1 AND domain = $2 AND selector = ANY($3::text[])
                     AND retired_at IS NULL AND activated_at IS NULL
                   RETURNING algorithm, id""", workspace_id, domain, selectors)
            for row in rows:
                await connection.execute(
                    """UPDATE dkim_keys SET retire_after = now() + make_interval(secs => $5)
                       WHERE workspace_id = $1 AND domain = $2 AND algorithm = $3 AND id < $4
                         AND retired_at IS NULL AND activated_at IS NOT NULL
                         AND retire_after IS NULL""",
                    workspace_id, domain, row["algorithm"], row["id"], float(grace_seconds))
        for selector in selectors:
            log.info("dkim.key_activated", domain=domain, selector=selector,
                     workspace_id=workspace_id)

    async def retire_due(self, workspace_id: int, domain: str) -> list[str]:
        """Retire the rotated-out keys whose grace period is over; their selectors."""
        rows = await self._db.fetch(
            """UPDATE dkim_keys SET retired_at = now()
               WHERE workspace_id = $1 AND domain = $2 AND retired_at IS NULL
                 AND retire_after <= now()
               RETURNING selector""", workspace_id, domain)
        for row in rows:
            log.info("dkim.key_retired", domain=domain, selector=row["selector"],
                     workspace_id=workspace_id, reason="rotation grace over")
        return [row["selector"] for row in rows]

    async def delete_domain_keys(self, workspace_id: int, domain: str,
                                 db: DbLike | None = None) -> int:
        status = await (db or self._db).execute(
            "DELETE FROM dkim_keys WHERE workspace_id = $1 AND domain = $2", workspace_id, domain)
        return int(status.split()[-1])


@contextlib.asynccontextmanager
async def _transaction(db: DbLike) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as connection, connection.transaction():
            yield connection
        return
    async with db.transaction():
        yield db


async def operator_workspace_id(db: DbLike) -> int:
    """The owner of the default domain's keys (see migration 0003)."""
    workspace_id = await db.fetchval("SELECT id FROM workspaces WHERE operator")
    if workspace_id is None:  # pragma: no cover - the migration inserts it
        raise KeyStoreError("no operator workspace: run `smtpd-agent migrate`")
    return int(workspace_id)
