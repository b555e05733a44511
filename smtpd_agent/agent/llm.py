"""The Messages API call, through the official SDK, and what its errors mean for the job.

Stage 6 of the pipeline. The SDK's own retries are off (max_retries=0): retries
belong to the job queue, where backoff survives a restart and every attempt is
counted in the job row.

The SDK is imported when the first client is made: it is ~50 MB and a second
of start-up that accepting processes (smtp.processes) and servers without an
API key never need.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..config import AgentSettings
from .prompt import Prompt

if TYPE_CHECKING:
    import anthropic

Outcome = Literal["retry", "fail"]


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    input_tokens: int
    output_tokens: int
    latency_ms: int


@dataclass(frozen=True)
class CallError:
    """An API failure, classified: retry later (429, 5xx, timeout, network) or give up."""

    outcome: Outcome
    error: str
    retry_after: float | None = None


def classify_error(error: BaseException) -> CallError:
    anthropic = sys.modules.get("anthropic")  # without a client made, no SDK error either
    if anthropic is not None:
        if isinstance(error, anthropic.APITimeoutError):
            return CallError("retry", "timeout")
        if isinstance(error, anthropic.APIConnectionError):
            return CallError("retry", f"connection error: {error}")
        if isinstance(error, anthropic.APIStatusError):
            status = error.status_code
            text = f"HTTP {status}: {_short(_api_message(error))}"
            if status == 429 or status >= 500 or status == 408:
                return CallError("retry", text,
                                 _retry_after(error.response.headers.get("retry-after")))
            return CallError("fail", text)
    return CallError("fail", f"{type(error).__name__}: {_short(str(error))}")


def _api_message(error: anthropic.APIStatusError) -> str:
    """The API's own error message ({"error": {"message": ...}}), else the SDK's summary."""
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
        if isinstance(message, str) and message:
            return message
    return error.message


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def deprecation_of(model: str) -> str | None:
    """The end-of-life date the installed SDK gives for `model`, if it deprecates it."""
    from anthropic.resources.messages import messages as sdk_messages

    deprecated: dict[str, str] = getattr(sdk_messages, "DEPRECATED_MODELS", {})
    return deprecated.get(model)


class LLM:
    """One AsyncAnthropic client per process, shared by its workers."""

    def __init__(self, settings: AgentSettings) -> None:
        import anthropic

        self.settings = settings
        self.client = anthropic.AsyncAnthropic(
            api_key=settings.api_key, base_url=settings.base_url or None,
            timeout=settings.timeout, max_retries=0)

    async def complete(self, prompt: Prompt) -> Completion:
        started = time.monotonic()
        response = await self.client.messages.create(
            model=self.settings.model, max_tokens=self.settings.max_tokens,
            system=prompt.system, messages=prompt.messages)  # type: ignore[arg-type]
        latency_ms = round((time.monotonic() - started) * 1000)
        text = "".join(block.text for block in response.content if block.type == "text")
        return Completion(text=text, model=response.model,
                          input_tokens=response.usage.input_tokens,
                          output_tokens=response.usage.output_tokens, latency_ms=latency_ms)

    async def close(self) -> None:
        await self.client.close()
