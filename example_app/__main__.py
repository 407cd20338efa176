"""``python -m example_app [--port N] [--agent-delay S] [--token-rate N]``: serve the demo with uvicorn on 127.0.0.1."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from .app import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m example_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--agent-delay",
        type=float,
        default=float(os.environ.get("AGENT_DELAY", "3.0")),
        help="seconds before the agent's answer is published (default 3, or AGENT_DELAY)",
    )
    parser.add_argument(
        "--token-rate",
        type=float,
        default=float(os.environ.get("TOKEN_RATE", "30")),
        help="tokens per second the agent streams its answer at (default 30, or TOKEN_RATE)",
    )
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=float(os.environ.get("HEARTBEAT", "25")),
        help="seconds of silence before the server pings; the page treats twice that as a dead socket",
    )
    parser.add_argument("--fd", type=int, default=None, help="serve on this already-bound socket (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(agent_delay=args.agent_delay, heartbeat_interval=args.heartbeat, token_rate=args.token_rate)
    if args.fd is not None:
        uvicorn.run(app, fd=args.fd, log_level="info")
    else:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
