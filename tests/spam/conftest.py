"""The spam tests answer through the agent's local Messages API (tests/agent/conftest.py)."""

from tests.agent.conftest import messages_api

__all__ = ["messages_api"]
