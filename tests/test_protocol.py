"""The pure wire protocol: client frame parsing, server frame encoding."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from starlette_replay.events import Event
from starlette_replay.protocol import (
    MAX_OFFSET,
    Ack,
    ErrorCode,
    ErrorFrame,
    EventFrame,
    FrameError,
    Ping,
    Pong,
    ServerPing,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    encode_client_frame,
    encode_error,
    encode_event,
    encode_ping,
    encode_pong,
    encode_subscribed,
    encode_unsubscribed,
    parse_client_frame,
    parse_server_frame,
)


def parse(obj: Any) -> Any:
    return parse_client_frame(json.dumps(obj))


def refused(obj: Any) -> FrameError:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    with pytest.raises(FrameError) as info:
        parse_client_frame(text)
    assert info.value.code is ErrorCode.BAD_REQUEST
    return info.value


# --- valid frames ---------------------------------------------------------------------


def test_subscribe_variants() -> None:
    assert parse({"type": "subscribe", "topic": "user:42"}) == Subscribe("user:42")
    assert parse({"type": "subscribe", "topic": "a", "epoch": "e1", "offset": 0}) == Subscribe("a", "e1", 0)
    assert parse({"type": "subscribe", "topic": "a", "rewind": 5, "ref": "r"}) == Subscribe("a", rewind=5, ref="r")
    assert parse({"type": "subscribe", "topic": "a", "epoch": "e", "offset": MAX_OFFSET, "ref": 7}) == Subscribe(
        "a", "e", MAX_OFFSET, 0, 7
    )
    # every character of the alphabet, at the maximum length
    topic = ("Az09_-.:@/" * 26)[:256]
    assert parse({"type": "subscribe", "topic": topic}).topic == topic


def test_time_with_a_cursor() -> None:
    # "Reused offsets": the time of the event at the cursor, on a resume and on an ack
    frame = parse({"type": "subscribe", "topic": "a", "epoch": "e", "offset": 4, "time": 1_700_000_000_004})
    assert frame == Subscribe("a", "e", 4, time=1_700_000_000_004)
    assert parse({"type": "ack", "topic": "a", "epoch": "e", "offset": 4, "time": 17}) == Ack("a", "e", 4, time=17)
    for frame in (Subscribe("a", "e", 4, time=9), Ack("a", "e", 4, "r", 9)):
        assert parse_client_frame(encode_client_frame(frame)) == frame
    error = refused({"type": "subscribe", "topic": "a", "time": 5, "ref": 1})
    assert "time" in error.message and "epoch" in error.message and error.ref == 1
    for bad in (-1, 1.5, "5", True, None, MAX_OFFSET + 1):
        for kind in ("subscribe", "ack"):
            error = refused({"type": kind, "topic": "a", "epoch": "e", "offset": 1, "time": bad, "ref": 2})
            assert "'time'" in error.message, (kind, bad, error)


def test_unsubscribe_ack_ping() -> None:
    assert parse({"type": "unsubscribe", "topic": "t", "ref": 1}) == Unsubscribe("t", 1)
    assert parse({"type": "ack", "topic": "t", "epoch": "e", "offset": 3}) == Ack("t", "e", 3)
    assert parse({"type": "ping"}) == Ping()
    assert parse({"type": "ping", "ref": "x"}) == Ping("x")


def test_unknown_fields_are_ignored() -> None:
    assert parse({"type": "ping", "extra": [1, 2]}) == Ping()


# --- malformed frames -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "not json", "{", "[]", "1", '"subscribe"', "null", "true", '{"type": "ping"} x'],
)
def test_not_an_object(text: str) -> None:
    error = refused(text)
    assert error.ref is None


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_refused(constant: str) -> None:
    refused(f'{{"type": "subscribe", "topic": "t", "epoch": "e", "offset": {constant}}}')


def test_deep_nesting_refused_cleanly() -> None:
    deep = '{"type": "ping", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    refused(deep)


def test_missing_and_bad_type() -> None:
    assert "type" in refused({"topic": "t", "ref": "r"}).message
    assert refused({"topic": "t", "ref": "r"}).ref == "r"
    error = refused({"type": "frobnicate", "ref": 3})
    assert "frobnicate" in error.message and error.ref == 3
    assert "type" in refused({"type": 5}).message
    assert "type" in refused({"type": None}).message


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "ack"])
def test_topic_required_and_checked(kind: str) -> None:
    extra = {"epoch": "e", "offset": 1} if kind == "ack" else {}
    assert "topic" in refused({"type": kind, "ref": "r", **extra}).message
    for bad in [5, None, ["t"], "", "a b", "caf\u00e9", "t\n", "x" * 257, 'q"uote', "back\\slash"]:
        error = refused({"type": kind, "topic": bad, "ref": "r", **extra})
        assert "topic" in error.message, (bad, error)
        assert error.ref == "r"


def test_epoch_without_offset_and_offset_without_epoch() -> None:
    error = refused({"type": "subscribe", "topic": "t", "epoch": "e", "ref": 1})
    assert "epoch" in error.message and "offset" in error.message
    assert (error.ref, error.topic) == (1, "t")
    error = refused({"type": "subscribe", "topic": "t", "offset": 3})
    assert "epoch" in error.message


BAD_INTS: list[Any] = ["1", 1.0, 1.5, -1, 2**53, 2**64, 10**400, True, False, None, [1], {"a": 1}]


@pytest.mark.parametrize("value", BAD_INTS, ids=repr)
def test_bad_offsets(value: Any) -> None:
    error = refused({"type": "subscribe", "topic": "t", "epoch": "e", "offset": value, "ref": "r"})
    assert "offset" in error.message and error.ref == "r" and error.topic == "t"
    error = refused({"type": "ack", "topic": "t", "epoch": "e", "offset": value})
    assert "offset" in error.message


@pytest.mark.parametrize("value", BAD_INTS, ids=repr)
def test_bad_rewind(value: Any) -> None:
    assert "rewind" in refused({"type": "subscribe", "topic": "t", "rewind": value}).message


def test_huge_integer_literal() -> None:
    # Python refuses to parse ints past 4300 digits: still a FrameError, not a ValueError leak.
    refused('{"type": "subscribe", "topic": "t", "epoch": "e", "offset": ' + "9" * 5000 + "}")
    refused('{"type": "subscribe", "topic": "t", "epoch": "e", "offset": 1e400}')


@pytest.mark.parametrize("epoch", ["", 5, None, True, ["e"], "x" * 129])
def test_bad_epoch(epoch: Any) -> None:
    assert "epoch" in refused({"type": "subscribe", "topic": "t", "epoch": epoch, "offset": 1}).message
    assert "epoch" in refused({"type": "ack", "topic": "t", "epoch": epoch, "offset": 1}).message


def test_ack_needs_epoch_and_offset() -> None:
    assert "epoch" in refused({"type": "ack", "topic": "t", "offset": 1}).message
    assert "offset" in refused({"type": "ack", "topic": "t", "epoch": "e"}).message


@pytest.mark.parametrize("ref", [True, False, 1.5, None, [1], {"r": 1}, "x" * 65, 10**65])
def test_bad_refs(ref: Any) -> None:
    error = refused({"type": "ping", "ref": ref})
    assert "ref" in error.message
    assert error.ref is None  # an unreadable ref is not echoed


def test_ref_limits_and_unicode() -> None:
    assert parse({"type": "ping", "ref": "x" * 64}) == Ping("x" * 64)
    assert parse({"type": "ping", "ref": 10**63}) == Ping(10**63)
    assert parse({"type": "ping", "ref": "\u00e9\U0001f600"}) == Ping("\u00e9\U0001f600")
    assert parse({"type": "ping", "ref": -1}) == Ping(-1)


def test_error_frame_encodes_ref_and_topic() -> None:
    error = refused({"type": "subscribe", "topic": "t", "offset": 1, "ref": "abc"})
    frame = parse_server_frame(error.encode())
    assert frame == ErrorFrame("bad_request", error.message, "t", "abc")
    frame = parse_server_frame(refused("nope").encode())
    assert isinstance(frame, ErrorFrame) and frame.ref is None and frame.topic is None
    assert "ref" not in json.loads(refused("nope").encode())


# --- property tests -----------------------------------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_parses_or_raises_frame_error(text: str) -> None:
    try:
        parse_client_frame(text)
    except FrameError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
        json.loads(exc.encode())


frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "ack", "ping", "other"])},
    optional={
        "topic": json_values | st.from_regex(r"[A-Za-z0-9_\-.:@/]{1,20}", fullmatch=True),
        "epoch": json_values,
        "offset": json_values | st.integers(min_value=-2, max_value=2**54),
        "rewind": json_values,
        "time": json_values | st.integers(min_value=-2, max_value=2**54),
        "ref": json_values,
    },
)


@settings(max_examples=500, deadline=None)
@given(frame_like)
def test_any_frame_object_parses_or_raises_frame_error(obj: dict[str, Any]) -> None:
    try:
        text = json.dumps(obj)
    except ValueError:
        return
    try:
        frame = parse_client_frame(text)
    except FrameError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
        return
    # What parses re-encodes to an equivalent frame.
    assert parse_client_frame(encode_client_frame(frame)) == frame


# --- server frames ----------------------------------------------------------------------


def make_event(offset: int = 1, raw: str = '{"a":[1,"\u00e9"]}') -> Event:
    return Event("user:42", "ep", offset, "task.update", raw, 1_700_000_000_000)


def test_server_frames_round_trip() -> None:
    assert parse_server_frame(
        encode_subscribed("t", "ep", 9, resumed=True, recovered=False, replayed=4, ref="r")
    ) == Subscribed("t", "ep", 9, True, False, 4, "r")
    sub = json.loads(encode_subscribed("t", "ep", 0, resumed=False, recovered=False, replayed=0))
    assert "ref" not in sub
    assert parse_server_frame(encode_unsubscribed("t", 5)) == Unsubscribed("t", 5)
    assert parse_server_frame(encode_pong("p")) == Pong("p")
    assert json.loads(encode_pong()) == {"type": "pong"}
    assert parse_server_frame(encode_ping()) == ServerPing()
    assert parse_server_frame(encode_error(ErrorCode.FORBIDDEN, "no", topic="t", ref=1)) == ErrorFrame(
        "forbidden", "no", "t", 1
    )
    assert parse_server_frame(encode_event(make_event())) == EventFrame(
        "user:42", 1, "task.update", {"a": [1, "\u00e9"]}, 1_700_000_000_000
    )


def test_event_frame_encoded_once() -> None:
    event = make_event()
    first = encode_event(event)
    assert encode_event(event) is first
    assert json.loads(first) == {
        "type": "event",
        "topic": "user:42",
        "offset": 1,
        "event": "task.update",
        "data": {"a": [1, "\u00e9"]},
        "time": 1_700_000_000_000,
    }


@pytest.mark.parametrize("text", ["[]", '{"type": "event"}', '{"type": "nope"}', '{"type": "subscribed"}'])
def test_parse_server_frame_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_server_frame(text)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_event_frame_round_trips_any_payload(data: Any) -> None:
    try:
        raw = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        return
    frame = parse_server_frame(encode_event(make_event(raw=raw)))
    assert isinstance(frame, EventFrame)
    assert frame.data == json.loads(raw)


# --- what the server echoes must be sendable as UTF-8 -------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        r'{"type": "ping", "ref": "\ud800"}',
        r'{"type": "ping", "ref": "ok\udfff"}',
        r'{"type": "subscribe", "topic": "t", "epoch": "\ud800", "offset": 1, "ref": "r"}',
        r'{"type": "ack", "topic": "t", "epoch": "e\udc00", "offset": 1}',
    ],
)
def test_lone_surrogates_are_bad_requests(text: str) -> None:
    """A JSON escape can smuggle a lone surrogate in; echoing it would make a frame no socket can send."""
    with pytest.raises(FrameError) as info:
        parse_client_frame(text)
    assert info.value.code is ErrorCode.BAD_REQUEST
    info.value.encode().encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, categories=["Cs", "Ll", "Nd"]), max_size=8))
def test_replies_are_always_utf8(ref: str) -> None:
    text = json.dumps({"type": "ping", "ref": ref})
    try:
        frame = parse_client_frame(text)
    except FrameError as exc:
        exc.encode().encode("utf-8")
    else:
        encode_pong(frame.ref).encode("utf-8")
