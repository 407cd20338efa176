"""Runs the browser client's unit tests (``tests/js/*.test.mjs``) with Node's built-in runner."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

JS_TESTS = Path(__file__).parent / "js"


def test_replay_js_unit_tests() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: `make system` (or apt-get install nodejs) installs it")
    files = sorted(str(p) for p in JS_TESTS.glob("*.test.mjs"))
    assert files, "no JS test files found"
    result = subprocess.run(
        [node, "--test", "--test-reporter=tap", *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-8000:]
    # Guard against a runner that found nothing and still exited 0.
    assert "# fail 0" in report, report[-4000:]
    passed = [line for line in report.splitlines() if line.startswith("# pass ")]
    assert passed and int(passed[-1].split()[-1]) >= 40, report[-4000:]


def test_client_speaks_the_servers_subprotocol() -> None:
    from starlette_replay.protocol import SUBPROTOCOL

    source = (Path(__file__).parents[1] / "starlette_replay" / "static" / "replay.js").read_text()
    assert f'export const PROTOCOL = "{SUBPROTOCOL}";' in source
    declarations = (Path(__file__).parents[1] / "starlette_replay" / "static" / "replay.d.ts").read_text()
    assert f'export declare const PROTOCOL: "{SUBPROTOCOL}";' in declarations


def test_declarations_cover_every_export() -> None:
    static = Path(__file__).parents[1] / "starlette_replay" / "static"
    exported = set(re.findall(r"^export (?:const|function|class) (\w+)", (static / "replay.js").read_text(), re.M))
    declared = set(
        re.findall(r"^export declare (?:const|function|class) (\w+)", (static / "replay.d.ts").read_text(), re.M)
    )
    assert exported == declared == {"PROTOCOL", "VERSION", "STOP_CODES", "resolveUrl", "Subscription", "ReplayClient"}
