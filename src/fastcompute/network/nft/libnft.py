"""A small in-process binding to libnftables (cffi, ABI mode), speaking nft's JSON.

Spawning ``nft`` for every change costs a process start, a dynamic link and a full ruleset
cache fetch each time; during a boot storm that dominates. libnftables is the library the
``nft`` command is built on, so one context kept open in the agent runs the same commands
in-process. Only the handful of functions needed to run a JSON transaction and read its
output and errors are declared; ABI mode needs no compiler or headers at install time.

A context is not safe for concurrent use, so each :class:`Nft` serialises its calls with a
lock; the calls release the GIL, so a transaction in a worker thread does not stall the loop.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Final

import cffi
import msgspec

from fastcompute.errors import AgentError

_CDEF: Final = """
struct nft_ctx;
struct nft_ctx *nft_ctx_new(uint32_t flags);
void nft_ctx_free(struct nft_ctx *ctx);
void nft_ctx_output_set_flags(struct nft_ctx *ctx, unsigned int flags);
int nft_ctx_buffer_output(struct nft_ctx *ctx);
const char *nft_ctx_get_output_buffer(struct nft_ctx *ctx);
int nft_ctx_buffer_error(struct nft_ctx *ctx);
const char *nft_ctx_get_error_buffer(struct nft_ctx *ctx);
int nft_run_cmd_from_buffer(struct nft_ctx *nft, const char *buf);
"""

_LIBRARY: Final = "libnftables.so.1"
_CTX_DEFAULT: Final = 0
# Output flag from <nftables/libnftables.h>.
_OUTPUT_JSON: Final = 1 << 4

# libnftables builds and frees a cache of the whole ruleset on every call. In a worker
# thread's malloc arena glibc hands that memory back to the kernel after each call and
# faults it in again on the next, which doubled the cost of a small transaction here
# (0.25 -> 0.5 ms). A top pad of a few MiB keeps it; MALLOC_TOP_PAD_ in the environment wins.
_M_TOP_PAD: Final = -2
_TOP_PAD_BYTES: Final = 4 << 20

_ffi = cffi.FFI()
_ffi.cdef(_CDEF + "int mallopt(int param, int value);")
_lib: Any = None
_lib_lock = threading.Lock()


def _library() -> Any:
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                _lib = _ffi.dlopen(_LIBRARY)
            except OSError as exc:
                raise NftError(f"cannot load {_LIBRARY}: {exc}") from exc
            if "MALLOC_TOP_PAD_" not in os.environ:
                _ffi.dlopen(None).mallopt(_M_TOP_PAD, _TOP_PAD_BYTES)
        return _lib


class NftError(AgentError):
    """nftables refused a command; the message is nft's own error text."""


class Nft:
    """One libnftables context: run JSON (or nft syntax) commands and read their output.

    ``Nft().json({"nftables": [...]})`` runs the commands as one atomic transaction and
    returns nft's JSON output (the listing for ``list`` commands), or ``{}`` when a command
    prints nothing.
    """

    def __init__(self) -> None:
        self._lib = _library()
        ctx = self._lib.nft_ctx_new(_CTX_DEFAULT)
        if ctx == _ffi.NULL:
            raise NftError("nft_ctx_new failed")
        self._ctx = ctx
        self._lock = threading.Lock()
        self._lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON)
        if self._lib.nft_ctx_buffer_output(ctx) != 0 or self._lib.nft_ctx_buffer_error(ctx) != 0:
            self._lib.nft_ctx_free(ctx)
            raise NftError("cannot buffer libnftables output")

    def json(self, cmds: dict[str, Any]) -> dict[str, Any]:
        """Run a JSON command document (``{"nftables": [...]}``) as one transaction."""
        out = self.run(msgspec.json.encode(cmds))
        if not out.strip():
            return {}
        decoded: dict[str, Any] = msgspec.json.decode(out)
        return decoded

    def run(self, commands: bytes | str) -> bytes:
        """Run commands (JSON or nft syntax) and return the raw output; errors raise NftError."""
        buf = commands.encode() if isinstance(commands, str) else commands
        with self._lock:
            if self._ctx is None:
                raise NftError("nftables context is closed")
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, buf)
            out = _ffi.string(self._lib.nft_ctx_get_output_buffer(self._ctx))
            err = _ffi.string(self._lib.nft_ctx_get_error_buffer(self._ctx))
        if rc != 0:
            text = err.decode(errors="replace").strip() or f"nft failed with status {rc}"
            raise NftError(text, {"status": rc})
        return bytes(out)

    def close(self) -> None:
        """Free the context; later calls raise NftError."""
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            self._lib.nft_ctx_free(ctx)
            self._ctx = None
