"""Real QEMU guests (TCG) driven by the agent through ``qemu:///system``: the project's guest
image goes through the image cache and a qcow2 overlay like any image, boots BIOS -> syslinux ->
kernel, and prints its marker on the serial console that ``instance.console`` returns.

One guest through its whole life, a storm of 8, a kill -9 of the agent in a storm, a restart of
libvirtd under a running agent, and guests that stop behind the agent's back (seen through
events, and through the sync when events were missed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess, call_error, recv_events, sub_socket
from guest_fixtures import (
    LIBVIRTD_SCRIPT,
    MARKER,
    POWEROFF,
    READY,
    agent_domain_name,
    disk_read,
    domains_under,
    first_mib_md5,
    guest_image,
    libvirtd,
    managed_save_file,
    open_quietly,
    qemu_log,
    remove_domains_under,
    virsh,
    virsh_names,
)
from network_fixtures import (
    EGRESS_ALL,
    connect,
    group,
    links,
    mentions,
    namespace_on_bridge,
    ping,
    port,
    remove_owned,
    rule,
    rule_chains,
    sh,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["guest_image", "libvirtd"]

# TCG on 2 shared cores: one guest takes 3-7 s to its marker, a storm of 8 up to a minute or
# more when other work loads the host. Bounded so that a hang fails the run.
BOOT_TIMEOUT_S = 240.0
MEMORY_MB = 128
# Nova's rule: a guest that powered itself off is stopped. With the periodic sync 60 s away,
# seeing it before this deadline proves the lifecycle event carried it. (It takes well under a
# second here; the deadline leaves room for a loaded CI machine, since tests time nothing.)
EVENT_DEADLINE_S = 5.0


def agent_config(*, sync_s: float = 60.0, shutdown_timeout_s: float = 30.0) -> str:
    """The agent's config for real guests. A long sync period by default, so that what a test
    sees before the sync could run came through events; stats off, they are not under test here."""
    return (
        f"[agent]\nsync_power_state_interval_s = {sync_s}\n"
        f'[hypervisor]\ndomain_type = "qemu"\nshutdown_timeout_s = {shutdown_timeout_s}\n'
        "[stats]\ninterval_s = 0\n"
    )


@pytest.fixture
def conn(libvirtd: str) -> Iterator[Any]:
    """A connection of our own to the real hypervisor, to check what the agent did."""
    c = open_quietly(libvirtd)
    yield c
    with contextlib.suppress(libvirt.libvirtError):
        c.close()  # dead already if a test restarted libvirtd


@pytest.fixture
def guest_agent(make_agent: Any, libvirtd: str, guest_image: Path,
                tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Factory of agents on ``qemu:///system``. At the end, whatever happened: the agents are
    stopped, every domain under this test's directory is destroyed and undefined (managed save
    and QEMU log included), and the agents' state dirs (disks, consoles, image cache) removed."""
    agents: list[AgentProcess] = []

    def make(config: str | None = None) -> AgentProcess:
        a: AgentProcess = make_agent(config=config or agent_config(), hypervisor="qemu:///system")
        agents.append(a)
        return a

    yield make
    for a in agents:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
    # A connection of its own: the test's may have died with a libvirtd restart.
    c = libvirt.open(libvirtd)
    try:
        remove_domains_under(c, tmp_path)
    finally:
        c.close()
    for a in agents:
        shutil.rmtree(a.state_dir, ignore_errors=True)


def spawn_guest(agent: AgentProcess, image: Path, name: str, *, wait: bool = True) -> dict[str, Any]:
    """``instance.spawn`` of one guest of the project's image: 1 vCPU, 128 MiB, 1 GiB disk."""
    rec: dict[str, Any] = agent.call("instance.spawn", {
        "name": name, "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
        "image": {"url": image.as_uri()}, "wait": wait,
    })
    return rec


def console(agent: AgentProcess, uuid: str) -> bytes:
    """The whole serial console history, as ``instance.console`` returns it."""
    data: bytes = agent.call("instance.console", {"uuid": uuid, "tail_bytes": 1 << 20})["data"]
    return data


def wait_console(agent: AgentProcess, uuid: str, text: str, count: int = 1,
                 timeout_s: float = BOOT_TIMEOUT_S) -> bytes:
    """Poll ``instance.console`` until ``text`` is on it ``count`` times; the console then."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = console(agent, uuid)
        if data.count(text.encode()) >= count:
            return data
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} x{count} not on the console of {uuid} within {timeout_s}s; tail:\n"
                        f"{data[-1500:].decode(errors='replace')}\nagent log tail:\n{agent.log()[-3000:]}")
        time.sleep(0.2)


def markers(agent: AgentProcess, uuid: str) -> int:
    """How many times the guest has booted to its marker so far."""
    return console(agent, uuid).count(MARKER.encode())


def wait_record(agent: AgentProcess, uuid: str, vm_state: str, power_state: str,
                timeout_s: float) -> dict[str, Any]:
    """Poll ``instance.get`` until the instance is (vm_state, no task, power_state)."""
    deadline = time.monotonic() + timeout_s
    with agent.client() as c:
        while True:
            rec: dict[str, Any] = c.call("instance.get", {"uuid": uuid})
            if (rec["vm_state"], rec["task_state"], rec["power_state"]) == (vm_state, None, power_state):
                return rec
            if time.monotonic() > deadline:
                pytest.fail(f"{uuid} not {vm_state}/{power_state} within {timeout_s}s; last: "
                            f"{rec['vm_state']}/{rec['task_state']}/{rec['power_state']}\n{agent.log()[-3000:]}")
            time.sleep(0.02)


_LIBVIRT_STATE = {"running": "running", "paused": "paused", "shutdown": "shut off", "suspended": "shut off"}


def assert_state(agent: AgentProcess, conn: Any, uuid: str, vm_state: str, power_state: str,
                 rec: dict[str, Any] | None = None) -> None:
    """The agent's record (the reply given, and ``instance.get``) and libvirt agree on the state."""
    got = agent.call("instance.get", {"uuid": uuid})
    for r in ([rec] if rec is not None else []) + [got]:
        assert (r["vm_state"], r["task_state"], r["power_state"]) == (vm_state, None, power_state), r
    assert virsh("domstate", agent_domain_name(uuid)).strip() == _LIBVIRT_STATE[power_state]
    dom = conn.lookupByUUIDString(uuid)
    assert bool(dom.hasManagedSaveImage()) == (power_state == "suspended")
    assert managed_save_file(uuid).exists() == (power_state == "suspended")


def assert_nothing_left(agent: AgentProcess, conn: Any, uuids: list[str]) -> None:
    """No domain, disk, console, QEMU log, managed save or claim is left of these instances."""
    names = virsh_names()
    for uuid in uuids:
        assert agent_domain_name(uuid) not in names
        assert not (agent.state_dir / "instances" / uuid).exists()
        assert not qemu_log(agent_domain_name(uuid)).exists()
        assert not managed_save_file(uuid).exists()
        assert call_error(agent, "instance.get", {"uuid": uuid}).code == "NOT_FOUND"
    assert not domains_under(conn, agent.state_dir)
    info = agent.call("host.info")
    assert info["instances"] == 0
    assert info["usage"].get("MEMORY_MB", 0) == 0 and info["usage"].get("VCPU", 0) == 0


def delete_all(agent: AgentProcess, uuids: list[str]) -> None:
    """``instance.delete`` of every instance, all at once."""
    def delete(uuid: str) -> None:
        assert agent.call("instance.delete", {"uuid": uuid}) == {"uuid": uuid, "deleted": True}

    with ThreadPoolExecutor(max_workers=max(1, len(uuids))) as pool:
        list(pool.map(delete, uuids))


def spawn_storm(agent: AgentProcess, image: Path, n: int) -> list[dict[str, Any]]:
    """``n`` spawns at once (one client per thread, no waiting for the builds); their replies."""
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda i: spawn_guest(agent, image, f"storm-{i}", wait=False), range(n)))


def wait_stopped_by_libvirt(conn: Any, uuid: str, timeout_s: float = 60.0) -> None:
    """Wait until libvirt itself reports the domain shut off (our own connection, not the agent's)."""
    dom = conn.lookupByUUIDString(uuid)
    deadline = time.monotonic() + timeout_s
    while dom.isActive():
        if time.monotonic() > deadline:
            pytest.fail(f"domain of {uuid} still active after {timeout_s}s")
        time.sleep(0.01)


# -- 1. one guest through its whole life -------------------------------------------------------

def test_one_guest_through_its_whole_life(guest_agent: Callable[..., AgentProcess], conn: Any,
                                          guest_image: Path) -> None:
    agent = guest_agent()
    events = sub_socket(agent.events, ["instance."])
    rec = spawn_guest(agent, guest_image, "life")
    uuid = rec["uuid"]
    assert_state(agent, conn, uuid, "active", "running", rec)

    # The guest booted the image from the agent's overlay: it names itself by the instance's
    # uuid (SMBIOS) and read the image's first MiB from its virtio disk.
    wait_console(agent, uuid, READY)
    data = console(agent, uuid)
    assert f"{MARKER} uptime=".encode() in data and f"uuid={uuid}".encode() in data
    console_file = agent.state_dir / "instances" / uuid / "console.log"
    assert disk_read(console_file) == ("vda", 1 << 20, first_mib_md5(guest_image))
    assert (agent.state_dir / "instances" / uuid / "disk").exists()

    rec = agent.call("instance.pause", {"uuid": uuid})
    assert_state(agent, conn, uuid, "paused", "paused", rec)
    rec = agent.call("instance.unpause", {"uuid": uuid})
    assert_state(agent, conn, uuid, "active", "running", rec)

    # Soft reboot: ACPI, the guest shuts down, libvirt resets it in the same QEMU process.
    rec = agent.call("instance.reboot", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"]) == ("active", None)
    wait_console(agent, uuid, MARKER, count=2)
    assert console(agent, uuid).count(POWEROFF.encode()) == 1
    wait_record(agent, uuid, "active", "running", 10.0)
    assert_state(agent, conn, uuid, "active", "running")

    # Graceful stop: the guest saw the ACPI power button (it says so) and powered off.
    rec = agent.call("instance.stop", {"uuid": uuid})
    assert_state(agent, conn, uuid, "stopped", "shutdown", rec)
    assert console(agent, uuid).count(POWEROFF.encode()) == 2

    # Start: a new QEMU process boots the image again; the console keeps the history.
    rec = agent.call("instance.start", {"uuid": uuid})
    assert_state(agent, conn, uuid, "active", "running", rec)
    wait_console(agent, uuid, MARKER, count=3)

    rec = agent.call("instance.suspend", {"uuid": uuid})
    assert_state(agent, conn, uuid, "suspended", "suspended", rec)
    rec = agent.call("instance.resume", {"uuid": uuid})
    assert_state(agent, conn, uuid, "active", "running", rec)
    # Restored from memory, not booted again.
    assert markers(agent, uuid) == 3

    assert agent.call("instance.delete", {"uuid": uuid}) == {"uuid": uuid, "deleted": True}
    assert_nothing_left(agent, conn, [uuid])

    # The events told the same story, with no detour: the reboot (a shutdown and a reset in
    # the same QEMU process, as libvirt does it) never showed the instance as stopped.
    got = recv_events(events, 5.0, until=lambda _t, body: body["vm_state"] == "deleted")
    events.close()
    assert {t for t, _b in got} == {f"instance.{uuid}"}
    states = [b["vm_state"] for _t, b in got]
    story = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert story == ["building", "active", "paused", "active", "stopped", "active", "suspended", "active",
                     "deleted"]


# -- 2. a storm of 8 ---------------------------------------------------------------------------

def test_storm_of_eight_guests_all_boot_and_all_vanish(guest_agent: Callable[..., AgentProcess], conn: Any,
                                                       guest_image: Path) -> None:
    agent = guest_agent()
    recs = spawn_storm(agent, guest_image, 8)
    uuids = [r["uuid"] for r in recs]
    assert len(set(uuids)) == 8
    assert {r["vm_state"] for r in recs} == {"building"}

    for uuid in uuids:
        wait_console(agent, uuid, MARKER)
        # Each console is its own guest's: the guest prints the uuid it was given.
        assert f"uuid={uuid}".encode() in console(agent, uuid)
    for uuid in uuids:
        # Every guest is at its marker, so every create() returned seconds ago: only the
        # commit of the build can be in flight.
        wait_record(agent, uuid, "active", "running", 10.0)
        assert_state(agent, conn, uuid, "active", "running")
    assert set(domains_under(conn, agent.state_dir)) == set(uuids)
    assert agent.call("host.info")["usage"]["MEMORY_MB"] == 8 * MEMORY_MB

    delete_all(agent, uuids)
    assert_nothing_left(agent, conn, uuids)


# -- 3. kill -9 of the agent in a storm --------------------------------------------------------

def test_agent_killed_during_a_storm_finishes_or_rolls_back_every_claim(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path) -> None:
    # The default sync period: besides the restart, nothing here depends on it.
    agent = guest_agent(agent_config(sync_s=10.0))
    recs = spawn_storm(agent, guest_image, 4)
    claimed = [r["uuid"] for r in recs]
    # Every spawn was answered: its claim is durable. Kill the agent as soon as libvirt has the
    # first of the domains, while the others are still being built.
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while not domains_under(conn, agent.state_dir):
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.005)
    agent.kill()
    before = {u: agent_domain_name(u) in virsh_names() for u in claimed}

    agent.start()
    # After the restart every claimed instance is either running or cleanly rolled back.
    active: list[str] = []
    errored: list[str] = []
    for uuid in claimed:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while (rec := agent.call("instance.get", {"uuid": uuid}))["vm_state"] not in ("active", "error") \
                or rec["task_state"] is not None:
            assert time.monotonic() < deadline, (rec, agent.log()[-3000:])
            time.sleep(0.05)
        (active if rec["vm_state"] == "active" else errored).append(uuid)
    assert sorted(r["uuid"] for r in agent.call("instance.list")) == sorted(claimed)
    for uuid in active:
        assert_state(agent, conn, uuid, "active", "running")
        data = wait_console(agent, uuid, MARKER)
        assert f"uuid={uuid}".encode() in data
    for uuid in errored:
        rec = agent.call("instance.get", {"uuid": uuid})
        assert rec["power_state"] == "nostate" and rec["fault"] is not None
    # No domain, disk or claim leaked: exactly the running instances have one each.
    assert set(domains_under(conn, agent.state_dir)) == set(active)
    assert {p.name for p in (agent.state_dir / "instances").iterdir()} >= set(active)
    for uuid in errored:
        assert not (agent.state_dir / "instances" / uuid / "disk").exists()
    usage = agent.call("host.info")["usage"]
    assert usage["MEMORY_MB"] == MEMORY_MB * len(active) and usage["VCPU"] == len(active)
    assert any(before.values()), "the kill came before any domain existed"

    delete_all(agent, claimed)
    assert_nothing_left(agent, conn, claimed)


# -- 4. libvirtd restarted under a running agent -----------------------------------------------

def test_agent_reconnects_after_libvirtd_restarts(guest_agent: Callable[..., AgentProcess], conn: Any,
                                                  guest_image: Path, libvirtd: str) -> None:
    agent = guest_agent()
    uuid = spawn_guest(agent, guest_image, "reconnect")["uuid"]
    wait_console(agent, uuid, MARKER)

    subprocess.run(["bash", str(LIBVIRTD_SCRIPT), "restart-libvirtd"], check=True, capture_output=True,
                   timeout=120)
    new_conn = libvirt.open(libvirtd)
    try:
        # The guest ran on across the restart (QEMU outlives libvirtd), and the agent, on its
        # own, reconnected: ops work again with no restart of the agent.
        rec = agent.call("instance.pause", {"uuid": uuid})
        assert_state(agent, new_conn, uuid, "paused", "paused", rec)
        rec = agent.call("instance.unpause", {"uuid": uuid})
        assert_state(agent, new_conn, uuid, "active", "running", rec)
        assert markers(agent, uuid) == 1
        assert "reconnected" in agent.log()

        # It is subscribed to events again: a power-off from outside is seen within a second
        # (the periodic sync is a minute away).
        virsh("shutdown", agent_domain_name(uuid))
        wait_stopped_by_libvirt(new_conn, uuid)
        wait_record(agent, uuid, "stopped", "shutdown", EVENT_DEADLINE_S)
        assert console(agent, uuid).count(POWEROFF.encode()) == 1

        agent.call("instance.delete", {"uuid": uuid})
        assert_nothing_left(agent, new_conn, [uuid])
    finally:
        new_conn.close()


# -- 5. guests that stop behind the agent's back ----------------------------------------------

def test_guest_power_off_and_crash_are_seen_through_events(guest_agent: Callable[..., AgentProcess],
                                                           conn: Any, guest_image: Path) -> None:
    agent = guest_agent()
    uuid = spawn_guest(agent, guest_image, "behind-our-back")["uuid"]
    name = agent_domain_name(uuid)
    wait_console(agent, uuid, MARKER)

    # An operator (or the guest's own ACPI handling) powers it off: Nova's sync rules make an
    # active instance whose guest shut down `stopped`, and the agent must not restart it.
    virsh("shutdown", name)
    wait_stopped_by_libvirt(conn, uuid)
    wait_record(agent, uuid, "stopped", "shutdown", EVENT_DEADLINE_S)
    assert console(agent, uuid).count(POWEROFF.encode()) == 1

    rec = agent.call("instance.start", {"uuid": uuid})
    assert_state(agent, conn, uuid, "active", "running", rec)
    wait_console(agent, uuid, MARKER, count=2)

    # A crash-like stop: the QEMU process is gone without the guest's consent.
    virsh("destroy", name)
    wait_stopped_by_libvirt(conn, uuid)
    wait_record(agent, uuid, "stopped", "shutdown", EVENT_DEADLINE_S)
    assert_state(agent, conn, uuid, "stopped", "shutdown")

    agent.call("instance.delete", {"uuid": uuid})
    assert_nothing_left(agent, conn, [uuid])


def test_changes_made_while_the_agent_was_away_are_synced(guest_agent: Callable[..., AgentProcess],
                                                          conn: Any, guest_image: Path) -> None:
    sync_s = 1.0
    agent = guest_agent(agent_config(sync_s=sync_s))
    uuid = spawn_guest(agent, guest_image, "missed-events")["uuid"]
    name = agent_domain_name(uuid)
    wait_console(agent, uuid, MARKER)

    # Killed: no one hears libvirt's event when the guest is destroyed.
    agent.kill()
    virsh("destroy", name)
    agent.start()
    wait_record(agent, uuid, "stopped", "shutdown", sync_s + 5.0)
    assert_state(agent, conn, uuid, "stopped", "shutdown")

    # Frozen (SIGSTOP): the guest of a stopped instance is started behind its back. Nova's
    # rule: the instance stays stopped and its guest is powered off again.
    assert agent.proc is not None
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        virsh("start", name)
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    wait_stopped_by_libvirt(conn, uuid, timeout_s=sync_s + 5.0)
    wait_record(agent, uuid, "stopped", "shutdown", sync_s + 5.0)
    assert_state(agent, conn, uuid, "stopped", "shutdown")

    agent.call("instance.delete", {"uuid": uuid})
    assert_nothing_left(agent, conn, [uuid])


# -- 7. a real guest on a port -----------------------------------------------------------------

def test_a_real_guest_on_a_port_answers_a_namespace_as_its_groups_allow(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path) -> None:
    """The agent plugs the guest's tap into a bridge and tells the guest its address (SMBIOS
    OEM strings); a namespace on the same bridge then pings it, and reaches its HTTP server
    only once the port's groups allow TCP 80. Delete leaves no tap, bridge or rule."""
    tag = uuid_mod.uuid4().hex[:6]
    owner = f"fct{tag}"
    agent = guest_agent(agent_config() + f'[network]\nowner = "{owner}"\nbridge_prefix = "b{tag}"\n'
                        f'tap_prefix = "t{tag[:3]}"\n')
    icmp_only = [group(EGRESS_ALL, rule("ingress", "icmp"))]
    guest_port = port("10.78.0.2", network=f"n{tag}", groups=icmp_only)
    ns, host_end = f"{owner}-c", f"{owner}v"
    try:
        rec = agent.call("instance.spawn", {
            "name": "net", "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
            "image": {"url": guest_image.as_uri()}, "networks": [guest_port], "wait": True,
        })
        uuid = rec["uuid"]
        wait_console(agent, uuid, "FASTCOMPUTE-NET ip=10.78.0.2/24")
        wait_console(agent, uuid, READY)
        tap = f"t{tag[:3]}{guest_port['id']}"[:15]
        bridge = f"b{tag}n{tag}"[:15]
        assert links()[tap]["master"] == bridge

        # A client namespace joined to the guest's bridge by a veth (not a port: no rules of its own).
        namespace_on_bridge(ns, host_end, bridge, "10.78.0.1/24")

        # TCG guests answer slowly at first (ARP, a busy vCPU): a few tries, each one timed out.
        assert any(ping(ns, "10.78.0.2", timeout=2.0) for _ in range(15)), "the guest never answered a ping"
        assert connect(ns, "10.78.0.2", 80, timeout=2.0) is None, "TCP 80 got through a group that allows ICMP only"

        web = [group(EGRESS_ALL, rule("ingress", "icmp"), rule("ingress", "tcp", 80, remote="10.78.0.0/24"))]
        agent.call("instance.set_security_groups", {"uuid": uuid, "port_id": guest_port["id"],
                                                    "security_groups": web})
        sock = connect(ns, "10.78.0.2", 80, timeout=5.0)
        assert sock is not None, "TCP 80 still blocked after the group allowed it"
        with sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
            body = b""
            while chunk := sock.recv(4096):
                body += chunk
        assert f"fastcompute-guest {uuid}".encode() in body

        # The veth goes first: the agent leaves alone a bridge that holds a link that is not its
        # own. Its host end is deleted by name, which is synchronous; a namespace's links go
        # with it only later, in the kernel's own time.
        sh("ip", "link", "del", host_end)
        sh("ip", "netns", "del", ns)
        agent.call("instance.delete", {"uuid": uuid})
        after = links()
        assert tap not in after
        assert bridge not in after
        assert not rule_chains(owner) and not mentions(owner, tap)
    finally:
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", host_end, check=False)
        remove_owned(owner)
