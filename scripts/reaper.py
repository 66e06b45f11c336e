#!/usr/bin/python3
"""reaper.py COMMAND [ARG...]: run COMMAND with this process as the subreaper of what it starts.

A process whose parent has gone is adopted by the nearest ancestor marked a child subreaper,
else by PID 1, and stays a zombie until that one reaps it. This machine's PID 1 (a VM agent,
not an init) reaps only every second or two, and a zombie still answers kill(pid, 0), which is
how libvirtd waits for a QEMU it killed to be gone: each guest that stops or leaves its host
kept libvirtd waiting that long (most of a live migration's time here). libvirtd daemonizes
and so do its QEMUs, so they are orphans; started under this process they are adopted by it and
reaped at once. It exits with COMMAND's status once nothing it adopted is left.
"""

import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"reaper.py: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    child = os.fork()
    if child == 0:
        try:
            os.execvp(sys.argv[1], sys.argv[1:])
        finally:
            os._exit(127)
    status = 0
    while True:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            return status
        if pid == child:
            status = os.waitstatus_to_exitcode(raw)


if __name__ == "__main__":
    sys.exit(main())
