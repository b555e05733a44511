"""The HTTP fixtures (API keys of acme and globex, a client session) for the event tests."""

from tests.http.conftest import http, keys  # noqa: F401
