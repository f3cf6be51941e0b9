#!/usr/bin/env python3
"""atheris: opening what a client sends back sealed - session cookies (tickets), login-state
cookies (``flow``) and the sign-out state cookie - and the login-state cookie's slot stamp.

Properties: a damaged value raises ``OpenError`` and nothing else; a value that opens carries
exactly the bytes that were sealed (base64url spellings of the same bytes aside); a login
state opens only for the state it was sealed for.
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports(include=["gateway"], enable_loader_override=False):
    from gateway.crypto import KeyRing, OpenError, b64u_decode
    from gateway.flow import LoginState, slot_for
    from gateway.login import _stamp
    from gateway.logout import _LOGOUT_PURPOSE
    from gateway.session import SESSION_PURPOSE, Ticket

RING = KeyRing([bytes(range(32)), bytes(range(1, 33))])  # two keys: rotation in effect
OLD = KeyRing([bytes(range(1, 33))])
TICKET = Ticket(bytes(16), bytes(range(32)))
SESSION = TICKET.to_cookie(OLD)  # sealed by the older key
FLOW, _ = LoginState.new("/deep?x=1", 1700000000.0, "s" * 43)
FLOW_COOKIE = FLOW.seal(RING)
LOGOUT = RING.seal_text(b'{"state":"st","target":"/bye","at":1}', _LOGOUT_PURPOSE)
SEALED = {"session": SESSION, "flow": FLOW_COOKIE, "logout": LOGOUT}


def _same(a: str, b: str) -> bool:
    try:
        return b64u_decode(a) == b64u_decode(b)
    except ValueError:
        return False


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.PickValueInList(["session", "flow", "logout", "stamp"])
    edit = fdp.ConsumeIntInRange(0, 3)
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 5000))
    if kind == "stamp":
        stamp = _stamp(text)
        assert isinstance(stamp, int) and 0 <= stamp < 10**12
        assert 0 <= slot_for("s" * 43 + text.encode("ascii", "ignore").decode(), 5) < 5
        return
    real = SEALED[kind]
    if edit == 1:  # splice the fuzz into the real value
        cut = len(text) % (len(real) + 1)
        text = real[:cut] + text + real[cut + len(text) % 7 :]
    elif edit == 2:  # flip one character of the real value
        i = len(text) % len(real)
        text = real[:i] + (text[:1] or "A") + real[i + 1 :]
    try:
        if kind == "session":
            ticket = Ticket.from_cookie(text, RING)
            assert ticket == TICKET and _same(text, real)
        elif kind == "flow":
            state = fdp.PickValueInList([FLOW.state, FLOW.state[:-1] + "t", text[:43]])
            flow = LoginState.open(text, state, RING)
            assert flow == FLOW and state == FLOW.state and _same(text, real)
        else:
            opened = json.loads(RING.open_text(text, _LOGOUT_PURPOSE))
            assert opened["target"] == "/bye" and _same(text, real)
    except OpenError:
        pass
    # A session cookie never opens as another kind, and the reverse.
    for other, purpose in (("flow", SESSION_PURPOSE), ("logout", SESSION_PURPOSE)):
        try:
            RING.open_text(SEALED[other], purpose)
            raise AssertionError(f"a {other} cookie opened as a session")
        except OpenError:
            pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
