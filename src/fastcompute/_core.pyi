"""Typing stub of the compiled core; one section per include file under core/."""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

# --- core/copy.pxi: the image copier ---
def copy_file(
    src: str,
    dst: str,
    progress: Callable[[int, int], object] | None = None,
    sync: bool = True,
    progress_step: int = 268435456,
) -> tuple[int, str]: ...

# --- core/sampler.pxi: the cgroup sampler ---
import array  # noqa: E402 - one section per include file, each with its own imports

CGROUP_FILE_KINDS: dict[str, int]
CGROUP_SAMPLE_FIELDS: tuple[str, ...]

class CgroupSampler:
    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...
    def add(self, key: int, files: list[tuple[int, int]]) -> None: ...
    def remove(self, key: int) -> bool: ...
    def close(self) -> None: ...
    def sample(self) -> tuple[array.array[int], array.array[int], list[tuple[int, int]]]: ...

# --- core/cpuset.pxi + core/numa_fit.pxi: CPU set bitmaps and the NUMA fitter ---
def cpuset_to_list(bitmap: bytes) -> list[int]: ...
def cpuset_from_list(cpus: Iterable[int]) -> bytes: ...

# The NUMA shapes are resources/numa_types.py's TypedDicts (dicts at run time, as the core needs).
class NumaHost:
    def __init__(self, host: Mapping[str, Any], previous: NumaHost | None = None) -> None: ...
    def __len__(self) -> int: ...

def numa_fit(
    host: Mapping[str, Any] | NumaHost,
    request: Mapping[str, Any],
    limits: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None: ...
