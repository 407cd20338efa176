"""The client's errors: one root, :class:`ReplayClientError`, and one class per server error code."""

from __future__ import annotations

from typing import Any

from ..errors import ReplayError
from ..protocol import ErrorCode

__all__ = [
    "BadRequestError",
    "ClientClosed",
    "ClientStopped",
    "ForbiddenError",
    "HandshakeRejected",
    "InternalServerError",
    "NotSubscribedError",
    "RateLimitedError",
    "ReplayClientError",
    "ServerClosed",
    "ServerError",
    "TooManySubscriptionsError",
    "UnavailableError",
]


class ReplayClientError(ReplayError):
    """Root of the errors the client raises."""


class ClientClosed(ReplayClientError, RuntimeError):
    """The client was used before ``async with`` entered it, or after it was closed."""


class ClientStopped(ReplayClientError):
    """The client stopped for good: the server said retrying cannot help.

    Raised by the iterator (after the items received before it) and by every
    later call. Subclasses say why.
    """


class HandshakeRejected(ClientStopped):
    """The server refused the WebSocket handshake with an HTTP 4xx status (403: origin or ``identify``).

    ``status`` is the HTTP status code. 408 and 429 are retried instead, like 5xx.
    """

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(f"handshake rejected with HTTP {status}" + (f": {message}" if message else ""))
        self.status = status


class ServerClosed(ClientStopped):
    """The server closed the connection with a code that means "do not reconnect".

    ``code`` is 1000 (normal close sent by the server), 1008 (policy: bad frames,
    frame rate, identity revoked) or 1009 (a client frame was too large);
    ``reason`` is the close reason the server gave.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"server closed the connection with {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class ServerError(ReplayClientError):
    """An ``error`` frame from the server. Subclasses exist for each code of the protocol.

    ``code`` is the protocol's error code (a string, so that codes added later
    still come through), ``message`` the server's text, ``topic`` the topic the
    refused frame named (when the server said), ``ref`` the refused frame's ref.
    """

    code: str = "unknown"

    def __init__(self, message: str, *, code: str | None = None, topic: str | None = None, ref: Any = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.topic = topic
        self.ref = ref

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, topic={self.topic!r}, message={self.message!r})"

    def __str__(self) -> str:
        where = f" (topic {self.topic!r})" if self.topic is not None else ""
        return f"{self.code}{where}: {self.message}"

    @staticmethod
    def from_frame(code: str, message: str, topic: str | None, ref: Any) -> ServerError:
        """The exception for an ``error`` frame: the subclass of ``code``, else :class:`ServerError`."""
        cls = _ERRORS_BY_CODE.get(code, ServerError)
        return cls(message, code=code, topic=topic, ref=ref)


class BadRequestError(ServerError):
    """``bad_request``: the server could not accept a frame the client sent."""

    code = ErrorCode.BAD_REQUEST.value


class ForbiddenError(ServerError):
    """``forbidden``: the server's ``authorize`` hook refused the topic. Not retried."""

    code = ErrorCode.FORBIDDEN.value


class TooManySubscriptionsError(ServerError):
    """``too_many_subscriptions``: the connection holds the server's maximum of topics. Not retried."""

    code = ErrorCode.TOO_MANY_SUBSCRIPTIONS.value


class NotSubscribedError(ServerError):
    """``not_subscribed``: an ack or unsubscribe named a topic the connection did not hold."""

    code = ErrorCode.NOT_SUBSCRIBED.value


class RateLimitedError(ServerError):
    """``rate_limited``: the server dropped a frame; the client sends it again later."""

    code = ErrorCode.RATE_LIMITED.value


class UnavailableError(ServerError):
    """``unavailable``: the server's store cannot be reached; a subscribe is retried with backoff."""

    code = ErrorCode.UNAVAILABLE.value


class InternalServerError(ServerError):
    """``internal``: the server failed on the frame (e.g. its ``authorize`` hook raised); retried."""

    code = ErrorCode.INTERNAL.value


_ERRORS_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        ForbiddenError,
        TooManySubscriptionsError,
        NotSubscribedError,
        RateLimitedError,
        UnavailableError,
        InternalServerError,
    )
}
