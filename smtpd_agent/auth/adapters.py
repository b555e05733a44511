"""Every way we adapt dkimpy and pyspf, in one place, and nothing applied on import.

Place: the standards layer, below auth/dkim.py, auth/arc.py, auth/spf.py and
outbound/signing.py, which use these adapters and patch nothing themselves.

Two kinds of adaptation:

- Per call, no global state: `SpfQuery` answers pyspf's lookups with the
  resolver view it is built with (pyspf reads `spf.DNSLookup` from its module
  namespace; overriding `query.dns` keeps that hook untouched), `make_dnsfunc`
  gives dkimpy the same resolver, and `Verifier` / `ArcVerifier` work on one
  `DkimMessage` per message, shared by the DKIM and the ARC check: its header
  section parsed once (dkimpy's constructor would split the whole message into
  lines, again for each verifier), each header and body canonicalization and each
  body hash made once, each signature's tags parsed once; they stop at the next
  signature once their caller has gone.
- Process-wide, once at start-up: `install()` routes dkimpy's RSA PKCS#1 v1.5
  sign and verify through OpenSSL. dkimpy calls them by their names in its module
  namespace from inside `DKIM.sign` (and our verify steps call the verify by that
  name too), so there is no per-call hook short of copying dkimpy's signing. Same
  inputs, same answers (tests compare them), only faster, so code that runs before
  `install()` is slower, never wrong.
  The runtime calls it when it opens; test fixtures call it too.

dkimpy still does the verification: its tag parser and field checks
(`parse_tag_value`, `validate_signature_fields`), its canonicalizations (`Simple`;
`Relaxed` in fewer steps, `relaxed_field` and `relaxed_body`), its choice of
the signed fields (`select_headers`), its key record parser (`evaluate_pk`), its ARC
chain logic (`ARC.verify`, `verify_instance`) and its RSA / Ed25519 checks. What we
do around them (the header section parsed as its `rfc822_parse` does, `header_fields`;
its verify steps on the shared message) is written against dkimpy 1.1.8 and compared
with plain dkimpy by tests/auth/test_dkim_differential.py. The internals relied on, which are why
pyproject.toml bounds dkimpy (and pyspf) from above:
- pyspf: `query.dns` and its cache and void-lookup bookkeeping;
- dkimpy: the module-level RSA names (`install()`); `DomainSigner.__init__` taking no
  message, and the attributes its verify steps read (`headers`, `body`, `pk`,
  `keysize`, `ktag`, `seqtlsrpt`, `tlsrpt`, `minkey`, `timeout`); `verify_sig` and
  `verify_sig_process`, which `_SharedMessage` replaces with the same steps on the
  shared message; `DKIM.verify_headerprep`, whose steps `Verifier.prepare` does;
  `ARC.sorted_arc_headers`, replaced the same way, and `ARC.verify` calling it and
  `verify_sig`; `hash_headers` and its `RE_BTAG`, replaced by `hash_headers` and
  `B_TAG` here; `select_headers` reading only the names of the fields it is given;
  `Relaxed`, which `relaxed_field` and `relaxed_body` follow (the body's last two
  steps, `strip_trailing_lines` and `correct_empty_body`, they call); `rfc822_parse`,
  which `header_fields` and `DkimMessage.body` follow; `evaluate_pk`,
  `HASH_ALGORITHMS`, `ARC.ARC_HEADERS`, `ARC.INSTANCE_RE` and the exceptions, as
  they are in 1.1.8.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import time
from typing import Any, Callable

import dkim
import dkim.crypto
import nacl.exceptions
import spf
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim import canonicalization
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.canonicalization import Relaxed
from dkim.util import InvalidTagValueList, parse_tag_value

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


# A run of blanks other than one space: what compress_whitespace's [\t ]+ changes.
BLANKS_TO_SQUEEZE = re.compile(rb"\t[\t ]*| [\t ]+")


def relaxed_body(body: bytes) -> bytes:
    """dkimpy's `Relaxed.canonicalize_body` in fewer steps: its two regex passes stepped
    through every space of the body (0.2 ms for 5 KB of prose) though prose mostly has
    single spaces, changed by neither. Blanks before a line end go line by line, and only
    runs other than a single space are squeezed."""
    if b" \r\n" in body or b"\t\r\n" in body:
        lines = body.split(b"\r\n")
        last = lines.pop()  # not followed by a line end: its blanks stay
        body = b"\r\n".join([line.rstrip(b" \t") for line in lines] + [last])
    if b"\t" in body or b"  " in body:
        body = BLANKS_TO_SQUEEZE.sub(b" ", body)
    return canonicalization.correct_empty_body(canonicalization.strip_trailing_lines(body))


def relaxed_field(field: Any) -> tuple[bytes, bytes]:
    """dkimpy's relaxed canonicalization of one header field (`Relaxed.canonicalize_headers`:
    name in lower case; value unfolded, blanks squeezed, stripped, CRLF), without its regex
    passes where they could change nothing."""
    value = field[1]
    if b"\n" in value:
        # dkimpy removes \r?\n: each LF with the CR before it, if any
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    if b"\t" in value or b"  " in value:
        value = BLANKS_TO_SQUEEZE.sub(b" ", value)
    return field[0].lower().rstrip(), value.strip() + b"\r\n"


FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")  # dkimpy's, in rfc822_parse


def header_fields(head: bytes) -> list[list[bytes]]:
    """dkimpy's `rfc822_parse` of a header section: [name, value] per field, each line
    of the value ending in CRLF, "From " lines skipped, MessageFormatError on a line that
    is none of these. dkimpy splits with a regex and grows a folded value by copying it
    once per line (half a second for 256 KB of folded lines); here a split on LF and one
    join per field."""
    lines = head.split(b"\n")
    last = len(lines) - 1
    fields: list[list[bytes]] = []
    parts: list[bytes] = []
    for number, line in enumerate(lines):
        if number < last and line[-1:] == b"\r":  # dkimpy splits on \r?\n
            line = line[:-1]
        if not line:
            break
        if line[0] in (0x09, 0x20):
            if not fields:  # dkimpy: IndexError
                raise dkim.MessageFormatError("folded line before the first field")
            parts += (line, b"\r\n")
            continue
        match = FIELD_NAME.match(line)
        if match is not None:
            if fields:
                fields[-1][1] = b"".join(parts)
            fields.append([match.group(1), b""])
            parts = [line[match.end():], b"\r\n"]
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    if fields:
        fields[-1][1] = b"".join(parts)
    return fields


def blank_line(raw: bytes) -> int:
    """Where the first "\\n\\r?\\n" starts (a line end before an empty line), or -1; with
    two plain searches, not a regex stepping through every byte of the message."""
    crlf = raw.find(b"\n\r\n")
    lf = raw.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(raw))
    return lf if lf >= 0 else crlf


class DkimMessage:
    """One received message as dkimpy's verifiers need it, prepared once and shared by the
    message's DKIM check and its ARC check.

    dkimpy's constructor splits the *whole* message into lines with a regex for every
    verifier it builds (for 50 KB messages that alone was a tenth of the listener's CPU),
    and each signature then canonicalizes every header field, and the body, again. Here
    the header section only is parsed, once, as dkimpy's `rfc822_parse` does; the body is
    sliced off after the first empty line (turned into CRLF lines as dkimpy does, only
    when it has a bare LF); a field is canonicalized only when a signature covers it, once
    per canonicalization, and each canonicalized body and each (body canonicalization, l=,
    hash) digest is made once per message.

    The two checks may run on two threads: every value is computed from `raw` alone and
    stored whole, so one computed twice is the same value and no lock is needed. Nothing
    handed out is changed by the verifiers (dkimpy's verify steps only read the header list).
    """

    def __init__(self, raw: bytes, *, crlf: bool = False) -> None:
        """`crlf`: the caller knows every line of `raw` ends in CRLF (the content step,
        ingress.accept_content, settled bare LF), so the body is not searched for one."""
        self.raw = raw
        self.crlf = crlf
        self.cache: dict[Any, Any] = {}
        self._split: tuple[bytes, bytes] | None = None
        self._headers: list[list[bytes]] | None = None
        self._body: bytes | None = None
        self._signatures: list[list[bytes]] | None = None

    def split(self) -> tuple[bytes, bytes]:
        """(the header lines, each with its line end; what follows the first empty line).

        The first empty line is where `rfc822_parse` stops: the message starts with a line
        end, or a line end is followed by another (LF or CRLF)."""
        if self._split is None:
            raw = self.raw
            if raw.startswith(b"\n"):
                self._split = (b"", raw[1:])
            elif raw.startswith(b"\r\n"):
                self._split = (b"", raw[2:])
            else:
                end = blank_line(raw)
                if end < 0:
                    self._split = (raw, b"")
                else:
                    after = end + (3 if raw[end + 1] == 0x0D else 2)
                    self._split = (raw[:end + 1], raw[after:])
        return self._split

    @property
    def headers(self) -> list[list[bytes]]:
        """dkimpy's [name, value] list; MessageFormatError, as dkimpy's constructor raises."""
        if self._headers is None:
            self._headers = header_fields(self.split()[0])
        return self._headers

    @property
    def body(self) -> bytes:
        """The body as `rfc822_parse` gives it: its lines joined with CRLF."""
        if self._body is None:
            rest = self.split()[1]
            newlines = 0 if self.crlf else rest.count(b"\n")
            if newlines and newlines != rest.count(b"\r\n"):
                rest = re.sub(rb"\r?\n", b"\r\n", rest)
            self._body = rest
        return self._body

    @property
    def signatures(self) -> list[list[bytes]]:
        """The DKIM-Signature fields, top first (dkimpy's signature index)."""
        if self._signatures is None:
            self._signatures = [h for h in self.headers if h[0].lower() == b"dkim-signature"]
        return self._signatures

    def signature_tags(self, index: int) -> dict[bytes, bytes]:
        """The `index`-th signature's tags, parsed by dkimpy once (InvalidTagValueList each
        time when they cannot be); not to be changed by the caller."""
        key = ("tags", index)
        found = self.cache.get(key)
        if found is None:
            try:
                found = parse_tag_value(self.signatures[index][1])
            except InvalidTagValueList as error:
                found = (type(error), error.args)  # raised anew: two threads may ask
            self.cache[key] = found
        if isinstance(found, tuple):
            raise found[0](*found[1])
        return found

    def canonical_field(self, algorithm: Any, index: int) -> tuple[bytes, bytes]:
        """The `index`-th header field canonicalized by `algorithm` (dkimpy's Simple or
        Relaxed), made once; fields no signature covers are never canonicalized."""
        key = (algorithm, index)
        found = self.cache.get(key)
        if found is None:
            field = self.headers[index]
            if algorithm is Relaxed:
                found = relaxed_field(field)
            else:
                [found] = algorithm.canonicalize_headers([field])
            self.cache[key] = found
        return found

    @property
    def indexed_names(self) -> list[tuple[bytes, int]]:
        """(name, index) of every header field: what dkimpy's `select_headers` reads (the
        names, which canonicalization does not change but for case, which it ignores)."""
        found = self.cache.get("names")
        if found is None:
            found = self.cache["names"] = [(h[0], i) for i, h in enumerate(self.headers)]
        return found

    def body_digest(self, canon: Any, length: int | None, algorithm: bytes) -> bytes:
        """The body hash of a signature: canonicalized by `canon`'s body algorithm (with
        dkimpy's code), cut at l=, hashed with a= (sha1 or sha256)."""
        cache = self.cache
        body_canon = canon.body_algorithm  # the class Simple or Relaxed
        key = (body_canon, length, algorithm)
        digest = cache.get(key)
        if digest is None:
            body = cache.get(body_canon)
            if body is None:
                body = cache[body_canon] = (relaxed_body(self.body) if body_canon is Relaxed
                                            else canon.canonicalize_body(self.body))
            hasher = dkim.HASH_ALGORITHMS[algorithm]()
            hasher.update(body if length is None else memoryview(body)[:length])
            digest = cache[key] = hasher.digest()
        return digest


def _no_checkpoint() -> None:
    return None


@functools.cache
def _dkimpy_logger() -> Any:
    """dkimpy's logger, looked up once (its constructor looks it up for every verifier)."""
    return dkim.get_default_logger()


class _SharedMessage:
    """A dkimpy verifier (DKIM or ARC, next in the subclass's MRO) on a `DkimMessage`.

    dkimpy gets no message (it would split all of it); its header list is the shared one.
    `verify_sig_process` and `verify_sig` are dkimpy's (1.1.8) step for step, except that the
    canonicalized header fields and body digests come from the shared message, the key
    record is parsed once per record text, and `checkpoint` runs before each signature, so
    work whose caller has gone stops there (ARC verifies its sets inside one dkimpy call).
    """

    headers: list[Any]
    body: bytes
    tlsrpt: Any
    seqtlsrpt: bool
    ktag: bytes | None
    pk: Any
    keysize: int
    minkey: int
    timeout: float
    signed_headers: list[Any]

    def __init__(self, message: DkimMessage, *, minkey: int,
                 checkpoint: Callable[[], None] = _no_checkpoint) -> None:
        super().__init__(None, minkey=minkey, logger=_dkimpy_logger())  # type: ignore[call-arg]
        self.message = message
        self.headers = message.headers
        self.body = message.body
        self.checkpoint = checkpoint

    def verify_sig(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                   sig_header: Any, dnsfunc: Any) -> Any:
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            self.pk, self.keysize, self.ktag, self.seqtlsrpt = parse_key_record(
                name, dnsfunc(name, timeout=self.timeout))
        except (dkim.KeyFormatError, binascii.Error, dkim.DnsTimeoutError):
            return False
        return self.verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: Any, dnsfunc: Any) -> Any:
        self.checkpoint()
        # RFC 8460: a TLS report's key must say s=tlsrpt; other mail's must not
        if self.tlsrpt == "strict" and not self.seqtlsrpt:
            raise dkim.ValidationError("Message is tlsrpt and Service Type is not tlsrpt")
        if not self.tlsrpt and self.seqtlsrpt:
            raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        try:
            canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as error:
            raise dkim.MessageFormatError(f"invalid c= value: {error.args[0]}") from None
        hasher = dkim.HASH_ALGORITHMS[sig[b"a"]]

        if b"bh" in sig:
            length = None
            if b"l" in sig and not self.tlsrpt:
                try:
                    length = max(0, int(sig[b"l"]))
                except ValueError:  # dkimpy lets this escape as a crash
                    raise dkim.MessageFormatError("invalid l= value") from None
            digest = self.message.body_digest(canon, length, sig[b"a"])
            try:
                expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            except ValueError as error:  # dkimpy lets binascii.Error escape
                raise dkim.MessageFormatError(str(error)) from None
            if digest != expected:
                raise dkim.ValidationError(
                    f"body hash mismatch (got {base64.b64encode(digest)!r}, "
                    f"expected {sig[b'bh']!r})")

        # dkimpy (its bug #644046): any extra From field is signed too, so it must verify
        if b"from" in include_headers:
            include_headers.append(b"from")
        header_hash = hasher()
        self.signed_headers = hash_headers(header_hash, canon, self.message, include_headers,
                                           sig_header)
        try:
            signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
        except ValueError as error:  # dkimpy lets binascii.Error escape
            raise dkim.MessageFormatError(f"b= value is not valid base64: {error}") from None
        if self.ktag == b"rsa":
            try:
                valid = dkim.RSASSA_PKCS1_v1_5_verify(header_hash, signature, self.pk)
            except (TypeError, dkim.DigestTooLargeError) as error:
                raise dkim.KeyFormatError(f"digest too large for modulus: {error}") from None
            if valid and self.keysize < self.minkey:
                raise dkim.KeyFormatError(f"public key too small: {self.keysize}")
            return valid
        if self.ktag == b"ed25519":
            try:
                self.pk.verify(header_hash.digest(), signature)
            # dkimpy lets ValueError (a b= not 64 octets long) escape as a crash: it is
            # a signature that does not verify, as for RSA
            except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
                return False
            return True
        raise dkim.UnknownKeyTypeError(self.ktag)


# dkimpy's RE_BTAG, which finds the b= tag (and its value, removed before hashing the
# signature field), writes folding white space as (?:(?:\s*\r?\n)?\s+)?, the same strings
# as \s*, and its value as (?:FWS [base64])*: base64 runs parted by blanks, as here. The
# same matches, but the nested alternatives stepped through every octet of b= several
# ways (42 us a signature, a tenth of a verification; this one takes 7).
# tests/auth/test_dkim_differential.py checks the two on generated fields.
B_TAG = re.compile(rb"([;\s]b\s*=)[a-zA-Z0-9+/=]*(?:\s+[a-zA-Z0-9+/=]+)*(?:\r?\n\Z)?")


def hash_headers(hasher: Any, canon: Any, message: DkimMessage, include_headers: list[bytes],
                 sig_header: Any) -> list[Any]:
    """dkimpy's `hash_headers`: the signed fields (chosen by dkimpy's `select_headers`),
    canonicalized, then the signature field without its b= value, into `hasher`."""
    algorithm = canon.header_algorithm
    signed = [message.canonical_field(algorithm, index) for _, index in
              dkim.select_headers(message.indexed_names, include_headers)]
    unsigned = (sig_header[0], B_TAG.sub(rb"\1", sig_header[1]))
    if algorithm is Relaxed:
        name, value = relaxed_field(unsigned)
    else:
        [(name, value)] = algorithm.canonicalize_headers([unsigned])
    hasher.update(b"".join([part for field in signed for part in (field[0], b":", field[1])]
                           + [name, b":", value.rstrip()]))
    return signed


class Verifier(_SharedMessage, dkim.DKIM):
    """dkimpy's DKIM verifier on a shared `DkimMessage`, stoppable between signatures."""

    def prepare(self, index: int, sig: dict[bytes, bytes]) -> tuple[dict[bytes, bytes],
                                                                     list[bytes], Any]:
        """dkimpy's `verify_headerprep` for the `index`-th signature, whose tags the caller
        has parsed already (dkimpy would parse them again): (tags, h= names, the field)."""
        try:
            dkim.validate_signature_fields(sig)
        # dkimpy's crashes: an i= equal to d= (no "@" or "." before it); a t= or x= of
        # more digits than Python converts (4300)
        except IndexError:
            raise dkim.ValidationError(f"i= is not an identity in d= (i={sig[b'i']!r} "
                                       f"d={sig[b'd']!r})") from None
        except ValueError as error:
            raise dkim.ValidationError(f"t= or x= value: {error}") from None
        include_headers = [x.lower() for x in re.split(rb"\s*:\s*", sig[b"h"])]
        return dict(sig), include_headers, self.message.signatures[index]


class ArcVerifier(_SharedMessage, dkim.ARC):
    """dkimpy's ARC verifier on a shared `DkimMessage`, with the same checkpoints."""

    def sorted_arc_headers(self) -> tuple[int, list[Any]]:
        """dkimpy's `ARC.sorted_arc_headers` on the message's relaxed ARC fields, which the
        ARC signatures canonicalize anyway: (highest i=, [(i, (name, value))] newest first)."""
        found = []
        for raw_name, index in self.message.indexed_names:
            if raw_name.lower() in dkim.ARC.ARC_HEADERS:
                name, value = self.message.canonical_field(Relaxed, index)
                match = dkim.ARC.INSTANCE_RE.search(value)
                try:
                    if match is not None:
                        found.append((int(match.group(1)), (name, value)))
                except ValueError:  # over Python's 4300 digits
                    pass
        if not found:
            return 0, []
        found.sort(key=lambda a: [a[0], a[1][0].lower(), a[1][1].lower()])
        found.reverse()  # not sort(reverse=True): fields of equal keys in dkimpy's order
        return found[0][0], found


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
