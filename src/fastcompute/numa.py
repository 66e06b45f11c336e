"""Public NUMA API (kept at this path): flavor constraints and the fitter, from ``resources.numa``."""

from fastcompute.resources.numa import (
    CPU_POLICIES,
    EMULATOR_POLICIES,
    PAGE_ANY,
    PAGE_LARGE,
    PAGE_SMALL,
    THREAD_POLICIES,
    claim,
    compile_host,
    constraints,
    fit,
    parse_cpu_spec,
    release,
)

__all__ = [
    "CPU_POLICIES",
    "EMULATOR_POLICIES",
    "PAGE_ANY",
    "PAGE_LARGE",
    "PAGE_SMALL",
    "THREAD_POLICIES",
    "claim",
    "compile_host",
    "constraints",
    "fit",
    "parse_cpu_spec",
    "release",
]
