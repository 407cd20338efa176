"""The Python client's parts, one concept per module; ``starlette_replay.client`` is the public face.

- ``errors``: what the client raises;
- ``backoff``: the one backoff (exponential, full jitter) for reconnects and retried subscribes;
- ``cursors``: where processed cursors are kept across restarts;
- ``core``: the client's rules as a pure state machine (frames in, actions out; no I/O, no clock).
"""
