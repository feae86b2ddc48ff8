"""The floor under the gateway: a featureless relay on the same server and client.

uvicorn (uvloop + httptools) in front, one pooled ``aiohttp.ClientSession`` behind, and
nothing between them: no tenant, no quota, no ledger, no log line. It forwards the request
body to ``--upstream`` + the request path and relays the status, the content type and the
body (whole for JSON, chunk by chunk for a stream). ``load.py --bare`` measures it with the
same harness as the gateway, so "the gateway's CPU per request" can be read against the
cost of relaying at all on the same host at the same moment.

    python benchmarks/bare_relay.py --upstream http://127.0.0.1:9000 --port 8080
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn


def relay_app(upstream: str) -> Any:
    """The ASGI app: ``/healthz`` answers 200, every other request is forwarded."""
    state: dict[str, aiohttp.ClientSession] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["session"] = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=0),
                        skip_auto_headers=("User-Agent",),
                    )
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["session"].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {"content-type": "application/json"}
        for name, value in scope["headers"]:
            if name == b"authorization":
                headers["authorization"] = value.decode("latin-1")
        session = state["session"]
        async with session.post(upstream + scope["path"], data=body, headers=headers) as answer:
            content_type = answer.headers.get("content-type", "application/json").encode()
            if content_type.startswith(b"text/event-stream"):
                await send(
                    {
                        "type": "http.response.start",
                        "status": answer.status,
                        "headers": [(b"content-type", content_type)],
                    }
                )
                while chunk := await answer.content.readany():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            data = await answer.read()
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        relay_app(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
