"""DKIM signing of outbound mail (RFC 6376 with RFC 8463 Ed25519), once, at queue time.

Place: the worker calls `sign_message` before a delivery's first attempt and
stores the result; retries send the stored bytes. Both an RSA-2048 and an
Ed25519 signature go on every message (Ed25519 is short and fast, RSA is what
every verifier knows). RSA signing goes through OpenSSL once auth/adapters.py's
`install()` has run (the runtime does it at start-up). Without both keys, or if
dkimpy fails, `SigningError`: the caller must not send unsigned.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from email.parser import BytesHeaderParser

import dkim

from ..domains.keys import SigningKey

# RFC 6376 5.4.1's recommended set, plus the threading and MIME fields we write.
SIGNED_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "in-reply-to",
                  "references", "reply-to", "mime-version", "content-type",
                  "content-transfer-encoding", "content-disposition", "auto-submitted")


@functools.lru_cache(maxsize=256)
def _dkimpy_key(key: SigningKey) -> bytes:
    """dkimpy's form of a key, cached: loading PKCS#8 validates the RSA key (~19 ms) each time."""
    return key.dkimpy_private_key()


class SigningError(RuntimeError):
    """No usable keys, or dkimpy could not sign; the message stays unsent."""


def header_names(raw: bytes) -> set[str]:
    return {name.lower() for name in BytesHeaderParser().parsebytes(raw).keys()}


def sign_message(raw: bytes, keys: Sequence[SigningKey]) -> bytes:
    """`raw` with an RSA and an Ed25519 DKIM-Signature prepended (relaxed/relaxed)."""
    algorithms = {key.algorithm for key in keys}
    if algorithms != {"rsa-2048", "ed25519"}:
        raise SigningError(f"need an RSA-2048 and an Ed25519 key, have {sorted(algorithms)}")
    present = header_names(raw)
    if "from" not in present:
        raise SigningError("message has no From header")
    # From twice (RFC 6376 8.15): a second From added later breaks the signature.
    include = [name.encode() for name in SIGNED_HEADERS if name in present] + [b"from"]
    signatures = []
    for key in sorted(keys, key=lambda k: k.algorithm != "rsa-2048"):
        try:
            signature = dkim.sign(raw, key.selector.encode(), key.domain.encode(),
                                  _dkimpy_key(key), include_headers=include,
                                  canonicalize=(b"relaxed", b"relaxed"),
                                  signature_algorithm=key.dkimpy_algorithm)
        except (dkim.DKIMException, ValueError) as error:
            raise SigningError(f"dkimpy: {error}") from None
        if not signature:
            raise SigningError("dkimpy returned no signature")
        signatures.append(signature)
    # the Ed25519 signature on top, the RSA one below it (RFC 8463 is additive)
    return b"".join(reversed(signatures)) + raw
