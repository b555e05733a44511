"""DKIM (RFC 6376) for the authenticate stage: verify every DKIM-Signature of a received message.

Each signature gets its own verdict (d=, s=, a=, result, why), because DMARC
needs to know *which* domain signed, and an operator needs to know why a
signature failed. dkimpy does the cryptography (RSA and Ed25519, RFC 8463); we
drive its steps one by one so a missing key (permerror), a DNS outage
(temperror) and a forged signature (fail) stay distinct: dkimpy's own
`verify()` collapses all three to `False`.

Keys are fetched through dkimpy's `dnsfunc` hook with our resolver; where
the check runs (on the loop from cached keys, else in the bounded "verify"
pool) is auth/runner.py's decision. A hostile message may carry thousands of
signatures: at most `max_signatures` are verified, those whose d= aligns with
the From domain first (they are the ones DMARC needs), the header section is
parsed once and each body variant hashed once, for DKIM and ARC together
(auth/adapters.py `DkimMessage`), and the work stops between signatures once
nobody waits for it.
"""

from __future__ import annotations

import binascii
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

import dkim
import structlog
from dkim.util import InvalidTagValueList, parse_tag_value

from ..dns import DnsTempError, SyncResolver
from .adapters import DkimMessage, Verifier, blank_line, make_dnsfunc, parse_key_record
from .runner import INLINE_MAX, SyncCheck

log = structlog.get_logger(__name__)

DkimStatus = Literal["pass", "fail", "neutral", "temperror", "permerror"]
# RFC 8301 section 3.2: keys under 1024 bits must not be considered valid.
MIN_RSA_BITS = 1024
# RFC 6376 6.1 lets a verifier limit the signatures it tries; auth.dkim_max_signatures.
DEFAULT_MAX_SIGNATURES = 5
TIMED_OUT_EXAMINED = 100


@dataclass(frozen=True)
class DkimSignatureResult:
    """The verdict on one DKIM-Signature header field."""

    result: DkimStatus
    domain: str
    selector: str
    algorithm: str
    reason: str = ""
    identity: str = ""
    header_b: str = ""  # first 8 characters of b= (RFC 6008), tells signatures apart in A-R

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))  # flat: no deep copy (asdict) on the hot path


@dataclass(frozen=True)
class DkimResult:
    signatures: tuple[DkimSignatureResult, ...] = ()
    skipped: int = 0  # signatures present but not verified (over max_signatures)

    @property
    def summary(self) -> str:
        """One word for the column: pass if any signature passes, else the most telling failure."""
        results = [s.result for s in self.signatures]
        if not results:
            return "none"
        for status in ("pass", "temperror", "fail", "permerror", "neutral"):
            if status in results:
                return status
        return "none"  # pragma: no cover

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "signatures": [s.to_dict() for s in self.signatures],
                "skipped": self.skipped}


def _text(value: bytes | None) -> str:
    return value.decode("ascii", "replace") if value else ""


def verify_signature(verifier: Verifier, index: int,
                     dnsfunc: Callable[..., bytes | None]) -> DkimSignatureResult:
    """Verify the `index`-th DKIM-Signature (0 = topmost). Blocking: run it in a thread."""
    try:
        fields = verifier.message.signature_tags(index)
    except (InvalidTagValueList, dkim.DKIMException) as error:
        return DkimSignatureResult("permerror", "", "", "", f"malformed signature: {error}")
    domain, selector = _text(fields.get(b"d")), _text(fields.get(b"s"))
    algorithm = _text(fields.get(b"a"))
    b_value = "".join(_text(fields.get(b"b")).split())
    done = dict(domain=domain, selector=selector, algorithm=algorithm,
                identity=_text(fields.get(b"i")), header_b=b_value[:8])

    if algorithm == "rsa-sha1":
        # RFC 8301 section 3.1: verifiers must not consider rsa-sha1 signatures valid.
        return DkimSignatureResult("permerror", reason="rsa-sha1 is not accepted (RFC 8301)",
                                   **done)
    try:
        sig, include_headers, sig_header = verifier.prepare(index, fields)
    except dkim.DKIMException as error:
        return DkimSignatureResult("permerror", reason=f"bad signature: {error}", **done)

    key_name = f"{selector}._domainkey.{domain}."
    try:
        key_record = dnsfunc(key_name.encode("ascii", "replace"), timeout=5)
    except DnsTempError as error:
        return DkimSignatureResult("temperror", reason=f"key lookup: {error}", **done)
    try:
        pk, keysize, ktag, seqtlsrpt = parse_key_record(key_name, key_record)
    except dkim.KeyFormatError as error:
        reason = "no key" if not key_record else f"bad key: {error}"
        return DkimSignatureResult("permerror", reason=reason, **done)
    except (binascii.Error, ValueError) as error:
        return DkimSignatureResult("permerror", reason=f"bad key: {error}", **done)
    verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = (
        pk, keysize, ktag, seqtlsrpt)
    testing = _testing_key(key_record)

    try:
        valid = verifier.verify_sig_process(sig, include_headers, sig_header, dnsfunc)
    except dkim.ValidationError as error:
        message_text = str(error)
        if "body hash mismatch" in message_text:
            result: DkimStatus = "neutral" if testing else "fail"
            return DkimSignatureResult(result, reason="body hash mismatch", **done)
        return DkimSignatureResult("permerror", reason=message_text, **done)
    except dkim.KeyFormatError as error:
        return DkimSignatureResult("permerror", reason=str(error), **done)
    except dkim.DKIMException as error:
        return DkimSignatureResult("permerror", reason=str(error), **done)
    if valid:
        return DkimSignatureResult("pass", **done)
    # RFC 6376 3.6.1 t=y: the signer is testing; its failures must not count against it.
    return DkimSignatureResult("neutral" if testing else "fail",
                               reason="signature did not verify", **done)


@functools.lru_cache(maxsize=1024)
def _testing_key(record: bytes | None) -> bool:
    try:
        flags = parse_tag_value(record or b"").get(b"t", b"")
    except InvalidTagValueList:
        return False
    return b"y" in [f.strip() for f in flags.split(b":")]


HAS_SIGNATURE = re.compile(rb"(?im)^dkim-signature\s*:")
SIGNATURE_FIELD = re.compile(rb"(?im)^dkim-signature[ \t]*:((?:.*)(?:\r?\n[ \t].*)*)")


def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return parse_tag_value(value)
    except (InvalidTagValueList, dkim.DKIMException):
        return {}


def choose(tags: list[dict[bytes, bytes]], first: Callable[[str], bool],
           limit: int) -> list[int]:
    """Indexes of the signatures to verify, in header order: at most `limit`, those whose
    d= satisfies `first` (aligns with the From domain) chosen before the others."""
    domains = [_text(t.get(b"d")) for t in tags]
    preferred = [i for i, d in enumerate(domains) if d and first(d)]
    if len(preferred) < limit:
        taken = set(preferred)
        preferred += [i for i in range(len(tags)) if i not in taken]
    return sorted(preferred[:max(0, limit)])


def _parsed_tags(message: DkimMessage, index: int) -> dict[bytes, bytes]:
    try:
        return message.signature_tags(index)
    except (InvalidTagValueList, dkim.DKIMException):
        return {}


def _never(domain: str) -> bool:
    return False


def verify_all(message: DkimMessage, dnsfunc: Any, *,
               first: Callable[[str], bool] = _never, limit: int = DEFAULT_MAX_SIGNATURES,
               checkpoint: Callable[[], None] = lambda: None) -> DkimResult:
    """The chosen signatures, one after the other, on one parse of the message."""
    try:
        verifier = Verifier(message, minkey=MIN_RSA_BITS, checkpoint=checkpoint)
    except dkim.DKIMException as error:  # unparseable header section
        return DkimResult((DkimSignatureResult("permerror", "", "", "",
                                               f"message format: {error}"),))
    count = len(message.signatures)
    chosen = choose([_parsed_tags(message, i) for i in range(count)], first, limit)
    results = []
    for index in chosen:
        checkpoint()
        results.append(verify_signature(verifier, index, dnsfunc))
    return DkimResult(tuple(results), skipped=count - len(chosen))


def _verify(view: SyncResolver, message: bytes, first: Callable[[str], bool],
            limit: int, shared: DkimMessage | None = None) -> DkimResult:
    if not HAS_SIGNATURE.search(header_section(message)):
        return DkimResult(())
    result = verify_all(shared_message(message, shared), make_dnsfunc(view), first=first,
                        limit=limit, checkpoint=view.checkpoint)
    for r in result.signatures:
        log.debug("dkim.checked", result=r.result, d=r.domain, s=r.selector, a=r.algorithm,
                  reason=r.reason)
    if result.skipped:
        log.info("dkim.capped", verified=len(result.signatures), skipped=result.skipped)
    return result


def dkim_check(message: bytes, *, first: Callable[[str], bool] = _never,
               limit: int = DEFAULT_MAX_SIGNATURES,
               shared: DkimMessage | None = None) -> SyncCheck[DkimResult]:
    """DKIM as a check for auth/runner.py: `first` says which d= to verify first;
    `shared`, the message prepared for dkimpy, is shared with the message's ARC check."""
    inline = len(message) <= INLINE_MAX or not HAS_SIGNATURE.search(header_section(message))
    return SyncCheck(functools.partial(_verify, message=message, first=first, limit=limit,
                                       shared=shared),
                     pool="verify", inline=inline)


def timed_out(message: bytes, *, first: Callable[[str], bool] = _never,
              limit: int = DEFAULT_MAX_SIGNATURES) -> DkimResult:
    """Verification missed its deadline: temperror for each signature it would have
    verified, with its d= (DMARC must see an aligned temperror, not a missing signature)."""
    # On the event loop: look at a bounded number of fields (a hostile message has thousands).
    fields = SIGNATURE_FIELD.finditer(header_section(message))
    values = [m.group(1) for _, m in zip(range(TIMED_OUT_EXAMINED), fields)]
    tags_of = [_tags(v) for v in values]
    signatures = []
    for index in choose(tags_of, first, limit):
        tags = tags_of[index]
        signatures.append(DkimSignatureResult(
            "temperror", _text(tags.get(b"d")), _text(tags.get(b"s")), _text(tags.get(b"a")),
            "DKIM verification timed out"))
    if not signatures:
        signatures.append(DkimSignatureResult("temperror", "", "", "",
                                              "DKIM verification timed out"))
    return DkimResult(tuple(signatures))


def header_section(message: bytes) -> bytes:
    """The header fields of `message`, up to the first "\\r?\\n\\r?\\n" and including its
    first octet, without the blank line and body (a bounded scan)."""
    end = blank_line(message)
    if end < 0:
        return message
    return message[:end] if end and message[end - 1] == 0x0D else message[:end + 1]


def shared_message(message: bytes, shared: DkimMessage | None) -> DkimMessage:
    """`shared` (prepared by the stage for DKIM and ARC both), or the message's own."""
    if shared is None:
        return DkimMessage(message)
    if shared.raw is not message:
        raise ValueError("the shared DkimMessage holds another message")
    return shared
