"""The HTTP service: an aiohttp application in the server's own event loop.

A `Service` of the App like the SMTP listener (start binds, stop closes),
built from the shared Runtime: the same pool, the same Router and Pipeline (so
webhook mail is routed, authenticated, scanned and stored as SMTP mail is) and
the same Metrics registry that the listener counts into.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from ..domains.mta_sts import POLICY_PATH, mta_sts_route
from ..hooks.service import Endpoints
from ..events.stream import EventStreams
from ..extract.attachment import AttachmentText, Limits
from ..mailbox.send import Mailboxes
from ..runtime import Runtime
from ..store.database import CONNECTION_ERRORS, DatabaseUnavailable
from .api import InboxApi
from .endpoints import EndpointsApi
from .health import Health
from .mailbox import MailboxApi
from .openapi import openapi_spec
from .responses import HttpError, error, json_response
from .webhooks import Webhooks

if TYPE_CHECKING:
    from ..mcpserver.http import McpHttp

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Webhook bodies carry the message, base64-encoded in JSON at worst (4/3), plus fields.
BODY_OVERHEAD = 1024 * 1024


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One JSON error shape; a database outage is 503, anything unexpected 500 (logged)."""
    try:
        return await handler(request)
    except HttpError as failure:
        return error(failure.status, failure.message, failure.headers, failure.rule)
    except web.HTTPException as failure:
        if failure.status >= 400:
            # Keep what the status needs (Allow on 405); the body and its type are ours.
            kept = {k: v for k, v in failure.headers.items() if k.lower() != "content-type"}
            return error(failure.status, failure.reason, kept)
        raise
    except (DatabaseUnavailable, *CONNECTION_ERRORS) as failure:
        log.error("http.database_unavailable", path=request.path,
                  error=type(failure).__name__)
        return error(503, "database unavailable, retry later")
    except Exception:
        log.exception("http.internal_error", path=request.path, method=request.method)
        return error(500, "internal error")


class HttpServer:
    """Health, metrics, inbox API, webhooks, the MTA-STS policy, /openapi.json and the
    MCP server (/mcp) on http.host:http.port."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self.webhooks: Webhooks | None = None
        self.mcp: McpHttp | None = None
        self.streams: EventStreams | None = None

    def build(self) -> web.Application:
        runtime, settings = self.runtime, self.settings
        pipeline = runtime.pipeline
        router = runtime.router
        health = Health(runtime.pool, settings, pipeline.scanner, pipeline.spam_filter)
        content = settings.content
        api = InboxApi(runtime.pool, AttachmentText(Limits(
            max_bytes=content.attachment_max_bytes, max_chars=content.attachment_max_chars,
            pdf_max_pages=content.pdf_max_pages, pdf_timeout=content.pdf_timeout,
            pdf_memory_mb=content.pdf_memory_mb), content.pdf_workers))
        mailboxes = Mailboxes(runtime.pool, settings)
        mailbox = MailboxApi(runtime.pool, api, mailboxes)
        endpoints = EndpointsApi(runtime.pool, api, Endpoints(runtime.pool, settings))
        self.webhooks = hooks = Webhooks(settings.http, pipeline, router, runtime.pool,
                                         runtime.metrics)
        self.streams = streams = EventStreams(api, runtime.pool, runtime.event_wakeups,
                                              settings.http, runtime.metrics,
                                              settings.retention.events_days)
        spec = openapi_spec()
        app = web.Application(middlewares=[errors],
                              client_max_size=2 * settings.smtp.max_message_size
                              + BODY_OVERHEAD)

        async def openapi(request: web.Request) -> web.Response:
            return json_response(spec)

        async def mta_sts(request: web.Request) -> web.Response:
            """RFC 8461 3.3, behind the TLS-terminating proxy for every mta-sts.<domain>."""
            reply = await mta_sts_route(runtime.pool, settings, request.host, request.path)
            return web.Response(status=reply.status, body=reply.body,
                                headers={"Content-Type": reply.content_type})

        async def metrics(request: web.Request) -> web.Response:
            try:
                await runtime.metrics.refresh_queues(runtime.pool)
            # The counters are still worth serving without the queue gauges.
            except Exception as failure:  # noqa: BLE001
                log.warning("http.metrics_queues_unavailable", error=type(failure).__name__)
            return web.Response(body=runtime.metrics.render(),
                                headers={"Content-Type": "text/plain; version=0.0.4; "
                                                         "charset=utf-8"})

        workspace = "/api/v1/workspaces/{slug}"
        ident = r"{id:\d{1,19}}"
        part = r"{attachment:\d{1,19}}"
        app.router.add_get("/health", health.live)
        app.router.add_get("/health/ready", health.ready)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/openapi.json", openapi)
        app.router.add_get(POLICY_PATH, mta_sts)
        app.router.add_get(f"{workspace}/agents", api.agents)
        app.router.add_get(f"{workspace}/events", streams.handle)
        app.router.add_post(f"{workspace}/agents", mailbox.create_agent)
        app.router.add_get(f"{workspace}/agents/{{handle}}", mailbox.agent)
        app.router.add_patch(f"{workspace}/agents/{{handle}}", mailbox.update_agent)
        app.router.add_get(f"{workspace}/agents/{{handle}}/inbox", api.inbox)
        app.router.add_post(f"{workspace}/agents/{{handle}}/messages", mailbox.send)
        app.router.add_get(f"{workspace}/keys", mailbox.keys)
        app.router.add_post(f"{workspace}/keys", mailbox.create_key)
        app.router.add_delete(f"{workspace}/keys/{ident}", mailbox.revoke_key)
        app.router.add_get(f"{workspace}/threads/{ident}", api.thread)
        app.router.add_post(f"{workspace}/threads/{ident}/reply", mailbox.reply)
        app.router.add_get(f"{workspace}/messages/{ident}", mailbox.message)
        app.router.add_patch(f"{workspace}/messages/{ident}", mailbox.labels)
        app.router.add_get(f"{workspace}/search", mailbox.search)
        app.router.add_get(f"{workspace}/drafts", mailbox.drafts)
        app.router.add_post(f"{workspace}/agents/{{handle}}/drafts", mailbox.create_draft)
        app.router.add_get(f"{workspace}/drafts/{ident}", mailbox.draft)
        app.router.add_patch(f"{workspace}/drafts/{ident}", mailbox.update_draft)
        app.router.add_delete(f"{workspace}/drafts/{ident}", mailbox.discard_draft)
        app.router.add_post(f"{workspace}/drafts/{ident}/send", mailbox.send_draft)
        app.router.add_get(f"{workspace}/drafts/{ident}/attachments/{part}",
                           mailbox.draft_attachment)
        app.router.add_get(f"{workspace}/messages/{ident}/raw", api.raw)
        app.router.add_get(f"{workspace}/attachments/{ident}", api.attachment)
        app.router.add_get(f"{workspace}/attachments/{ident}/text", api.attachment_text)
        # Outgoing webhooks (admin): the endpoints events are POSTed to, and their log.
        app.router.add_get(f"{workspace}/webhooks", endpoints.list)
        app.router.add_post(f"{workspace}/webhooks", endpoints.create)
        app.router.add_get(f"{workspace}/webhooks/{ident}", endpoints.get)
        app.router.add_patch(f"{workspace}/webhooks/{ident}", endpoints.update)
        app.router.add_delete(f"{workspace}/webhooks/{ident}", endpoints.delete)
        app.router.add_post(f"{workspace}/webhooks/{ident}/rotate-secret", endpoints.rotate)
        app.router.add_get(f"{workspace}/webhooks/{ident}/deliveries", endpoints.deliveries)
        app.router.add_post(f"{workspace}/webhooks/{ident}/deliveries/{{delivery:\\d{{1,19}}}}"
                            "/replay", endpoints.replay_delivery)
        app.router.add_post(f"{workspace}/webhooks/{ident}/replay", endpoints.replay_event)
        if settings.mcp.http:
            # The MCP SDK costs about 1.5 s of CPU to import: only a server that serves
            # /mcp pays it, never every CLI command that imports the app.
            from ..mcpserver.http import McpHttp, owner_of
            from ..mcpserver.server import build_server
            from ..mcpserver.tools import MailboxTools

            self.mcp = McpHttp(runtime.pool, build_server(MailboxTools(
                runtime.pool, mailboxes, api.texts, settings.mcp,
                settings.server.default_domain),
                owner_of, runtime.metrics), settings.mcp, runtime.metrics)
            # Stateless: no GET stream (it would hold a slot open) and no session to DELETE
            # (405 with Allow: POST).
            app.router.add_post("/mcp", self.mcp.handle)
        # Webhooks read their own bodies within http.webhook_max_body_size (413 above,
        # before 100 Continue when the client asks for one).
        app.router.add_post("/webhook/ses", hooks.ses, expect_handler=hooks.expect)
        app.router.add_post("/webhook/sendgrid", hooks.sendgrid, expect_handler=hooks.expect)
        app.router.add_post("/webhook/mailgun", hooks.mailgun, expect_handler=hooks.expect)
        # Mailgun posts MIME only to a forward URL ending in "mime".
        app.router.add_post("/webhook/mailgun/mime", hooks.mailgun, expect_handler=hooks.expect)
        app.router.add_post("/webhook/postmark", hooks.postmark, expect_handler=hooks.expect)
        return app

    async def start(self) -> None:
        app = self.build()
        assert self.webhooks is not None
        await self.webhooks.start()
        if self.mcp is not None:
            await self.mcp.start()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.http.host, self.settings.http.port,
                           reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("http.listening", host=self.settings.http.host, port=self.port)

    async def stop(self) -> None:
        if self.streams is not None:  # before the runner waits for every open request
            await self.streams.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.mcp is not None:
            await self.mcp.stop()
        log.info("http.stopped")
