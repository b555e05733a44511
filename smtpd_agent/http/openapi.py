"""The OpenAPI 3.0 description served at /openapi.json: the inbox API, health, webhooks.

Written out by hand, next to the handlers it describes; tests run
schemathesis against it over real HTTP, so a route that drifts from it shows.
"""

from __future__ import annotations

from typing import Any

from .. import __version__


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


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
        "spf": {"type": "string", "nullable": True}, "dkim": {"type": "string", "nullable": True},
        "dmarc": {"type": "string", "nullable": True}, "arc": {"type": "string", "nullable": True},
        "quarantined": {"type": "boolean"},
        "spam": {"type": "boolean"},
        "spam_status": {"type": "string", "nullable": True},
        "spam_action": {"type": "string", "nullable": True},
        "spam_score": {"type": "number", "nullable": True},
        "scan_status": {"type": "string", "nullable": True},
        "attachments": {"type": "array", "items": {"$ref": "#/components/schemas/Attachment"}}}}
    bearer = [{"bearer": []}]
    return {
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
                                "description": "next_cursor of the previous page"}],
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
                          "properties": {"error": {"type": "string"}}},
                "Attachment": attachment,
                "Message": message,
                "Readiness": {"type": "object", "required": ["ready", "checks"], "properties": {
                    "ready": {"type": "boolean"},
                    "checks": {"type": "object", "additionalProperties": {
                        "type": "object", "properties": {
                            "ok": {"type": "boolean"}, "required": {"type": "boolean"},
                            "detail": {"type": "string"}}}}}},
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
