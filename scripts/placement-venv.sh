#!/usr/bin/env bash
# Install OpenStack Placement and gunicorn into their own cached venv, for the scheduler and
# Placement tests. Placement gets a venv of its own so that its pins never touch the agent's;
# the venv is kept between runs (.cache/ is git-ignored), and everything is byte-compiled at
# install (PYTHONDONTWRITEBYTECODE is set on these machines, and imports without compiled
# files were 5x slower). uv installs it about 10x faster than pip.
#
# Usage: scripts/placement-venv.sh [VENV]   (default .cache/placement-venv); prints the venv path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${PLACEMENT_VENV:-$ROOT/.cache/placement-venv}}"
PLACEMENT_SPEC="${PLACEMENT_SPEC:-openstack-placement>=16,<17}"
STAMP="$VENV/.fastcompute-installed"
UV_HOME="$ROOT/.cache/uv-tool"

mkdir -p "$(dirname "$VENV")"
# Several test sessions may ask at once: one installs, the others wait for it.
exec 9>"$VENV.lock"
flock 9

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$PLACEMENT_SPEC" && -x "$VENV/bin/gunicorn" ]]; then
    echo "$VENV"
    exit 0
fi

# The interpreter the agent runs on (Placement 16 needs Python >= 3.11).
PYTHON="${PLACEMENT_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"

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
        "$PLACEMENT_SPEC" gunicorn >&2
else
    # Without uv (it could not be installed): pip, then compile explicitly.
    "$PYTHON" -m venv "$VENV" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$PLACEMENT_SPEC" gunicorn >&2
    "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" >&2 || true
fi
echo "$PLACEMENT_SPEC" > "$STAMP"
echo "$VENV"
