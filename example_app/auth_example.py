"""Authenticating the WebSocket handshake: a runnable example.

Two kinds of clients, one ``identify`` hook:

- a **browser** on this site sends its session cookie (Starlette's
  ``SessionMiddleware``); the ``Origin`` check (on by default: same origin as
  the ``Host``) stops other sites' pages from riding on that cookie
  (cross-site WebSocket hijacking gets HTTP 403);
- **another program** offers its bearer token as a subprotocol
  ``bearer.<token>`` next to ``replay.v1`` (browsers cannot set an
  ``Authorization`` header on a WebSocket; a subprotocol is not logged by
  uvicorn, a query string is). The server answers with ``replay.v1`` only,
  never echoing the token.

``POST /logout`` ends the session and closes every socket of that user with
1008 (``replay.revoke``); ``max_connections_per_identity`` caps one user's
sockets (the next handshake gets 403).

Run it::

    python -m example_app.auth_example     # http://127.0.0.1:8001, token tok_8f2b1c is user 42

    # a program with a token (any WebSocket client):
    async with websockets.connect(
        "ws://127.0.0.1:8001/ws", subprotocols=["replay.v1", "bearer.tok_8f2b1c"]
    ) as ws:
        await ws.send('{"type": "subscribe", "topic": "user:42"}')

    # a browser: POST /login {"user": "42"} sets the session cookie; then
    # new WebSocket("ws://127.0.0.1:8001/ws", "replay.v1") from a page of this site.

If your clients must pass a token in the query string, install
:class:`DropQueryString` (below) so that uvicorn's log lines keep the path only.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_replay import Refused, Replay

__all__ = ["TOKEN_PREFIX", "DropQueryString", "create_app"]

TOKEN_PREFIX = "bearer."


class DropQueryString(logging.Filter):
    """Removes the query string from uvicorn's ``WebSocket /path?query`` and access-log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(record.msg, str) and isinstance(args, tuple):
            if record.msg.startswith('%s - "WebSocket %s"') and len(args) >= 2 and isinstance(args[1], str):
                record.args = (args[0], args[1].split("?", 1)[0], *args[2:])
            elif record.name == "uvicorn.access" and len(args) >= 3 and isinstance(args[2], str):
                # '%s - "%s %s HTTP/%s" %d': client, method, path with query, version, status
                record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def create_app(
    tokens: dict[str, str] | None = None,
    *,
    secret_key: str = "change-me",
    max_connections_per_identity: int = 5,
    **replay_options: Any,
) -> Starlette:
    """The example app. ``tokens`` maps bearer tokens to user ids (your token check)."""
    known_tokens = dict(tokens or {})
    # Server-side sessions: the signed cookie only names one. A cookie alone
    # (Starlette's SessionMiddleware keeps its data in the cookie) stays valid
    # after logout for whoever kept a copy, so revocation needs state here.
    sessions: dict[str, str] = {}

    # The hooks take the request's HTTPConnection: a WebSocket here (a Request on an SSE route).
    async def identify(websocket: HTTPConnection) -> str:
        user = sessions.get(websocket.session.get("sid", ""))  # a browser on this site
        for offered in websocket.scope.get("subprotocols", []):
            offered = offered.strip()  # some ASGI servers/test transports keep the space after a comma
            if offered.startswith(TOKEN_PREFIX):  # another program
                user = known_tokens.get(offered.removeprefix(TOKEN_PREFIX))
                if user is None:
                    raise Refused("unknown token")  # never put the token in the reason: it is logged
        if user is None:
            raise Refused("not signed in")  # HTTP 403, no socket
        websocket.state.user = user
        return user  # acks are stored under this identity; revoke() closes by it

    def authorize(websocket: HTTPConnection, topic: str) -> bool:
        return topic == f"user:{websocket.state.user}"

    async def login(request: Request) -> JSONResponse:
        body = await request.json()
        user = str(body.get("user", "")) if isinstance(body, dict) else ""  # after checking a password, of course
        if not user.isalnum():
            return JSONResponse({"error": "user must be alphanumeric"}, status_code=400)
        sid = secrets.token_urlsafe(16)
        sessions[sid] = user
        request.session["sid"] = sid
        return JSONResponse({"user": user})

    async def logout(request: Request) -> JSONResponse:
        """Sign out everywhere: end every session of the user, then close their sockets."""
        user = sessions.get(request.session.pop("sid", ""))
        if user is None:
            return JSONResponse({"closed": 0})
        for sid in [sid for sid, owner in sessions.items() if owner == user]:
            del sessions[sid]  # first: a reconnect with an old cookie is refused
        return JSONResponse({"closed": await replay.revoke(user)})

    async def notify(request: Request) -> JSONResponse:
        user = sessions.get(request.session.get("sid", ""))
        if user is None:
            return JSONResponse({"error": "not signed in"}, status_code=403)
        event = await replay.publish(f"user:{user}", "note", await request.json())
        return JSONResponse({"offset": event.offset})

    replay = Replay(
        identify=identify,
        authorize=authorize,
        max_connections_per_identity=max_connections_per_identity,
        **replay_options,
    )
    app = Starlette(
        routes=[
            replay.route("/ws"),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/notify", notify, methods=["POST"]),
        ],
        middleware=[Middleware(SessionMiddleware, secret_key=secret_key, https_only=False)],
        lifespan=replay.lifespan,
    )
    app.state.replay = replay
    return app


def main() -> None:  # pragma: no cover - manual entry point
    import uvicorn

    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(DropQueryString())
    tokens = {os.environ.get("DEMO_TOKEN", "tok_8f2b1c"): "42"}
    uvicorn.run(create_app(tokens, secret_key=os.environ.get("SESSION_SECRET", "change-me")), port=8001)


if __name__ == "__main__":
    main()
