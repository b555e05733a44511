"""Every way we adapt dkimpy and pyspf, in one place, and nothing applied on import.

Place: the standards layer, below auth/dkim.py, auth/arc.py, auth/spf.py and
outbound/signing.py, which use these adapters and patch nothing themselves.

Two kinds of adaptation:

- Per call, no global state: `SpfQuery` answers pyspf's lookups with the
  resolver view it is built with (pyspf reads `spf.DNSLookup` from its module
  namespace; overriding `query.dns` keeps that hook untouched), `make_dnsfunc`
  gives dkimpy the same resolver, and `Verifier` / `ArcVerifier` hash each body
  variant once (per message, across both, with a shared `BodyHashes`) and stop at the next signature once their caller has gone.
- Process-wide, once at start-up: `install()` routes dkimpy's RSA PKCS#1 v1.5
  sign and verify through OpenSSL. dkimpy calls them by their names in its module
  namespace from inside `DKIM.sign`/`verify_sig_process`, so there is no per-call
  hook short of copying those methods. Same inputs, same answers (tests compare
  them), only faster, so code that runs before `install()` is slower, never wrong.
  The runtime calls it when it opens; test fixtures call it too.

The internals relied on here (`query.dns` and its cache/void-lookup bookkeeping,
`DomainSigner.verify_sig_process`, `body`, the module-level RSA names) are why
pyproject.toml bounds dkimpy and pyspf from above.
"""

from __future__ import annotations

import base64
import functools
import re
import time
from typing import Any, Callable

import dkim
import dkim.crypto
import spf
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

from ..dns import DnsTempError, SyncResolver

PREHASHED = {"sha256": utils.Prehashed(hashes.SHA256()), "sha1": utils.Prehashed(hashes.SHA1())}
DKIMPY_RSA_VERIFY = dkim.crypto.RSASSA_PKCS1_v1_5_verify
DKIMPY_RSA_SIGN = dkim.crypto.RSASSA_PKCS1_v1_5_sign


# -- RSA through OpenSSL (process-wide, installed at start-up) -------------------------------

def rsa_pkcs1_v1_5_verify(hash: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkimpy's RSASSA-PKCS1-v1_5 verification, done by OpenSSL (through `cryptography`).

    dkimpy verifies RSA in pure Python, converting 2048-bit integers to bytes one
    byte at a time; on our hot path that was half of all DKIM time.
    """
    prehashed = PREHASHED.get(hash.name)
    if prehashed is None:
        return bool(DKIMPY_RSA_VERIFY(hash, signature, public_key))
    key = _rsa_public_key(public_key["publicExponent"], public_key["modulus"])
    try:
        key.verify(signature, hash.digest(), padding.PKCS1v15(), prehashed)
    except (InvalidSignature, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=1024)
def _rsa_public_key(exponent: int, modulus: int) -> Any:
    """OpenSSL's key object, built once per published key rather than per message."""
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def rsa_pkcs1_v1_5_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's RSASSA-PKCS1-v1_5 signing, done by OpenSSL.

    dkimpy signs RSA in pure Python: ~39 ms per message on our 2-core machine, which
    capped a worker at ~25 messages/s. PKCS#1 v1.5 is deterministic, so OpenSSL
    gives the very same bytes.
    """
    prehashed = PREHASHED.get(hash.name)
    if prehashed is None:
        return bytes(DKIMPY_RSA_SIGN(hash, private_key))
    key = _rsa_private_key(*(private_key[name] for name in (
        "modulus", "publicExponent", "privateExponent", "prime1", "prime2", "exponent1",
        "exponent2", "coefficient")))
    return key.sign(hash.digest(), padding.PKCS1v15(), prehashed)


@functools.lru_cache(maxsize=256)
def _rsa_private_key(n: int, e: int, d: int, p: int, q: int, dmp1: int, dmq1: int,
                     iqmp: int) -> rsa.RSAPrivateKey:
    """The key as OpenSSL holds it; loading checks the key, so it is done once per key."""
    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp,
                                 rsa.RSAPublicNumbers(e, n)).private_key()


def install() -> None:
    """Route dkimpy's RSA through OpenSSL, for the whole process; idempotent."""
    dkim.RSASSA_PKCS1_v1_5_verify = rsa_pkcs1_v1_5_verify
    dkim.RSASSA_PKCS1_v1_5_sign = rsa_pkcs1_v1_5_sign


def installed() -> bool:
    return (dkim.RSASSA_PKCS1_v1_5_verify is rsa_pkcs1_v1_5_verify
            and dkim.RSASSA_PKCS1_v1_5_sign is rsa_pkcs1_v1_5_sign)


# -- dkimpy, per call ----------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def parse_key_record(name: str, record: bytes | None) -> tuple[Any, int, bytes, bool]:
    """dkimpy's parse of a key record (base64 and ASN.1), once per record text."""
    return dkim.evaluate_pk(name, record)


def make_dnsfunc(view: SyncResolver) -> Callable[..., bytes | None]:
    """dkimpy's key lookup, answered by our resolver.

    A DNS temporary error is raised as `DnsTempError`, which is *not* a
    DKIMException, so dkimpy cannot swallow it into "signature invalid".
    """

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = view.txt(text)
        # RFC 6376 3.6.2.2: several key records are ambiguous; use the first, like dkimpy.
        return records[0] if records else None

    return dnsfunc


class BodyHashes:
    """One message's canonicalized bodies and body digests, shared by its DKIM and ARC
    verifiers (an ARC-Message-Signature usually covers the body as the DKIM signature
    does). Filled from two verify threads at most; a key computed twice gets the same
    value, so a plain dict is enough."""

    def __init__(self) -> None:
        self.cache: dict[Any, bytes] = {}


def _no_checkpoint() -> None:
    return None


class _OneBodyHash:
    """dkimpy re-canonicalizes and re-hashes the body for every signature (~40 ms per MB
    each). Here each canonicalized body is made once and each (canonicalization, l=,
    algorithm) hashed once per message, across DKIM and ARC when they share `body_hashes`;
    `checkpoint` runs before each signature so work whose caller has gone stops there
    (ARC verifies its sets inside one dkimpy call)."""

    body: bytes
    tlsrpt: Any

    def __init__(self, message: bytes, *, minkey: int,
                 checkpoint: Callable[[], None] = _no_checkpoint,
                 body_hashes: BodyHashes | None = None) -> None:
        # dkimpy's DKIM or ARC, next in the subclass's MRO
        super().__init__(message, minkey=minkey)  # type: ignore[call-arg]
        self.checkpoint = checkpoint
        self.body_hashes = body_hashes if body_hashes is not None else BodyHashes()

    def _body_digest(self, canon: Any, length: int | None, algorithm: bytes) -> bytes:
        cache = self.body_hashes.cache
        body_canon = canon.body_algorithm  # the class Simple or Relaxed
        key = (body_canon, length, algorithm)
        digest = cache.get(key)
        if digest is None:
            body = cache.get(body_canon)
            if body is None:
                body = cache[body_canon] = canon.canonicalize_body(self.body)
            hasher = dkim.HASH_ALGORITHMS[algorithm]()
            hasher.update(body if length is None else memoryview(body)[:length])
            digest = cache[key] = hasher.digest()
        return digest

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: Any) -> Any:
        self.checkpoint()
        if b"bh" in sig and b"a" in sig and sig[b"a"] in dkim.HASH_ALGORITHMS:
            try:
                canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
            except InvalidCanonicalizationPolicyError as error:
                raise dkim.MessageFormatError(f"invalid c= value: {error.args[0]}") from None
            length = None
            if b"l" in sig and not self.tlsrpt:
                try:
                    length = max(0, int(sig[b"l"]))
                except ValueError:
                    raise dkim.MessageFormatError("invalid l= value") from None
            digest = self._body_digest(canon, length, sig[b"a"])
            try:
                expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            except ValueError as error:
                raise dkim.MessageFormatError(str(error)) from None
            if digest != expected:
                raise dkim.ValidationError(
                    f"body hash mismatch (got {base64.b64encode(digest)!r}, "
                    f"expected {sig[b'bh']!r})")
            # Checked: dkimpy goes on with the header hash and the signature only.
            sig = {k: v for k, v in sig.items() if k != b"bh"}
        return super().verify_sig_process(  # type: ignore[misc]
            sig, include_headers, sig_header, dnsfunc)


class Verifier(_OneBodyHash, dkim.DKIM):
    """dkimpy's DKIM verifier, one body hash per variant, stoppable between signatures."""


class ArcVerifier(_OneBodyHash, dkim.ARC):
    """dkimpy's ARC verifier, with the same body hashing and checkpoints."""


# -- pyspf, per query ----------------------------------------------------------------------

class SpfQuery(spf.query):
    """pyspf's query with every lookup answered by `view` (our resolver: shared cache,
    configured nameservers, one timeout, DnsTempError -> TempError).

    pyspf's own `dns()` calls the module-level `spf.DNSLookup`; replacing that would
    change every query in the process. This override keeps pyspf's per-query cache,
    its void-lookup limit (RFC 7208 4.6.4) and its overall query time; CNAMEs are
    followed by our resolver.
    """

    def __init__(self, view: SyncResolver, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.view = view

    def dns(self, name: str, qtype: str, cnames: Any = None,
            ignore_void: bool = False) -> list[Any]:
        if not name:
            raise spf.PermError("empty DNS name")
        name = str(name).rstrip(".").lower()
        if not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # cannot exist in the DNS (empty or over-long label), as pyspf
        key = (name, qtype)
        result = self.cache.get(key)
        if result is None:
            if self.querytime < 0:
                raise spf.TempError("DNS Error: exceeded max query lookup time")
            began = time.time()
            try:
                answer = self.view.query(name, qtype)
            except DnsTempError as error:
                raise spf.TempError(f"DNS {error}") from error
            result = self.cache[key] = [_pyspf_value(qtype, r) for r in answer.records]
            if self.querytime > 0:
                self.querytime -= time.time() - began
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def _pyspf_value(qtype: str, rdata: Any) -> Any:
    """One record in the shape pyspf's own DNS layer gives it."""
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))
    if qtype == "PTR":
        return rdata.target.to_text(omit_final_dot=True)
    if qtype in ("TXT", "SPF"):
        return tuple(rdata.strings)
    raise spf.PermError(f"unexpected query type {qtype}")  # pragma: no cover
