"""The HTTP surface, beside the SMTP listener in the same event loop.

Health and readiness for the orchestrator, Prometheus metrics, the
workspace-scoped inbox API (reads what the store wrote), and provider
webhooks that are another way *into* the pipeline: they route, authenticate
(when the provider hands over the message as sent), scan and store exactly as
SMTP does, through the same `Pipeline`.
"""

from .server import HttpServer

__all__ = ["HttpServer"]
