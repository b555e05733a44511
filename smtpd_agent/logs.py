"""structlog set-up: JSON lines in production, a readable console in dev.

Context (session id, client IP) is bound with structlog.contextvars per SMTP
session, so every event of a session carries it.
"""

from __future__ import annotations

import logging
import sys
import warnings

from typing import Any

import orjson
import structlog

from .config import LogSettings


def configure_logging(settings: LogSettings, stream=None) -> None:
    stream = stream or sys.stderr
    level = getattr(logging, settings.level.upper())
    use_json = settings.format == "json" or (settings.format == "auto" and not stream.isatty())
    if use_json and hasattr(stream, "buffer"):
        # orjson renders bytes straight to the stream: logging is on every message's path.
        renderer: Any = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory: Any = structlog.BytesLoggerFactory(file=stream.buffer)
    else:
        renderer = (structlog.processors.JSONRenderer() if use_json
                    else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
        factory = structlog.WriteLoggerFactory(file=stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=stream,
                        format="%(levelname)s %(name)s: %(message)s")
    # aiosmtpd logs every command at INFO through stdlib logging; our own events replace it.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    route_warnings_to_log()


def route_warnings_to_log() -> None:
    """Python warnings become log events, DeprecationWarning included.

    Python hides DeprecationWarning outside __main__, yet a library's deprecation (the
    Anthropic SDK warns when agent.model nears its end of life) is the operator's business.
    """
    warnings.simplefilter("default", DeprecationWarning)
    warnings.showwarning = _log_warning


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    structlog.get_logger("smtpd_agent.warnings").warning(
        "python.warning", category=category.__name__, message=str(message),
        source=f"{filename}:{lineno}")
