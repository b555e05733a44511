"""The MCP tool catalog and its argument checks, without a server (issue 19)."""

from __future__ import annotations

import pytest

from smtpd_agent.mcpserver.server import describe
from smtpd_agent.mcpserver.tools import TOOLS, ToolError, check_arguments, html_text
from smtpd_agent.store.apikeys import Scope


def test_every_tool_has_a_closed_schema_and_honest_annotations() -> None:
    assert len({tool.name for tool in TOOLS}) == len(TOOLS) == 10
    for tool in TOOLS:
        schema = tool.schema
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert set(schema["required"]) <= set(schema["properties"])
        for rule in schema["properties"].values():
            assert rule["type"] in {"string", "integer", "array"}
            assert rule.get("description")
        # a read-only tool needs only `read`; anything that writes needs `send`
        assert tool.read_only is (tool.scope is Scope.READ)
        assert not (tool.read_only and tool.destructive)
        wire = describe(tool).model_dump(by_alias=True, exclude_none=True)
        assert wire["inputSchema"] == schema
        assert wire["annotations"]["readOnlyHint"] is tool.read_only
        assert wire["annotations"]["destructiveHint"] is tool.destructive
        assert wire["annotations"]["idempotentHint"] is tool.idempotent
    sends = {t.name for t in TOOLS if t.open_world}
    assert sends == {"send_message", "reply_to_thread", "send_draft"}
    assert all(t.destructive for t in TOOLS if t.open_world)


def test_reply_takes_no_recipients() -> None:
    [reply] = [t for t in TOOLS if t.name == "reply_to_thread"]
    assert not {"to", "cc", "bcc"} & set(reply.schema["properties"])


@pytest.mark.parametrize(("arguments", "message"), [
    ([], "arguments: expected an object"),
    ({}, "thread_id: required"),
    ({"thread_id": None}, "thread_id: required"),
    ({"thread_id": True, "text": "x"}, "thread_id: expected an integer"),
    ({"thread_id": 2**63, "text": "x"}, "thread_id: 1-"),
    ({"thread_id": 1, "text": ""}, "text: 1-"),
    ({"thread_id": 1, "text": "a\x00b"}, "NUL"),
    ({"thread_id": 1, "text": "x", "to": ["a@b.c"]}, "unknown argument 'to'"),
])
def test_arguments_that_do_not_fit_are_refused_by_name(arguments, message) -> None:
    [reply] = [t for t in TOOLS if t.name == "reply_to_thread"]
    with pytest.raises(ToolError) as caught:
        check_arguments(reply.schema, arguments)
    assert message in caught.value.message


def test_lists_are_bounded_and_checked_item_by_item() -> None:
    [send] = [t for t in TOOLS if t.name == "send_message"]
    base = {"agent": "support", "text": "hi"}
    assert check_arguments(send.schema, {**base, "to": ["a@example.org"], "cc": None}) == {
        **base, "to": ["a@example.org"]}
    with pytest.raises(ToolError, match="at most 50 items"):
        check_arguments(send.schema, {**base, "to": [f"a{i}@example.org" for i in range(51)]})
    with pytest.raises(ToolError, match="to: expected a string"):
        check_arguments(send.schema, {**base, "to": [7]})
    with pytest.raises(ToolError, match="to: expected a list"):
        check_arguments(send.schema, {**base, "to": "a@example.org"})


def test_html_fallback() -> None:
    assert html_text("<p>Hello <b>there</b></p>\n<p>again</p>") == "Hello there \n again"
