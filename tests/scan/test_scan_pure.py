"""The pure half of the scanning stage: addresses, clamd replies, verdicts, decisions."""

from __future__ import annotations

import pytest

from smtpd_agent.config import ConfigError, ScanSettings, Settings, SmtpSettings
from smtpd_agent.scan import (
    ClamdAddress,
    ClamdOutcome,
    ClamdReply,
    PartVerdict,
    ScanDecision,
    Scanner,
    ScanResult,
    classify,
    combine,
    decide,
    limit_problems,
    parse_address,
    parse_reply,
)

REQUIRED = ScanSettings(clamd="unix:/run/clamd.sock", required=True)
OPTIONAL = ScanSettings(clamd="unix:/run/clamd.sock", required=False)


@pytest.mark.parametrize(("spec", "address"), [
    ("unix:/run/clamav/clamd.ctl", ClamdAddress(path="/run/clamav/clamd.ctl")),
    ("tcp:127.0.0.1:3310", ClamdAddress(host="127.0.0.1", port=3310)),
    ("tcp:clamav.internal:3310", ClamdAddress(host="clamav.internal", port=3310)),
    ("tcp:[::1]:3310", ClamdAddress(host="::1", port=3310)),
])
def test_parse_address(spec: str, address: ClamdAddress) -> None:
    assert parse_address(spec) == address
    assert str(address) == spec


@pytest.mark.parametrize("spec", [
    "", "unix:", "/run/clamd.sock", "tcp:localhost", "tcp::3310", "tcp:host:0", "tcp:host:99999",
    "tcp:host:port", "http://clamd:3310",
])
def test_parse_address_rejects(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"scan\.clamd"):
        parse_address(spec)


def test_scanner_needs_an_address() -> None:
    with pytest.raises(ConfigError, match=r"scan\.clamd: not set"):
        Scanner(ScanSettings())


@pytest.mark.parametrize(("line", "reply"), [
    ("stream: OK", ClamdReply("ok")),
    ("stream: OK\0", ClamdReply("ok")),
    ("stream: Win.Test.EICAR_HDB-1 FOUND", ClamdReply("found", signature="Win.Test.EICAR_HDB-1")),
    ("stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0",
     ClamdReply("found", signature="Eicar-Test-Signature.UNOFFICIAL")),
    ("1: stream: OK", ClamdReply("ok")),  # IDSESSION replies carry a request id
    ("INSTREAM size limit exceeded. ERROR",
     ClamdReply("error", message="INSTREAM size limit exceeded.")),
    ("stream: Can't allocate memory ERROR", ClamdReply("error", message="Can't allocate memory")),
    ("UNKNOWN COMMAND", ClamdReply("unknown", message="UNKNOWN COMMAND")),
    ("", ClamdReply("unknown", message="")),
])
def test_parse_reply(line: str, reply: ClamdReply) -> None:
    assert parse_reply(line) == reply


def test_parse_reply_keeps_signature_printable() -> None:
    # The name goes into an SMTP reply: no CR/LF smuggling, bounded length.
    reply = parse_reply("stream: Evil\x07Name" + "X" * 300 + " FOUND")
    assert reply.kind == "found" and reply.signature is not None
    assert reply.signature.isprintable() and len(reply.signature) == 200


@pytest.mark.parametrize(("outcome", "verdict"), [
    (ClamdOutcome("done", "stream: OK"), PartVerdict("clean")),
    (ClamdOutcome("done", "stream: Eicar FOUND"), PartVerdict("infected", signature="Eicar")),
    (ClamdOutcome("done", "stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND"),
     PartVerdict("error", problem="too_large", detail="Heuristics.Limits.Exceeded.MaxFileSize")),
    (ClamdOutcome("done", "INSTREAM size limit exceeded. ERROR"),
     PartVerdict("error", problem="too_large", detail="INSTREAM size limit exceeded.")),
    (ClamdOutcome("done", "stream: Can't allocate memory ERROR"),
     PartVerdict("error", problem="clamd_error", detail="Can't allocate memory")),
    (ClamdOutcome("done", "PONG"), PartVerdict("error", problem="bad_reply", detail="PONG")),
    (ClamdOutcome("connect_failed", detail="refused"),
     PartVerdict("unscanned", problem="connect_failed", detail="refused")),
    (ClamdOutcome("timeout"), PartVerdict("unscanned", problem="timeout")),
    (ClamdOutcome("io_error"), PartVerdict("unscanned", problem="io_error")),
])
def test_classify(outcome: ClamdOutcome, verdict: PartVerdict) -> None:
    assert classify(outcome) == verdict


INFECTED = PartVerdict("infected", signature="Eicar")
TOO_LARGE = PartVerdict("error", problem="too_large")
CLAMD_ERROR = PartVerdict("error", problem="clamd_error")
DOWN = PartVerdict("unscanned", problem="connect_failed")
CLEAN = PartVerdict("clean")


@pytest.mark.parametrize(("verdicts", "worst"), [
    ([], PartVerdict("skipped")),
    ([CLEAN, CLEAN], CLEAN),
    ([CLEAN, DOWN], DOWN),
    ([DOWN, INFECTED, TOO_LARGE], INFECTED),  # a virus found anywhere decides
    ([CLAMD_ERROR, TOO_LARGE, DOWN], TOO_LARGE),  # a permanent limit beats transient errors
    ([DOWN, CLAMD_ERROR], CLAMD_ERROR),
])
def test_combine(verdicts: list[PartVerdict], worst: PartVerdict) -> None:
    assert combine(verdicts) == worst


@pytest.mark.parametrize(("result", "required", "optional"), [
    (ScanResult("skipped"), ScanDecision("accept", "not_scanned"),
     ScanDecision("accept", "not_scanned")),
    (ScanResult("clean"), ScanDecision("accept", "clean"), ScanDecision("accept", "clean")),
    (ScanResult("infected", signature="Eicar"), ScanDecision("reject", "virus", "Eicar"),
     ScanDecision("reject", "virus", "Eicar")),
    # Too large to scan: rejected whether or not scanning is required, never passed.
    (ScanResult("error", problem="too_large"), ScanDecision("reject", "too_large"),
     ScanDecision("reject", "too_large")),
    (ScanResult("error", problem="clamd_error"), ScanDecision("tempfail", "scanner_error"),
     ScanDecision("accept_unscanned", "scanner_error")),
    (ScanResult("unscanned", problem="connect_failed"),
     ScanDecision("tempfail", "scanner_unavailable"),
     ScanDecision("accept_unscanned", "scanner_unavailable")),
    (ScanResult("unscanned", problem="timeout"), ScanDecision("tempfail", "scanner_unavailable"),
     ScanDecision("accept_unscanned", "scanner_unavailable")),
])
def test_decide(result: ScanResult, required: ScanDecision, optional: ScanDecision) -> None:
    assert decide(result, REQUIRED) == required
    assert decide(result, OPTIONAL) == optional


def test_limit_problems() -> None:
    assert limit_problems(Settings()) == []  # the defaults agree: 25 MiB each
    small = Settings(scan=ScanSettings(max_stream_size=1_000_000),
                     smtp=SmtpSettings(max_message_size=2_000_000))
    [problem] = limit_problems(small)
    assert "scan.max_stream_size" in problem
