"""scripts/reaper.py, under which the test set-ups start libvirtd: the processes its command
leaves behind (as libvirtd leaves its QEMUs) are adopted by it and reaped by it, not by PID 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REAPER = Path(__file__).resolve().parent.parent / "scripts" / "reaper.py"

# Forks a grandchild that outlives its parent (as a daemon does), prints its pid and exits.
_ORPHAN = """
import os, sys, time
if os.fork() == 0:
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
    else:
        print(pid, flush=True)
    os._exit(0)
os.wait()
"""


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1]
    raise AssertionError(f"no {field} for {pid}")


def test_orphans_of_the_command_are_adopted_and_reaped_by_the_reaper() -> None:
    proc = subprocess.Popen([sys.executable, str(REAPER), sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        orphan = int(proc.stdout.readline())
        for _ in range(200):  # its parent exits just after printing
            if _status(orphan, "PPid") == str(proc.pid):
                break
            time.sleep(0.05)
        assert _status(orphan, "PPid") == str(proc.pid)  # adopted here, not by PID 1
        os.kill(orphan, signal.SIGTERM)
        # The reaper exits once it has reaped the last process it adopted, so its exit says
        # the orphan was reaped by it.
        assert proc.wait(timeout=30) == 0
        assert not Path(f"/proc/{orphan}").exists()
    finally:
        proc.kill()


def test_the_command_s_exit_status_is_the_reaper_s() -> None:
    assert subprocess.run([sys.executable, str(REAPER), "sh", "-c", "exit 7"], timeout=30).returncode == 7
    assert subprocess.run([sys.executable, str(REAPER), "/nonexistent"], timeout=30).returncode == 127
