"""The outgoing-webhook routes (admin keys): endpoints, secret rotation, the delivery log,
replay. Not the providers' incoming webhooks (http/webhooks.py).

Each handler checks the key's workspace and scope (api.InboxApi.owner), reads a bounded
JSON body, and leaves the work to hooks/service.py and the store. The secret is in the
answer to create and rotate only.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog
from aiohttp import web

from ..hooks.payloads import EVENT_TYPES
from ..hooks.service import Endpoints
from ..hooks.targets import Refused
from ..store import hooks as store
from ..store.apikeys import Scope
from .api import InboxApi, page_limit, row_id
from .mailbox import MAX_ADMIN_BODY, json_object
from .responses import HttpError, json_response

log = structlog.get_logger(__name__)

MAX_DESCRIPTION = 500


def _event_types(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > 50 or not all(
            isinstance(v, str) for v in value):
        raise HttpError(400, "event_types: a list of event types (empty: all)")
    unknown = [v for v in value if v not in EVENT_TYPES]
    if unknown:
        raise HttpError(400, f"event_types: unknown {unknown[0][:60]!r}; known: "
                             + ", ".join(sorted(EVENT_TYPES)))
    return sorted(set(value))


def _description(body: dict[str, Any]) -> str | None:
    value = body.get("description")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION or any(
            ord(c) < 32 for c in value):
        raise HttpError(400, f"description: one line of at most {MAX_DESCRIPTION} characters")
    return value


def _enabled(body: dict[str, Any]) -> bool | None:
    value = body.get("enabled")
    if value is not None and not isinstance(value, bool):
        raise HttpError(400, "enabled: true or false")
    return value


class EndpointsApi:
    def __init__(self, db: asyncpg.Pool, api: InboxApi, endpoints: Endpoints) -> None:
        self.db = db
        self.api = api
        self.endpoints = endpoints

    async def list(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        found = await store.endpoints(self.db, owner.workspace_id)
        return json_response({"endpoints": [e.public() for e in found]})

    async def get(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        found = await store.endpoint(self.db, owner.workspace_id, row_id(request, "id"))
        if found is None:
            raise HttpError(404, "no such webhook endpoint")
        return json_response(found.public())

    async def create(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        body = await json_object(request, MAX_ADMIN_BODY)
        url = body.get("url")
        if not isinstance(url, str):
            raise HttpError(400, "url: required, an https URL")
        event_types = _event_types(body.get("event_types", []))
        enabled = _enabled(body)
        try:
            created = await self.endpoints.create(
                owner.workspace_id, url, event_types, True if enabled is None else enabled,
                _description(body))
        except Refused as refused:
            raise HttpError(422, str(refused)) from None
        except store.TooMany as error:
            raise HttpError(409, str(error)) from None
        log.info("api.webhook_created", key_id=owner.key_id, endpoint_id=created.endpoint.id)
        return json_response({**created.endpoint.public(), "secret": created.secret}, 201)

    async def update(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        body = await json_object(request, MAX_ADMIN_BODY)
        url = body.get("url")
        if url is not None and not isinstance(url, str):
            raise HttpError(400, "url: an https URL")
        event_types = _event_types(body["event_types"]) if "event_types" in body else None
        try:
            updated = await self.endpoints.update(
                owner.workspace_id, row_id(request, "id"), url=url, event_types=event_types,
                description=_description(body), set_description="description" in body,
                enabled=_enabled(body))
        except Refused as refused:
            raise HttpError(422, str(refused)) from None
        if updated is None:
            raise HttpError(404, "no such webhook endpoint")
        return json_response(updated.public())

    async def delete(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        endpoint_id = row_id(request, "id")
        if not await store.delete_endpoint(self.db, owner.workspace_id, endpoint_id):
            raise HttpError(404, "no such webhook endpoint")
        log.info("api.webhook_deleted", key_id=owner.key_id, endpoint_id=endpoint_id)
        return web.Response(status=204)

    async def rotate(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        rotated = await self.endpoints.rotate(owner.workspace_id, row_id(request, "id"))
        if rotated is None:
            raise HttpError(404, "no such webhook endpoint")
        log.info("api.webhook_secret_rotated", key_id=owner.key_id,
                 endpoint_id=rotated.endpoint.id)
        return json_response({**rotated.endpoint.public(), "secret": rotated.secret})

    async def deliveries(self, request: web.Request) -> web.Response:
        """The delivery log: deliveries newest first, each with its attempts."""
        owner = await self.api.owner(request, Scope.ADMIN)
        endpoint_id = row_id(request, "id")
        if await store.endpoint(self.db, owner.workspace_id, endpoint_id) is None:
            raise HttpError(404, "no such webhook endpoint")
        limit = page_limit(request)
        before = None
        if "before" in request.query:
            text = request.query["before"]
            if not text.isdigit() or not 0 < int(text) < 2**63:
                raise HttpError(400, "before: a delivery id")
            before = int(text)
        rows = await store.deliveries(self.db, owner.workspace_id, endpoint_id, limit + 1,
                                      before)
        page, more = rows[:limit], len(rows) > limit
        return json_response({"deliveries": page,
                              "next_before": page[-1]["id"] if more and page else None})

    async def replay_delivery(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        endpoint_id = row_id(request, "id")
        replay = await store.replay_delivery(self.db, owner.workspace_id, endpoint_id,
                                             row_id(request, "delivery"))
        if replay is None:
            raise HttpError(404, "no such delivery of this endpoint")
        log.info("api.webhook_replayed", key_id=owner.key_id, endpoint_id=endpoint_id,
                 delivery_id=replay)
        return json_response({"delivery_id": replay}, 202)

    async def replay_event(self, request: web.Request) -> web.Response:
        """POST {"event_id": n}: send an event of the workspace to this endpoint again (or
        for the first time, if it was made before the endpoint or not subscribed)."""
        owner = await self.api.owner(request, Scope.ADMIN)
        endpoint_id = row_id(request, "id")
        body = await json_object(request, MAX_ADMIN_BODY)
        event_id = body.get("event_id")
        if not isinstance(event_id, int) or isinstance(event_id, bool) or \
                not 0 < event_id < 2**63:
            raise HttpError(400, "event_id: an event's id")
        replay = await store.replay_event(self.db, owner.workspace_id, endpoint_id, event_id)
        if replay is None:
            raise HttpError(404, "no such event or webhook endpoint")
        log.info("api.webhook_replayed", key_id=owner.key_id, endpoint_id=endpoint_id,
                 event_id=event_id, delivery_id=replay)
        return json_response({"delivery_id": replay}, 202)
