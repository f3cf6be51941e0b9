"""The development provider (``gateway.devidp``) in a process of its own, for the benchmark.

Usage: ``idp.py PORT GATEWAY_URL CLIENT_ID CLIENT_SECRET``. Tokens live a day, so no refresh
happens while the benchmark runs; consent is still asked, as a real first login would be.
"""

import asyncio
import sys

import uvloop

from gateway.devidp import ClientRegistration, DevIdpConfig, demo_users, start_devidp


async def main(port: int, gateway_url: str, client_id: str, secret: str) -> None:
    client = ClientRegistration(
        client_id=client_id,
        client_secret=secret,
        redirect_uris=(gateway_url + "/oauth2/callback",),
        post_logout_redirect_uris=(gateway_url + "/oauth2/signed_out",),
    )
    cfg = DevIdpConfig(
        users=demo_users(), clients=[client], access_token_ttl=86400, id_token_ttl=86400
    )
    idp = await start_devidp(cfg, "127.0.0.1", port)
    print("ready", idp.url, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await idp.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
