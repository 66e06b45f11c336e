"""The guest's CPU: the host CPUs it may run on, the CPU it sees, and the traits it was placed for.

A flavor asks for traits as Nova's do (``trait:HW_CPU_X86_AVX2=required``, ``=forbidden``).
A host that lacks a required trait, or has a forbidden one, is not a place for the guest
(NO_CAPACITY, as a scheduler would have filtered it out); a required ``HW_CPU_X86_*`` trait
becomes a feature the guest's CPU must have, so that the guest sees what it was placed for.
Guests without pinned CPUs run on the host's shared CPUs only, never on the pCPUs pinned
guests were promised.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

import msgspec

from fastcompute.errors import NoCapacity
from fastcompute.hypervisor.spec import CpuMode
from fastcompute.resources.tracker import cpu_traits

TRAIT_PREFIX: Final = "trait:"
TRAIT_VALUES: Final = ("required", "forbidden")
# Placement's trait names: upper-case letters, digits and underscores, at most 255.
TRAIT_NAME: Final = re.compile(r"^[A-Z0-9_]{1,255}$", re.ASCII)


class HostCpu(msgspec.Struct, frozen=True, kw_only=True):
    """What the guests of this host get of its CPUs, decided once at start.

    ``shared`` are the host CPUs of unpinned vCPUs (``cpu_shared_set``, or every CPU not in
    ``cpu_dedicated_set``); ``shared_configured`` says whether ``cpu_shared_set`` was given
    (Nova puts emulator threads of ``hw:emulator_threads_policy=share`` there only then).
    ``features`` maps each ``HW_CPU_X86_*`` trait of the host to its CPU feature name, and
    ``traits`` is every trait the host reports.
    """

    shared: list[int]
    shared_configured: bool = False
    mode: CpuMode | None = None
    model: str | None = None
    extra_flags: list[str] = []
    features: dict[str, str] = {}
    traits: frozenset[str] = frozenset()


def trait_features(features: Iterable[str]) -> dict[str, str]:
    """The host's CPU feature names by the trait each is published as."""
    return {trait: name for name in features for trait in cpu_traits([name])}


def flavor_traits(extra_specs: Mapping[str, str]) -> tuple[set[str], set[str]]:
    """The (required, forbidden) traits of a flavor's validated ``trait:`` extra specs."""
    required: set[str] = set()
    forbidden: set[str] = set()
    for key, value in extra_specs.items():
        if key.startswith(TRAIT_PREFIX):
            (required if value == "required" else forbidden).add(key[len(TRAIT_PREFIX):])
    return required, forbidden


def trait_problem(key: str, value: str) -> str | None:
    """Why a ``trait:`` extra spec is malformed, or None."""
    if not TRAIT_NAME.match(key[len(TRAIT_PREFIX):]):
        return "a trait name is upper-case letters, digits and underscores (at most 255)"
    if value not in TRAIT_VALUES:
        return f"must be one of {', '.join(TRAIT_VALUES)}, not {value!r}"
    return None


def check_traits(extra_specs: Mapping[str, str], host: HostCpu) -> None:
    """NO_CAPACITY when this host lacks a trait the flavor requires or has one it forbids."""
    required, forbidden = flavor_traits(extra_specs)
    missing = sorted(required - host.traits)
    present = sorted(forbidden & host.traits)
    if missing or present:
        what = (f"lacks required traits {', '.join(missing)}" if missing
                else f"has forbidden traits {', '.join(present)}")
        raise NoCapacity(f"this host {what}", {"resource_class": "TRAITS", "missing": missing,
                                                "forbidden": present})


def guest_features(extra_specs: Mapping[str, str], host: HostCpu) -> list[str]:
    """The CPU features a guest must see: the configured extra flags and the features of the
    ``HW_CPU_X86_*`` traits its flavor requires (``check_traits`` has passed)."""
    required, _ = flavor_traits(extra_specs)
    wanted = dict.fromkeys(host.extra_flags)
    wanted.update(dict.fromkeys(host.features[t] for t in sorted(required) if t in host.features))
    return list(wanted)
