"""The Lua scripts the store runs, loaded from the ``.lua`` files beside this module.

Each script touches only the keys of one topic (one hash tag, so one cluster
slot). It is sent by its SHA1 (``EVALSHA``) and, where Redis does not know it
yet, by its body once.
"""

from __future__ import annotations

import hashlib
from importlib import resources

__all__ = ["APPEND", "SAVE_CURSOR", "STATE", "TOUCH", "Script"]


class Script:
    """A script's body and the SHA1 that ``EVALSHA`` names it by."""

    __slots__ = ("body", "name", "sha")

    def __init__(self, name: str) -> None:
        self.name = name
        self.body = resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.body.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:10]}...)"


APPEND = Script("append")
STATE = Script("state")
TOUCH = Script("touch")
SAVE_CURSOR = Script("save_cursor")
