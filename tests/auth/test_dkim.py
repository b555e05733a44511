"""DKIM over real DNS: RSA-2048 and Ed25519 verify; tampering fails; key trouble is permerror/temperror."""

from __future__ import annotations

from .checks import verify_dkim
from .keys import message, rsa_key, sign


async def test_rsa2048_pass(dns_server, resolver, rsa2048):
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)  # > 255 octets: split strings
    result = await verify_dkim(resolver, sign(message(), rsa2048, "example.com"))
    [sig] = result.signatures
    assert (sig.result, sig.domain, sig.selector, sig.algorithm) == \
        ("pass", "example.com", "sel", "rsa-sha256")
    assert result.summary == "pass"
    assert len(sig.header_b) == 8


async def test_ed25519_pass(dns_server, resolver, ed25519):
    dns_server.txt("ed._domainkey.example.com", ed25519.record)
    result = await verify_dkim(resolver, sign(message(), ed25519, "example.com", "ed"))
    [sig] = result.signatures
    assert (sig.result, sig.algorithm) == ("pass", "ed25519-sha256")


async def test_every_signature_gets_a_verdict(dns_server, resolver, rsa2048, ed25519):
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    dns_server.txt("ed._domainkey.example.com", ed25519.record)
    raw = sign(sign(message(), rsa2048, "example.com"), ed25519, "example.com", "ed")
    raw = sign(raw, rsa2048, "missing.example.net", "gone")
    result = await verify_dkim(resolver, raw)
    verdicts = sorted((s.selector, s.result) for s in result.signatures)
    assert verdicts == [("ed", "pass"), ("gone", "permerror"), ("sel", "pass")]
    assert result.summary == "pass"


async def test_body_altered_fails(dns_server, resolver, rsa2048, ed25519):
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    dns_server.txt("ed._domainkey.example.com", ed25519.record)
    for key, selector in ((rsa2048, "sel"), (ed25519, "ed")):
        raw = sign(message(), key, "example.com", selector).replace(b"Hello Bob.", b"Pay Mallory")
        [sig] = (await verify_dkim(resolver, raw)).signatures
        assert (sig.result, sig.reason) == ("fail", "body hash mismatch")


async def test_header_altered_fails(dns_server, resolver, rsa2048):
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    raw = sign(message(), rsa2048, "example.com").replace(b"Subject: hello", b"Subject: HELLO")
    [sig] = (await verify_dkim(resolver, raw)).signatures
    assert (sig.result, sig.reason) == ("fail", "signature did not verify")


async def test_wrong_key_fails(dns_server, resolver, rsa2048):
    dns_server.txt("sel._domainkey.example.com", rsa_key(1024).record)
    [sig] = (await verify_dkim(resolver, sign(message(), rsa2048, "example.com"))).signatures
    assert sig.result == "fail"


async def test_missing_key_is_permerror(dns_server, resolver, rsa2048):
    [sig] = (await verify_dkim(resolver, sign(message(), rsa2048, "example.com"))).signatures
    assert (sig.result, sig.reason) == ("permerror", "no key")


async def test_revoked_key_is_permerror(dns_server, resolver, rsa2048):
    dns_server.txt("sel._domainkey.example.com", "v=DKIM1; k=rsa; p=")
    [sig] = (await verify_dkim(resolver, sign(message(), rsa2048, "example.com"))).signatures
    assert sig.result == "permerror"


async def test_dns_timeout_is_temperror(dns_server, resolver, rsa2048):
    dns_server.set_timeout("sel._domainkey.example.com")
    [sig] = (await verify_dkim(resolver, sign(message(), rsa2048, "example.com"))).signatures
    assert sig.result == "temperror"
    assert "key lookup" in sig.reason


async def test_servfail_is_temperror(dns_server, resolver, ed25519):
    dns_server.set_servfail("ed._domainkey.example.com")
    result = await verify_dkim(resolver, sign(message(), ed25519, "example.com", "ed"))
    assert result.summary == "temperror"


async def test_testing_key_failure_is_neutral(dns_server, resolver, rsa2048):
    dns_server.txt("sel._domainkey.example.com", rsa2048.record + "; t=y")
    raw = sign(message(), rsa2048, "example.com").replace(b"Hello Bob.", b"Hello Eve.")
    assert (await verify_dkim(resolver, raw)).signatures[0].result == "neutral"


async def test_unsigned_is_none(resolver):
    result = await verify_dkim(resolver, message())
    assert result.summary == "none" and result.signatures == ()


async def test_malformed_signature_is_permerror(resolver):
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com\r\n" + message()
    [sig] = (await verify_dkim(resolver, raw)).signatures
    assert sig.result == "permerror"


def test_openssl_rsa_verification_agrees_with_dkimpy(rsa2048):
    """Our OpenSSL-backed RSASSA-PKCS1-v1_5 check answers exactly as dkimpy's pure Python one."""
    import hashlib

    import dkim.crypto

    from smtpd_agent.auth.adapters import rsa_pkcs1_v1_5_verify

    private = dkim.crypto.parse_pem_private_key(rsa2048.private)
    public = {"modulus": private["modulus"], "publicExponent": private["publicExponent"]}
    for text in (b"", b"hello", b"x" * 5000):
        for algorithm in (hashlib.sha256, hashlib.sha1):
            signature = dkim.crypto.RSASSA_PKCS1_v1_5_sign(algorithm(text), private)
            for candidate, digest in ((signature, algorithm(text)),
                                      (signature, algorithm(text + b"!")),
                                      (signature[:-1] + bytes([signature[-1] ^ 1]), algorithm(text)),
                                      (b"\x00" * len(signature), algorithm(text))):
                expected = dkim.crypto.RSASSA_PKCS1_v1_5_verify(digest.copy(), candidate, public)
                assert rsa_pkcs1_v1_5_verify(digest.copy(), candidate, public) == expected
