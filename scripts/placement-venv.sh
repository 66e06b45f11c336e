#!/usr/bin/env bash
# OpenStack Placement (needs Python >= 3.11) for the scheduler and Placement tests, in its
# cached venv.
# Usage: scripts/placement-venv.sh [VENV]   (default .cache/placement-venv); prints the venv path.
exec "$(dirname "${BASH_SOURCE[0]}")/service-venv.sh" placement \
    "${PLACEMENT_SPEC:-openstack-placement>=16,<17}" "${1:-${PLACEMENT_VENV:-}}"
