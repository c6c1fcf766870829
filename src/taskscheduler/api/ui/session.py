"""The dashboard's session cookie and CSRF tokens. Pure: no I/O, the clock injected.

With API_KEYS set, `/ui/login` takes a key and the browser gets a cookie that says "logged in with
key K until T", signed with a secret derived from K itself. The cookie holds neither the key nor
anything it can be recovered from: only a key id (an HMAC of the key) and the expiry. Several API
processes check each other's cookies without sharing anything but API_KEYS, and removing a key from
API_KEYS ends every session opened with it.

Every visitor also gets a nonce, in a cookie of its own, before any login (and when no login is
needed, without API_KEYS): each form carries a CSRF token derived from the session's nonce, and a POST
whose token does not match its cookie's nonce is refused. The cookies are HttpOnly and
SameSite=Strict, so another site can neither read the nonce nor send the cookies with a forged form.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

# The login (signed), set only by a login; and the visitor's nonce for CSRF tokens. Two cookies, so
# that a request that arrives without the login cookie (SameSite=Strict keeps it off a link followed
# from another site) and gets a new nonce does not overwrite the login.
COOKIE_NAME = "taskscheduler_ui"
NONCE_COOKIE_NAME = "taskscheduler_ui_nonce"
SESSION_TTL_SEC = 12 * 3600
_ANONYMOUS = "a"
_SIGNED = "s"
# Anonymous sessions grant nothing; their CSRF token only has to be one that another site cannot
# compute without the nonce, which it cannot read.
_ANONYMOUS_SECRET = b"taskscheduler ui anonymous csrf"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, message: str) -> bytes:
    return hmac.new(secret, message.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class Session:
    nonce: str
    key_id: str | None = None  # the key it logged in with (an HMAC of it); None: not logged in
    expires_at: float = 0.0

    @property
    def logged_in(self) -> bool:
        return self.key_id is not None


class Sessions:
    """Issues and checks cookies and CSRF tokens for the keys in API_KEYS."""

    def __init__(self, keys: list[str], *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # key id -> signing secret; both derived from the key, which is not kept.
        self._secrets = {self._key_id(key): self._signing_secret(key) for key in keys}
        self.login_required = bool(keys)

    @staticmethod
    def _key_id(key: str) -> str:
        return _b64(_mac(key.encode(), "taskscheduler ui key id")[:12])

    @staticmethod
    def _signing_secret(key: str) -> bytes:
        return _mac(key.encode(), "taskscheduler ui session signing")

    def anonymous(self) -> tuple[Session, str]:
        """A fresh session that is not logged in, and its cookie value."""
        session = Session(nonce=secrets.token_urlsafe(18))
        return session, f"{_ANONYMOUS}.{session.nonce}"

    def key_id_for(self, given: str) -> str | None:
        """The id of the key in API_KEYS equal to `given`, compared in constant time with every key."""
        given_id = self._key_id(given)
        found = None
        for key_id in self._secrets:
            if hmac.compare_digest(given_id, key_id):
                found = key_id
        return found

    def logged_in(self, key_id: str) -> tuple[Session, str]:
        """A new session for a key that was just checked (a new nonce: the pre-login one is dropped)."""
        session = Session(
            nonce=secrets.token_urlsafe(18), key_id=key_id, expires_at=float(int(self._clock() + SESSION_TTL_SEC))
        )
        payload = _b64(json.dumps([session.key_id, session.nonce, int(session.expires_at)]).encode())
        signature = _b64(_mac(self._secrets[key_id], payload))
        return session, f"{_SIGNED}.{payload}.{signature}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie holds, or None when it is missing, forged, expired, or its key is gone."""
        if not cookie:
            return None
        kind, _, rest = cookie.partition(".")
        if kind == _ANONYMOUS:
            return Session(nonce=rest) if 16 <= len(rest) <= 64 else None
        if kind != _SIGNED:
            return None
        payload, _, signature = rest.partition(".")
        try:
            key_id, nonce, expires_at = json.loads(_unb64(payload))
        except (ValueError, TypeError):
            return None
        secret = self._secrets.get(key_id) if isinstance(key_id, str) else None
        if secret is None or not isinstance(nonce, str) or not isinstance(expires_at, int):
            return None
        if not hmac.compare_digest(_b64(_mac(secret, payload)), signature):
            return None
        if expires_at <= self._clock():
            return None
        return Session(nonce=nonce, key_id=key_id, expires_at=float(expires_at))

    def csrf_token(self, session: Session) -> str:
        secret = self._secrets.get(session.key_id, _ANONYMOUS_SECRET) if session.key_id else _ANONYMOUS_SECRET
        return _b64(_mac(secret, f"csrf {session.nonce}"))

    def csrf_ok(self, session: Session | None, token: str | None) -> bool:
        if session is None or not token:
            return False
        return hmac.compare_digest(self.csrf_token(session), token)
