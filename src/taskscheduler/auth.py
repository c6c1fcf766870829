"""API keys: `Authorization: Bearer <key>` checked against API_KEYS in constant time."""

from __future__ import annotations

import hmac


def bearer_ok(header: str | None, keys: list[str]) -> bool:
    """Whether the `Authorization` header value carries one of `keys`.

    Every key is compared, with hmac.compare_digest, whatever the outcome: the time taken does not
    tell how much of a key matched, nor which key.
    """
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    given = token.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode("utf-8"))
    return ok
