#!/usr/bin/env bash
# Create the benchmark's extra virtualenvs under bench/.venvs/ (gitignored):
#   broadcaster: encode/broadcaster 0.3.1 with redis-py < 8 (0.3.1 delivers nothing with redis-py 8)
#   socketio:    python-socketio + AsyncRedisManager
#   plot:        matplotlib, for bench/report.py (not a library dependency)
# Each server venv gets the same server stack as the library's: uvicorn[standard]
# (uvloop, httptools, websockets) and the same Starlette.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
STARLETTE=$(../.venv/bin/python -c 'import starlette; print(starlette.__version__)')
UVICORN=$(../.venv/bin/python -c 'import uvicorn; print(uvicorn.__version__)')
mkvenv() {
    local name=$1; shift
    if [ ! -x ".venvs/$name/bin/python" ]; then
        "$PYTHON" -m venv ".venvs/$name"
    fi
    ".venvs/$name/bin/python" -m pip install -q --disable-pip-version-check "$@"
}
mkvenv broadcaster "broadcaster[redis]==0.3.1" "redis<8" "starlette==$STARLETTE" "uvicorn[standard]==$UVICORN"
mkvenv socketio "python-socketio" "redis" "starlette==$STARLETTE" "uvicorn[standard]==$UVICORN"
mkvenv plot matplotlib
echo "bench venvs ready:"; ls .venvs
