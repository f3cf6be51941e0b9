"""Login-flow state: state, nonce, PKCE verifier and return path, in a short-lived cookie.

Each flow has its own cookie in one of ``session.max_login_flows`` slots (the slot is a
function of the state, see ``login.begin_login``), sealed with the state as associated data,
so unauthenticated traffic writes nothing server-side, several tabs can log in at once, a
burst of parallel logins never grows the Cookie header, and a cookie only opens for the
callback that carries its own state.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from gateway.config import DEFAULT_PROVIDER_ID
from gateway.crypto import KeyRing, OpenError, pkce_pair, random_token, sha256_b64u

_PURPOSE = b"gateway-login-state:"


@dataclass(frozen=True, slots=True)
class LoginState:
    state: str
    nonce: str
    verifier: str
    return_to: str
    created_at: float
    # The provider chosen for this sign-in: only its issuer may answer, only its token
    # endpoint ever sees the code (cookies sealed before there could be several: default).
    provider: str = DEFAULT_PROVIDER_ID

    @classmethod
    def new(
        cls,
        return_to: str,
        now: float | None = None,
        state: str | None = None,
        provider: str = DEFAULT_PROVIDER_ID,
    ) -> tuple[LoginState, str]:
        """A fresh flow and its S256 code challenge (``state``: one already drawn)."""
        verifier, challenge = pkce_pair()
        st = cls(
            state or random_token(32),
            random_token(32),
            verifier,
            return_to,
            now or time.time(),
            provider,
        )
        return st, challenge

    @property
    def flow_id(self) -> str:
        return flow_id_for(self.state)

    def seal(self, ring: KeyRing) -> str:
        data = asdict(self)
        if self.provider == DEFAULT_PROVIDER_ID:
            del data["provider"]  # as before: a replica on the previous version opens it
        payload = json.dumps(data, separators=(",", ":")).encode()
        return ring.seal_text(payload, _PURPOSE + self.state.encode())

    @classmethod
    def open(cls, value: str, state: str, ring: KeyRing) -> LoginState:
        """Raise OpenError unless the cookie was sealed by us for exactly this state."""
        raw = ring.open_text(value, _PURPOSE + state.encode())
        try:
            data = json.loads(raw)
            st = cls(**data)
        except (ValueError, TypeError):
            raise OpenError("bad login state") from None
        if st.state != state:
            raise OpenError("state mismatch")
        return st


def flow_id_for(state: str) -> str:
    """Short cookie-name-safe id of a flow: 16 base64url chars of sha256(state)."""
    return sha256_b64u(state)[:16]


def slot_for(state: str, slots: int) -> int:
    """Which login-state cookie slot a flow's state belongs to."""
    return flow_id_for(state).encode()[0] % slots


def flow_cookie(prefix: str, slot: int) -> str:
    """The name of the login-state cookie in ``slot``."""
    return f"{prefix}{slot}"
