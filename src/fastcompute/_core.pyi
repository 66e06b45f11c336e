"""Typing stub of the compiled core; one section per include file under core/."""

from collections.abc import Callable

# --- core/copy.pxi: the image copier ---
def copy_file(
    src: str,
    dst: str,
    progress: Callable[[int, int], object] | None = None,
    sync: bool = True,
    progress_step: int = 268435456,
) -> tuple[int, str]: ...
