"""The inbox API: /api/v1/workspaces/{slug}/..., reading, behind Bearer keys with scopes.

The key decides the workspace; the slug in the path must be that workspace's,
and every query filters on the key's workspace_id. A key of another workspace
gets 404, never 403, so it learns nothing about what exists there. No key or
an unknown key gets 401.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import asyncpg
import structlog
from aiohttp import web

from ..extract.attachment import AttachmentText, ExtractionError, Failure
from ..store import inbox as queries
from ..store.inbox import Cursor
from ..store.mailbox import LABEL
from ..store.apikeys import KeyOwner, Scope
from ..store.directory import HANDLE, SLUG
from .responses import HttpError, bearer_owner, json_response

log = structlog.get_logger(__name__)

DEFAULT_PAGE = 20
MAX_PAGE = 100
BIGINT_MAX = 2**63 - 1
# Content types we pass through as given; anything else is served as octet-stream.
SAFE_CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
# An attachment without text to give, by why.
EXTRACTION_STATUS = {Failure.UNSUPPORTED: 415, Failure.TOO_LARGE: 422, Failure.UNREADABLE: 422,
                     Failure.TIMEOUT: 422, Failure.BUSY: 503}


def encode_cursor(last_message_at: datetime, thread_id: int) -> str:
    text = f"{last_message_at.isoformat()}|{thread_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(value: str) -> Cursor:
    """Raise ValueError for anything we did not issue."""
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        when, _, ident = text.partition("|")
        moment = datetime.fromisoformat(when)
        number = int(ident)
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise ValueError("invalid cursor") from error
    if not 0 < number <= BIGINT_MAX:
        raise ValueError("invalid cursor")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return Cursor(moment, number)


def page_limit(request: web.Request) -> int:
    """The `limit` query parameter of a listing: 1 to MAX_PAGE, DEFAULT_PAGE when absent."""
    try:
        limit = int(request.query.get("limit", DEFAULT_PAGE))
    except ValueError:
        raise HttpError(400, "limit: expected an integer") from None
    if not 1 <= limit <= MAX_PAGE:
        raise HttpError(400, f"limit: must be 1-{MAX_PAGE}")
    return limit


def row_id(request: web.Request, name: str) -> int:
    number = int(request.match_info[name])  # the route admits digits only
    if not 0 < number <= BIGINT_MAX:
        raise HttpError(404, "not found")
    return number


class InboxApi:
    def __init__(self, db: asyncpg.Pool, texts: AttachmentText) -> None:
        self.db = db
        self.texts = texts

    async def owner(self, request: web.Request, scope: Scope = Scope.READ) -> KeyOwner:
        """The key's workspace, which must be the one the path names, and a key holding
        `scope` (403 without it; a key of another workspace learns only 404)."""
        owner = await bearer_owner(self.db, request, missing="missing bearer token",
                                   refused_event="api.unauthorized")
        slug = request.match_info["slug"]
        if not SLUG.match(slug) or slug != owner.workspace_slug:
            log.info("api.other_workspace", key_id=owner.key_id, workspace=owner.workspace_slug)
            raise HttpError(404, "not found")
        if scope not in owner.scopes:
            log.info("api.forbidden", key_id=owner.key_id, scope=scope.value)
            raise HttpError(403, f"this key lacks the {scope.value!r} scope")
        return owner

    async def agents(self, request: web.Request) -> web.Response:
        owner = await self.owner(request)
        return json_response({"agents": await queries.agents(self.db, owner.workspace_id)})

    async def inbox(self, request: web.Request) -> web.Response:
        owner = await self.owner(request)
        handle = request.match_info["handle"]
        agent = (await queries.agent_id(self.db, owner.workspace_id, handle)
                 if HANDLE.match(handle.lower()) else None)
        if agent is None:
            raise HttpError(404, "no such agent")
        limit = page_limit(request)
        after = None
        if "cursor" in request.query:
            try:
                after = decode_cursor(request.query["cursor"])
            except ValueError:
                raise HttpError(400, "cursor: invalid") from None
        label = request.query.get("label")
        if label is not None and not LABEL.match(label):
            raise HttpError(400, "label: a-z, 0-9 and _ . : / -, at most 63 characters")
        threads = await queries.threads_page(self.db, owner.workspace_id, agent, limit + 1,
                                             after, label)
        page, more = threads[:limit], len(threads) > limit
        last = page[-1] if page else None
        return json_response({
            "threads": page,
            "next_cursor": encode_cursor(last["last_message_at"], last["id"])
            if more and last else None})

    async def thread(self, request: web.Request) -> web.Response:
        owner = await self.owner(request)
        found = await queries.thread(self.db, owner.workspace_id, row_id(request, "id"))
        if found is None:
            raise HttpError(404, "no such thread")
        return json_response(found)

    async def raw(self, request: web.Request) -> web.Response:
        owner = await self.owner(request)
        raw = await queries.raw_message(self.db, owner.workspace_id, row_id(request, "id"))
        if raw is None:
            raise HttpError(404, "no such message")
        return web.Response(body=bytes(raw), headers={"Content-Type": "message/rfc822"})

    async def attachment(self, request: web.Request) -> web.Response:
        owner = await self.owner(request)
        found = await queries.attachment(self.db, owner.workspace_id, row_id(request, "id"))
        if found is None:
            raise HttpError(404, "no such attachment")
        return attachment_response(found)

    async def attachment_text(self, request: web.Request) -> web.Response:
        """The attachment's text (extract/attachment.py): text/* and PDFs, bounded."""
        owner = await self.owner(request)
        found = await queries.attachment(self.db, owner.workspace_id, row_id(request, "id"))
        if found is None:
            raise HttpError(404, "no such attachment")
        content_type = (found["content_type"] or "").lower()
        try:
            extracted = await self.texts.extract(content_type, bytes(found["content"]))
        except ExtractionError as error:
            log.info("api.attachment_text_refused", key_id=owner.key_id,
                     attachment=found["id"], content_type=content_type,
                     reason=error.failure.value)
            headers = {"Retry-After": "5"} if error.failure is Failure.BUSY else None
            raise HttpError(EXTRACTION_STATUS[error.failure], error.detail, headers) from None
        return json_response({
            "id": found["id"], "filename": found["filename"], "content_type": content_type,
            "size": found["size"], "text": extracted.text, "truncated": extracted.truncated,
            "pages": extracted.pages, "page_count": extracted.page_count})


def attachment_response(found: dict[str, Any]) -> web.Response:
    """An attachment's bytes (a message's or a draft's): filename, content_type, content."""
    content_type = (found["content_type"] or "").lower()
    if not SAFE_CONTENT_TYPE.match(content_type):
        content_type = "application/octet-stream"
    # Attacker-chosen bytes: never rendered inline by a browser on our origin.
    response = web.Response(body=bytes(found["content"]), headers={
        "Content-Type": content_type, "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox"})
    response.headers["Content-Disposition"] = _disposition(found["filename"])
    return response


def _disposition(filename: str | None) -> str:
    if not filename:
        return "attachment"
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"
