"""Free loopback ports for servers a test starts and must name before they listen.

A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range, and that is
also where the local port of every outgoing connection comes from. Between the moment a test
picks such a port and the moment its server binds it, a connection the suite opens (to Redis,
to the provider, to the gateway) can take it, and the server fails with EADDRINUSE; CI saw
exactly that. The ports handed out here lie below the ephemeral range, where the kernel never
puts an outgoing connection or a ``bind(0)``, and none is handed out twice in one run.
"""

from __future__ import annotations

import contextlib
import random
import socket

_LOWEST = 10000
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(*, with_offset: int = 0) -> int:
    """A loopback port nobody listens on, outside the ephemeral range.

    ``with_offset``: the port ``port + with_offset`` must be free and outside that range too
    (a Redis Cluster node's bus port is its port + 10000).
    """
    top = _ephemeral_start() - 1 - with_offset
    if top <= _LOWEST:
        raise RuntimeError("the ephemeral port range leaves no room for test servers")
    for _ in range(500):
        port = random.randint(_LOWEST, top)
        wanted = (port, port + with_offset) if with_offset else (port,)
        if any(p in _handed_out for p in wanted):
            continue
        with contextlib.ExitStack() as stack:
            try:
                for p in wanted:
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
        _handed_out.update(wanted)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")
