"""Rows for the store's composite types: built by name from the one field list, text cleaned."""

from __future__ import annotations

import pytest

from smtpd_agent.store.rows import INBOUND_DELIVERY, MESSAGE_ATTACHMENT, clean_text


def test_a_row_follows_the_field_order_whatever_the_argument_order():
    row = INBOUND_DELIVERY.row(rcpt_to="a@b", auto_reply=True, agent_id=2, workspace_id=1,
                               content_position=1)
    assert row == (1, 1, 2, True, "a@b")


def test_a_missing_or_unknown_field_fails_at_once():
    with pytest.raises(TypeError, match="missing \\['rcpt_to'\\]"):
        INBOUND_DELIVERY.row(content_position=1, workspace_id=1, agent_id=2, auto_reply=True)
    with pytest.raises(TypeError, match="unknown \\['rcpt'\\]"):
        INBOUND_DELIVERY.row(content_position=1, workspace_id=1, agent_id=2, auto_reply=True,
                             rcpt_to="a@b", rcpt="a@b")


def test_text_values_lose_what_postgres_refuses():
    assert clean_text("a\x00b\udcff") == "ab?"
    row = MESSAGE_ATTACHMENT.row(content_position=1, position=0, filename="x\x00.pdf",
                                 content_type="application/\x00pdf", disposition=None,
                                 content_id=None, sha256=b"\x00" * 32, content=b"\x00",
                                 scan_status=None, scan_signature=None)
    assert row[2:4] == ("x.pdf", "application/pdf")
    assert row[6:8] == (b"\x00" * 32, b"\x00")  # bytes stay as they are
