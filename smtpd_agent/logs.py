"""structlog set-up: JSON lines in production, a readable console in dev.

Context (session id, client IP) is bound with structlog.contextvars per SMTP
session, so every event of a session carries it.
"""

from __future__ import annotations

import logging
import sys

import structlog

from .config import LogSettings


def configure_logging(settings: LogSettings, stream=None) -> None:
    stream = stream or sys.stderr
    level = getattr(logging, settings.level.upper())
    use_json = settings.format == "json" or (settings.format == "auto" and not stream.isatty())
    renderer = (structlog.processors.JSONRenderer() if use_json
                else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=stream,
                        format="%(levelname)s %(name)s: %(message)s")
    # aiosmtpd logs every command at INFO through stdlib logging; our own events replace it.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
