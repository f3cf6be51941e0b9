"""RFC 7662 introspection answers against the bearer verifier's answer check (pure)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.bearer import BearerVerifier
from gateway.errors import TokenValidationError
from tests.fuzz.profiles import FUZZ, TRIED
from tests.fuzz.properties import json_values

pytestmark = pytest.mark.fuzz

ISSUER = "https://idp.example"
CLIENT = "gateway-client"
# The answer check alone: no provider is asked anything here.
VERIFIER = object.__new__(BearerVerifier)
VERIFIER.audiences = [CLIENT]


@FUZZ
@given(
    answer=st.fixed_dictionaries(
        {"active": st.one_of(st.just(True), json_values(2)), "sub": st.one_of(st.just("alice"), json_values(2))},
        optional={name: json_values(3) for name in
                  ("exp", "nbf", "iss", "aud", "client_id", "token_type", "scope", "cnf")},
    )
)  # fmt: skip
@example(answer={"active": True, "sub": "alice", "aud": CLIENT, "exp": math.nan})
@example(answer={"active": True, "sub": "alice", "aud": CLIENT, "exp": math.inf})
@example(answer={"active": True, "sub": "alice", "aud": CLIENT, "nbf": -math.inf})
def test_only_active_unexpired_answers_for_us_are_accepted(answer: dict[str, Any]) -> None:
    TRIED["introspection answers"] += 1
    now = time.time()
    try:
        principal = VERIFIER._from_introspection(answer, ISSUER, now)
    except TokenValidationError:
        return
    assert answer["active"] is True and principal.identity.sub
    exp = answer.get("exp")
    # A finite number in the future (NaN compares as never expired; found by atheris_tokens).
    assert exp is None or (math.isfinite(exp) and exp > now), answer
    aud = answer.get("aud")
    if aud is not None:
        assert aud == CLIENT or (isinstance(aud, list) and CLIENT in aud), answer
