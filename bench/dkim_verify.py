"""Inbound DKIM and ARC verification alone: CPU per message, old code against new, one process.

    .venv/bin/python -m bench.dkim_verify [--baseline REV] [--messages 200] [--rounds 5]
                                          [--json FILE]

Messages: bench/run.py's own (5 KB DKIM-signed; 50 KB with a base64 attachment;
both signed c=relaxed/simple), the 5 KB one signed c=relaxed/relaxed instead (as
most large senders sign), and the 5 KB one forwarded by a list that added an ARC set
and its own DKIM signature (two DKIM signatures and a chain: what ARC and the
shared per-message state are for). Each message is verified as the authenticate stage does it:
`dkim_check` and `arc_check` of the same message, sharing the per-message state
the stage shares, run through `Resolver.from_cache` (what auth/runner.py does on
the event loop when the keys are cached), the keys published by the loopback DNS
test server and cached by a warm-up pass.

Implementations, measured in alternating rounds (each round every implementation
verifies every message of every case once), CPU seconds by time.process_time:
- current: this checkout's smtpd_agent;
- baseline: --baseline REV's smtpd_agent (git archive, imported in this same process
  under another name; it shares the process-wide RSA-through-OpenSSL install);
- dkimpy: plain dkimpy, one `DKIM(raw)` and `.verify(i)` per signature, and
  `ARC(raw).verify()`, with the same cached key lookup: the reference when the old
  path is gone.
Before timing, the verdicts of current and baseline must be equal and agree with
dkimpy's (pass per signature, the chain's cv), or the run stops.

Prints, per case, the median of the rounds' microseconds of CPU per message of each
implementation and the median of the per-round ratios to current; --json writes them.
A shared machine drifts; the ratios within a round are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import io
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dkim  # noqa: E402

from bench.run import SENDER_DOMAIN, make_payloads  # noqa: E402
from smtpd_agent.auth import adapters  # noqa: E402
from smtpd_agent.config import DnsSettings, LogSettings  # noqa: E402
from smtpd_agent.dns import Resolver  # noqa: E402
from smtpd_agent.logs import configure_logging  # noqa: E402
from tests.auth.keys import SIGNED_HEADERS, rsa_key, sign  # noqa: E402
from tests.dnsserver import DnsTestServer  # noqa: E402

LIST_DOMAIN = "lists.bench.test"


def load_revision(rev: str, into: Path) -> ModuleType:
    """REV's smtpd_agent package, importable beside ours as `baseline_smtpd_agent`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "smtpd_agent"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    name = "baseline_smtpd_agent"
    spec = importlib.util.spec_from_file_location(
        name, into / "smtpd_agent" / "__init__.py",
        submodule_search_locations=[str(into / "smtpd_agent")])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def forwarded(raw: bytes, key: Any) -> bytes:
    """`raw` as a mailing list passes it on: its verdict, an ARC set, its DKIM signature."""
    raw = (f"Authentication-Results: {LIST_DOMAIN}; dkim=pass header.d={SENDER_DOMAIN}\r\n"
           ).encode() + raw
    arc_set = dkim.arc_sign(raw, b"arc", LIST_DOMAIN.encode(), key.private,
                            LIST_DOMAIN.encode(),
                            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sign(b"".join(arc_set) + raw, key, LIST_DOMAIN, "list")


def unstuffed(payload: bytes) -> bytes:
    return payload.replace(b"\r\n..", b"\r\n.")


def relaxed_relaxed(signed: bytes, key: Any) -> bytes:
    """`signed` with its signature made again with c=relaxed/relaxed."""
    raw = re.sub(rb"^DKIM-Signature:.*\r\n(?:[ \t].*\r\n)*", b"", signed)
    return dkim.sign(raw, b"sel", SENDER_DOMAIN.encode(), key.private,
                     canonicalize=(b"relaxed", b"relaxed"), include_headers=SIGNED_HEADERS) + raw


@dataclass
class Implementation:
    name: str
    verify: Callable[[bytes], Any]  # one message -> comparable verdicts


def pipeline_implementation(name: str, package: str, resolver: Resolver) -> Implementation:
    """The authenticate stage's calls, in the package `package` (ours or the baseline)."""
    auth_dkim = importlib.import_module(f"{package}.auth.dkim")
    auth_arc = importlib.import_module(f"{package}.auth.arc")
    auth_adapters = importlib.import_module(f"{package}.auth.adapters")
    shared_state = getattr(auth_adapters, "DkimMessage", None)

    def first(domain: str) -> bool:
        return domain == SENDER_DOMAIN

    def verify(raw: bytes) -> Any:
        if shared_state is not None:  # as the stage makes it: its input is CRLF only
            shared = shared_state(raw, crlf=True)
            checks = (auth_dkim.dkim_check(raw, first=first, shared=shared),
                      auth_arc.arc_check(raw, shared=shared))
        else:  # before the shared message state: only the body hashes were shared
            body_hashes = auth_adapters.BodyHashes()
            checks = (auth_dkim.dkim_check(raw, first=first, body_hashes=body_hashes),
                      auth_arc.arc_check(raw, body_hashes))
        found = [resolver.from_cache(check.run) for check in checks]
        assert None not in found, "a key was not cached"
        return [result.to_dict() for result in found]

    return Implementation(name, verify)


def dkimpy_implementation(resolver: Resolver) -> Implementation:
    """Plain dkimpy at its cheapest: one DKIM object per message, `verify(i)` for each
    signature (its `dkim.verify` makes an object per call), and an ARC object."""
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        answer = resolver.cached(name.decode().rstrip("."), "TXT")
        assert answer is not None, "a key was not cached"
        records = [b"".join(r.strings) for r in answer.records]
        return records[0] if records else None

    def verify(raw: bytes) -> Any:
        verifier = dkim.DKIM(raw)
        count = len([1 for name, _ in verifier.headers if name.lower() == b"dkim-signature"])
        signatures = [verifier.verify(index, dnsfunc=dnsfunc) for index in range(count)]
        cv, _, _ = dkim.ARC(raw).verify(dnsfunc=dnsfunc)
        return signatures, cv

    return Implementation("dkimpy", verify)


def agree_with_dkimpy(ours: Any, reference: Any) -> bool:
    """Our per-signature pass/not-pass and chain verdict equal plain dkimpy's."""
    dkim_result, arc_result = ours
    passes = [s["result"] == "pass" for s in dkim_result["signatures"]]
    signatures, cv = reference
    chain = {b"pass": "pass", b"fail": "fail", b"none": "none"}.get(cv, "fail")
    return passes == [bool(p) for p in signatures] and arc_result["result"] == chain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure git revision REV's smtpd_agent")
    parser.add_argument("--messages", type=int, default=200, help="per case")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    configure_logging(LogSettings(level="info", format="json"))  # as served: no debug events
    adapters.install()
    work = Path(tempfile.mkdtemp(prefix="smtpd-agent-dkim-bench-"))
    with DnsTestServer() as dns:
        key = rsa_key(2048)
        dns.txt(f"sel._domainkey.{SENDER_DOMAIN}", key.record)
        dns.txt(f"list._domainkey.{LIST_DOMAIN}", key.record)
        dns.txt(f"arc._domainkey.{LIST_DOMAIN}", key.record)
        resolver = Resolver(DnsSettings(nameservers=[dns.nameserver], timeout=5,
                                        cache_size=1000))
        small = [unstuffed(p) for p in make_payloads(args.messages, 5000, False, key)]
        cases = {
            "5k": small,
            "5k-relaxed-body": [relaxed_relaxed(raw, key) for raw in small],
            "50k-attachment": [unstuffed(p) for p in
                               make_payloads(args.messages, 50000, True, key)],
            "5k-forwarded-arc": [forwarded(raw, key) for raw in small],
        }
        async def warm() -> None:
            for name in (f"sel._domainkey.{SENDER_DOMAIN}.", f"list._domainkey.{LIST_DOMAIN}.",
                         f"arc._domainkey.{LIST_DOMAIN}."):
                await resolver.txt(name)
        asyncio.run(warm())

        implementations = [pipeline_implementation("current", "smtpd_agent", resolver)]
        if args.baseline:
            load_revision(args.baseline, work)
            implementations.append(
                pipeline_implementation("baseline", "baseline_smtpd_agent", resolver))
        implementations.append(dkimpy_implementation(resolver))

        for case, messages in cases.items():
            for raw in messages[:20]:
                verdicts = {i.name: i.verify(raw) for i in implementations}
                if "baseline" in verdicts and verdicts["baseline"] != verdicts["current"]:
                    raise SystemExit(f"{case}: baseline and current differ: {verdicts}")
                if not agree_with_dkimpy(verdicts["current"], verdicts["dkimpy"]):
                    raise SystemExit(f"{case}: current and dkimpy differ: {verdicts}")
            assert verdicts["current"][0]["summary"] == "pass", verdicts

        per_round: dict[str, dict[str, list[float]]] = {
            case: {i.name: [] for i in implementations} for case in cases}
        for round_index in range(-1, args.rounds):  # round -1 warms up, not counted
            order = implementations if round_index % 2 == 0 else implementations[::-1]
            for case, messages in cases.items():
                for implementation in order:
                    began = time.process_time()
                    for raw in messages:
                        implementation.verify(raw)
                    spent = time.process_time() - began
                    if round_index >= 0:
                        per_round[case][implementation.name].append(spent / len(messages) * 1e6)

    revision = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                              capture_output=True, text=True).stdout.strip()
    report: dict[str, Any] = {"messages_per_case": args.messages, "rounds": args.rounds,
                              "current": revision, "baseline": args.baseline, "cases": {}}
    for case, figures in per_round.items():
        current = figures["current"]
        entry: dict[str, Any] = {"bytes": round(statistics.mean(len(m) for m in cases[case]))}
        for name, values in figures.items():
            entry[f"{name}_us"] = round(statistics.median(values), 1)
            if name != "current":
                entry[f"{name}_over_current"] = round(statistics.median(
                    [v / c for v, c in zip(values, current)]), 2)
        report["cases"][case] = entry
    print(f"CPU per message (median of {args.rounds} rounds, {args.messages} messages each):")
    for case, entry in report["cases"].items():
        figures_text = ", ".join(f"{name} {entry[f'{name}_us']:.0f} us"
                                 for name in per_round[case])
        ratios = ", ".join(f"{name}/current {entry[f'{name}_over_current']:.2f}"
                           for name in per_round[case] if name != "current")
        print(f"  {case} ({entry['bytes']} bytes): {figures_text}; {ratios}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
