"""A Messages API server on loopback, for the real anthropic SDK to talk to via base_url.

It validates each request as the API would (path, headers, JSON shape, roles
alternating from and to `user`), records it, and answers from a script:
`ok` (a reply text), `429`, `500` or `slow` (answer after a delay), then
`ok` forever. stdlib only, in a thread: no event loop shared with the server.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

API_KEY = "sk-ant-test-key"


@dataclass
class Step:
    kind: str = "ok"  # ok | 429 | 500 | slow
    text: str = "Thank you for your message. We are looking into it."
    delay: float = 0.0
    retry_after: float | None = None


@dataclass
class Recorded:
    at: float
    headers: dict[str, str]
    body: dict[str, Any]
    problems: list[str] = field(default_factory=list)


def validate(headers: dict[str, str], body: Any) -> list[str]:
    problems = []
    # The API takes the key as x-api-key; newer SDKs send it as a bearer token.
    if API_KEY not in (headers.get("x-api-key"), headers.get("authorization", "")[7:]):
        problems.append("bad API key")
    if not headers.get("anthropic-version"):
        problems.append("no anthropic-version")
    if not isinstance(body, dict):
        return problems + ["body is not an object"]
    if not isinstance(body.get("model"), str) or not body["model"]:
        problems.append("no model")
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        problems.append("bad max_tokens")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        problems.append("bad system")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return problems + ["no messages"]
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != expected:
            problems.append(f"message {index}: expected role {expected}")
        elif not message.get("content"):
            problems.append(f"message {index}: empty content")
    if messages[-1].get("role") != "user":
        problems.append("last message is not from the user")
    return problems


class MessagesAPI:
    def __init__(self) -> None:
        self.script: deque[Step] = deque()
        self.requests: list[Recorded] = []
        self.default = Step()
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                problems = (["wrong path " + self.path] if self.path != "/v1/messages" else [])
                problems += validate(headers, body)
                with api._lock:
                    step = api.script.popleft() if api.script else api.default
                    api.requests.append(Recorded(time.monotonic(), headers, body, problems))
                if problems:
                    return self._send(400, {"type": "error", "error": {
                        "type": "invalid_request_error", "message": "; ".join(problems)}})
                if step.kind == "429":
                    extra = {"retry-after": str(step.retry_after)} if step.retry_after else {}
                    return self._send(429, {"type": "error", "error": {
                        "type": "rate_limit_error", "message": "slow down"}}, extra)
                if step.kind == "500":
                    return self._send(500, {"type": "error", "error": {
                        "type": "api_error", "message": "internal error"}})
                if step.kind == "slow":
                    time.sleep(step.delay)
                text = step.text
                self._send(200, {
                    "id": f"msg_{len(api.requests)}", "type": "message", "role": "assistant",
                    "model": body["model"], "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": len(raw) // 4, "output_tokens": len(text) // 4}})

            def _send(self, status: int, payload: dict[str, Any],
                      extra: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.send_header("request-id", f"req_{len(api.requests)}")
                    for name, value in (extra or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout, or killed)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def queue(self, *steps: Step) -> None:
        with self._lock:
            self.script.extend(steps)

    def wait_for_requests(self, count: int, timeout: float = 60.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.requests) >= count:
                return self.requests
            time.sleep(0.02)
        raise AssertionError(f"expected {count} API requests, got {len(self.requests)}")

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
