"""Whether this host's kernel can do what libvirt's interface ``<bandwidth>`` asks of it.

libvirt applies an interface's inbound limit as an htb class on the tap with an sfq qdisc
under it, and its outbound limit as a police action on the tap's ingress qdisc (it runs
``tc``). A kernel without these (``sch_htb``, ``sch_sfq``, ``sch_ingress``, ``cls_u32`` and
``act_police``, built in or loadable) fails every guest with such limits at start
("Specified qdisc kind is unknown"); this machine's kernel has no sfq and no tc actions at
all. The agent probes once at start, with libvirt's own commands on a veth pair in a
throwaway network namespace (``unshare --net``: nothing is left behind), and refuses the
flavors it could not honour instead of making guests that fail.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Final

# The tc commands libvirt runs for an inbound and an outbound average (virnetdevbandwidth.c),
# on a veth pair standing in for a tap.
_PROBE: Final = """set -e
ip link add fcprobe0 type veth peer name fcprobe1
tc qdisc add dev fcprobe0 root handle 1: htb default 1
tc class add dev fcprobe0 parent 1: classid 1:1 htb rate 1mbit
tc qdisc add dev fcprobe0 parent 1:1 handle 2: sfq perturb 10
tc qdisc add dev fcprobe0 ingress
tc filter add dev fcprobe0 parent ffff: protocol all u32 match u32 0 0 police rate 1mbit burst 64kb mtu 64kb \
drop flowid :1
"""
_TIMEOUT_S: Final = 10.0


async def bandwidth_problem() -> str | None:
    """None when the kernel takes libvirt's interface bandwidth commands; else why not (the
    failed command's complaint, or why the probe could not run)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "unshare", "--net", "sh", "-c", _PROBE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
    except OSError as exc:
        return f"cannot probe the kernel's traffic control: {exc}"
    try:
        _out, err = await asyncio.wait_for(proc.communicate(), _TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return "the kernel's traffic control probe did not finish"
    if proc.returncode == 0:
        return None
    lines = err.decode(errors="replace").strip().splitlines()
    # set -e: the failed command's complaint is the last thing said.
    return f"the kernel refuses libvirt's tc commands: {lines[-1] if lines else f'exit status {proc.returncode}'}"
