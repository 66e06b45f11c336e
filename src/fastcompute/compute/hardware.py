"""The guest's machine, firmware and devices, as its flavor's extra specs ask (Nova's keys).

``hardware(extra_specs, vcpus)`` reads every key this module owns into a :class:`Hardware`,
or raises BAD_REQUEST naming the key: a value Nova would not take, a combination that cannot
be honoured (secure boot without UEFI, a TPM model without a version, a CPU topology that
cannot hold the vCPUs), or a key the agent does not apply (memory encryption, a vIOMMU,
multiqueue taps). ``check_host`` then refuses, as NO_CAPACITY, what this host cannot give
(no OVMF, no secure-boot firmware, no swtpm, a machine type its QEMU lacks): a scheduler
would have placed such a guest elsewhere.

Nova reads some of these from the image (``hw_firmware_type``, ``hw_machine_type``,
``hw_video_model``, ``os_secure_boot``); spawns here carry no image properties, so a flavor
may give them under either spelling. ``docs/GUESTS.md`` has the table of every key.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Final

import msgspec

from fastcompute.errors import BadRequest, NoCapacity
from fastcompute.hypervisor.spec import (
    CpuTopology,
    Firmware,
    HostFeatures,
    Rng,
    Tpm,
    TpmModel,
    TpmVersion,
    VideoModel,
    WatchdogAction,
)
from fastcompute.protocol.extra_specs import bad, choice
from fastcompute.protocol.schema import parse_uint
from fastcompute.resources.numa_types import NumaRequest

TOPOLOGY_KEYS: Final = ("hw:cpu_sockets", "hw:cpu_cores", "hw:cpu_threads")
MAX_TOPOLOGY_KEYS: Final = ("hw:cpu_max_sockets", "hw:cpu_max_cores", "hw:cpu_max_threads")
HW_KEYS: Final = frozenset({
    *TOPOLOGY_KEYS, *MAX_TOPOLOGY_KEYS,
    "hw:machine_type", "hw:firmware_type", "hw:tpm_model", "hw:tpm_version", "hw:watchdog_action",
    "hw:video_model", "hw:serial_port_count", "hw:boot_menu", "hw:pmu", "hw:hide_hypervisor_id",
    "hw:locked_memory", "hw:virtio_packed_ring", "hw:vif_multiqueue_enabled", "hw:mem_encryption",
    "hw:viommu_model",
})
"""The ``hw:`` keys this module owns (``resources.numa`` owns the NUMA and CPU-policy ones)."""
OTHER_KEYS: Final = frozenset({"os:secure_boot", "hw_rng:allowed", "hw_rng:rate_bytes", "hw_rng:rate_period",
                               "hw_video:ram_max_mb"})
"""Its keys in Nova's other namespaces (``os:``, ``hw_rng:``, ``hw_video:``)."""
NAMESPACES: Final = ("os:", "hw_rng:", "hw_video:")
ALIASES: Final = {"hw_firmware_type": "hw:firmware_type", "hw_machine_type": "hw:machine_type",
                  "hw_video_model": "hw:video_model", "os_secure_boot": "os:secure_boot"}
"""Nova's image-property spelling of a key -> the flavor spelling."""

FIRMWARES: Final[dict[str, Firmware]] = {"bios": "bios", "uefi": "uefi"}
TPM_MODELS: Final[tuple[TpmModel, ...]] = ("tpm-tis", "tpm-crb")
TPM_VERSIONS: Final[tuple[TpmVersion, ...]] = ("1.2", "2.0")
WATCHDOG_ACTIONS: Final[tuple[WatchdogAction, ...]] = ("none", "pause", "poweroff", "reset")
VIDEO_MODELS: Final[tuple[VideoModel, ...]] = ("vga", "cirrus", "qxl", "virtio", "bochs", "none")
MAX_SERIAL_PORTS: Final = 4  # the ISA serial ports of an x86 machine (COM1-COM4)
# x86 machine types: the i440fx and q35 families, bare or versioned (pc-q35-7.2).
MACHINE_TYPE: Final = re.compile(r"^(?:pc|q35|pc-(?:i440fx|q35)-\d{1,3}\.\d{1,3})$", re.ASCII)
# Nova's strutils.bool_from_string, strict.
_TRUE: Final = frozenset({"1", "t", "true", "on", "y", "yes"})
_FALSE: Final = frozenset({"0", "f", "false", "off", "n", "no"})
_MAX_RATE: Final = 2**32 - 1  # libvirt keeps the RNG rate as unsigned ints
Cells = tuple[tuple[int, ...], ...]
"""The vCPUs of each guest NUMA cell, in cell order."""


class Hardware(msgspec.Struct, frozen=True, kw_only=True):
    """What a flavor asks of the guest's machine and devices (the :class:`GuestSpec` fields of
    the same names; ``rng`` is on unless ``hw_rng:allowed`` is false, as in Nova)."""

    machine: str | None = None
    firmware: Firmware = "bios"
    secure_boot: bool = False
    tpm: Tpm | None = None
    watchdog: WatchdogAction | None = None
    rng: Rng | None = Rng()
    video: VideoModel | None = None
    serial_ports: int = 1
    topology: CpuTopology | None = None
    boot_menu: bool = False
    pmu: bool | None = None
    hide_hypervisor: bool = False
    locked_memory: bool = False
    packed_ring: bool = False




def _bool(specs: Mapping[str, str], key: str) -> bool | None:
    value = specs.get(key)
    if value is None:
        return None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise bad(key, f"must be true or false, not {value!r}")


def _int(specs: Mapping[str, str], key: str, low: int, high: int) -> int | None:
    value = specs.get(key)
    if value is None:
        return None
    number = parse_uint(value)
    if number is None or not low <= number <= high:
        raise bad(key, f"must be an integer from {low} to {high}, not {value!r}")
    return number


def flavor_keys(extra_specs: Mapping[str, str]) -> dict[str, str]:
    """The extra specs this module owns, image-property spellings under their flavor names;
    BAD_REQUEST for an unknown key of its namespaces and for a key given both ways apart."""
    specs: dict[str, str] = {}
    for key, value in extra_specs.items():
        name = ALIASES.get(key, key)
        if name in HW_KEYS or name in OTHER_KEYS:
            if name in specs and specs[name] != value:
                raise bad(key, f"says {value!r} but {name} says {specs[name]!r}")
            specs[name] = value
        elif key.startswith(NAMESPACES):
            known = sorted(k for k in OTHER_KEYS if k.startswith(key.split(":", 1)[0] + ":"))
            raise bad(key, f"unknown extra spec; known in its namespace: {', '.join(known)}")
    return specs


def hardware(extra_specs: Mapping[str, str], vcpus: int, cells: Cells = ()) -> Hardware:
    """The machine and devices a flavor of ``vcpus`` vCPUs asks for; BAD_REQUEST naming the
    key (as the flavor spells it) for values, combinations and features this agent does not
    apply. ``cells`` are the vCPUs of each guest NUMA cell (``cell_cpus``; none: no NUMA),
    which the CPU topology must not split a core across."""
    return _hardware_of(tuple(sorted(extra_specs.items())), vcpus, cells)


def cell_cpus(request: NumaRequest | None) -> Cells:
    """The vCPUs of each guest NUMA cell of a NUMA request (none without one)."""
    if request is None:
        return ()
    return tuple(tuple(sorted(c["cpuset"] + c["pcpuset"])) for c in request["cells"])


# Validation, the host check and the guest's description each ask, for every spawn of a storm
# of the same flavor: the answer (frozen) is kept; a refusal is raised again each time.
@functools.lru_cache(maxsize=1024)
def _hardware_of(items: tuple[tuple[str, str], ...], vcpus: int, cells: Cells) -> Hardware:
    extra_specs = dict(items)
    specs = flavor_keys(extra_specs)
    try:
        return _hardware(specs, extra_specs, vcpus, cells)
    except BadRequest as exc:
        field = str((exc.details or {}).get("field", ""))
        given = next((k for k, name in ALIASES.items() if name == field and k in extra_specs), None)
        if given is None or field in extra_specs:
            raise
        raise bad(given, str((exc.details or {}).get("reason", exc.message))) from None


def _hardware(specs: Mapping[str, str], extra_specs: Mapping[str, str], vcpus: int, cells: Cells) -> Hardware:
    for key, why in (("hw:mem_encryption", "this host has no memory encryption (AMD SEV)"),
                     ("hw:vif_multiqueue_enabled", "the agent's taps have one queue")):
        if _bool(specs, key):
            raise bad(key, f"cannot be applied: {why}")
    for key, why in (("hw:viommu_model", "the agent gives guests no virtual IOMMU"),
                     ("hw_video:ram_max_mb", "it caps the image's hw_video_ram, and spawns here carry no "
                                             "image properties")):
        if key in specs:
            raise bad(key, f"cannot be applied: {why}")
    machine = specs.get("hw:machine_type")
    if machine is not None and not MACHINE_TYPE.match(machine):
        raise bad("hw:machine_type", f"must be pc, q35 or a versioned pc-i440fx-X.Y or pc-q35-X.Y, not {machine!r}")
    firmware = FIRMWARES.get(specs.get("hw:firmware_type", "bios"))
    if firmware is None:
        raise bad("hw:firmware_type", f"must be bios or uefi, not {specs['hw:firmware_type']!r}")
    secure = choice(specs, "os:secure_boot", ("disabled", "required")) == "required"
    if secure and firmware != "uefi":
        raise bad("os:secure_boot", "secure boot needs hw:firmware_type=uefi")
    if secure and "q35" not in (machine or ""):
        raise bad("os:secure_boot", "secure boot on x86 needs a q35 machine (hw:machine_type=q35)")
    locked = bool(_bool(specs, "hw:locked_memory"))
    if locked and "hw:mem_page_size" not in extra_specs:
        # Nova's rule: locked memory is only allowed with a page size, whose memory is
        # accounted per NUMA cell, so that locked guests cannot overcommit a host.
        raise bad("hw:locked_memory", "locked memory needs hw:mem_page_size")
    # Nova's "disabled" (its default) is no watchdog at all.
    action = specs.get("hw:watchdog_action")
    watchdog = next((w for w in WATCHDOG_ACTIONS if w == action), None)
    if action is not None and watchdog is None and action != "disabled":
        raise bad("hw:watchdog_action", f"must be one of disabled, {', '.join(WATCHDOG_ACTIONS)}, not {action!r}")
    return Hardware(
        machine=machine,
        firmware=firmware,
        secure_boot=secure,
        tpm=_tpm(specs),
        watchdog=watchdog,
        rng=_rng(specs),
        video=choice(specs, "hw:video_model", VIDEO_MODELS),
        serial_ports=_serial_ports(specs),
        topology=topology(specs, vcpus, cells),
        boot_menu=bool(_bool(specs, "hw:boot_menu")),
        pmu=_bool(specs, "hw:pmu"),
        hide_hypervisor=bool(_bool(specs, "hw:hide_hypervisor_id")),
        locked_memory=locked,
        packed_ring=bool(_bool(specs, "hw:virtio_packed_ring")),
    )


def _tpm(specs: Mapping[str, str]) -> Tpm | None:
    version = choice(specs, "hw:tpm_version", TPM_VERSIONS)
    model = choice(specs, "hw:tpm_model", TPM_MODELS)
    if version is None:
        if model is not None:
            raise bad("hw:tpm_model", "a TPM model needs hw:tpm_version")
        return None
    model = model or "tpm-tis"  # Nova's default model
    if model == "tpm-crb" and version != "2.0":
        raise bad("hw:tpm_model", "tpm-crb is a TPM 2.0 interface (hw:tpm_version=2.0)")
    return Tpm(model, version)


def _rng(specs: Mapping[str, str]) -> Rng | None:
    rate = _int(specs, "hw_rng:rate_bytes", 0, _MAX_RATE)
    period = _int(specs, "hw_rng:rate_period", 0, _MAX_RATE)
    if _bool(specs, "hw_rng:allowed") is False:
        if rate or period:
            raise bad("hw_rng:rate_bytes" if rate else "hw_rng:rate_period",
                       "a rate limit needs the RNG (hw_rng:allowed is false)")
        return None
    if period and not rate:
        raise bad("hw_rng:rate_period", "a rate period needs hw_rng:rate_bytes")
    # Nova: a rate of 0 bytes is no limit.
    return Rng(rate_bytes=rate or None, rate_period=(period or None) if rate else None)


def _serial_ports(specs: Mapping[str, str]) -> int:
    count = _int(specs, "hw:serial_port_count", 1, MAX_SERIAL_PORTS)
    return 1 if count is None else count


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def topology(specs: Mapping[str, str], vcpus: int, cells: Cells = ()) -> CpuTopology | None:
    """The guest CPU topology Nova's ``get_best_cpu_topology`` picks for the ``hw:cpu_*``
    keys (None when none is given): of the sockets x cores x threads = ``vcpus`` within the
    maxima, the one matching most preferred counts, ties to more sockets x cores, then more
    sockets, then more threads. Stricter than Nova, which quietly drops a preference it
    cannot meet: a preferred count above its maximum, one that does not divide the vCPUs, or
    three that do not multiply to them are BAD_REQUEST.

    With guest NUMA ``cells`` each core's threads must be in one cell (vCPU ``n`` is thread
    ``n % threads`` of core ``n // threads``, as QEMU numbers them), or the guest kernel sees
    SMT siblings on two nodes. Nova has dropped its per-cell thread rule (bug 1910466) and
    lets such a guest be made; here the best topology that keeps cores whole and every
    preference the unconstrained best met is taken, and when there is none the flavor is
    BAD_REQUEST naming the key that forces the threads."""
    keys = (*TOPOLOGY_KEYS, *MAX_TOPOLOGY_KEYS)
    if not any(k in specs for k in keys):
        return None
    values = {k: _int(specs, k, 1, 65536) for k in keys}
    want = [values[k] for k in TOPOLOGY_KEYS]
    limit = [min(values[k] or vcpus, vcpus) for k in MAX_TOPOLOGY_KEYS]
    for key, value, top, max_key in zip(TOPOLOGY_KEYS, want, limit, MAX_TOPOLOGY_KEYS, strict=True):
        if value is None:
            continue
        if values[max_key] is not None and value > top:
            raise bad(key, f"{value} is above {max_key}={values[max_key]}")
        if vcpus % value:
            raise bad(key, f"{value} does not divide the flavor's {vcpus} vCPUs")
    if None not in want and want[0] * want[1] * want[2] != vcpus:  # type: ignore[operator]
        raise bad(TOPOLOGY_KEYS[0], f"{want[0]} sockets x {want[1]} cores x {want[2]} threads "
                                     f"is not the flavor's {vcpus} vCPUs")
    possible = [(s, c, vcpus // s // c) for s in _divisors(vcpus) if s <= limit[0]
                for c in _divisors(vcpus // s) if c <= limit[1] and vcpus // s // c <= limit[2]]
    if not possible:
        raise bad(MAX_TOPOLOGY_KEYS[0], f"no sockets x cores x threads within the maxima make {vcpus} vCPUs")

    def rank(t: tuple[int, int, int]) -> tuple[int, int, int, int]:
        score = sum(1 for got, wanted in zip(t, want, strict=True) if wanted is not None and got == wanted)
        return score, t[0] * t[1], t[0], t[2]

    best = max(possible, key=rank)
    if cells and _splits_a_core(best[2], cells):
        met = [i for i, wanted in enumerate(want) if wanted is not None and best[i] == wanted]
        whole = [t for t in possible if not _splits_a_core(t[2], cells) and all(t[i] == want[i] for i in met)]
        if not whole:
            key = next(k for k in (*reversed(TOPOLOGY_KEYS), *reversed(MAX_TOPOLOGY_KEYS)) if k in specs)
            raise bad(key, f"{best[0]} sockets x {best[1]} cores x {best[2]} threads would put a core's threads "
                           f"in two of the guest's NUMA cells (vCPUs {_cells_text(cells)}); each cell must "
                           "hold whole cores")
        best = max(whole, key=rank)
    return CpuTopology(*best)


def _splits_a_core(threads: int, cells: Cells) -> bool:
    cell_of = {vcpu: i for i, cpus in enumerate(cells) for vcpu in cpus}
    return any(cell_of.get(vcpu) != cell_of.get(vcpu - vcpu % threads) for vcpu in cell_of)


def _cells_text(cells: Cells) -> str:
    return " | ".join(",".join(map(str, cpus)) for cpus in cells)


def check_host(hw: Hardware, host: HostFeatures, extra_specs: Mapping[str, str]) -> None:
    """NO_CAPACITY when this host cannot give what ``hw`` (read from ``extra_specs``) asks for."""
    missing: list[tuple[str, str]] = []
    if hw.machine is not None and host.machines and hw.machine not in host.machines:
        missing.append(("hw:machine_type", f"its QEMU has no machine type {hw.machine}"))
    if hw.firmware == "uefi" and not host.uefi:
        missing.append(("hw:firmware_type", "it has no UEFI firmware (OVMF)"))
    if hw.secure_boot and not host.secure_boot:
        missing.append(("os:secure_boot", "it has no secure-boot UEFI firmware"))
    if hw.tpm is not None and hw.tpm.version not in host.tpm_versions:
        missing.append(("hw:tpm_version", f"it has no emulated TPM {hw.tpm.version} (swtpm)"))
    elif hw.tpm is not None and host.tpm_models and hw.tpm.model not in host.tpm_models:
        missing.append(("hw:tpm_model", f"it has no TPM model {hw.tpm.model}"))
    if missing:
        key, why = missing[0]
        raise NoCapacity(f"this host cannot give {key}: {why}",
                         {"resource_class": "FEATURES", "field": key, "reason": why})



def security_traits(host: HostFeatures) -> list[str]:
    """The Placement traits a host with these features reports, as Nova's libvirt driver does:
    ``COMPUTE_SECURITY_TPM_1_2``/``_2_0`` per emulated TPM version swtpm gives,
    ``COMPUTE_SECURITY_TPM_TIS``/``_CRB`` per TPM model, ``COMPUTE_SECURITY_UEFI_SECURE_BOOT``
    with secure-boot OVMF. A scheduler sends a flavor asking for a TPM or secure boot here only
    when they are listed."""
    found = [f"COMPUTE_SECURITY_TPM_{v.replace('.', '_')}" for v in host.tpm_versions if v in TPM_VERSIONS]
    if host.tpm_versions:
        found += [f"COMPUTE_SECURITY_TPM_{m.removeprefix('tpm-').upper()}" for m in host.tpm_models
                  if m in TPM_MODELS]
    if host.uefi and host.secure_boot:
        found.append("COMPUTE_SECURITY_UEFI_SECURE_BOOT")
    return sorted(found)
