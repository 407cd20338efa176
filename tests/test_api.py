"""The public surface promised by api.md (../shared/api.md when reachable) exists.

The names are also listed here, so the test runs where shared/ is absent; when
the file is reachable, the names parsed from it must be in the list too, so the
list cannot fall behind the contract.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import starlette_replay
from starlette_replay import Event, MemoryStore, RedisStore, Replay

API_MD = Path(__file__).resolve().parent.parent.parent / "shared" / "api.md"

TOP_LEVEL = {"Replay", "Publisher", "Event", "MemoryStore", "RedisStore", "allow_all"}
# named in api.md's prose
ERRORS = {"Refused", "ReplayError", "InvalidTopic", "InvalidEvent"}
REPLAY_OPTIONS = {
    "store",
    "authorize",
    "identify",
    "allowed_origins",
    "send_queue_size",
    "max_message_size",
    "max_subscriptions",
    "heartbeat_interval",
    "max_event_size",
}
REPLAY_ATTRIBUTES = {
    "lifespan",
    "route",
    "endpoint",
    "publisher",
    "publish",
    "publish_many",
    "publish_sync",
    "history",
    "stats",
    "client_route",
    "__aenter__",
    "__aexit__",
}
EVENT_FIELDS = {"topic", "offset", "epoch", "event", "data", "time"}
MEMORY_STORE_OPTIONS = {"history_size", "history_ttl", "max_topics"}
REDIS_STORE_OPTIONS = {"history_size", "history_ttl", "prefix", "publish_timeout"}
PUBLISHER_METHODS = {"publish", "publish_many", "publish_sync"}

# Names we export beyond api.md's import line.
OUR_ADDITIONS = {
    "CloseCode",
    "Cursor",
    "ErrorCode",
    "EventStore",
    "Health",  # what Replay.health() returns (issue 17)
    "NotRunning",
    "Position",
    "Snapshot",
    "StoreError",
    "StoreUnavailable",
}


def _code_block(text: str) -> str:
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match is not None, "api.md has no python code block"
    return match.group(1)


def _kwargs_of(call: str) -> set[str]:
    return set(re.findall(r"(?:^|[(,\s])(\w+)=", call, re.M))


# api.md's "Additions" block names what later issues build: each name there is
# either built (it exists) or listed here with the issue that builds it. A test
# below checks that what is listed is really still missing, so the list shrinks
# as the work lands.
PENDING_ADDITIONS: dict[str, str] = {}


def _contract_text() -> tuple[str, str]:
    """api.md split into the contract as built and its "Additions" block."""
    text = API_MD.read_text(encoding="utf-8")
    base, _, additions = text.partition("## Additions")
    return base, additions


def parsed_additions() -> set[str]:
    _, additions = _contract_text()
    return set(re.findall(r"(?<![/\w])replay\.(\w+)", additions)) | set(
        re.findall(r"from starlette_replay\.(\w+) import", additions)
    )


def parsed_api() -> dict[str, set[str]]:
    text, _ = _contract_text()
    code = _code_block(text)
    imports = re.search(r"from starlette_replay import ([^\n]+)", code)
    assert imports is not None
    replay_call = re.search(r"Replay\(\n(.*?)\n\)", code, re.S)
    assert replay_call is not None
    memory = re.search(r"MemoryStore\((\w[^)]*)\)", code)
    redis = re.search(r"RedisStore\.from_url\((\"[^)]*)\)", code)
    assert memory is not None and redis is not None
    return {
        "top": {name.strip() for name in imports.group(1).split(",")},
        "errors": set(re.findall(r"starlette_replay\.(\w+)", text)) | set(re.findall(r"`(Invalid\w+)`", text)),
        "replay_options": _kwargs_of(replay_call.group(1)) | set(re.findall(r"`(max_\w+)` \(a Replay option", text)),
        "replay_attributes": set(re.findall(r"(?<![/\w])replay\.(\w+)", code)),
        "event_fields": set(re.findall(r"\bevent\.(\w+)", code)),
        "memory_options": _kwargs_of(memory.group(1)),
        "redis_options": _kwargs_of(redis.group(1)) | set(re.findall(r"RedisStore also takes (\w+)", text)),
        "publisher_methods": set(re.findall(r"\bpublisher\.(\w+)", code)),
    }


@pytest.mark.skipif(
    not API_MD.exists(),
    reason="the contract file ../shared/api.md is not beside this checkout (it is in the team's workspace and in CI)",
)
def test_the_explicit_lists_cover_api_md() -> None:
    api = parsed_api()
    assert api["top"] <= TOP_LEVEL
    assert api["errors"] <= ERRORS
    assert api["replay_options"] <= REPLAY_OPTIONS
    assert api["replay_attributes"] <= REPLAY_ATTRIBUTES
    assert api["event_fields"] <= EVENT_FIELDS
    assert api["memory_options"] <= MEMORY_STORE_OPTIONS
    assert api["redis_options"] <= REDIS_STORE_OPTIONS
    assert api["publisher_methods"] <= PUBLISHER_METHODS
    # and the parse found something in each category (a parse that finds nothing proves nothing)
    assert all(api.values()), api


@pytest.mark.skipif(
    not API_MD.exists(),
    reason="the contract file ../shared/api.md is not beside this checkout (it is in the team's workspace and in CI)",
)
def test_every_addition_is_built_or_pending_with_its_issue() -> None:
    additions = parsed_additions()
    assert additions, "the Additions block of api.md parsed to nothing"
    for name in additions - set(PENDING_ADDITIONS):
        assert hasattr(Replay, name) or importlib.util.find_spec(f"starlette_replay.{name}") is not None, name


def test_pending_additions_are_really_still_missing() -> None:
    for name in PENDING_ADDITIONS:
        built = hasattr(Replay, name) or importlib.util.find_spec(f"starlette_replay.{name}") is not None
        assert not built, f"{name} is built now: drop it from PENDING_ADDITIONS ({PENDING_ADDITIONS[name]})"


def test_top_level_names() -> None:
    for name in TOP_LEVEL | ERRORS:
        assert hasattr(starlette_replay, name), name


def test_all_is_the_documented_set_plus_our_additions() -> None:
    assert set(starlette_replay.__all__) == TOP_LEVEL | ERRORS | OUR_ADDITIONS
    assert len(starlette_replay.__all__) == len(set(starlette_replay.__all__))


def test_replay_options_and_attributes() -> None:
    parameters = inspect.signature(Replay).parameters
    for name in REPLAY_OPTIONS:
        assert name in parameters, name
    assert parameters["store"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for name in REPLAY_OPTIONS - {"store"}:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    replay = Replay()
    for name in REPLAY_ATTRIBUTES:
        assert callable(getattr(replay, name)), name
    assert parameters["send_queue_size"].default == 1024
    assert parameters["max_message_size"].default == 65536
    assert parameters["max_subscriptions"].default == 100
    assert parameters["heartbeat_interval"].default == 25.0
    assert parameters["max_event_size"].default == 1024 * 1024


def test_event_fields() -> None:
    event = Event("t", "e", 1, "x", '{"a":1}', 5)
    for name in EVENT_FIELDS:
        assert hasattr(event, name), name
    assert event.data == {"a": 1}


def test_store_options() -> None:
    memory = inspect.signature(MemoryStore).parameters
    assert MEMORY_STORE_OPTIONS <= set(memory)
    assert (memory["history_size"].default, memory["history_ttl"].default, memory["max_topics"].default) == (
        10_000,
        None,
        100_000,
    )


def test_redis_store_options() -> None:
    # named parameters, not just **kwargs: a typo in an option must be an error
    redis = inspect.signature(RedisStore.from_url).parameters
    assert REDIS_STORE_OPTIONS <= set(redis), set(redis)


def test_publisher_methods() -> None:
    publisher = Replay().publisher()
    assert isinstance(publisher, starlette_replay.Publisher)
    for name in PUBLISHER_METHODS:
        assert callable(getattr(publisher, name)), name


def test_errors_hierarchy() -> None:
    from starlette_replay import InvalidEvent, InvalidTopic, Refused, ReplayError

    assert issubclass(InvalidTopic, ReplayError) and issubclass(InvalidTopic, ValueError)
    assert issubclass(InvalidEvent, ReplayError) and issubclass(InvalidEvent, ValueError)
    assert issubclass(Refused, ReplayError)


def _modules() -> list[str]:
    names = ["starlette_replay"]
    for info in pkgutil.walk_packages(starlette_replay.__path__, "starlette_replay."):
        names.append(info.name)
    return names


@pytest.mark.parametrize("module_name", _modules())
def test_every_module_all_names_exist(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    if module_name.rsplit(".", 1)[-1].startswith("_"):
        return
    assert exported is not None, f"{module_name} has no __all__"
    for name in exported:
        assert hasattr(module, name), f"{module_name}.__all__ names {name!r}, which does not exist"
