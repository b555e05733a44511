"""schemathesis against /openapi.json over real HTTP: whatever it sends, no 5xx.

Bounded (a few examples per operation, no shrinking database) to stay well
under a minute. Requests carry a valid key holding every scope (and the Postmark
credentials), and
each API case is sent twice, once with the generated slug and once with the
key's own, so the handlers behind the authorization are exercised too.
"""

from __future__ import annotations

import asyncio
import base64

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from smtpd_agent.store import directory
from smtpd_agent.store.apikeys import Scope, create_key
from tests.http.test_api import deliver, message

EXAMPLES = 12
POSTMARK = ("postmark", "fuzz-secret")


@pytest.fixture
async def fuzz_server(start_server, db):
    running = start_server(**{"http.postmark_username": POSTMARK[0],
                              "http.postmark_password": POSTMARK[1],
                              "http.mailgun_signing_key": "key-fuzz"})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    # Something to find: rows 1 exist (thread, message, attachment), generated ids hit them.
    raw = message("fuzzed", attachment=True)
    assert await asyncio.to_thread(deliver, running.port, raw) == 250
    # Every scope, so send, reply and the admin routes run their handlers; an id far from
    # the small ones generated, so DELETE /keys/{id} does not revoke the fuzzer's own key.
    await db.execute("SELECT setval('api_keys_id_seq', 1000000)")
    return running, (await create_key(db, "acme", scopes=frozenset(Scope))).key


def fuzz(base_url: str, key: str) -> list[str]:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    basic = base64.b64encode(":".join(POSTMARK).encode()).decode()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/events"):
            continue  # an SSE stream never ends; tests/events/test_stream.py checks its input
        headers = {"Authorization": f"Basic {basic}" if "postmark" in operation.path
                   else f"Bearer {key}"}

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            variants = [None, "acme"] if "slug" in (case.path_parameters or {}) else [None]
            for slug in variants:
                if slug:
                    case.path_parameters["slug"] = slug
                    if "handle" in case.path_parameters:
                        case.path_parameters["handle"] = "support"
                response = case.call(base_url=base_url, headers=headers,  # noqa: B023
                                     timeout=10)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> "
                                    f"{response.status_code}: {response.text[:200]}")

        run()  # called here, inside the iteration whose `headers` it reads
    return failures


@pytest.mark.timeout(120)
async def test_openapi_fuzz_finds_no_server_error(fuzz_server):
    running, key = fuzz_server
    failures = await asyncio.to_thread(fuzz, running.http_url, key)
    assert not failures, "\n".join(failures)
