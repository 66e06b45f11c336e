#!/usr/bin/env bash
# OpenStack Glance (the Image service, ~120 packages) for the image tests, in its cached venv.
# Usage: scripts/glance-venv.sh [VENV]   (default .cache/glance-venv); prints the venv path.
exec "$(dirname "${BASH_SOURCE[0]}")/service-venv.sh" glance "${GLANCE_SPEC:-glance>=33,<34}" \
    "${1:-${GLANCE_VENV:-}}"
