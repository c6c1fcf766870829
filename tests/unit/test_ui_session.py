"""The dashboard's session cookie and CSRF tokens (api.ui.session): signed, expiring, keyless."""

from __future__ import annotations

from taskscheduler.api.ui.session import SESSION_TTL_SEC, Session, Sessions

KEY = "k3y-0f-the-operators-1234567890"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def logged_in(sessions: Sessions, key: str = KEY) -> tuple[Session, str]:
    key_id = sessions.key_id_for(key)
    assert key_id is not None
    return sessions.logged_in(key_id)


def test_a_logged_in_cookie_reads_back_and_holds_nothing_of_the_key() -> None:
    sessions = Sessions([KEY, "other-key"])
    session, cookie = logged_in(sessions)
    assert sessions.read(cookie) == session
    assert session.logged_in
    assert KEY not in cookie and KEY.encode().hex() not in cookie


def test_only_a_configured_key_logs_in() -> None:
    sessions = Sessions([KEY])
    assert sessions.key_id_for("wrong") is None
    assert sessions.key_id_for(KEY[:-1]) is None
    assert sessions.key_id_for("") is None


def test_a_forged_or_altered_cookie_is_refused() -> None:
    sessions = Sessions([KEY])
    _, cookie = logged_in(sessions)
    kind, payload, signature = cookie.split(".")
    assert sessions.read(f"{kind}.{payload}.{signature[:-2]}AA") is None
    assert sessions.read(f"{kind}.{payload[:-2]}AA.{signature}") is None
    assert sessions.read(f"x.{payload}.{signature}") is None
    assert sessions.read("s.garbage") is None
    assert sessions.read("") is None and sessions.read(None) is None


def test_a_cookie_signed_for_another_set_of_keys_is_refused() -> None:
    _, cookie = logged_in(Sessions(["attacker-chosen-key-123"]), "attacker-chosen-key-123")
    assert Sessions([KEY]).read(cookie) is None


def test_removing_a_key_from_api_keys_ends_its_sessions() -> None:
    _, cookie = logged_in(Sessions([KEY, "second-key-abcdef"]))
    assert Sessions(["second-key-abcdef"]).read(cookie) is None
    assert Sessions([KEY]).read(cookie) is not None  # another process with the same key reads it


def test_a_session_expires() -> None:
    clock = Clock()
    sessions = Sessions([KEY], clock=clock)
    _, cookie = logged_in(sessions)
    clock.now += SESSION_TTL_SEC - 1
    assert sessions.read(cookie) is not None
    clock.now += 1
    assert sessions.read(cookie) is None


def test_an_anonymous_session_is_not_logged_in() -> None:
    sessions = Sessions([KEY])
    session, cookie = sessions.anonymous()
    read = sessions.read(cookie)
    assert read == session and not read.logged_in
    assert sessions.read("a.short") is None


def test_csrf_tokens_belong_to_their_session() -> None:
    sessions = Sessions([KEY])
    mine, _ = logged_in(sessions)
    other, _ = logged_in(sessions)
    anonymous, _ = sessions.anonymous()
    token = sessions.csrf_token(mine)
    assert sessions.csrf_ok(mine, token)
    assert not sessions.csrf_ok(other, token)
    assert not sessions.csrf_ok(anonymous, token)
    assert not sessions.csrf_ok(mine, None) and not sessions.csrf_ok(mine, "")
    assert not sessions.csrf_ok(None, token)
    assert sessions.csrf_ok(anonymous, sessions.csrf_token(anonymous))


def test_without_keys_no_login_is_required_and_forms_still_carry_tokens() -> None:
    sessions = Sessions([])
    assert not sessions.login_required
    session, cookie = sessions.anonymous()
    assert sessions.read(cookie) == session
    assert sessions.csrf_ok(session, sessions.csrf_token(session))
    assert sessions.key_id_for("anything") is None
