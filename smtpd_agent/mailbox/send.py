"""Send a first message, or reply in a thread, as one of the workspace's agents.

Place: a feature beside the agent; the HTTP API calls it. Whatever the caller
asks, From is the agent's own address and the threading headers come from the
stored thread. Every recipient is checked before anything is stored (the
suppression list; the allow/block lists where they exist: agent/recipients.py, the
check the built-in agent's replies pass too), and so are the caps
the built-in agent's replies obey (agent/caps.py, under the same workspace
lock); a refusal names its rule. The message is composed once (agent/compose.py), stored in its thread
with status 'queued' (store_outbound, the one writer) and queued for delivery
(outbound/queue.py, which signs and sends it) in one transaction, together with
its Idempotency-Key.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import asyncpg
import structlog

from ..addresses import OurDomains, parse_address
from ..agent import caps as limits
from ..agent import recipients as recipient_rules
from ..agent.caps import Caps
from ..agent.compose import (
    ComposedMessage,
    Original,
    Outgoing,
    compose_message,
    reply_references,
    reply_subject,
)
from ..agent.policy import agent_address, reply_address
from ..config import Settings
from ..message import Attachment, normalize_subject
from ..outbound.queue import enqueue, normalize_address
from ..store import domains as domain_store
from ..store import mailbox as store
from ..store.messages import OutboundRow, store_outbound

log = structlog.get_logger(__name__)

MAX_RECIPIENTS = 50
MAX_SUBJECT = 998
MAX_IDEMPOTENCY_KEY = 255
# Deliberately narrower than RFC 5321: what we send to must be unambiguous in every header.
ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                     r"@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$")
CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


class Problem(StrEnum):
    """Why a send was not done; the HTTP layer maps each to one status."""

    INVALID = "invalid"            # 400: the request itself is malformed
    NOT_FOUND = "not_found"        # 404: no such agent or thread in the workspace
    DISABLED = "disabled"          # 409: the agent is disabled
    REFUSED = "refused"            # 422: a recipient is refused by a rule
    CAPPED = "capped"              # 422: a cap that never lets this message through
    RATE_LIMITED = "rate_limited"  # 429 + Retry-After: a cap frees up with time
    KEY_REUSED = "key_reused"      # 422: the Idempotency-Key was used for another request
    TOO_LARGE = "too_large"        # 413: the composed message exceeds smtp.max_message_size
    CONFLICT = "conflict"          # 409: the draft was sent or discarded already


class SendError(Exception):
    def __init__(self, problem: Problem, message: str, rule: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.problem = problem
        self.message = message
        self.rule = rule
        self.retry_after = retry_after


@dataclass(frozen=True)
class SendRequest:
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class AttachmentLimits:
    """http.api_max_attachments and http.api_max_attachment_size."""

    count: int
    size: int


@dataclass(frozen=True)
class Sent:
    message_id: int
    thread_id: int
    replayed: bool


def valid_address(value: str) -> str:
    address = value.strip()
    if len(address) > 254 or not ADDRESS.match(address):
        raise SendError(Problem.INVALID, f"not an email address we send to: {value[:100]!r}")
    return normalize_address(address)


def check_request(request: SendRequest, bounds: AttachmentLimits,
                  need_to: bool = True) -> SendRequest:
    """The request with addresses normalized, or SendError(INVALID) saying what is wrong."""
    to = tuple(valid_address(a) for a in request.to)
    cc = tuple(valid_address(a) for a in request.cc)
    bcc = tuple(valid_address(a) for a in request.bcc)
    if need_to and not to:
        raise SendError(Problem.INVALID, "to: at least one recipient")
    if len(set(to + cc + bcc)) > MAX_RECIPIENTS:
        raise SendError(Problem.INVALID, f"at most {MAX_RECIPIENTS} recipients in all")
    if request.text is None and request.html is None:
        raise SendError(Problem.INVALID, "text or html: give at least one")
    if request.subject is not None and len(request.subject) > MAX_SUBJECT:
        raise SendError(Problem.INVALID, f"subject: at most {MAX_SUBJECT} characters")
    if len(request.attachments) > bounds.count:
        raise SendError(Problem.INVALID, f"at most {bounds.count} attachments "
                        "(http.api_max_attachments)", rule="http.api_max_attachments")
    for number, attachment in enumerate(request.attachments, 1):
        if attachment.size > bounds.size:
            raise SendError(Problem.TOO_LARGE, f"attachment {number}: at most "
                            f"{bounds.size} bytes (http.api_max_attachment_size)",
                            rule="http.api_max_attachment_size")
        if not CONTENT_TYPE.match(attachment.content_type):
            raise SendError(Problem.INVALID, "attachment content type: type/subtype")
        if not attachment.filename or len(attachment.filename) > 255 or any(
                ord(c) < 32 or ord(c) == 127 for c in attachment.filename):
            raise SendError(Problem.INVALID, "attachment filename: 1-255 characters, no "
                            "control characters")
    for value in (request.subject, request.text, request.html,
                  *(a.filename for a in request.attachments)):
        if value is not None and "\x00" in value:
            raise SendError(Problem.INVALID, "NUL characters are not allowed")
    return SendRequest(to, cc, bcc, request.subject, request.text, request.html,
                       request.attachments)


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.match(key):
        raise SendError(Problem.INVALID, "Idempotency-Key: 1-255 visible ASCII characters")
    return key


class Mailboxes:
    """Sending as a workspace's agents; one per process, on the shared pool."""

    def __init__(self, db: asyncpg.Pool, settings: Settings) -> None:
        self.db = db
        self.default_domain = settings.server.default_domain
        self.max_message_size = settings.smtp.max_message_size
        self.caps = Caps.of(settings.agent)
        self.bounds = AttachmentLimits(settings.http.api_max_attachments,
                                       settings.http.api_max_attachment_size)

    async def refusal(self, connection: asyncpg.Connection, workspace_id: int, agent_id: int,
                      recipients: tuple[str, ...]) -> None:
        """SendError(REFUSED) naming the rule for the first refused recipient, if any: the
        check the built-in agent's replies pass too (agent/recipients.py)."""
        refused = await recipient_rules.check(connection, workspace_id, agent_id, recipients)
        if refused is not None:
            log.info("mailbox.refused", workspace_id=workspace_id, agent_id=agent_id,
                     rule=refused.rule.value)
            raise SendError(Problem.REFUSED, refused.error, rule=refused.rule.value)

    async def send(self, workspace_id: int, slug: str, handle: str, request: SendRequest,
                   idempotency_key: str | None, fingerprint: bytes,
                   draft_id: int | None = None) -> Sent:
        request = check_request(request, self.bounds)
        key = check_idempotency_key(idempotency_key)
        found = await store.agent(self.db, workspace_id, handle)
        if found is None:
            raise SendError(Problem.NOT_FOUND, "no such agent")
        subject = " ".join((request.subject or "").split())
        outgoing = Outgoing(
            from_name=found["display_name"],
            from_address=OurDomains(self.default_domain).agent_address(found["handle"], slug),
            to=request.to, cc=request.cc, subject=subject, text=request.text, html=request.html,
            attachments=request.attachments)
        return await self._store(workspace_id, found["id"], found["enabled"], None, outgoing,
                                 request, key, fingerprint, draft_id)

    async def reply(self, workspace_id: int, thread_id: int, request: SendRequest,
                    idempotency_key: str | None, fingerprint: bytes,
                    draft_id: int | None = None) -> Sent:
        request = check_request(request, self.bounds, need_to=False)
        key = check_idempotency_key(idempotency_key)
        target = await store.reply_target(self.db, workspace_id, thread_id)
        if target is None:
            raise SendError(Problem.NOT_FOUND, "no such thread")
        inbound = target.inbound
        to = request.to
        if not to:
            # the built-in agent's rule: From, or a Reply-To of the same organization
            found = (reply_address(inbound.from_address, inbound.reply_to) if inbound else None
                     ) or target.correspondent
            if not found:
                raise SendError(Problem.INVALID, "the thread has no correspondent: give to")
            to = (valid_address(found),)
        if inbound is None:
            # no inbound mail yet: answer our own newest message in the thread
            last = await store.last_message_of(self.db, workspace_id, thread_id)
            original = Original(last["message_id"] if last else None,
                                tuple(last["references"]) if last else (),
                                last["subject"] if last else target.thread_subject)
        else:
            original = Original.of(inbound)
        in_reply_to = (original.message_id,) if original.message_id else ()
        request = SendRequest(to, request.cc, request.bcc, request.subject, request.text,
                              request.html, request.attachments)
        outgoing = Outgoing(
            from_name=target.display_name,
            from_address=await self._reply_from(workspace_id, target),
            to=to, cc=request.cc,
            subject=reply_subject(request.subject or original.subject or target.thread_subject),
            text=request.text, html=request.html, in_reply_to=in_reply_to,
            references=reply_references(original), attachments=request.attachments)
        return await self._store(workspace_id, target.agent_id, target.enabled, thread_id,
                                 outgoing, request, key, fingerprint, draft_id)

    async def _reply_from(self, workspace_id: int, target: store.ReplyTarget) -> str:
        """The built-in agent's rule (agent/policy.agent_address): the agent's address on the
        domain the correspondent wrote to when it is the workspace's own."""
        ours = OurDomains(self.default_domain)
        slug = await self.db.fetchval("SELECT slug FROM workspaces WHERE id = $1", workspace_id)
        rcpt = parse_address(target.inbound.rcpt_to or "") if target.inbound else None
        domain = rcpt.domain if rcpt else None
        custom_ok = (domain is not None and not ours.is_ours(domain)
                     and await domain_store.receives_for(self.db, workspace_id, domain))
        return agent_address(target.handle, slug, domain, ours, custom_ok)

    async def _store(self, workspace_id: int, agent_id: int, enabled: bool,
                     thread_id: int | None, outgoing: Outgoing, request: SendRequest,
                     key: str | None, fingerprint: bytes, draft_id: int | None) -> Sent:
        if not enabled:
            raise SendError(Problem.DISABLED, "the agent is disabled")
        composed = compose_message(outgoing, datetime.now(UTC))
        if len(composed.raw) > self.max_message_size:
            raise SendError(Problem.TOO_LARGE,
                            f"the message is {len(composed.raw)} bytes; at most "
                            f"{self.max_message_size}")
        recipients = tuple(dict.fromkeys(request.to + request.cc + request.bcc))
        async with self.db.acquire() as connection, connection.transaction():
            if key is not None:
                remembered = await store.recall(connection, workspace_id, key, fingerprint)
                if remembered is not None:
                    if not remembered.same_request:
                        raise SendError(Problem.KEY_REUSED, "Idempotency-Key was used for a "
                                        "different request in the last 24 hours")
                    thread = await connection.fetchval(
                        "SELECT thread_id FROM messages WHERE workspace_id = $1 AND id = $2",
                        workspace_id, remembered.message_id)
                    log.info("mailbox.replayed", workspace_id=workspace_id,
                             message=remembered.message_id)
                    return Sent(remembered.message_id, thread, replayed=True)
            await self.refusal(connection, workspace_id, agent_id, recipients)
            # the caps the built-in agent's replies obey, under the same workspace lock
            await limits.lock(connection, workspace_id)
            capped = await limits.check(connection, workspace_id, agent_id, recipients,
                                        self.caps)
            if capped is not None:
                log.info("mailbox.capped", workspace_id=workspace_id, agent_id=agent_id,
                         rule=capped.rule.value, retry_after=capped.retry_after)
                raise SendError(
                    Problem.CAPPED if capped.retry_after is None else Problem.RATE_LIMITED,
                    f"{capped.reason} ({capped.rule.value})", rule=capped.rule.value,
                    retry_after=capped.retry_after)
            if thread_id is None:
                thread_id = await store.new_thread(
                    connection, workspace_id, agent_id, composed.subject, request.to[0],
                    normalize_subject(composed.subject))
            message_id = await store_outbound(connection, self._row(
                workspace_id, agent_id, thread_id, outgoing, composed, request))
            await limits.remember_recipients(connection, workspace_id, agent_id, recipients)
            await enqueue(connection, message_id, workspace_id, bcc=request.bcc)
            if draft_id is not None and not await store.mark_draft_sent(
                    connection, workspace_id, draft_id, message_id):
                raise SendError(Problem.CONFLICT, "the draft was sent or discarded already")
            if key is not None:
                await store.remember(connection, workspace_id, key, fingerprint, message_id)
        log.info("mailbox.sent", workspace_id=workspace_id, agent_id=agent_id,
                 thread=thread_id, message=message_id, recipients=len(recipients),
                 reply=bool(outgoing.in_reply_to))
        return Sent(message_id, thread_id, replayed=False)

    @staticmethod
    def _row(workspace_id: int, agent_id: int, thread_id: int, outgoing: Outgoing,
             composed: ComposedMessage, request: SendRequest) -> OutboundRow:
        return OutboundRow(
            workspace_id=workspace_id, agent_id=agent_id, thread_id=thread_id,
            dedup_key=f"api:{uuid.uuid4()}", message_id=composed.message_id,
            in_reply_to=outgoing.in_reply_to, references=outgoing.references,
            from_header=composed.from_header, from_address=outgoing.from_address,
            to_address=request.to[0], to_header=composed.to_header,
            cc_header=composed.cc_header, subject=composed.subject, headers=composed.headers,
            text_body=composed.text, html_body=composed.html, raw=composed.raw,
            attachments=outgoing.attachments)


def draft_fields(request: SendRequest, bounds: AttachmentLimits,
                 keep_attachments: bool = False) -> store.DraftFields:
    """A draft may be incomplete (no recipient, no body yet); what it has must be valid.
    `keep_attachments`: an update that names none leaves the draft's attachments as they are."""
    checked = SendRequest(
        tuple(valid_address(a) for a in request.to), tuple(valid_address(a) for a in request.cc),
        tuple(valid_address(a) for a in request.bcc), request.subject, request.text or "",
        request.html, request.attachments)
    check_request(checked, bounds, need_to=False)
    return store.DraftFields(checked.to, checked.cc, checked.bcc, request.subject, request.text,
                             request.html,
                             None if keep_attachments else request.attachments)


async def send_draft(mailboxes: Mailboxes, workspace_id: int, slug: str, draft_id: int) -> Sent:
    """Send a draft the way a send or reply request would go, with its attachments, and mark
    it sent in the same transaction (a second send, or a send after a discard, is a CONFLICT)."""
    found = await store.draft(mailboxes.db, workspace_id, draft_id)
    if found is None:
        raise SendError(Problem.NOT_FOUND, "no such draft")
    if found["status"] != "draft":
        raise SendError(Problem.CONFLICT, f"the draft was {found['status']} already")
    attachments = await store.draft_attachment_contents(mailboxes.db, workspace_id, draft_id)
    request = SendRequest(tuple(found["to"]), tuple(found["cc"]), tuple(found["bcc"]),
                          found["subject"], found["text"], found["html"], attachments)
    fingerprint = store.request_hash(f"draft:{draft_id}".encode())
    if found["thread_id"] is not None:
        return await mailboxes.reply(workspace_id, found["thread_id"], request, None,
                                     fingerprint, draft_id)
    return await mailboxes.send(workspace_id, slug, found["agent"], request, None, fingerprint,
                                draft_id)
