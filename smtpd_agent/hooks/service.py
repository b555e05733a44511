"""The workspaces' webhook endpoints: create, change, rotate, replay; secrets sealed.

Place: between the API handlers (http/endpoints.py) and the store (store/hooks.py). A
secret is made here, returned once to the caller, and stored sealed with Fernet under the
at-rest secret (domains.key_file, as the DKIM private keys: domains/keys.py); only the
delivery worker unseals it, to sign. URLs pass targets.check_url before they are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import structlog
from cryptography.fernet import Fernet, InvalidToken

from ..config import Settings
from ..domains import key_file
from ..domains.keys import KeyStoreError, load_secret
from ..store import hooks as store
from . import signing
from .targets import Policy, check_url

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Created:
    """An endpoint and its secret, which is shown this once."""

    endpoint: store.Endpoint
    secret: str


class Sealer:
    """Fernet under the at-rest secret, loaded on first use."""

    def __init__(self, settings: Settings) -> None:
        self.path = key_file(settings)
        self._fernet: Fernet | None = None

    def _cipher(self) -> Fernet:
        if self._fernet is None:
            self._fernet = load_secret(self.path, create=True)
        return self._fernet

    def seal(self, secret: str) -> bytes:
        return self._cipher().encrypt(secret.encode())

    def unseal(self, sealed: bytes) -> str:
        try:
            return self._cipher().decrypt(sealed).decode()
        except InvalidToken:
            raise KeyStoreError("a webhook secret cannot be decrypted "
                                "(was domains.key_file changed?)") from None


class Endpoints:
    """What the API does to endpoints, each call scoped to one workspace."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, sealer: Sealer | None = None) -> None:
        self.pool = pool
        self.settings = settings.webhooks
        self.policy = Policy.of(self.settings.allow_loopback, self.settings.allowed_networks)
        self.sealer = sealer or Sealer(settings)

    def check_url(self, url: str) -> str:
        """The URL as stored, or targets.Refused saying why not."""
        return check_url(url, self.policy)

    async def create(self, workspace_id: int, url: str, event_types: list[str], enabled: bool,
                     description: str | None) -> Created:
        secret = signing.new_secret()
        endpoint = await store.create_endpoint(
            self.pool, workspace_id, self.check_url(url), event_types, enabled, description,
            self.sealer.seal(secret), self.settings.max_endpoints)
        log.info("webhooks.endpoint_created", workspace_id=workspace_id,
                 endpoint_id=endpoint.id, event_types=event_types, enabled=enabled)
        return Created(endpoint, secret)

    async def rotate(self, workspace_id: int, endpoint_id: int) -> Created | None:
        secret = signing.new_secret()
        endpoint = await store.rotate_secret(self.pool, workspace_id, endpoint_id,
                                             self.sealer.seal(secret),
                                             self.settings.secret_rotation_grace)
        if endpoint is None:
            return None
        log.info("webhooks.secret_rotated", workspace_id=workspace_id, endpoint_id=endpoint_id,
                 grace=self.settings.secret_rotation_grace)
        return Created(endpoint, secret)

    async def update(self, workspace_id: int, endpoint_id: int, *, url: str | None,
                     event_types: list[str] | None, description: str | None,
                     set_description: bool, enabled: bool | None) -> store.Endpoint | None:
        before = await store.endpoint(self.pool, workspace_id, endpoint_id)
        if before is None:
            return None
        checked = self.check_url(url) if url is not None else None
        async with self.pool.acquire() as connection, connection.transaction():
            after = await store.update_endpoint(
                connection, workspace_id, endpoint_id, url=checked, event_types=event_types,
                description=description, set_description=set_description, enabled=enabled)
            if after is not None and before.enabled and not after.enabled:
                await store.fail_unfinished(connection, workspace_id, endpoint_id,
                                            "endpoint disabled over the API")
        log.info("webhooks.endpoint_updated", workspace_id=workspace_id,
                 endpoint_id=endpoint_id, enabled=enabled, url_changed=url is not None)
        return after
