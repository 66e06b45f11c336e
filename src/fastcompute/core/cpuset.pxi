# CPU sets as bitmaps: arrays of 64-bit words, bit (cpu % 64) of word (cpu / 64).
#
# The NUMA fitter keeps every host cell's shared, dedicated, pinned and free CPUs in these,
# so that membership is a shift and a mask, set difference and equality are a loop over a
# few words, and counting is a popcount: no Python sets in the search. The word count is
# the caller's (enough for the highest CPU id it saw); every function runs without the GIL.

from libc.stdint cimport uint64_t
from libc.string cimport memset as _cs_memset

cdef extern from *:
    int _cs_popcount "__builtin_popcountll"(unsigned long long) nogil
    int _cs_ctz "__builtin_ctzll"(unsigned long long) nogil


cdef inline void cs_clear(uint64_t *s, Py_ssize_t words) noexcept nogil:
    _cs_memset(s, 0, <size_t>words * sizeof(uint64_t))


cdef inline void cs_add(uint64_t *s, int cpu) noexcept nogil:
    s[cpu >> 6] |= (<uint64_t>1) << (cpu & 63)


cdef inline bint cs_has(const uint64_t *s, int cpu) noexcept nogil:
    return (s[cpu >> 6] >> (cpu & 63)) & 1


cdef inline int cs_count(const uint64_t *s, Py_ssize_t words) noexcept nogil:
    cdef Py_ssize_t i
    cdef int n = 0
    for i in range(words):
        n += _cs_popcount(s[i])
    return n


cdef inline bint cs_equal(const uint64_t *a, const uint64_t *b, Py_ssize_t words) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(words):
        if a[i] != b[i]:
            return False
    return True


cdef inline void cs_difference(uint64_t *dst, const uint64_t *a, const uint64_t *b,
                               Py_ssize_t words) noexcept nogil:
    """dst = a - b (dst may be a or b)."""
    cdef Py_ssize_t i
    for i in range(words):
        dst[i] = a[i] & ~b[i]


cdef inline int cs_next(const uint64_t *s, Py_ssize_t words, int start) noexcept nogil:
    """The lowest CPU >= start in the set, or -1."""
    cdef Py_ssize_t w = start >> 6
    cdef uint64_t bits
    if start < 0 or w >= words:
        return -1
    bits = s[w] & (~(<uint64_t>0) << (start & 63))
    while True:
        if bits:
            return <int>(w * 64 + _cs_ctz(bits))
        w += 1
        if w >= words:
            return -1
        bits = s[w]


def cpuset_to_list(bytes bitmap):
    """The CPU ids of a bitmap (native-endian 64-bit words), ascending."""
    cdef Py_ssize_t words = len(bitmap) // 8
    cdef const uint64_t *s = <const uint64_t *><const char *>bitmap
    cdef int cpu = cs_next(s, words, 0)
    cdef list out = []
    while cpu >= 0:
        out.append(cpu)
        cpu = cs_next(s, words, cpu + 1)
    return out


def cpuset_from_list(cpus):
    """The bitmap (native-endian 64-bit words) of an iterable of non-negative CPU ids."""
    cdef list ids = [int(c) for c in cpus]
    cdef int cpu
    cdef int top = -1
    for cpu in ids:
        if cpu < 0:
            raise ValueError(f"CPU id {cpu} is negative")
        if cpu > top:
            top = cpu
    cdef bytearray out = bytearray(((top >> 6) + 1) * 8 if top >= 0 else 0)
    cdef uint64_t *s = <uint64_t *><char *>out
    for cpu in ids:
        cs_add(s, cpu)
    return bytes(out)
