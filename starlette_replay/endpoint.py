"""The ASGI side: the WebSocket handshake (origin, identity, subprotocol), then a Connection.

:meth:`Endpoint.admit` is the handshake's checks for both routes (the SSE
route answers its refusals as HTTP responses with a JSON body, see ``sse.py``).
"""

from __future__ import annotations

import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket

from .connection import Connection
from .errors import Refused
from .protocol import SUBPROTOCOL, CloseCode, ErrorCode
from .registry import Registry

__all__ = ["Endpoint", "Identify", "Refusal", "origin_allowed"]

# The app's hook naming a handshake's identity: (conn) -> str | None | Awaitable[...]; raise Refused for 403.
# conn is the request's HTTPConnection: a WebSocket, or a Request on the SSE route.
Identify = Callable[[HTTPConnection], "str | Awaitable[str | None] | None"]

logger = logging.getLogger("starlette_replay.endpoint")

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _netloc(host: str, scheme: str | None) -> tuple[str, int | None]:
    """``host[:port]`` as (lower-cased host, port), the port defaulted by scheme."""
    parts = urlsplit(f"//{host}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None and scheme is not None:
        port = _DEFAULT_PORTS.get(scheme)
    return (parts.hostname or "").lower(), port


def origin_allowed(origin: str | None, host: str | None, scheme: str, allowed: Sequence[str] | None) -> bool:
    """Decide whether a handshake's ``Origin`` may connect.

    No ``Origin`` header (a non-browser client) is allowed: the check exists to
    stop other sites' pages from using a browser's cookies. With ``allowed`` None
    the origin must name the same host and port as the ``Host`` header (the
    scheme is not compared, so a TLS-terminating proxy does not break it);
    otherwise it must be one of ``allowed`` (``"*"`` allows any).
    """
    if origin is None:
        return True
    if allowed is not None:
        return "*" in allowed or origin.rstrip("/") in allowed
    if host is None or origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    try:
        origin_port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        return False
    host_name, host_port = _netloc(host, None)
    if host_port is None:
        host_port = _DEFAULT_PORTS["https" if scheme in ("wss", "https") else "http"]
        if host_name == parts.hostname.lower() and origin_port in (80, 443):
            # Host without a port: the client used the scheme's default port,
            # which a proxy may have changed from https to http.
            return True
    return host_name == parts.hostname.lower() and host_port == origin_port


async def _deny(websocket: WebSocket, status: int, reason: str) -> None:
    """Refuse the handshake with an HTTP status (403 via a plain close where the server lacks the extension)."""
    if status != 403 and "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(PlainTextResponse(reason, status_code=status))
    else:
        await websocket.close(code=CloseCode.POLICY_VIOLATION, reason=reason)


class Refusal(Exception):
    """A handshake refused by :meth:`Endpoint.admit`: the HTTP ``status``, an error ``code`` and a short ``reason``."""

    def __init__(self, status: int, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.code.value!r}, {self.reason!r})"


class Endpoint:
    """The WebSocket route's ASGI side: the handshake, then a :class:`Connection` until it ends.

    Given its collaborators by the Replay: the origin rule, the ``identify``
    hook, the :class:`Registry` of connections (which also says whether the
    Replay is running) and ``connect``, which makes the :class:`Connection`
    for an accepted socket.
    """

    __slots__ = ("allowed_origins", "connect", "identify", "registry")

    def __init__(
        self,
        *,
        allowed_origins: Sequence[str] | None,
        identify: Identify | None,
        registry: Registry,
        connect: Callable[[WebSocket, str | None, str], Connection],
    ) -> None:
        self.allowed_origins = allowed_origins
        self.identify = identify
        self.registry = registry
        self.connect = connect

    async def admit(self, conn: HTTPConnection, conn_id: str) -> str | None:
        """The handshake's checks, for either route: origin, ``identify``, running, the identity's limit.

        Returns the identity (None: anonymous). Raises :class:`Refusal`: 403 for
        an origin not allowed, ``identify`` raising ``Refused`` and an identity
        at ``max_connections_per_identity``; 500 when ``identify`` fails; 503
        when the Replay is not running. The caller reserves the connection in
        the registry with no await after this returns (the limit has no race).
        """
        if not origin_allowed(
            conn.headers.get("origin"),
            conn.headers.get("host"),
            conn.url.scheme,
            self.allowed_origins,
        ):
            logger.warning("[%s] handshake refused: origin %r not allowed", conn_id, conn.headers.get("origin"))
            raise Refusal(403, ErrorCode.FORBIDDEN, "origin not allowed")
        identity: str | None = None
        if self.identify is not None:
            try:
                result = self.identify(conn)
                if inspect.isawaitable(result):
                    result = await result
                if result is not None and (not isinstance(result, str) or not result):
                    # "" would make every such user share one set of stored cursors.
                    raise TypeError(f"identify() must return a non-empty str or None, not {result!r}")
                identity = result
            except Refused as exc:
                logger.info("[%s] handshake refused by identify: %s", conn_id, exc.reason)
                raise Refusal(403, ErrorCode.FORBIDDEN, "refused") from None
            except Exception:
                logger.exception("[%s] identify() raised; refusing the handshake", conn_id)
                raise Refusal(500, ErrorCode.INTERNAL, "internal error") from None
        registry = self.registry
        if not registry.accepting:
            logger.error(
                "[%s] connection refused: the Replay is not running. Start it with the app's lifespan "
                "(Starlette(..., lifespan=replay.lifespan)) or `async with replay:`; under a server that sends "
                "no lifespan events (daphne), from the first request (README: Servers without a lifespan)",
                conn_id,
            )
            raise Refusal(503, ErrorCode.UNAVAILABLE, "not running")
        if registry.identity_full(identity):
            # 403, not accept + 1008: the protocol refuses handshakes with 403, no
            # socket is spent, and a client stops on both (retrying cannot help
            # until the identity closes a connection).
            logger.info(
                "[%s] handshake refused: the identity holds %s connections (max_connections_per_identity)",
                conn_id,
                registry.max_per_identity,
            )
            raise Refusal(403, ErrorCode.FORBIDDEN, "too many connections")
        return identity

    async def serve(self, websocket: WebSocket) -> None:
        """Run one WebSocket connection from handshake to close. Never raises."""
        conn_id = secrets.token_hex(4)
        try:
            identity = await self.admit(websocket, conn_id)
        except Refusal as refusal:
            await _deny(websocket, refusal.status, refusal.reason)
            return
        registry = self.registry
        connection = self.connect(websocket, identity, conn_id)
        # Counted for its identity from before accept(), with no await since the
        # check above: the limit has no race, and revoke() reaches handshakes in progress.
        registry.reserve(connection)
        try:
            offered = websocket.scope.get("subprotocols") or []
            await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
            logger.debug("[%s] connected (identity=%r)", conn_id, identity)
            await registry.serve(connection)
        finally:
            registry.release(connection)
        logger.debug("[%s] closed (%s)", conn_id, connection.close_code)
