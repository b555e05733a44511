"""The programmable-mailbox routes: agents and keys for `admin` keys, send and reply for
`send` keys. Each handler checks the key's workspace and scope (api.InboxApi.owner),
reads a bounded body, and leaves the work to mailbox/send.py and the store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import math
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from ..mailbox.send import Mailboxes, Problem, SendError, SendRequest, draft_fields, send_draft
from ..message import Attachment
from ..store import directory
from ..store import mailbox as queries
from ..store.apikeys import Scope, create_key, list_keys, parse_scopes, revoke_key
from ..store.directory import HANDLE, ReplyMode
from .api import InboxApi, attachment_response, page_limit, row_id
from .responses import HttpError, json_response

log = structlog.get_logger(__name__)

STATUS = {Problem.INVALID: 400, Problem.NOT_FOUND: 404, Problem.DISABLED: 409,
          Problem.REFUSED: 422, Problem.CAPPED: 422, Problem.RATE_LIMITED: 429,
          Problem.KEY_REUSED: 422, Problem.TOO_LARGE: 413, Problem.CONFLICT: 409}
MAX_DISPLAY_NAME = 200
MAX_PROMPT = 20_000
MAX_KEY_NAME = 200
# Admin bodies are small JSON objects.
MAX_ADMIN_BODY = 64 * 1024
ADDRESS_FIELDS = ("to", "cc", "bcc")
TEXT_FIELDS = ("subject", "text", "html")


def _fail(error: SendError) -> HttpError:
    """The refusal with the rule that made it; a cap that frees up says when (Retry-After)."""
    headers = ({"Retry-After": str(math.ceil(error.retry_after))}
               if error.retry_after is not None else None)
    return HttpError(STATUS[error.problem], error.message, headers, error.rule)


@dataclass
class Body:
    """A send, reply or draft request as given: only the fields it names (an update keeps
    the others); `attachments` None when it names none."""

    values: dict[str, Any]
    attachments: list[Attachment] | None

    def request(self) -> SendRequest:
        return SendRequest(
            to=tuple(self.values.get("to", ())), cc=tuple(self.values.get("cc", ())),
            bcc=tuple(self.values.get("bcc", ())), subject=self.values.get("subject"),
            text=self.values.get("text"), html=self.values.get("html"),
            attachments=tuple(self.attachments or ()))


async def json_object(request: web.Request, limit: int) -> dict[str, Any]:
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise HttpError(413, f"body: at most {limit} bytes")
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "body: expected a JSON object") from None
    if not isinstance(value, dict):
        raise HttpError(400, "body: expected a JSON object")
    return value


def _text(values: dict[str, Any], name: str, limit: int, single_line: bool = False) -> Any:
    value = values.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise HttpError(400, f"{name}: a string of at most {limit} characters")
    if single_line and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise HttpError(400, f"{name}: no control characters")
    return value


def _addresses(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise HttpError(400, f"{name}: a string or a list of strings")
    return [i for i in (item.strip() for item in items) if i]


class MailboxApi:
    def __init__(self, db: asyncpg.Pool, api: InboxApi, mailboxes: Mailboxes) -> None:
        self.db = db
        self.api = api
        self.mailboxes = mailboxes

    # --- agents -------------------------------------------------------------------------

    async def agent(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.READ)
        found = await queries.agent(self.db, owner.workspace_id, request.match_info["handle"])
        if found is None:
            raise HttpError(404, "no such agent")
        if Scope.ADMIN not in owner.scopes:
            found.pop("system_prompt")
        return json_response(found)

    async def create_agent(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        body = await json_object(request, MAX_ADMIN_BODY)
        handle = body.get("handle")
        if not isinstance(handle, str) or not HANDLE.match(handle.lower()) or len(handle) > 64:
            raise HttpError(400, "handle: a-z, 0-9, '.', '_' and '-', at most 64 characters")
        mode = self._mode(body)
        if await queries.agent(self.db, owner.workspace_id, handle) is not None:
            raise HttpError(409, f"agent {handle.lower()!r} already exists")
        try:
            await directory.add_agent(
                self.db, owner.workspace_slug, handle,
                display_name=_text(body, "display_name", MAX_DISPLAY_NAME, single_line=True),
                system_prompt=_text(body, "system_prompt", MAX_PROMPT),
                reply_mode=mode or ReplyMode.AUTO)
        except directory.DirectoryError as error:
            raise HttpError(409 if "already exists" in str(error) else 400, str(error)) from None
        log.info("api.agent_created", key_id=owner.key_id, handle=handle.lower())
        return json_response(await queries.agent(self.db, owner.workspace_id, handle), 201)

    async def update_agent(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        handle = request.match_info["handle"]
        body = await json_object(request, MAX_ADMIN_BODY)
        enabled = body.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            raise HttpError(400, "enabled: true or false")
        changes: dict[str, Any] = {}
        if "display_name" in body:
            changes["display_name"] = _text(body, "display_name", MAX_DISPLAY_NAME,
                                            single_line=True)
        if "system_prompt" in body:
            changes["system_prompt"] = _text(body, "system_prompt", MAX_PROMPT)
        if not HANDLE.match(handle.lower()) or not await directory.update_agent(
                self.db, owner.workspace_id, handle, reply_mode=self._mode(body),
                enabled=enabled, **changes):
            raise HttpError(404, "no such agent")
        log.info("api.agent_updated", key_id=owner.key_id, handle=handle.lower(),
                 fields=sorted(body))
        return json_response(await queries.agent(self.db, owner.workspace_id, handle))

    @staticmethod
    def _mode(body: dict[str, Any]) -> ReplyMode | None:
        value = body.get("reply_mode")
        if value is None:
            return None
        try:
            return ReplyMode(value)
        except ValueError:
            raise HttpError(400, "reply_mode: auto, draft or off") from None

    # --- keys ---------------------------------------------------------------------------

    async def keys(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        return json_response({"keys": [dict(vars(k)) for k in
                                       await list_keys(self.db, owner.workspace_slug)]})

    async def create_key(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        body = await json_object(request, MAX_ADMIN_BODY)
        scopes = body.get("scopes", ["read"])
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise HttpError(400, "scopes: a list of read, send, admin")
        try:
            parsed = parse_scopes(scopes)
        except ValueError as error:
            raise HttpError(400, f"scopes: {error}") from None
        created = await create_key(self.db, owner.workspace_slug,
                                   _text(body, "name", MAX_KEY_NAME, single_line=True), parsed)
        log.info("api.key_created", key_id=owner.key_id, created=created.id,
                 scopes=sorted(parsed))
        return json_response({"id": created.id, "prefix": created.prefix, "key": created.key,
                              "scopes": [s.value for s in Scope if s in parsed]}, 201)

    async def revoke_key(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.ADMIN)
        if not await revoke_key(self.db, owner.workspace_slug, row_id(request, "id")):
            raise HttpError(404, "no such key")
        log.info("api.key_revoked", key_id=owner.key_id, revoked=request.match_info["id"])
        return web.Response(status=204)

    # --- send and reply -----------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.SEND)
        handle = request.match_info["handle"]
        if not HANDLE.match(handle.lower()):
            raise HttpError(404, "no such agent")
        outgoing, fingerprint = await self._read(request, f"send:{handle.lower()}")
        try:
            sent = await self.mailboxes.send(owner.workspace_id, owner.workspace_slug, handle,
                                             outgoing, request.headers.get("Idempotency-Key"),
                                             fingerprint)
        except SendError as error:
            raise _fail(error) from None
        return await self._sent(owner.workspace_id, sent)

    async def reply(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.SEND)
        thread_id = row_id(request, "id")
        outgoing, fingerprint = await self._read(request, f"reply:{thread_id}")
        try:
            sent = await self.mailboxes.reply(owner.workspace_id, thread_id, outgoing,
                                              request.headers.get("Idempotency-Key"), fingerprint)
        except SendError as error:
            raise _fail(error) from None
        return await self._sent(owner.workspace_id, sent)

    async def _agent_filter(self, request: web.Request, workspace_id: int) -> int | None:
        """The `agent` query parameter (a handle of this workspace) as an agent id, if given."""
        if "agent" not in request.query:
            return None
        handle = request.query["agent"]
        found = (await queries.agent(self.db, workspace_id, handle)
                 if HANDLE.match(handle.lower()) else None)
        if found is None:
            raise HttpError(404, "no such agent")
        agent_id: int = found["id"]
        return agent_id

    # --- drafts -------------------------------------------------------------------------

    async def drafts(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.READ)
        agent_id = await self._agent_filter(request, owner.workspace_id)
        return json_response({"drafts": await queries.drafts(self.db, owner.workspace_id,
                                                             agent_id)})

    async def draft(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.READ)
        found = await queries.draft(self.db, owner.workspace_id, row_id(request, "id"))
        if found is None:
            raise HttpError(404, "no such draft")
        found.pop("agent_id")
        return json_response(found)

    async def draft_attachment(self, request: web.Request) -> web.Response:
        """One of the draft's own attachments, as sent (the ids the draft lists)."""
        owner = await self.api.owner(request, Scope.READ)
        found = await queries.draft_attachment(self.db, owner.workspace_id,
                                               row_id(request, "id"),
                                               row_id(request, "attachment"))
        if found is None:
            raise HttpError(404, "no such attachment of this draft")
        return attachment_response(found)

    async def create_draft(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.SEND)
        handle = request.match_info["handle"]
        found = (await queries.agent(self.db, owner.workspace_id, handle)
                 if HANDLE.match(handle.lower()) else None)
        if found is None:
            raise HttpError(404, "no such agent")
        body = await self._body(request, extra=("thread_id",))
        thread_id = _thread_id(body.values.get("thread_id"))
        if thread_id is not None:
            target = await queries.reply_target(self.db, owner.workspace_id, thread_id)
            if target is None or target.agent_id != found["id"]:
                raise HttpError(404, "no such thread for this agent")
        try:
            fields = draft_fields(body.request(), self.mailboxes.bounds)
        except SendError as error:
            raise _fail(error) from None
        draft_id = await queries.add_draft(self.db, owner.workspace_id, found["id"], thread_id,
                                           fields, "api")
        log.info("api.draft_created", key_id=owner.key_id, draft=draft_id,
                 attachments=len(fields.attachments or ()))
        return await self._draft(owner.workspace_id, draft_id, 201)

    async def update_draft(self, request: web.Request) -> web.Response:
        """Fields named replace the draft's; attachments given replace all of its own
        (JSON "attachments": [] removes them), none given keeps them."""
        owner = await self.api.owner(request, Scope.SEND)
        draft_id = row_id(request, "id")
        found = await queries.draft(self.db, owner.workspace_id, draft_id)
        if found is None:
            raise HttpError(404, "no such draft")
        body = await self._body(request)
        merged = Body({name: body.values[name] if name in body.values else found[name]
                       for name in ADDRESS_FIELDS + TEXT_FIELDS}, body.attachments)
        try:
            fields = draft_fields(merged.request(), self.mailboxes.bounds,
                                  keep_attachments=body.attachments is None)
        except SendError as error:
            raise _fail(error) from None
        if not await queries.update_draft(self.db, owner.workspace_id, draft_id, fields):
            raise HttpError(409, f"the draft was {found['status']} already")
        return await self._draft(owner.workspace_id, draft_id, 200)

    async def send_draft(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.SEND)
        draft_id = row_id(request, "id")
        try:
            sent = await send_draft(self.mailboxes, owner.workspace_id, owner.workspace_slug,
                                    draft_id)
        except SendError as error:
            raise _fail(error) from None
        log.info("api.draft_sent", key_id=owner.key_id, draft=draft_id,
                 message=sent.message_id)
        return await self._sent(owner.workspace_id, sent)

    async def discard_draft(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.SEND)
        draft_id = row_id(request, "id")
        if not await queries.discard_draft(self.db, owner.workspace_id, draft_id):
            found = await queries.draft(self.db, owner.workspace_id, draft_id)
            if found is None:
                raise HttpError(404, "no such draft")
            raise HttpError(409, f"the draft was {found['status']} already")
        log.info("api.draft_discarded", key_id=owner.key_id, draft=draft_id)
        return web.Response(status=204)

    async def _draft(self, workspace_id: int, draft_id: int, status: int) -> web.Response:
        found = await queries.draft(self.db, workspace_id, draft_id)
        assert found is not None
        found.pop("agent_id")
        return json_response(found, status)

    # --- labels and search --------------------------------------------------------------

    async def labels(self, request: web.Request) -> web.Response:
        """PATCH a message's labels: {"add": [...], "remove": [...]} (mark read: remove
        'unread')."""
        owner = await self.api.owner(request, Scope.SEND)
        message_id = row_id(request, "id")
        body = await json_object(request, MAX_ADMIN_BODY)
        changes = []
        for name in ("add", "remove"):
            values = body.get(name, [])
            if not isinstance(values, list) or len(values) > queries.MAX_LABELS or not all(
                    isinstance(v, str) and queries.LABEL.match(v) for v in values):
                raise HttpError(400, f"{name}: a list of labels (a-z, 0-9 and _ . : / -, "
                                     f"at most 63 characters, at most {queries.MAX_LABELS})")
            changes.append(values)
        try:
            labels = await queries.change_labels(self.db, owner.workspace_id, message_id,
                                                 *changes)
        except asyncpg.CheckViolationError:
            raise HttpError(400, f"at most {queries.MAX_LABELS} labels a message") from None
        if labels is None:
            raise HttpError(404, "no such message")
        return json_response({"id": message_id, "labels": labels})

    async def search(self, request: web.Request) -> web.Response:
        owner = await self.api.owner(request, Scope.READ)
        text = request.query.get("q", "").strip()
        if not text or len(text) > 500 or "\x00" in text:
            raise HttpError(400, "q: 1-500 characters")
        limit = page_limit(request)
        agent_id = await self._agent_filter(request, owner.workspace_id)
        after = None
        if "cursor" in request.query:
            after = _search_cursor(request.query["cursor"])
        rows = await queries.search(self.db, owner.workspace_id, text, agent_id, limit + 1,
                                    after)
        page, more = rows[:limit], len(rows) > limit
        for row in page:
            row["snippet"] = (html.escape(row["snippet"] or "")
                              .replace(queries.HIT_START, "<mark>")
                              .replace(queries.HIT_STOP, "</mark>"))
        last = page[-1] if page else None
        cursor = (base64.urlsafe_b64encode(f"{last['rank']!r}|{last['id']}".encode())
                  .decode().rstrip("=") if more and last else None)
        return json_response({"results": page, "next_cursor": cursor})

    async def message(self, request: web.Request) -> web.Response:
        """One message with its attachments and, if we sent it, its delivery state."""
        owner = await self.api.owner(request, Scope.READ)
        found = await queries.message(self.db, owner.workspace_id, row_id(request, "id"))
        if found is None:
            raise HttpError(404, "no such message")
        return json_response(found)

    async def _sent(self, workspace_id: int, sent: Any) -> web.Response:
        found = await queries.message(self.db, workspace_id, sent.message_id)
        headers = {"Idempotent-Replayed": "true"} if sent.replayed else None
        return json_response(found, 200 if sent.replayed else 201, headers=headers)

    async def _read(self, request: web.Request, route: str) -> tuple[SendRequest, bytes]:
        """The send or reply request, and its fingerprint for Idempotency-Key."""
        body = await self._body(request)
        outgoing = body.request()
        canonical = json.dumps({
            "route": route, **{n: body.values.get(n, [] if n in ADDRESS_FIELDS else None)
                               for n in ADDRESS_FIELDS + TEXT_FIELDS},
            "attachments": [[a.filename, a.content_type, hashlib.sha256(a.content).hexdigest()]
                            for a in outgoing.attachments]}, sort_keys=True)
        return outgoing, queries.request_hash(canonical.encode("utf-8", "surrogatepass"))

    async def _body(self, request: web.Request, extra: tuple[str, ...] = ()) -> Body:
        """The request as JSON (attachments base64) or multipart/form-data (attachments as
        file parts), within smtp.max_message_size; `extra`: more fields this route takes."""
        limit = self.mailboxes.max_message_size
        if request.content_type == "multipart/form-data":
            return await self._multipart(request, limit, extra)
        body = await json_object(request, 2 * limit)
        values: dict[str, Any] = {}
        for name in ADDRESS_FIELDS:
            if name in body:
                values[name] = _addresses(body[name], name)
        for name in TEXT_FIELDS:
            if name in body:
                values[name] = _text(body, name, limit)
        for name in extra:
            if name in body:
                values[name] = body[name]
        attachments = None
        if "attachments" in body:
            listed = body["attachments"] if body["attachments"] is not None else []
            if not isinstance(listed, list):
                raise HttpError(400, "attachments: a list")
            if len(listed) > self.mailboxes.bounds.count:
                raise HttpError(400, f"at most {self.mailboxes.bounds.count} attachments "
                                "(http.api_max_attachments)", rule="http.api_max_attachments")
            attachments = [_json_attachment(item, limit) for item in listed]
        return Body(values, attachments)

    async def _multipart(self, request: web.Request, limit: int, extra: tuple[str, ...]) -> Body:
        values: dict[str, Any] = {}
        attachments: list[Attachment] = []
        bounds = self.mailboxes.bounds
        try:
            reader = await request.multipart()
            total = 0
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or part.name is None:
                    raise HttpError(400, "multipart: named form fields only")
                is_file = part.filename is not None or part.name in ("attachment",
                                                                     "attachments")
                if is_file and len(attachments) >= bounds.count:
                    raise HttpError(400, f"at most {bounds.count} attachments "
                                    "(http.api_max_attachments)",
                                    rule="http.api_max_attachments")
                data = bytearray()
                while chunk := await part.read_chunk():
                    data += chunk
                    total += len(chunk)
                    if total > limit:
                        raise HttpError(413, f"body: at most {limit} bytes")
                    if is_file and len(data) > bounds.size:
                        raise HttpError(413, f"attachment: at most {bounds.size} bytes "
                                        "(http.api_max_attachment_size)",
                                        rule="http.api_max_attachment_size")
                if is_file:
                    content_type = (part.headers.get("Content-Type") or
                                    "application/octet-stream").split(";")[0].strip().lower()
                    attachments.append(Attachment(part.filename or "attachment", content_type,
                                                  bytes(data), disposition="attachment"))
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise HttpError(400, f"{part.name}: not UTF-8") from None
                if part.name in ADDRESS_FIELDS:
                    values[part.name] = values.get(part.name, []) + _addresses(text, part.name)
                elif part.name in TEXT_FIELDS or part.name in extra:
                    values[part.name] = text
                else:
                    raise HttpError(400, f"unknown field {part.name[:50]!r}")
        except (ValueError, AssertionError, KeyError, HttpProcessingError) as error:
            # aiohttp's parser refuses malformed part headers with these
            raise HttpError(400, f"multipart: {type(error).__name__}") from None
        return Body(values, attachments or None)


def _thread_id(value: Any) -> int | None:
    """A draft's thread: an id in JSON, or its digits in a form field."""
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= 19:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**63:
        raise HttpError(400, "thread_id: a thread's id")
    return value


def _search_cursor(value: str) -> queries.SearchCursor:
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        rank, _, ident = text.partition("|")
        cursor = queries.SearchCursor(float(rank), int(ident))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise HttpError(400, "cursor: invalid") from None
    if not 0 < cursor.id < 2**63 or not math.isfinite(cursor.rank):
        raise HttpError(400, "cursor: invalid")
    return cursor


def _json_attachment(item: Any, limit: int) -> Attachment:
    if not isinstance(item, dict):
        raise HttpError(400, "attachments: objects with filename, content_type, content_base64")
    filename, content_type, content = (item.get("filename"), item.get("content_type"),
                                       item.get("content_base64"))
    if not isinstance(filename, str) or not filename or len(filename) > 255:
        raise HttpError(400, "attachments: filename, a string of 1-255 characters")
    if not isinstance(content_type, str) or not isinstance(content, str):
        raise HttpError(400, "attachments: content_type and content_base64, strings")
    try:
        data = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "attachments: content_base64 is not base64") from None
    if len(data) > limit:
        raise HttpError(413, f"attachment: at most {limit} bytes")
    return Attachment(filename, content_type.lower(), data, disposition="attachment")
