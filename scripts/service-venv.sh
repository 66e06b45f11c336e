#!/usr/bin/env bash
# Install an OpenStack service and gunicorn into a cached venv of its own, for the tests that
# talk to the real service. Each service gets its own venv so that its pins never touch the
# agent's; the venv is kept between runs (.cache/ is git-ignored), and everything is
# byte-compiled at install (PYTHONDONTWRITEBYTECODE is set on these machines, and imports
# without compiled files were 5x slower). uv installs it about 10x faster than pip.
#
# Usage: scripts/service-venv.sh NAME SPEC [VENV]   (default .cache/NAME-venv); prints the venv path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="$1"
SPEC="$2"
VENV="${3:-}"
VENV="${VENV:-$ROOT/.cache/$NAME-venv}"
STAMP="$VENV/.fastcompute-installed"
UV_HOME="$ROOT/.cache/uv-tool"

mkdir -p "$(dirname "$VENV")"
# Several test sessions may ask at once: one installs, the others wait for it.
exec 9>"$VENV.lock"
flock 9

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$SPEC" && -x "$VENV/bin/gunicorn" ]]; then
    echo "$VENV"
    exit 0
fi

# The interpreter the agent runs on (SERVICE_PYTHON overrides it).
PYTHON="${SERVICE_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"

UV="$(command -v uv || true)"
if [[ -z "$UV" ]]; then
    if [[ ! -x "$UV_HOME/bin/uv" ]]; then
        rm -rf "$UV_HOME"
        "$PYTHON" -m venv "$UV_HOME" >&2
        "$UV_HOME/bin/pip" install --quiet --disable-pip-version-check uv >&2 || true
    fi
    [[ -x "$UV_HOME/bin/uv" ]] && UV="$UV_HOME/bin/uv"
fi

rm -rf "$VENV"
if [[ -n "$UV" ]]; then
    "$UV" venv --quiet --python "$PYTHON" "$VENV" >&2
    "$UV" pip install --quiet --python "$VENV/bin/python" --compile-bytecode \
        "$SPEC" gunicorn >&2
else
    # Without uv (it could not be installed): pip, then compile explicitly.
    "$PYTHON" -m venv "$VENV" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$SPEC" gunicorn >&2
    "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" >&2 || true
fi
echo "$SPEC" > "$STAMP"
echo "$VENV"
