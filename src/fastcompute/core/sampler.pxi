# The cgroup sampler: CPU, memory and block I/O counters of many cgroups, read cheaply.
#
# A dense host samples hundreds of guests every few seconds, so the cost per cgroup must be
# close to the cost of the read syscalls themselves. The descriptors are opened once by the
# caller and handed over here; every sample() re-reads them with pread at offset 0 (kernfs
# regenerates the text on each read from offset 0, so no reopen and no lseek) and parses the
# numbers in C with the GIL released. A cgroup whose directory was removed answers ENODEV on
# its open descriptors: such a cgroup is closed, dropped from the set and reported, so the
# sampling loop never raises for a guest that was deleted between two samples.
#
# Which file is which is decided by its name (the names of v1 and v2 files never collide);
# the caller maps names to kinds with CGROUP_FILE_KINDS and passes (kind, fd) pairs.

from cpython cimport array as _smp_carray
import array as _smp_pyarray

from libc.errno cimport errno as _smp_errno
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc as _smp_malloc, realloc as _smp_realloc, free as _smp_free
from libc.string cimport memcmp as _smp_memcmp, memcpy as _smp_memcpy
from posix.unistd cimport pread as _smp_pread, close as _smp_close

cdef extern from "<unistd.h>" nogil:
    long _smp_sysconf "sysconf"(int name)
    enum:
        _SC_CLK_TCK

cdef enum:
    # v1: cpuacct, memory and blkio controllers
    _K_CPUACCT_USAGE = 0
    _K_CPUACCT_STAT = 1
    _K_MEM_USAGE = 2
    _K_MEM_MAX_USAGE = 3
    _K_MEMSW_USAGE = 4
    _K_BLKIO_BYTES = 5
    _K_BLKIO_OPS = 6
    # v2
    _K_CPU_STAT = 7
    _K_MEM_CURRENT = 8
    _K_MEM_PEAK = 9
    _K_SWAP_CURRENT = 10
    _K_IO_STAT = 11
    _K_COUNT = 12

cdef enum:
    _F_CPU = 0
    _F_USER = 1
    _F_SYSTEM = 2
    _F_MEM = 3
    _F_MEM_PEAK = 4
    _F_SWAP = 5
    _F_RBYTES = 6
    _F_WBYTES = 7
    _F_RIOS = 8
    _F_WIOS = 9
    _F_COUNT = 10

cdef enum:
    # the most files one cgroup needs (v1: 2 cpuacct + 3 memory + 2 blkio)
    _SMP_MAX_FILES = 8
    # blkio lists five lines per device; 64 KiB holds a few hundred devices
    _SMP_BUF = 65536

CGROUP_FILE_KINDS = {
    "cpuacct.usage": _K_CPUACCT_USAGE,
    "cpuacct.stat": _K_CPUACCT_STAT,
    "memory.usage_in_bytes": _K_MEM_USAGE,
    "memory.max_usage_in_bytes": _K_MEM_MAX_USAGE,
    "memory.memsw.usage_in_bytes": _K_MEMSW_USAGE,
    "blkio.throttle.io_service_bytes": _K_BLKIO_BYTES,
    "blkio.throttle.io_serviced": _K_BLKIO_OPS,
    "cpu.stat": _K_CPU_STAT,
    "memory.current": _K_MEM_CURRENT,
    "memory.peak": _K_MEM_PEAK,
    "memory.swap.current": _K_SWAP_CURRENT,
    "io.stat": _K_IO_STAT,
}

CGROUP_SAMPLE_FIELDS = (
    "cpu_ns", "user_ns", "system_ns", "memory_bytes", "memory_peak_bytes", "swap_bytes",
    "read_bytes", "write_bytes", "read_ops", "write_ops",
)

ctypedef struct _smp_slot:
    int64_t key
    int nfiles
    int fds[_SMP_MAX_FILES]
    int kinds[_SMP_MAX_FILES]
    int err


cdef inline bint _smp_isdigit(char c) noexcept nogil:
    return c >= 48 and c <= 57


cdef inline bint _smp_isspace(char c) noexcept nogil:
    return c == 32 or c == 9 or c == 10


cdef int64_t _smp_uint(const char* p, const char* end) noexcept nogil:
    """The first unsigned integer at or after p (leading blanks skipped), or -1."""
    cdef int64_t v = 0
    while p < end and _smp_isspace(p[0]):
        p += 1
    if p >= end or not _smp_isdigit(p[0]):
        return -1
    while p < end and _smp_isdigit(p[0]):
        v = v * 10 + (p[0] - 48)
        p += 1
    return v


cdef inline bint _smp_is(const char* word, Py_ssize_t n, const char* lit, Py_ssize_t ln) noexcept nogil:
    return n == ln and _smp_memcmp(word, lit, ln) == 0


cdef inline void _smp_addto(int64_t* v, int field, int64_t x) noexcept nogil:
    if x < 0:
        return
    if v[field] < 0:
        v[field] = x
    else:
        v[field] += x


cdef void _smp_parse_keyed(const char* buf, const char* end, int kind, int64_t* v,
                           int64_t tick_ns) noexcept nogil:
    """'name value' lines: v2 cpu.stat (microseconds) and v1 cpuacct.stat (clock ticks)."""
    cdef const char* line = buf
    cdef const char* sp
    cdef Py_ssize_t n
    cdef int64_t x
    while line < end:
        sp = line
        while sp < end and sp[0] != 32 and sp[0] != 10:
            sp += 1
        n = sp - line
        x = _smp_uint(sp, end)
        if kind == _K_CPU_STAT:
            if x >= 0:
                if _smp_is(line, n, b"usage_usec", 10):
                    v[_F_CPU] = x * 1000
                elif _smp_is(line, n, b"user_usec", 9):
                    v[_F_USER] = x * 1000
                elif _smp_is(line, n, b"system_usec", 11):
                    v[_F_SYSTEM] = x * 1000
        elif x >= 0:
            if _smp_is(line, n, b"user", 4):
                v[_F_USER] = x * tick_ns
            elif _smp_is(line, n, b"system", 6):
                v[_F_SYSTEM] = x * tick_ns
        while line < end and line[0] != 10:
            line += 1
        line += 1


cdef void _smp_parse_blkio(const char* buf, const char* end, int ops, int64_t* v) noexcept nogil:
    """v1 'MAJ:MIN Op value' lines summed over devices; the device-less 'Total' line skipped."""
    cdef const char* line = buf
    cdef const char* p
    cdef const char* w
    cdef bint has_dev
    cdef Py_ssize_t n
    cdef int64_t x
    cdef int rf = _F_RIOS if ops else _F_RBYTES
    cdef int wf = _F_WIOS if ops else _F_WBYTES
    # An empty file means no I/O yet: zero, not unknown.
    if v[rf] < 0:
        v[rf] = 0
    if v[wf] < 0:
        v[wf] = 0
    while line < end:
        p = line
        has_dev = False
        while p < end and p[0] != 32 and p[0] != 10:
            if p[0] == 58:
                has_dev = True
            p += 1
        if has_dev and p < end and p[0] == 32:
            p += 1
            w = p
            while p < end and p[0] != 32 and p[0] != 10:
                p += 1
            n = p - w
            x = _smp_uint(p, end)
            if _smp_is(w, n, b"Read", 4):
                _smp_addto(v, rf, x)
            elif _smp_is(w, n, b"Write", 5):
                _smp_addto(v, wf, x)
        while line < end and line[0] != 10:
            line += 1
        line += 1


cdef void _smp_parse_iostat(const char* buf, const char* end, int64_t* v) noexcept nogil:
    """v2 'MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...' lines summed over devices."""
    cdef const char* p = buf
    cdef const char* w
    cdef Py_ssize_t n
    cdef int64_t x
    v[_F_RBYTES] = 0
    v[_F_WBYTES] = 0
    v[_F_RIOS] = 0
    v[_F_WIOS] = 0
    while p < end:
        while p < end and _smp_isspace(p[0]):
            p += 1
        w = p
        while p < end and p[0] != 61 and not _smp_isspace(p[0]):
            p += 1
        if p < end and p[0] == 61:
            n = p - w
            p += 1
            x = _smp_uint(p, end)
            if _smp_is(w, n, b"rbytes", 6):
                _smp_addto(v, _F_RBYTES, x)
            elif _smp_is(w, n, b"wbytes", 6):
                _smp_addto(v, _F_WBYTES, x)
            elif _smp_is(w, n, b"rios", 4):
                _smp_addto(v, _F_RIOS, x)
            elif _smp_is(w, n, b"wios", 4):
                _smp_addto(v, _F_WIOS, x)
            while p < end and not _smp_isspace(p[0]):
                p += 1


cdef void _smp_parse(int kind, const char* buf, Py_ssize_t n, int64_t* v, int64_t* memsw,
                     int64_t tick_ns) noexcept nogil:
    cdef const char* end = buf + n
    if kind == _K_CPUACCT_USAGE:
        v[_F_CPU] = _smp_uint(buf, end)
    elif kind == _K_CPUACCT_STAT or kind == _K_CPU_STAT:
        _smp_parse_keyed(buf, end, kind, v, tick_ns)
    elif kind == _K_MEM_USAGE or kind == _K_MEM_CURRENT:
        v[_F_MEM] = _smp_uint(buf, end)
    elif kind == _K_MEM_MAX_USAGE or kind == _K_MEM_PEAK:
        v[_F_MEM_PEAK] = _smp_uint(buf, end)
    elif kind == _K_MEMSW_USAGE:
        memsw[0] = _smp_uint(buf, end)
    elif kind == _K_SWAP_CURRENT:
        v[_F_SWAP] = _smp_uint(buf, end)
    elif kind == _K_BLKIO_BYTES:
        _smp_parse_blkio(buf, end, 0, v)
    elif kind == _K_BLKIO_OPS:
        _smp_parse_blkio(buf, end, 1, v)
    elif kind == _K_IO_STAT:
        _smp_parse_iostat(buf, end, v)


cdef class CgroupSampler:
    """A set of cgroups, each a few open stats files, sampled together in one pass.

    Cgroups are named by an integer key chosen by the caller. ``add(key, files)`` takes
    ownership of the descriptors in ``files`` (``(kind, fd)`` pairs, kinds from
    CGROUP_FILE_KINDS); ``remove(key)`` and ``close()`` close them. ``sample()`` returns
    ``(keys, values, vanished)``: ``keys`` an ``array('q')`` of the cgroups read, ``values`` an
    ``array('q')`` of ``len(keys) * len(CGROUP_SAMPLE_FIELDS)`` numbers (row per cgroup, in
    CGROUP_SAMPLE_FIELDS order, -1 where the files do not say), and ``vanished`` a list of
    ``(key, errno)`` for the cgroups that could not be read, which are closed and dropped.

    Not thread-safe: one caller at a time (the Python wrapper holds a lock).
    """

    cdef _smp_slot* _slots
    cdef Py_ssize_t _n
    cdef Py_ssize_t _cap
    cdef int64_t* _vals
    cdef char* _buf
    cdef dict _index
    cdef int64_t _tick_ns

    def __cinit__(self):
        self._slots = NULL
        self._vals = NULL
        self._n = 0
        self._cap = 0
        self._index = {}
        self._buf = <char*>_smp_malloc(_SMP_BUF)
        if self._buf == NULL:
            raise MemoryError()
        cdef long hz = _smp_sysconf(_SC_CLK_TCK)
        self._tick_ns = 1000000000 // (hz if hz > 0 else 100)

    def __dealloc__(self):
        self._close_all()
        _smp_free(self._slots)
        _smp_free(self._vals)
        _smp_free(self._buf)

    def __len__(self):
        return self._n

    def __contains__(self, key):
        return key in self._index

    cdef void _close_all(self) noexcept:
        cdef Py_ssize_t i
        cdef int j
        for i in range(self._n):
            for j in range(self._slots[i].nfiles):
                _smp_close(self._slots[i].fds[j])
        self._n = 0
        if self._index is not None:
            self._index.clear()

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = self._cap * 2 if self._cap else 64
        cdef _smp_slot* s = <_smp_slot*>_smp_realloc(self._slots, cap * sizeof(_smp_slot))
        if s == NULL:
            raise MemoryError()
        self._slots = s
        cdef int64_t* v = <int64_t*>_smp_realloc(self._vals, cap * _F_COUNT * sizeof(int64_t))
        if v == NULL:
            raise MemoryError()
        self._vals = v
        self._cap = cap
        return 0

    def add(self, int64_t key, files):
        """Adopt the descriptors of one cgroup: ``files`` is a sequence of ``(kind, fd)``."""
        if key in self._index:
            raise KeyError(f"cgroup key {key} already sampled")
        pairs = list(files)
        if not 0 < len(pairs) <= _SMP_MAX_FILES:
            raise ValueError(f"a cgroup needs 1 to {_SMP_MAX_FILES} files, got {len(pairs)}")
        for kind, fd in pairs:
            if not 0 <= kind < _K_COUNT:
                raise ValueError(f"unknown cgroup file kind {kind}")
        if self._n == self._cap:
            self._grow()
        cdef _smp_slot* s = &self._slots[self._n]
        s.key = key
        s.nfiles = len(pairs)
        s.err = 0
        cdef int j = 0
        for kind, fd in pairs:
            s.kinds[j] = kind
            s.fds[j] = fd
            j += 1
        self._index[key] = self._n
        self._n += 1

    cdef void _drop(self, Py_ssize_t i) noexcept:
        """Close slot i and move the last slot into its place."""
        cdef int j
        cdef _smp_slot* s = &self._slots[i]
        for j in range(s.nfiles):
            _smp_close(s.fds[j])
        del self._index[s.key]
        self._n -= 1
        if i != self._n:
            self._slots[i] = self._slots[self._n]
            self._index[self._slots[i].key] = i

    def remove(self, int64_t key):
        """Close and forget a cgroup; returns False when it was not in the set."""
        i = self._index.get(key)
        if i is None:
            return False
        self._drop(i)
        return True

    def close(self):
        """Close every descriptor; the sampler is empty afterwards."""
        self._close_all()

    def sample(self):
        """Read every cgroup once; see the class docstring for the result."""
        cdef Py_ssize_t i, ok = 0, n = self._n
        cdef int j, f
        cdef ssize_t r
        cdef int64_t memsw
        cdef int64_t* v
        cdef _smp_slot* s
        cdef char* buf = self._buf
        cdef int64_t tick_ns = self._tick_ns
        with nogil:
            for i in range(n):
                s = &self._slots[i]
                v = &self._vals[ok * _F_COUNT]
                for f in range(_F_COUNT):
                    v[f] = -1
                memsw = -1
                s.err = 0
                for j in range(s.nfiles):
                    r = _smp_pread(s.fds[j], buf, _SMP_BUF - 1, 0)
                    if r < 0:
                        s.err = _smp_errno
                        break
                    _smp_parse(s.kinds[j], buf, r, v, &memsw, tick_ns)
                if s.err:
                    continue
                # v1 reports memory+swap together; swap is the difference.
                if memsw >= 0 and v[_F_MEM] >= 0:
                    v[_F_SWAP] = memsw - v[_F_MEM] if memsw > v[_F_MEM] else 0
                ok += 1
        cdef _smp_carray.array keys = _smp_carray.clone(_smp_pyarray.array("q"), ok, False)
        cdef _smp_carray.array values = _smp_carray.clone(
            _smp_pyarray.array("q"), ok * _F_COUNT, False)
        if ok:
            _smp_memcpy(values.data.as_voidptr, self._vals, ok * _F_COUNT * sizeof(int64_t))
        vanished = []
        cdef Py_ssize_t k = 0
        for i in range(n):
            if self._slots[i].err == 0:
                keys.data.as_longlongs[k] = self._slots[i].key
                k += 1
        if ok != n:
            i = n - 1
            # Backwards, so that the swap-remove only moves slots already looked at.
            while i >= 0:
                if self._slots[i].err != 0:
                    vanished.append((self._slots[i].key, self._slots[i].err))
                    self._drop(i)
                i -= 1
        return keys, values, vanished
