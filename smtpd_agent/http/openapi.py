"""The OpenAPI 3.0 description served at /openapi.json: the inbox API, health, webhooks.

Written out by hand, next to the handlers it describes; tests run
schemathesis against it over real HTTP, so a route that drifts from it shows.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..store.events import EVENT_TYPES


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _refusal(description: str, examples: dict[str, dict[str, str]],
             retry_after: bool = False) -> dict[str, Any]:
    """An error naming the rule that refused the request, with examples of its body."""
    response: dict[str, Any] = {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"},
        "examples": {name: {"value": value} for name, value in examples.items()}}}}
    if retry_after:
        response["headers"] = {"Retry-After": {
            "description": "seconds until the oldest message the cap counts leaves its window",
            "schema": {"type": "integer", "minimum": 1}}}
    return response


CAPPED = _refusal(
    "a cap of the workspace or agent (the built-in agent's, issue 17) is reached; it frees "
    "up with time: Retry-After says when. Nothing was stored or queued.",
    {"workspace_hour": {"error": "cap: 500 replies per hour from this workspace "
                                 "(agent.workspace_replies_per_hour)",
                        "rule": "agent.workspace_replies_per_hour"},
     "correspondent": {"error": "rate limit: 5 replies per hour to this correspondent "
                                "(agent.correspondent_replies_per_hour)",
                       "rule": "agent.correspondent_replies_per_hour"}},
    retry_after=True)
REFUSED = _refusal(
    "refused by a rule that waiting does not change: a suppressed or allow/block-listed "
    "recipient, more first-time recipients than the day's cap, a cap of 0, or an "
    "Idempotency-Key used for another request. Nothing was stored or queued.",
    {"suppression": {"error": "gone@example.org is on the workspace's suppression list (a "
                              "hard bounce, a complaint or a manual entry)",
                     "rule": "suppression"},
     "acl": {"error": "ceo@rival.example is refused by the allow/block lists: blocked by "
                      "workspace entry @rival.example", "rule": "acl"},
     "new_recipients": {"error": "cap: 100 first-time recipients per day for this agent "
                                 "(agent.new_recipients_per_day)",
                        "rule": "agent.new_recipients_per_day"}})
TOO_LARGE = _refusal(
    "larger than smtp.max_message_size, or an attachment larger than "
    "http.api_max_attachment_size",
    {"attachment": {"error": "attachment: at most 10485760 bytes "
                             "(http.api_max_attachment_size)",
                    "rule": "http.api_max_attachment_size"}})


SLUG = {"name": "slug", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"}}
API_ERRORS = {"401": _error("no key, or a key we do not know"),
              "404": _error("not found, or not in the key's workspace")}
WEBHOOK_RESULT = {"$ref": "#/components/schemas/WebhookResult"}
WEBHOOK_ERRORS = {"400": _error("malformed body; nothing stored"),
                  "401": _error("bad signature or credentials; nothing stored"),
                  "403": _error("not configured, not allowed, stale or replayed; nothing stored"),
                  "503": _error("temporary failure; the provider retries")}


def _id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "integer", "minimum": 1, "format": "int64"}}


def _webhook(summary: str, content_type: str, schema: dict[str, Any],
             extra_statuses: dict[str, Any] | None = None,
             security: list[dict[str, list[str]]] | None = None) -> dict[str, Any]:
    responses = {"200": _json("accepted (or permanently rejected, see status)",
                              WEBHOOK_RESULT), **WEBHOOK_ERRORS, **(extra_statuses or {})}
    operation: dict[str, Any] = {
        "summary": summary, "tags": ["webhooks"],
        "requestBody": {"required": True, "content": {content_type: {"schema": schema}}},
        "responses": responses}
    if security is not None:
        operation["security"] = security
    return {"post": operation}


HANDLE = {"name": "handle", "in": "path", "required": True,
          "schema": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$"}}
FORBIDDEN = {"403": _error("the key lacks the scope this route needs")}
ADDRESSES = {"oneOf": [{"type": "string", "format": "email"},
                       {"type": "array", "maxItems": 50,
                        "items": {"type": "string", "format": "email"}}]}
SEND_FIELDS = {
    "to": ADDRESSES, "cc": ADDRESSES, "bcc": ADDRESSES,
    "subject": {"type": "string", "maxLength": 998},
    "text": {"type": "string"}, "html": {"type": "string"},
}
# Form fields of multipart/form-data: each address field may repeat; every file part is
# an attachment (at most http.api_max_attachments, each within http.api_max_attachment_size).
FORM_FIELDS = {
    "to": {"type": "string"}, "cc": {"type": "string"}, "bcc": {"type": "string"},
    "subject": {"type": "string", "maxLength": 998},
    "text": {"type": "string"}, "html": {"type": "string"},
    "attachment": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "file parts, each with its filename and Content-Type"},
}
MULTIPART_CURL = (
    "curl -H 'Authorization: Bearer sak_...' -F to=bob@example.org -F subject=Invoice "
    "-F text='Attached.' -F 'attachment=@invoice.pdf;type=application/pdf' "
    "https://mail.example.com/api/v1/workspaces/acme/agents/support/messages")
JSON_ATTACHMENT = {"type": "object", "required": ["filename", "content_type", "content_base64"],
                   "properties": {"filename": {"type": "string", "maxLength": 255},
                                  "content_type": {"type": "string"},
                                  "content_base64": {"type": "string", "format": "byte"}}}
IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
               "schema": {"type": "string", "minLength": 1, "maxLength": 255},
               "description": "the same key within 24 hours answers with the message it "
                              "sent first (200, Idempotent-Replayed: true), never a second one"}
AGENT = {"type": "object", "properties": {
    "id": {"type": "integer"}, "handle": {"type": "string"},
    "display_name": {"type": "string", "nullable": True},
    "system_prompt": {"type": "string", "nullable": True,
                      "description": "shown to admin keys only"},
    "reply_mode": {"type": "string", "enum": ["auto", "draft", "off"]},
    "auto_reply": {"type": "boolean"}, "enabled": {"type": "boolean"},
    "created_at": {"type": "string", "format": "date-time"}}}
AGENT_CHANGES = {"display_name": {"type": "string", "maxLength": 200, "nullable": True},
                 "system_prompt": {"type": "string", "maxLength": 20000, "nullable": True},
                 "reply_mode": {"type": "string", "enum": ["auto", "draft", "off"]}}
ATTACHMENT_ROW = {"type": "object", "properties": {
    "id": {"type": "integer"}, "filename": {"type": "string", "nullable": True},
    "content_type": {"type": "string"}, "size": {"type": "integer"},
    "sha256": {"type": "string"}}}
SENT_EXAMPLE = {
    "id": 42, "thread_id": 7, "direction": "outbound", "status": "deferred",
    "message_id": "<Yc3v0y8Q2c4QfT0d1mJ8k9Zs3a6Hc2bW@acme.aexy.email>",
    "subject": "Invoice", "labels": [],
    "attachments": [{"id": 9, "filename": "invoice.pdf", "content_type": "application/pdf",
                     "size": 48213, "sha256": "9f2c..."}],
    "delivery": {"id": 40, "status": "deferred", "attempts": 1,
                 "last_error": "bob@example.org: 451 4.3.0 try again later",
                 "last_attempt_at": "2026-12-02T01:00:00+00:00",
                 "next_attempt_at": "2026-12-02T01:01:00+00:00", "finished_at": None,
                 "recipients": [{"address": "bob@example.org", "state": "deferred",
                                 "code": 451, "enhanced": "4.3.0",
                                 "detail": "try again later"}]}}
LABEL = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_.:/-]{0,62}$"}
SCOPES = {"type": "array", "minItems": 1,
          "items": {"type": "string", "enum": ["read", "send", "admin"]}}


def _send_operation(summary: str, parameters: list[dict[str, Any]],
                    example: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary, "tags": ["send"], "security": [{"bearer": []}],
        "parameters": [*parameters, IDEMPOTENCY],
        "requestBody": {"required": True, "description": "JSON, or multipart/form-data with "
                        "the files as parts: " + MULTIPART_CURL, "content": {
            "application/json": {"schema": {"type": "object", "properties": {
                **SEND_FIELDS, "attachments": {"type": "array", "maxItems": 20,
                                               "items": JSON_ATTACHMENT}}},
                "example": example},
            "multipart/form-data": {"schema": {"type": "object", "properties": FORM_FIELDS},
                                    "example": {"to": "bob@example.org", "subject": "Invoice",
                                                "text": "Attached."}}}},
        "responses": {
            "201": {"description": "stored in its thread with status queued (its attachments "
                                   "as attachment rows), and queued for delivery",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/SentMessage"},
                        "example": {**SENT_EXAMPLE, "status": "queued", "delivery": {
                            **SENT_EXAMPLE["delivery"], "status": "queued", "attempts": 0,
                            "last_error": None, "last_attempt_at": None,
                            "next_attempt_at": "2026-12-02T01:00:00+00:00",
                            "recipients": [{"address": "bob@example.org", "state": "queued",
                                            "code": None, "enhanced": None,
                                            "detail": None}]}}}}},
            "200": _json("the message this Idempotency-Key already sent",
                         {"$ref": "#/components/schemas/SentMessage"}),
            "400": _error("malformed request: addresses, fields, more attachments than "
                          "http.api_max_attachments"),
            "409": _error("the agent is disabled"),
            "413": TOO_LARGE, "422": REFUSED, "429": CAPPED,
            **FORBIDDEN, **API_ERRORS}}


def mailbox_paths() -> dict[str, dict[str, Any]]:
    """The programmable-mailbox routes (http/mailbox.py): admin, send and reply."""
    bearer = [{"bearer": []}]
    workspace = "/api/v1/workspaces/{slug}"
    key_created = {"type": "object", "properties": {
        "id": {"type": "integer"}, "prefix": {"type": "string"},
        "key": {"type": "string", "description": "shown once, stored only as its SHA-256"},
        "scopes": SCOPES}}
    return {
        f"{workspace}/agents": {"post": {
            "summary": "create an agent (admin)", "tags": ["admin"], "security": bearer,
            "parameters": [SLUG],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"type": "object", "required": ["handle"], "properties": {
                    "handle": {"type": "string", "maxLength": 64}, **AGENT_CHANGES}},
                "example": {"handle": "billing", "display_name": "Acme Billing",
                            "system_prompt": "Answer invoice questions briefly.",
                            "reply_mode": "draft"}}}},
            "responses": {"201": _json("the agent", AGENT), "400": _error("bad field"),
                          "409": _error("the handle exists"), **FORBIDDEN, **API_ERRORS}}},
        f"{workspace}/agents/{{handle}}": {
            "get": {"summary": "one agent", "tags": ["inbox"], "security": bearer,
                    "parameters": [SLUG, HANDLE],
                    "responses": {"200": _json("the agent", AGENT), **FORBIDDEN,
                                  **API_ERRORS}},
            "patch": {
                "summary": "change an agent's name, prompt, reply mode; enable or disable it "
                           "(admin)", "tags": ["admin"], "security": bearer,
                "parameters": [SLUG, HANDLE],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "properties": {
                        **AGENT_CHANGES, "enabled": {"type": "boolean"}}},
                    "example": {"reply_mode": "off", "enabled": False}}}},
                "responses": {"200": _json("the agent", AGENT), "400": _error("bad field"),
                              **FORBIDDEN, **API_ERRORS}}},
        f"{workspace}/agents/{{handle}}/messages": {"post": _send_operation(
            "send a first message as the agent, in a new thread", [SLUG, HANDLE],
            {"to": ["bob@example.org"], "cc": [], "subject": "Your order",
             "text": "It ships today.", "html": "<p>It ships today.</p>"})},
        f"{workspace}/threads/{{id}}/reply": {"post": _send_operation(
            "reply in a thread: From, In-Reply-To, References, Re: subject and (unless given) "
            "the recipient come from the thread", [SLUG, _id("id")], {"text": "On its way."})},
        f"{workspace}/keys": {
            "get": {"summary": "the workspace's keys, prefixes only (admin)", "tags": ["admin"],
                    "security": bearer, "parameters": [SLUG],
                    "responses": {"200": _json("keys", {"type": "object", "properties": {
                        "keys": {"type": "array", "items": {"type": "object"}}}}),
                        **FORBIDDEN, **API_ERRORS}},
            "post": {"summary": "create a key with scopes (admin)", "tags": ["admin"],
                     "security": bearer, "parameters": [SLUG],
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "properties": {
                             "name": {"type": "string", "maxLength": 200}, "scopes": SCOPES}},
                         "example": {"name": "support bot", "scopes": ["read", "send"]}}}},
                     "responses": {"201": _json("the key, shown once", key_created),
                                   "400": _error("bad scopes or name"), **FORBIDDEN,
                                   **API_ERRORS}}},
        f"{workspace}/messages/{{id}}": {"get": {
            "summary": "one message with its attachments and, if we sent it, its delivery: "
                       "status queued, sending, sent, deferred (next_attempt_at says when), "
                       "bounced or failed, and each recipient's state and reply code",
            "tags": ["inbox"], "security": bearer, "parameters": [SLUG, _id("id")],
            "responses": {"200": {"description": "the message", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/SentMessage"},
                                     "example": SENT_EXAMPLE}}},
                          **FORBIDDEN, **API_ERRORS}}, "patch": {
            "summary": "change a message's labels ('unread' is set on arrival)",
            "tags": ["labels"], "security": bearer, "parameters": [SLUG, _id("id")],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"type": "object", "properties": {
                    "add": {"type": "array", "maxItems": 50, "items": LABEL},
                    "remove": {"type": "array", "maxItems": 50, "items": LABEL}}},
                "example": {"add": ["needs-human"], "remove": ["unread"]}}}},
            "responses": {"200": _json("the message's labels", {"type": "object", "properties": {
                "id": {"type": "integer"},
                "labels": {"type": "array", "items": {"type": "string"}}}}),
                "400": _error("bad label"), **FORBIDDEN, **API_ERRORS}}},
        f"{workspace}/search": {"get": {
            "summary": "full-text search over subject, From and the new text (an inbound "
                       "reply's extracted_text: quoted history does not match), best first, "
                       "with highlighted snippets (HTML-escaped, hits in <mark>). Mail is "
                       "indexed just after it is stored: found a moment after its arrival, or "
                       "during a burst of mail within store.search_max_delay (5 s)",
            "tags": ["inbox"], "security": bearer,
            "parameters": [SLUG,
                           {"name": "q", "in": "query", "required": True,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 500},
                            "description": "web search syntax: words, \"a phrase\", -not, or",
                            "example": "invoice -paid"},
                           {"name": "agent", "in": "query", "required": False,
                            "schema": {"type": "string"}},
                           {"name": "limit", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100,
                                       "default": 20}},
                           {"name": "cursor", "in": "query", "required": False,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json("a page of hits", {"type": "object", "properties": {
                "results": {"type": "array", "items": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "thread_id": {"type": "integer"},
                    "agent": {"type": "string"}, "subject": {"type": "string", "nullable": True},
                    "from_header": {"type": "string", "nullable": True},
                    "labels": {"type": "array", "items": {"type": "string"}},
                    "rank": {"type": "number"}, "snippet": {"type": "string"}}}},
                "next_cursor": {"type": "string", "nullable": True}}}),
                "400": _error("bad q, limit or cursor"), **API_ERRORS}}},
        f"{workspace}/drafts": {"get": {
            "summary": "drafts waiting to be sent or discarded, oldest first", "tags": ["drafts"],
            "security": bearer,
            "parameters": [SLUG, {"name": "agent", "in": "query", "required": False,
                                  "schema": {"type": "string"}}],
            "responses": {"200": _json("drafts", {"type": "object", "properties": {
                "drafts": {"type": "array", "items": {"$ref": "#/components/schemas/Draft"}}}}),
                **FORBIDDEN, **API_ERRORS}}},
        f"{workspace}/agents/{{handle}}/drafts": {"post": {
            "summary": "write a draft as the agent (thread_id: a reply in that thread)",
            "tags": ["drafts"], "security": bearer, "parameters": [SLUG, HANDLE],
            "requestBody": {"required": True, "content": {
                "application/json": {
                    "schema": {"type": "object", "properties": {
                        **SEND_FIELDS, "thread_id": {"type": "integer", "minimum": 1,
                                                     "format": "int64"},
                        "attachments": {"type": "array", "items": JSON_ATTACHMENT}}},
                    "example": {"to": ["bob@example.org"], "subject": "Your quote",
                                "text": "Here it is."}},
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {
                        **FORM_FIELDS, "thread_id": {"type": "string",
                                                     "pattern": "^[0-9]{1,19}$"}}},
                    "example": {"to": "bob@example.org", "subject": "Your quote",
                                "text": "Here it is."}}}},
            "responses": {"201": _json("the draft, with its attachments",
                                       {"$ref": "#/components/schemas/Draft"}),
                          "400": _error("bad field"), "413": TOO_LARGE,
                          **FORBIDDEN, **API_ERRORS}}},
        f"{workspace}/drafts/{{id}}": {
            "get": {"summary": "one draft", "tags": ["drafts"], "security": bearer,
                    "parameters": [SLUG, _id("id")],
                    "responses": {"200": _json("the draft",
                                               {"$ref": "#/components/schemas/Draft"}),
                                  **FORBIDDEN, **API_ERRORS}},
            "patch": {"summary": "change a pending draft: the fields given replace its own; "
                                 "attachments given (file parts, or JSON attachments, [] for "
                                 "none) replace all of its attachments, none given keeps them",
                      "tags": ["drafts"], "security": bearer, "parameters": [SLUG, _id("id")],
                      "requestBody": {"required": True, "content": {
                          "application/json": {
                              "schema": {"type": "object", "properties": {
                                  **SEND_FIELDS,
                                  "attachments": {"type": "array", "items": JSON_ATTACHMENT}}},
                              "example": {"text": "Here it is, with the discount."}},
                          "multipart/form-data": {
                              "schema": {"type": "object", "properties": FORM_FIELDS}}}},
                      "responses": {"200": _json("the draft",
                                                 {"$ref": "#/components/schemas/Draft"}),
                                    "400": _error("bad field"), "413": TOO_LARGE,
                                    "409": _error("sent or discarded already"),
                                    **FORBIDDEN, **API_ERRORS}},
            "delete": {"summary": "discard a pending draft and its attachments (nothing is "
                                  "queued)",
                       "tags": ["drafts"], "security": bearer, "parameters": [SLUG, _id("id")],
                       "responses": {"204": {"description": "discarded"},
                                     "409": _error("sent or discarded already"),
                                     **FORBIDDEN, **API_ERRORS}}},
        f"{workspace}/drafts/{{id}}/send": {"post": {
            "summary": "send a draft: the same checks, composition and queue as a send or reply",
            "tags": ["drafts"], "security": bearer, "parameters": [SLUG, _id("id")],
            "responses": {
                "201": _json("stored with its attachments and queued",
                             {"$ref": "#/components/schemas/SentMessage"}),
                "400": _error("the draft is incomplete (no recipient, no body)"),
                "409": _error("sent or discarded already, or the agent is disabled"),
                "413": TOO_LARGE, "422": REFUSED, "429": CAPPED,
                **FORBIDDEN, **API_ERRORS}}},
        f"{workspace}/drafts/{{id}}/attachments/{{attachment}}": {"get": {
            "summary": "one of a draft's own attachments (the ids its attachments list), "
                       "with its content type; served as a download, never inline",
            "tags": ["drafts"], "security": bearer,
            "parameters": [SLUG, _id("id"), {**_id("attachment"), "example": 9}],
            "responses": {"200": {"description": "the bytes",
                                  "headers": {"Content-Disposition": {
                                      "schema": {"type": "string"},
                                      "example": "attachment; filename=\"quote.pdf\"; "
                                                 "filename*=UTF-8''quote.pdf"}},
                                  "content": {"*/*": {
                                      "schema": {"type": "string", "format": "binary"},
                                      "example": "%PDF-1.7 ..."}}},
                          **FORBIDDEN, **API_ERRORS}}},
        f"{workspace}/keys/{{id}}": {"delete": {
            "summary": "revoke a key (admin)", "tags": ["admin"], "security": bearer,
            "parameters": [SLUG, _id("id")],
            "responses": {"204": {"description": "revoked"}, **FORBIDDEN, **API_ERRORS}}},
    }


def webhook_endpoint_paths() -> dict[str, dict[str, Any]]:
    """The outgoing-webhook routes (http/endpoints.py), admin keys only."""
    bearer = [{"bearer": []}]
    base = "/api/v1/workspaces/{slug}/webhooks"
    endpoint = {"$ref": "#/components/schemas/WebhookEndpoint"}
    with_secret = {"allOf": [endpoint, {"type": "object", "properties": {"secret": {
        "type": "string", "pattern": "^whsec_",
        "description": "Standard Webhooks secret: shown here once, stored encrypted"}}}]}
    fields = {"url": {"type": "string", "maxLength": 2048,
                      "description": "https; never a private, loopback or link-local address"},
              "event_types": {"type": "array", "maxItems": 50, "items": {"type": "string"},
                              "description": "empty: every event type"},
              "enabled": {"type": "boolean"},
              "description": {"type": "string", "maxLength": 500, "nullable": True}}
    delivery_id = {"type": "object", "properties": {"delivery_id": {"type": "integer"}}}
    errors = {**FORBIDDEN, **API_ERRORS}
    return {
        base: {
            "get": {"summary": "the workspace's webhook endpoints (admin)", "tags": ["events"],
                    "security": bearer, "parameters": [SLUG],
                    "responses": {"200": _json("endpoints", {"type": "object", "properties": {
                        "endpoints": {"type": "array", "items": endpoint}}}), **errors}},
            "post": {"summary": "add a webhook endpoint; its signing secret is in this answer "
                                "only (admin)", "tags": ["events"], "security": bearer,
                     "parameters": [SLUG],
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "required": ["url"],
                                    "properties": fields},
                         "example": {"url": "https://agent.example.com/hooks",
                                     "event_types": ["message.received"]}}}},
                     "responses": {"201": _json("the endpoint and its secret", with_secret),
                                   "400": _error("bad field"),
                                   "409": _error("webhooks.max_endpoints reached"),
                                   "422": _error("the URL is refused (https, public address)"),
                                   **errors}}},
        f"{base}/{{id}}": {
            "get": {"summary": "one webhook endpoint (admin)", "tags": ["events"],
                    "security": bearer, "parameters": [SLUG, _id("id")],
                    "responses": {"200": _json("the endpoint", endpoint), **errors}},
            "patch": {"summary": "change an endpoint; enabling it again resets its failure "
                                 "count, disabling fails what waits for it (admin)",
                      "tags": ["events"], "security": bearer, "parameters": [SLUG, _id("id")],
                      "requestBody": {"required": True, "content": {"application/json": {
                          "schema": {"type": "object", "properties": fields}}}},
                      "responses": {"200": _json("the endpoint", endpoint),
                                    "400": _error("bad field"),
                                    "422": _error("the URL is refused"), **errors}},
            "delete": {"summary": "delete an endpoint with its delivery log (admin)",
                       "tags": ["events"], "security": bearer, "parameters": [SLUG, _id("id")],
                       "responses": {"204": {"description": "deleted"}, **errors}}},
        f"{base}/{{id}}/rotate-secret": {"post": {
            "summary": "a new signing secret, shown once; the old one keeps signing beside it "
                       "for webhooks.secret_rotation_grace (admin)", "tags": ["events"],
            "security": bearer, "parameters": [SLUG, _id("id")],
            "responses": {"200": _json("the endpoint and its new secret", with_secret),
                          **errors}}},
        f"{base}/{{id}}/deliveries": {"get": {
            "summary": "the delivery log: deliveries newest first, each with its attempts "
                       "(status code, duration, error) (admin)", "tags": ["events"],
            "security": bearer,
            "parameters": [SLUG, _id("id"),
                           {"name": "limit", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                           {"name": "before", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1},
                            "description": "next_before of the previous page"}],
            "responses": {"200": _json("a page of deliveries", {"type": "object", "properties": {
                "deliveries": {"type": "array",
                               "items": {"$ref": "#/components/schemas/WebhookDelivery"}},
                "next_before": {"type": "integer", "nullable": True}}}),
                "400": _error("bad limit or before"), **errors}}},
        f"{base}/{{id}}/deliveries/{{delivery}}/replay": {"post": {
            "summary": "send a delivery's event to its endpoint again, now (admin)",
            "tags": ["events"], "security": bearer,
            "parameters": [SLUG, _id("id"), _id("delivery")],
            "responses": {"202": _json("the new delivery", delivery_id), **errors}}},
        f"{base}/{{id}}/replay": {"post": {
            "summary": "send an event of the workspace to this endpoint (again), now (admin)",
            "tags": ["events"], "security": bearer, "parameters": [SLUG, _id("id")],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"type": "object", "required": ["event_id"], "properties": {
                    "event_id": {"type": "integer", "minimum": 1}}}}}},
            "responses": {"202": _json("the new delivery", delivery_id),
                          "400": _error("bad event_id"), **errors}}},
    }


def mcp_paths() -> dict[str, dict[str, Any]]:
    """/mcp: the MCP server over streamable HTTP (mcpserver/http.py), stateless, JSON."""
    bearer = [{"bearer": []}]
    not_served = {"description": "only POST is served (stateless: no server-to-client "
                                 "stream, no session to end)",
                  "headers": {"Allow": {"schema": {"type": "string", "enum": ["POST"]}}}}
    example_call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "list_threads", "arguments": {"agent": "support"}}}
    return {"/mcp": {
        "post": {
            "summary": "the MCP server (Model Context Protocol, streamable HTTP): the "
                       "workspace's mailboxes as tools",
            "description": (
                "One JSON-RPC 2.0 message per POST (initialize, tools/list, tools/call, "
                "...), answered with one JSON-RPC response (application/json); a "
                "notification or response is answered 202 with no body. Stateless: no "
                "Mcp-Session-Id is kept between requests, so initialize is optional. "
                "Authorization: Bearer <workspace API key>; the key's scopes decide what "
                "a tool may do (read: list, read, search; send: also send, reply, draft, "
                "label) and a tool the key may not use answers a tool error (isError) "
                "naming the scope, with HTTP 200. Send Accept: application/json, "
                "text/event-stream, as the MCP specification asks. Bounded: the body "
                "within mcp.max_request_size (413 above, before any tool runs), "
                "mcp.concurrency requests at once per process (503 with Retry-After "
                "above), a tool call within mcp.tool_timeout seconds."),
            "tags": ["mcp"], "security": bearer,
            "parameters": [
                {"name": "MCP-Protocol-Version", "in": "header", "required": False,
                 "schema": {"type": "string", "example": "2025-06-18"},
                 "description": "the protocol version negotiated by initialize"}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/JsonRpcRequest"},
                "examples": {
                    "list_tools": {"value": {"jsonrpc": "2.0", "id": 1,
                                             "method": "tools/list"}},
                    "call_tool": {"value": example_call}}}}},
            "responses": {
                "200": {"description": "the JSON-RPC response: a result, or an error "
                                       "object; a tool's own failure is a result with "
                                       "isError true",
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/JsonRpcResponse"},
                            "example": {"jsonrpc": "2.0", "id": 1, "result": {
                                "content": [{"type": "text", "text": "{\"threads\": []}"}],
                                "structuredContent": {"threads": []},
                                "isError": False}}}}},
                "202": {"description": "a notification or response was accepted; no body"},
                "400": {"description": "not a JSON-RPC message, or a body that did not "
                                       "arrive whole"},
                "401": _error("no bearer key, or a key we do not know (WWW-Authenticate: "
                              "Bearer)"),
                "406": {"description": "the Accept header allows neither JSON nor SSE"},
                "408": _error("the body did not arrive in time"),
                "413": _error("body larger than mcp.max_request_size; nothing ran"),
                "415": {"description": "the body is not application/json"},
                "503": {"description": "mcp.concurrency requests already running in this "
                                       "process; retry after Retry-After seconds",
                        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/Error"}}}},
                "504": _error("the request took longer than mcp.tool_timeout plus the "
                              "read timeout")}},
        "get": {"summary": "not served: 405", "tags": ["mcp"],
                "responses": {"405": not_served}},
        "delete": {"summary": "not served: 405", "tags": ["mcp"],
                   "responses": {"405": not_served}}}}


def mcp_schemas() -> dict[str, Any]:
    identifier = {"oneOf": [{"type": "string", "maxLength": 200}, {"type": "integer"}]}
    return {
        "JsonRpcRequest": {
            "type": "object", "required": ["jsonrpc", "method"],
            "properties": {
                "jsonrpc": {"type": "string", "enum": ["2.0"]},
                "id": identifier,
                "method": {"type": "string", "example": "tools/call",
                           "description": "initialize, ping, tools/list, tools/call, or a "
                                          "notification such as notifications/initialized"},
                "params": {"type": "object"}}},
        "JsonRpcResponse": {
            "type": "object", "required": ["jsonrpc"],
            "properties": {
                "jsonrpc": {"type": "string", "enum": ["2.0"]},
                "id": {"oneOf": [*identifier["oneOf"], {"type": "string", "nullable": True}]},
                "result": {"type": "object"},
                "error": {"type": "object", "properties": {
                    "code": {"type": "integer"}, "message": {"type": "string"},
                    "data": {}}}}}}


def openapi_spec() -> dict[str, Any]:
    thread_summary = {"type": "object", "properties": {
        "id": {"type": "integer"}, "subject": {"type": "string", "nullable": True},
        "correspondent": {"type": "string", "nullable": True},
        "message_count": {"type": "integer"},
        "created_at": {"type": "string", "format": "date-time"},
        "last_message_at": {"type": "string", "format": "date-time"}}}
    attachment = {"type": "object", "properties": {
        "id": {"type": "integer"}, "filename": {"type": "string", "nullable": True},
        "content_type": {"type": "string"}, "size": {"type": "integer"},
        "sha256": {"type": "string"}, "scan_status": {"type": "string", "nullable": True}}}
    message = {"type": "object", "properties": {
        "id": {"type": "integer"}, "direction": {"type": "string"},
        "message_id": {"type": "string", "nullable": True},
        "from_header": {"type": "string", "nullable": True},
        "subject": {"type": "string", "nullable": True},
        "headers": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
        "text_body": {"type": "string", "nullable": True},
        "html_body": {"type": "string", "nullable": True},
        "extracted_text": {
            "type": "string", "nullable": True,
            "description": "inbound: the new text of the message, without the quoted "
                           "history and the signature (HTML-only mail converted to text "
                           "first), at most content.extract_max_chars characters; the "
                           "whole text when nothing new is left. null for outbound "
                           "messages and mail stored before it existed",
            "example": "Thanks, Thursday works for me."},
        "spf": {"type": "string", "nullable": True}, "dkim": {"type": "string", "nullable": True},
        "dmarc": {"type": "string", "nullable": True}, "arc": {"type": "string", "nullable": True},
        "quarantined": {"type": "boolean"},
        "spam": {"type": "boolean"},
        "spam_status": {"type": "string", "nullable": True},
        "spam_action": {"type": "string", "nullable": True},
        "spam_score": {"type": "number", "nullable": True},
        "scan_status": {"type": "string", "nullable": True},
        "labels": {"type": "array", "items": {"type": "string"}},
        "status": {"type": "string", "description": "inbound: received; outbound: queued, "
                                                     "sending, sent, deferred, bounced, failed"},
        "delivery": {"allOf": [{"$ref": "#/components/schemas/Delivery"}], "nullable": True},
        "attachments": {"type": "array", "items": {"$ref": "#/components/schemas/Attachment"}}}}
    bearer = [{"bearer": []}]
    spec = {
        "openapi": "3.0.3",
        "info": {"title": "smtpd-agent", "version": __version__,
                 "description": "Health, metrics, the workspace inbox API and provider "
                                "inbound webhooks of an smtpd-agent server."},
        "paths": {
            "/health": {"get": {"summary": "liveness", "tags": ["health"], "responses": {
                "200": _json("the process runs", {"type": "object"})}}},
            "/health/ready": {"get": {"summary": "readiness, each check named",
                                      "tags": ["health"], "responses": {
                "200": _json("ready", {"$ref": "#/components/schemas/Readiness"}),
                "503": _json("not ready", {"$ref": "#/components/schemas/Readiness"})}}},
            "/.well-known/mta-sts.txt": {"get": {
                "summary": "the MTA-STS policy (RFC 8461) of the domain in the Host header "
                           "(mta-sts.<domain>), served behind a TLS-terminating proxy",
                "tags": ["mta-sts"], "responses": {
                    "200": {"description": "the policy",
                            "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "404": {"description": "not a domain we receive mail for",
                            "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "tags": ["health"],
                                 "responses": {"200": {"description": "text exposition format",
                                                       "content": {"text/plain": {
                                                           "schema": {"type": "string"}}}}}}},
            "/api/v1/workspaces/{slug}/agents": {"get": {
                "summary": "the workspace's agents", "tags": ["inbox"], "security": bearer,
                "parameters": [SLUG], "responses": {
                    "200": _json("agents", {"type": "object", "properties": {
                        "agents": {"type": "array", "items": {"type": "object"}}}}),
                    **API_ERRORS}}},
            "/api/v1/workspaces/{slug}/events": {"get": {
                "summary": "the workspace's events as Server-Sent Events (a live stream)",
                "description": (
                    "One SSE message per event: `id` (the outbox id; resume after it), "
                    "`event` (the type), `data` (JSON: id, type, timestamp, data). "
                    "Reconnect with Last-Event-ID (or ?after=) to continue with no gap and "
                    "no repeat; without either the stream starts at the newest event, "
                    "?after=0 from the first. Heartbeat comments keep it open; a reader "
                    "that stops reading is cut off and may resume. Events older than "
                    "retention.events_days are deleted: a client resuming after an id "
                    "older than the newest deleted one first gets one SSE message with "
                    "`event: gap` and no `id`, data {\"type\": \"gap\", "
                    "\"last_event_id\": <its id>, \"pruned_through\": <newest deleted id>, "
                    "\"retention_days\": <days>}: it missed events and should "
                    "resynchronise from the API; every event still kept after its id "
                    "follows."),
                "tags": ["events"], "security": bearer,
                "parameters": [
                    SLUG,
                    {"name": "Last-Event-ID", "in": "header", "required": False,
                     "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}},
                    {"name": "after", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 0},
                     "description": "resume after this event id (Last-Event-ID wins)"},
                    {"name": "types", "in": "query", "required": False,
                     "schema": {"type": "string"},
                     "description": "comma-separated event types to keep: "
                                    + ", ".join(sorted(EVENT_TYPES))}],
                "responses": {
                    "200": {"description": "the stream", "content": {"text/event-stream": {
                        "schema": {"type": "string"}}}},
                    "400": _error("bad Last-Event-ID, after or types"),
                    "429": _error("too many streams open for this key or workspace"),
                    **API_ERRORS}}},
            "/api/v1/workspaces/{slug}/agents/{handle}/inbox": {"get": {
                "summary": "an agent's threads, newest first, by cursor", "tags": ["inbox"],
                "security": bearer,
                "parameters": [SLUG,
                               {"name": "handle", "in": "path", "required": True,
                                "schema": {"type": "string"}},
                               {"name": "limit", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": 100,
                                           "default": 20}},
                               {"name": "cursor", "in": "query", "required": False,
                                "schema": {"type": "string"},
                                "description": "next_cursor of the previous page"},
                               {"name": "label", "in": "query", "required": False,
                                "schema": {"type": "string"},
                                "description": "only threads with a message labelled so"}],
                "responses": {
                    "200": _json("a page of threads", {"type": "object", "properties": {
                        "threads": {"type": "array", "items": thread_summary},
                        "next_cursor": {"type": "string", "nullable": True}}}),
                    "400": _error("bad limit or cursor"), **API_ERRORS}}},
            "/api/v1/workspaces/{slug}/threads/{id}": {"get": {
                "summary": "a thread with its messages", "tags": ["inbox"], "security": bearer,
                "parameters": [SLUG, _id("id")], "responses": {
                    "200": _json("the thread", {"type": "object", "properties": {
                        **thread_summary["properties"],
                        "messages": {"type": "array",
                                     "items": {"$ref": "#/components/schemas/Message"}}}}),
                    **API_ERRORS}}},
            "/api/v1/workspaces/{slug}/messages/{id}/raw": {"get": {
                "summary": "the message as stored (our trace headers first)",
                "tags": ["inbox"], "security": bearer, "parameters": [SLUG, _id("id")],
                "responses": {"200": {"description": "the raw message",
                                      "content": {"message/rfc822": {
                                          "schema": {"type": "string", "format": "binary"}}}},
                              **API_ERRORS}}},
            "/api/v1/workspaces/{slug}/attachments/{id}": {"get": {
                "summary": "an attachment's bytes with its content type", "tags": ["inbox"],
                "security": bearer, "parameters": [SLUG, _id("id")],
                "responses": {"200": {"description": "the bytes",
                                      "content": {"*/*": {"schema": {"type": "string",
                                                                     "format": "binary"}}}},
                              **API_ERRORS}}},
            "/api/v1/workspaces/{slug}/attachments/{id}/text": {"get": {
                "summary": "an attachment's text: text/* decoded (HTML as text), PDFs read "
                           "in a child process under a deadline; bounded",
                "tags": ["inbox"], "security": bearer, "parameters": [SLUG, _id("id")],
                "responses": {
                    "200": {"description": "the text, at most content.attachment_max_chars "
                                           "characters (truncated says whether it was cut)",
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/AttachmentText"},
                                "example": {"id": 7, "filename": "invoice.pdf",
                                            "content_type": "application/pdf", "size": 48213,
                                            "text": "Invoice 2026-114\nTotal: 120.00 EUR",
                                            "truncated": False, "pages": 1,
                                            "page_count": 1}}}},
                    "415": _error("no text extraction for this content type (only text/* "
                                  "and application/pdf)"),
                    "422": _error("the attachment has no text to give: an unreadable, "
                                  "encrypted or too large PDF, or one that took too long"),
                    "503": _error("every PDF extraction process is busy; retry (Retry-After)"),
                    **FORBIDDEN, **API_ERRORS}}},
            **{path: item for path, item in mailbox_paths().items()
               if path != "/api/v1/workspaces/{slug}/agents"},
            **webhook_endpoint_paths(),
            "/webhook/ses": _webhook(
                "Amazon SES receipt through SNS (signature checked against the signing "
                "certificate; SubscriptionConfirmation handled)", "text/plain",
                {"type": "string"}),
            "/webhook/sendgrid": _webhook(
                "SendGrid Inbound Parse, raw MIME mode, signed (ECDSA)", "multipart/form-data",
                {"type": "object", "properties": {"email": {"type": "string"},
                                                  "envelope": {"type": "string"}}}),
            "/webhook/mailgun": _webhook(
                "Mailgun route forwarding MIME (HMAC signature, fresh timestamp, token once)",
                "application/x-www-form-urlencoded",
                {"type": "object", "properties": {
                    "timestamp": {"type": "string"}, "token": {"type": "string"},
                    "signature": {"type": "string"}, "recipient": {"type": "string"},
                    "sender": {"type": "string"}, "body-mime": {"type": "string"}}},
                {"406": _json("permanently rejected; Mailgun does not retry", WEBHOOK_RESULT)}),
            "/webhook/postmark": _webhook(
                "Postmark inbound JSON (basic auth)", "application/json",
                {"type": "object"},
                {"403": _json("permanently rejected (Postmark does not retry), or not "
                              "configured", {"type": "object"})},
                security=[{"basic": []}]),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "basic": {"type": "http", "scheme": "basic"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"},
                                         "rule": {"type": "string", "description":
                                                  "the rule or config key that refused "
                                                  "the request, when one did"}}},
                "Attachment": attachment,
                "AttachmentText": {"type": "object", "required": ["id", "text", "truncated"],
                                   "properties": {
                    "id": {"type": "integer"}, "filename": {"type": "string", "nullable": True},
                    "content_type": {"type": "string"}, "size": {"type": "integer"},
                    "text": {"type": "string"}, "truncated": {"type": "boolean"},
                    "pages": {"type": "integer", "nullable": True,
                              "description": "PDFs: pages read (at most content.pdf_max_pages)"},
                    "page_count": {"type": "integer", "nullable": True,
                                   "description": "PDFs: pages in the file"}}},
                "Message": message,
                "Delivery": {"type": "object", "properties": {
                    "id": {"type": "integer"},
                    "status": {"type": "string", "enum": ["queued", "sending", "sent",
                                                          "deferred", "bounced", "failed"]},
                    "attempts": {"type": "integer"},
                    "last_error": {"type": "string", "nullable": True},
                    "created_at": {"type": "string", "format": "date-time"},
                    "last_attempt_at": {"type": "string", "format": "date-time",
                                        "nullable": True},
                    "next_attempt_at": {"type": "string", "format": "date-time",
                                        "nullable": True,
                                        "description": "queued or deferred: when it is tried"},
                    "finished_at": {"type": "string", "format": "date-time", "nullable": True},
                    "recipients": {"type": "array", "items": {"type": "object", "properties": {
                        "address": {"type": "string"},
                        "state": {"type": "string", "enum": [
                            "queued", "deferred", "sent", "bounced", "failed", "suppressed",
                            "blocked"]},
                        "code": {"type": "integer", "nullable": True},
                        "enhanced": {"type": "string", "nullable": True},
                        "detail": {"type": "string", "nullable": True}}}}}},
                "Draft": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "agent": {"type": "string"},
                    "thread_id": {"type": "integer", "nullable": True},
                    "status": {"type": "string", "enum": ["draft", "sent", "discarded"]},
                    "origin": {"type": "string", "enum": ["api", "agent"]},
                    "to": {"type": "array", "items": {"type": "string"}},
                    "cc": {"type": "array", "items": {"type": "string"}},
                    "bcc": {"type": "array", "items": {"type": "string"}},
                    "subject": {"type": "string", "nullable": True},
                    "text": {"type": "string", "nullable": True},
                    "html": {"type": "string", "nullable": True},
                    "sent_message_id": {"type": "integer", "nullable": True},
                    "attachments": {"type": "array", "items": ATTACHMENT_ROW}}},
                "SentMessage": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "thread_id": {"type": "integer"},
                    "direction": {"type": "string", "enum": ["inbound", "outbound"]},
                    "status": {"type": "string", "nullable": True},
                    "message_id": {"type": "string", "nullable": True},
                    "subject": {"type": "string", "nullable": True},
                    "labels": {"type": "array", "items": {"type": "string"}},
                    "attachments": {"type": "array", "items": ATTACHMENT_ROW,
                                    "description": "download each from "
                                                   "/attachments/{id}"},
                    "delivery": {"$ref": "#/components/schemas/Delivery"}}},
                "Readiness": {"type": "object", "required": ["ready", "checks"], "properties": {
                    "ready": {"type": "boolean"},
                    "checks": {"type": "object", "additionalProperties": {
                        "type": "object", "properties": {
                            "ok": {"type": "boolean"}, "required": {"type": "boolean"},
                            "detail": {"type": "string"}}}}}},
                "WebhookEndpoint": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "url": {"type": "string"},
                    "description": {"type": "string", "nullable": True},
                    "event_types": {"type": "array", "items": {"type": "string"}},
                    "enabled": {"type": "boolean"},
                    "consecutive_failures": {"type": "integer"},
                    "failing_since": {"type": "string", "format": "date-time",
                                      "nullable": True},
                    "disabled_at": {"type": "string", "format": "date-time", "nullable": True},
                    "disabled_reason": {"type": "string", "nullable": True},
                    "rotating_secret_until": {"type": "string", "format": "date-time",
                                              "nullable": True},
                    "created_at": {"type": "string", "format": "date-time"},
                    "updated_at": {"type": "string", "format": "date-time"}}},
                "WebhookDelivery": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "event_id": {"type": "integer"},
                    "event_type": {"type": "string"},
                    "thread_id": {"type": "integer", "nullable": True},
                    "status": {"type": "string",
                               "enum": ["pending", "sending", "delivered", "failed"]},
                    "attempts": {"type": "integer"},
                    "next_attempt_at": {"type": "string", "format": "date-time",
                                        "nullable": True},
                    "replay": {"type": "boolean"},
                    "replay_of": {"type": "integer", "nullable": True},
                    "last_status": {"type": "integer", "nullable": True},
                    "last_error": {"type": "string", "nullable": True},
                    "created_at": {"type": "string", "format": "date-time"},
                    "finished_at": {"type": "string", "format": "date-time", "nullable": True},
                    "attempt_log": {"type": "array", "items": {"type": "object", "properties": {
                        "attempt": {"type": "integer"},
                        "started_at": {"type": "string", "format": "date-time"},
                        "duration_ms": {"type": "integer"},
                        "status_code": {"type": "integer", "nullable": True},
                        "outcome": {"type": "string",
                                    "enum": ["delivered", "failed", "refused"]},
                        "error": {"type": "string", "nullable": True},
                        "response": {"type": "string", "nullable": True},
                        "retry_at": {"type": "string", "format": "date-time",
                                     "nullable": True}}}}}},
                "WebhookResult": {"type": "object", "properties": {
                    "status": {"type": "string", "enum": ["accepted", "rejected", "tempfail"]},
                    "reason": {"type": "string"}, "reply": {"type": "string"},
                    "queue_id": {"type": "string"},
                    "stored": {"type": "array", "items": {"type": "object"}},
                    # each posted recipient's verdict and the RCPT reply SMTP would give it
                    "recipients": {"type": "array", "items": {"type": "object", "properties": {
                        "address": {"type": "string"}, "verdict": {"type": "string"},
                        "reply": {"type": "string"}}}}}},
            },
        },
    }
    spec["paths"].update(mcp_paths())
    spec["components"]["schemas"].update(mcp_schemas())
    agents = spec["paths"]["/api/v1/workspaces/{slug}/agents"]
    agents.update(mailbox_paths()["/api/v1/workspaces/{slug}/agents"])
    return spec
