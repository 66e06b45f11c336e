# The NUMA fitter: Nova 34's numa_fit_instance_to_host over plain data, in polynomial time.
#
# NumaHost reads a host (the corpus's JSON shape: dicts, lists, ints) into C arrays once and,
# without the GIL, builds each cell's bitmaps (cpuset.pxi) of shared, dedicated, pinned and
# free CPUs and each core's free threads in ascending order. numa_fit(host, request, limits)
# reads the request with the GIL held, then, without it:
#   1. orders the host cells as Nova does (free memory descending, then shared CPU usage
#      ascending or free pCPUs descending; stable);
#   2. checks every (guest cell, host cell) pair once (memory and page size, CPU counts,
#      pinning, allocation ratios), keeping the pinning found; a pair's answer does not
#      depend on the other pairs, so this matrix is all Nova's permutation walk ever looks at;
#   3. picks, guest cell by guest cell, the first host cell in order whose pair fits and that
#      leaves a perfect matching (augmenting paths) for the guest cells after it. That is the
#      first permutation Nova's itertools.permutations would accept, found in
#      O(k^3 * n^2) steps for k guest cells and n host cells instead of n!/(n-k)! walks.
# The plain-Python numa_reference.py follows the same rules and is the oracle in the tests.

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport malloc as _nf_malloc, realloc as _nf_realloc, free as _nf_free
from libc.string cimport memset as _nf_memset, memcpy

cdef enum:
    _NF_POL_NONE = 0
    _NF_POL_SHARED = 1
    _NF_POL_DEDICATED = 2
    _NF_POL_MIXED = 3
    _NF_THR_NONE = 0
    _NF_THR_PREFER = 1
    _NF_THR_ISOLATE = 2
    _NF_THR_REQUIRE = 3
    _NF_PAGE_SMALL = -1
    _NF_PAGE_LARGE = -2
    _NF_PAGE_ANY = -3


ctypedef struct _NfBuf:
    # A growable array of int64: every list of the input lands in one of these. It starts
    # in a caller's stack array and moves to the heap only for large hosts.
    int64_t *data
    Py_ssize_t n
    Py_ssize_t cap
    bint heap


ctypedef struct _NfHostCell:
    int64_t id
    int64_t memory
    int64_t memory_usage
    int64_t cpu_usage
    # Offsets and lengths into the ids buffer.
    Py_ssize_t cpuset_off, cpuset_n
    Py_ssize_t pcpuset_off, pcpuset_n
    Py_ssize_t pinned_off, pinned_n
    # siblings: sib_n entries whose lengths are in sib_lens[sib_off:]; their threads follow
    # one another in ids from sib_ids_off.
    Py_ssize_t sib_off, sib_n, sib_ids_off
    # mempages: pool_n pools of 4 values (size_kb, total, used, reserved) in pools.
    Py_ssize_t pool_off, pool_n
    # Derived without the GIL.
    int n_shared
    int n_dedicated
    int n_free
    int threads_per_core
    bint legacy          # cpuset == pcpuset: vcpu_pin_set configuration
    Py_ssize_t core_off  # free threads of each siblings entry, ascending, in core_threads
    int widest           # the most free threads of one core


ctypedef struct _NfGuestCell:
    int64_t memory
    int64_t pagesize     # 0: none requested
    int policy
    int thread_policy
    int n_shared
    Py_ssize_t vcpu_off, vcpu_n   # the dedicated vCPUs, ascending, in gids


cdef int _nf_reserve(_NfBuf *b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = b.cap
    cdef int64_t *grown
    if b.n + extra <= cap:
        return 0
    while cap < b.n + extra:
        cap *= 2
    if b.heap:
        grown = <int64_t *>_nf_realloc(b.data, <size_t>cap * sizeof(int64_t))
    else:
        grown = <int64_t *>_nf_malloc(<size_t>cap * sizeof(int64_t))
        if grown is not NULL:
            memcpy(grown, b.data, <size_t>b.n * sizeof(int64_t))
    if grown is NULL:
        raise MemoryError()
    b.data = grown
    b.cap = cap
    b.heap = True
    return 0


cdef inline int _nf_push(_NfBuf *b, int64_t v) except -1:
    if b.n == b.cap:
        _nf_reserve(b, 1)
    b.data[b.n] = v
    b.n += 1
    return 0


cdef int _nf_push_list(_NfBuf *b, object seq, Py_ssize_t *n_out) except -1:
    cdef list items = <list?>seq
    cdef Py_ssize_t i, n = len(items)
    _nf_reserve(b, n)
    for i in range(n):
        b.data[b.n + i] = <int64_t>items[i]
    b.n += n
    n_out[0] = n
    return 0


cdef int _nf_push_copy(_NfBuf *b, const int64_t *src, Py_ssize_t n) except -1:
    _nf_reserve(b, n)
    memcpy(b.data + b.n, src, <size_t>n * sizeof(int64_t))
    b.n += n
    return 0


cdef inline void _nf_buf_init(_NfBuf *b, int64_t *stack, Py_ssize_t cap) noexcept:
    b.data = stack
    b.n = 0
    b.cap = cap
    b.heap = False


cdef inline void _nf_buf_free(_NfBuf *b) noexcept:
    if b.heap:
        _nf_free(b.data)


cdef int _nf_policy(object value) except -1:
    if value is None:
        return _NF_POL_NONE
    if value == "dedicated":
        return _NF_POL_DEDICATED
    if value == "shared":
        return _NF_POL_SHARED
    if value == "mixed":
        return _NF_POL_MIXED
    raise ValueError(f"unknown cpu_policy {value!r}")


cdef int _nf_thread_policy(object value) except -1:
    if value is None:
        return _NF_THR_NONE
    if value == "prefer":
        return _NF_THR_PREFER
    if value == "isolate":
        return _NF_THR_ISOLATE
    if value == "require":
        return _NF_THR_REQUIRE
    raise ValueError(f"unknown cpu_thread_policy {value!r}")


cdef inline bint _nf_pinned(int policy) noexcept nogil:
    return policy == _NF_POL_DEDICATED or policy == _NF_POL_MIXED


cdef inline bint _nf_shared(int policy) noexcept nogil:
    return policy != _NF_POL_DEDICATED


cdef void _nf_sort(int64_t *a, Py_ssize_t n) noexcept nogil:
    # Insertion sort: the lists sorted here (one core's threads, one guest cell's vCPUs) are
    # short and usually sorted already.
    cdef Py_ssize_t i, j
    cdef int64_t v
    for i in range(1, n):
        v = a[i]
        j = i - 1
        while j >= 0 and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v


cdef struct _NfWork:
    # Everything the GIL-free part needs, owned by numa_fit.
    _NfHostCell *hosts
    Py_ssize_t n_hosts
    _NfGuestCell *guests
    Py_ssize_t n_guests
    int64_t *ids           # host CPU ids (lists of NumaHost)
    int64_t *gids          # guest cells' dedicated vCPUs
    int64_t *sib_lens
    int64_t *pools
    Py_ssize_t words
    uint64_t *bits          # 3 bitmaps per host cell: shared, dedicated, free
    uint64_t *used          # scratch bitmap: pCPUs taken by the pair being checked
    int64_t *core_threads   # free threads per siblings entry
    int64_t *core_lens
    int *order              # host cell indexes in Nova's order
    bint has_limits
    double cpu_ratio
    double ram_ratio
    int reserve             # emulator pCPUs for guest cell 0
    # Pair results, indexed [guest * n_hosts + position in order].
    char *fits
    int64_t *pagesizes
    int64_t *reserved
    int64_t *pins           # per guest: n_hosts rows of vcpu_n pCPUs, from pin_base[guest]
    Py_ssize_t *pin_base
    # The search.
    int *chosen
    int *owner
    char *taken
    char *seen


cdef void _nf_prepare_hosts(_NfWork *w) noexcept nogil:
    cdef Py_ssize_t h, i, e, t, pos, out
    cdef _NfHostCell *c
    cdef uint64_t *shared
    cdef uint64_t *dedicated
    cdef uint64_t *free_
    cdef int64_t cpu, length
    out = 0
    for h in range(w.n_hosts):
        c = &w.hosts[h]
        shared = w.bits + (3 * h) * w.words
        dedicated = shared + w.words
        free_ = dedicated + w.words
        cs_clear(shared, 3 * w.words)
        for i in range(c.cpuset_n):
            cs_add(shared, <int>w.ids[c.cpuset_off + i])
        for i in range(c.pcpuset_n):
            cs_add(dedicated, <int>w.ids[c.pcpuset_off + i])
        for i in range(c.pinned_n):
            cs_add(free_, <int>w.ids[c.pinned_off + i])
        cs_difference(free_, dedicated, free_, w.words)
        c.n_shared = cs_count(shared, w.words)
        c.n_dedicated = cs_count(dedicated, w.words)
        c.n_free = cs_count(free_, w.words)
        c.legacy = cs_equal(shared, dedicated, w.words)
        c.threads_per_core = 1 if c.sib_n == 0 else 0
        c.widest = 0
        c.core_off = out
        pos = c.sib_ids_off
        for e in range(c.sib_n):
            length = w.sib_lens[c.sib_off + e]
            if length > c.threads_per_core:
                c.threads_per_core = <int>length
            w.core_lens[c.sib_off + e] = 0
            for t in range(length):
                cpu = w.ids[pos + t]
                if cs_has(free_, <int>cpu):
                    w.core_threads[out + w.core_lens[c.sib_off + e]] = cpu
                    w.core_lens[c.sib_off + e] += 1
            _nf_sort(w.core_threads + out, w.core_lens[c.sib_off + e])
            if w.core_lens[c.sib_off + e] > c.widest:
                c.widest = <int>w.core_lens[c.sib_off + e]
            out += length
            pos += length


cdef void _nf_order_hosts(_NfWork *w) noexcept nogil:
    # Nova sorts stably by free memory (descending) and then stably by its second key, so
    # the order is by (second key, free memory descending, given position).
    cdef Py_ssize_t i, j, n = w.n_hosts
    cdef int cur
    cdef bint by_usage
    for i in range(n):
        w.order[i] = <int>i
    if n <= w.n_guests:
        return
    by_usage = w.guests[0].policy == _NF_POL_NONE or w.guests[0].policy == _NF_POL_SHARED
    for i in range(1, n):
        cur = w.order[i]
        j = i - 1
        while j >= 0 and _nf_before(w, cur, w.order[j], by_usage):
            w.order[j + 1] = w.order[j]
            j -= 1
        w.order[j + 1] = cur


cdef inline bint _nf_before(_NfWork *w, int a, int b, bint by_usage) noexcept nogil:
    """Whether host cell a strictly precedes b (ties keep the given order)."""
    cdef _NfHostCell *x = &w.hosts[a]
    cdef _NfHostCell *y = &w.hosts[b]
    if by_usage:
        if x.cpu_usage != y.cpu_usage:
            return x.cpu_usage < y.cpu_usage
    elif x.n_free != y.n_free:
        return x.n_free > y.n_free
    return (x.memory - x.memory_usage) > (y.memory - y.memory_usage)


cdef inline bint _nf_pool_fits(const int64_t *pool, int64_t memory_kb, bint use_free) noexcept nogil:
    cdef int64_t pages = pool[1] - pool[2] - pool[3] if use_free else pool[1]
    return memory_kb <= pages * pool[0] and memory_kb % pool[0] == 0


cdef int64_t _nf_pick_pagesize(_NfWork *w, _NfHostCell *c, int64_t memory_mb,
                               int64_t request) noexcept nogil:
    """The page size a request gets on the cell (largest candidate first), or 0."""
    cdef const int64_t *pools = w.pools + 4 * c.pool_off
    cdef Py_ssize_t i
    cdef int64_t smallest = -1, best, bound, size
    cdef int64_t memory_kb = memory_mb * 1024
    if c.pool_n == 0:
        return 0
    for i in range(c.pool_n):
        if smallest < 0 or pools[4 * i] < smallest:
            smallest = pools[4 * i]
    if request > 0:
        for i in range(c.pool_n):
            if pools[4 * i] == request:
                return request if _nf_pool_fits(pools + 4 * i, memory_kb, True) else 0
        return 0
    if request == _NF_PAGE_SMALL:
        for i in range(c.pool_n):
            if pools[4 * i] == smallest:
                return smallest if _nf_pool_fits(pools + 4 * i, memory_kb, True) else 0
        return 0
    if request != _NF_PAGE_LARGE and request != _NF_PAGE_ANY:
        return 0
    # large / any: candidates from the largest size down; large never takes the smallest.
    bound = -1
    while True:
        best = -1
        for i in range(c.pool_n):
            size = pools[4 * i]
            if (bound < 0 or size < bound) and (best < 0 or size > pools[4 * best]):
                best = i
        if best < 0:
            return 0
        size = pools[4 * best]
        if request == _NF_PAGE_LARGE and size == smallest:
            return 0
        if _nf_pool_fits(pools + 4 * best, memory_kb, True):
            return size
        bound = size


cdef bint _nf_take(_NfWork *w, _NfHostCell *c, _NfGuestCell *g, int width, int min_len,
                   int reserve, bint whole_cores, bint singles, int64_t *pins,
                   int64_t *reserved) noexcept nogil:
    """Pin g's vCPUs to the first ``width`` free threads of each core with at least
    ``min_len`` of them (``singles``: every free thread), then find the emulator pCPUs.
    False when there are not enough threads."""
    cdef Py_ssize_t e, t, k = 0, need = g.vcpu_n, eligible = 0
    cdef Py_ssize_t base = c.core_off
    cdef Py_ssize_t pos
    cdef int64_t length, cpu
    cdef int found
    cdef const int64_t *lens = w.core_lens + c.sib_off
    cdef const int64_t *sl = w.sib_lens + c.sib_off
    # Capacity first, as Nova does: width threads per eligible core.
    if singles:
        eligible = c.n_free
    else:
        for e in range(c.sib_n):
            if lens[e] >= min_len and lens[e] > 0:
                eligible += 1
        eligible *= width
    if eligible < need:
        return False
    if reserve:
        cs_clear(w.used, w.words)
    pos = base
    for e in range(c.sib_n):
        if k == need:
            break
        length = lens[e]
        if length > 0 and (singles or length >= min_len):
            for t in range(length if singles else width):
                if k == need:
                    break
                cpu = w.core_threads[pos + t]
                pins[k] = cpu
                k += 1
                if reserve:
                    cs_add(w.used, <int>cpu)
        pos += sl[e]
    if not reserve:
        reserved[0] = -1
        return True
    # The emulator pCPU: the first free thread, in core order, the guest does not use (for
    # isolate, on no core the guest uses).
    found = 0
    pos = base
    for e in range(c.sib_n):
        length = lens[e]
        if whole_cores:
            for t in range(length):
                if cs_has(w.used, <int>w.core_threads[pos + t]):
                    length = 0
                    break
        for t in range(length):
            cpu = w.core_threads[pos + t]
            if not cs_has(w.used, <int>cpu):
                reserved[0] = cpu
                return True
        pos += sl[e]
    return False


cdef bint _nf_pack(_NfWork *w, _NfHostCell *c, _NfGuestCell *g, int reserve, int64_t *pins,
                   int64_t *reserved) noexcept nogil:
    """Nova's _pack_instance_onto_cores for one pair."""
    cdef Py_ssize_t e
    cdef int width, lowest, whole = 0
    if g.thread_policy == _NF_THR_ISOLATE:
        for e in range(c.sib_n):
            if w.core_lens[c.sib_off + e] == c.threads_per_core and c.threads_per_core > 0:
                whole += 1
        if whole == 0:
            return False
        # Nova isolates on SMT hosts only with the legacy vcpu_pin_set configuration
        # (bug 1889633).
        if c.threads_per_core != 1 and not c.legacy:
            return False
        return _nf_take(w, c, g, 1, c.threads_per_core, reserve, True, False, pins, reserved)
    if g.thread_policy == _NF_THR_REQUIRE and c.threads_per_core <= 1:
        return False
    lowest = 2 if g.thread_policy == _NF_THR_REQUIRE else 1
    width = c.widest
    while width >= lowest:
        if _nf_take(w, c, g, width, width, reserve, False, False, pins, reserved):
            return True
        width -= 1
    if g.thread_policy == _NF_THR_REQUIRE:
        return False
    return _nf_take(w, c, g, 1, 1, reserve, False, True, pins, reserved)


cdef bint _nf_fit_pair(_NfWork *w, Py_ssize_t gi, Py_ssize_t pos) noexcept nogil:
    """Nova's _numa_fit_instance_cell for guest cell gi on the host cell at position pos."""
    cdef _NfGuestCell *g = &w.guests[gi]
    cdef _NfHostCell *c = &w.hosts[w.order[pos]]
    cdef Py_ssize_t slot = gi * w.n_hosts + pos
    cdef int reserve = w.reserve if gi == 0 else 0
    cdef bint pinned = _nf_pinned(g.policy)
    cdef const int64_t *pools = w.pools + 4 * c.pool_off
    cdef Py_ssize_t i, smallest
    w.pagesizes[slot] = 0
    w.reserved[slot] = -1
    if g.pagesize:
        w.pagesizes[slot] = _nf_pick_pagesize(w, c, g.memory, g.pagesize)
        if w.pagesizes[slot] == 0:
            return False
    elif c.pool_n:
        # No page size asked: small pages; only pinned guests need them free.
        smallest = 0
        for i in range(1, c.pool_n):
            if pools[4 * i] < pools[4 * smallest]:
                smallest = i
        if not _nf_pool_fits(pools + 4 * smallest, g.memory * 1024, pinned):
            return False
    elif pinned:
        # Only a cell that reports no page pools holds pinned guests to its free memory: with
        # pools, the pool the guest's pages come from is the whole check (Nova 34), so huge
        # pages stay usable when small-page guests have used up the cell's memory.
        if c.memory - c.memory_usage < g.memory:
            return False
    elif g.memory > c.memory:
        return False
    if pinned and g.vcpu_n + reserve > c.n_dedicated:
        return False
    if _nf_shared(g.policy) and g.n_shared > c.n_shared:
        return False
    if pinned:
        if c.n_free < g.vcpu_n + reserve:
            return False
        if not _nf_pack(w, c, g, reserve, w.pins + w.pin_base[gi] + pos * g.vcpu_n,
                        &w.reserved[slot]):
            return False
    if _nf_shared(g.policy) and w.has_limits:
        if <double>(c.cpu_usage + g.n_shared) > <double>c.n_shared * w.cpu_ratio:
            return False
        if <double>(c.memory_usage + g.memory) > <double>c.memory * w.ram_ratio:
            return False
    return True


cdef bint _nf_augment(_NfWork *w, Py_ssize_t row) noexcept nogil:
    cdef Py_ssize_t col, n = w.n_hosts
    for col in range(n):
        if not w.fits[row * n + col] or w.taken[col] or w.seen[col]:
            continue
        w.seen[col] = 1
        if w.owner[col] < 0 or _nf_augment(w, w.owner[col]):
            w.owner[col] = <int>row
            return True
    return False


cdef bint _nf_matchable(_NfWork *w, Py_ssize_t first_row) noexcept nogil:
    """Whether guest cells first_row.. can each get a distinct host cell not yet taken."""
    cdef Py_ssize_t row, col
    for col in range(w.n_hosts):
        w.owner[col] = -1
    for row in range(first_row, w.n_guests):
        for col in range(w.n_hosts):
            w.seen[col] = 0
        if not _nf_augment(w, row):
            return False
    return True


cdef bint _nf_search(_NfWork *w) noexcept nogil:
    """The first host cell per guest cell, in order, that keeps a full assignment possible."""
    cdef Py_ssize_t gi, pos
    cdef bint placed
    for gi in range(w.n_guests):
        for pos in range(w.n_hosts):
            w.fits[gi * w.n_hosts + pos] = _nf_fit_pair(w, gi, pos)
    for pos in range(w.n_hosts):
        w.taken[pos] = 0
    if not _nf_matchable(w, 0):
        return False
    for gi in range(w.n_guests):
        placed = False
        for pos in range(w.n_hosts):
            if not w.fits[gi * w.n_hosts + pos] or w.taken[pos]:
                continue
            w.taken[pos] = 1
            if _nf_matchable(w, gi + 1):
                w.chosen[gi] = <int>pos
                placed = True
                break
            w.taken[pos] = 0
        if not placed:
            return False
    return True


cdef inline char *_nf_carve(char **cursor, Py_ssize_t n, size_t size) noexcept nogil:
    # Slices of the single work allocation, each 8-byte aligned.
    cdef char *p = cursor[0]
    cdef size_t bytes_ = ((<size_t>n * size) + 7) & ~(<size_t>7)
    cursor[0] = p + bytes_
    return p


cdef inline size_t _nf_span(Py_ssize_t n, size_t size) noexcept nogil:
    return ((<size_t>n * size) + 7) & ~(<size_t>7)


cdef class NumaHost:
    """A host's NUMA cells read once into C arrays (the corpus's host shape), with each
    cell's CPU bitmaps and per-core free threads worked out: an immutable snapshot that any
    number of numa_fit calls, in any threads, can share. Build a new one when the host's
    usage changes: given the one before as ``previous``, the CPU lists of every cell whose
    ``cpuset``, ``pcpuset`` and ``siblings`` are the very same list objects as then are copied
    from it instead of read again (only usage, pinned CPUs and pages are), which is most of the
    work on a big host."""

    cdef _NfHostCell *hosts
    cdef Py_ssize_t n_hosts
    cdef _NfBuf ids
    cdef _NfBuf sib_lens
    cdef _NfBuf pools
    cdef char *derived
    cdef Py_ssize_t words
    cdef uint64_t *bits
    cdef int64_t *core_threads
    cdef int64_t *core_lens
    cdef list sources        # per cell: (cpuset, pcpuset, siblings) as read, for ``previous``

    def __cinit__(self, dict host, NumaHost previous=None):
        cdef list host_cells = <list?>host["cells"]
        cdef Py_ssize_t h, i, length, n_sib_ids = 0
        cdef int64_t top = 0, v
        cdef dict cell, pool
        cdef object sib, entry, cpuset, pcpuset, siblings
        cdef tuple old
        cdef _NfHostCell *c
        cdef _NfHostCell *pc
        cdef _NfWork w
        cdef char *cursor
        self.n_hosts = len(host_cells)
        _nf_heap_init(&self.ids, 1024)
        _nf_heap_init(&self.sib_lens, 256)
        _nf_heap_init(&self.pools, 64)
        self.hosts = <_NfHostCell *>_nf_malloc(_nf_span(self.n_hosts, sizeof(_NfHostCell)) or 8)
        if self.hosts is NULL:
            raise MemoryError()
        self.sources = []
        for h in range(self.n_hosts):
            cell = <dict?>host_cells[h]
            c = &self.hosts[h]
            c.id = cell["id"]
            c.memory = cell["memory"]
            c.memory_usage = cell["memory_usage"]
            c.cpu_usage = cell["cpu_usage"]
            cpuset, pcpuset, siblings = cell["cpuset"], cell["pcpuset"], cell["siblings"]
            self.sources.append((cpuset, pcpuset, siblings))
            old = None
            if previous is not None and h < previous.n_hosts:
                old = <tuple>previous.sources[h]
                if not (old[0] is cpuset and old[1] is pcpuset and old[2] is siblings):
                    old = None
            c.pinned_off = self.ids.n
            _nf_push_list(&self.ids, cell["pinned_cpus"], &c.pinned_n)
            c.sib_off = self.sib_lens.n
            if old is not None:
                pc = &previous.hosts[h]
                c.cpuset_off = self.ids.n
                c.cpuset_n = pc.cpuset_n
                _nf_push_copy(&self.ids, previous.ids.data + pc.cpuset_off, pc.cpuset_n)
                c.pcpuset_off = self.ids.n
                c.pcpuset_n = pc.pcpuset_n
                _nf_push_copy(&self.ids, previous.ids.data + pc.pcpuset_off, pc.pcpuset_n)
                c.sib_ids_off = self.ids.n
                c.sib_n = pc.sib_n
                _nf_push_copy(&self.sib_lens, previous.sib_lens.data + pc.sib_off, pc.sib_n)
                length = 0
                for i in range(pc.sib_n):
                    length += previous.sib_lens.data[pc.sib_off + i]
                _nf_push_copy(&self.ids, previous.ids.data + pc.sib_ids_off, length)
                n_sib_ids += length
            else:
                c.cpuset_off = self.ids.n
                _nf_push_list(&self.ids, cpuset, &c.cpuset_n)
                c.pcpuset_off = self.ids.n
                _nf_push_list(&self.ids, pcpuset, &c.pcpuset_n)
                c.sib_ids_off = self.ids.n
                c.sib_n = 0
                for sib in <list?>siblings:
                    _nf_push_list(&self.ids, sib, &length)
                    _nf_push(&self.sib_lens, length)
                    n_sib_ids += length
                    c.sib_n += 1
            c.pool_off = self.pools.n // 4
            c.pool_n = 0
            for entry in <list?>cell["mempages"]:
                pool = <dict?>entry
                _nf_reserve(&self.pools, 4)
                self.pools.data[self.pools.n] = pool["size_kb"]
                self.pools.data[self.pools.n + 1] = pool["total"]
                self.pools.data[self.pools.n + 2] = pool["used"]
                self.pools.data[self.pools.n + 3] = pool["reserved"]
                if self.pools.data[self.pools.n] <= 0:
                    raise ValueError("a page size must be positive")
                self.pools.n += 4
                c.pool_n += 1
        for i in range(self.ids.n):
            v = self.ids.data[i]
            if v < 0:
                raise ValueError(f"CPU id {v} is negative")
            if v > top:
                top = v
        self.words = (top >> 6) + 1
        self.derived = <char *>_nf_malloc(
            _nf_span(3 * self.n_hosts * self.words, sizeof(uint64_t))
            + _nf_span(n_sib_ids, sizeof(int64_t)) + _nf_span(self.sib_lens.n, sizeof(int64_t))
            + 8)
        if self.derived is NULL:
            raise MemoryError()
        _nf_memset(&w, 0, sizeof(w))
        with nogil:
            cursor = self.derived
            self.bits = <uint64_t *>_nf_carve(&cursor, 3 * self.n_hosts * self.words,
                                              sizeof(uint64_t))
            self.core_threads = <int64_t *>_nf_carve(&cursor, n_sib_ids, sizeof(int64_t))
            self.core_lens = <int64_t *>_nf_carve(&cursor, self.sib_lens.n, sizeof(int64_t))
            self._attach(&w)
            _nf_prepare_hosts(&w)

    cdef void _attach(self, _NfWork *w) noexcept nogil:
        w.hosts = self.hosts
        w.n_hosts = self.n_hosts
        w.ids = self.ids.data
        w.sib_lens = self.sib_lens.data
        w.pools = self.pools.data
        w.words = self.words
        w.bits = self.bits
        w.core_threads = self.core_threads
        w.core_lens = self.core_lens

    def __len__(self):
        return self.n_hosts

    def __dealloc__(self):
        _nf_free(self.hosts)
        _nf_free(self.derived)
        _nf_buf_free(&self.ids)
        _nf_buf_free(&self.sib_lens)
        _nf_buf_free(&self.pools)


cdef int _nf_heap_init(_NfBuf *b, Py_ssize_t cap) except -1:
    b.data = <int64_t *>_nf_malloc(<size_t>cap * sizeof(int64_t))
    if b.data is NULL:
        raise MemoryError()
    b.n = 0
    b.cap = cap
    b.heap = True
    return 0


def numa_fit(host, dict request, limits=None):
    """Nova 34's numa_fit_instance_to_host on the corpus's JSON shapes: the placement
    ``{"cells": [{host_cell, pinning, cpuset_reserved, pagesize}, ...]}`` or None.

    ``host`` is the host dict or a NumaHost built from it (cheaper when fitting many
    requests to the same host state)."""
    cdef NumaHost nh = host if isinstance(host, NumaHost) else NumaHost(host)
    cdef list guest_cells = <list?>request["cells"]
    cdef Py_ssize_t n_hosts = nh.n_hosts, n_guests = len(guest_cells)
    if n_guests == 0 or n_hosts < n_guests:
        return None
    cdef _NfWork w
    cdef _NfBuf gids
    cdef int64_t gids_stack[512]
    cdef char *work_mem = NULL
    cdef char *cursor
    cdef size_t total
    cdef Py_ssize_t h, gi, i, k, pin_total = 0, pairs
    cdef dict cell
    cdef object pagesize
    cdef bint ok
    cdef list out_cells, pinning
    cdef _NfGuestCell *g
    cdef int64_t *pins
    _nf_memset(&w, 0, sizeof(w))
    _nf_buf_init(&gids, gids_stack, 512)
    nh._attach(&w)
    w.n_guests = n_guests
    try:
        pairs = n_guests * n_hosts
        work_mem = <char *>_nf_malloc(
            _nf_span(n_guests, sizeof(_NfGuestCell))
            + _nf_span(nh.words, sizeof(uint64_t))
            + _nf_span(n_hosts, sizeof(int)) * 2
            + _nf_span(pairs, 1)
            + _nf_span(pairs, sizeof(int64_t)) * 2
            + _nf_span(n_guests, sizeof(Py_ssize_t))
            + _nf_span(n_guests, sizeof(int))
            + _nf_span(n_hosts, 1) * 2)
        if work_mem is NULL:
            raise MemoryError()
        cursor = work_mem
        w.guests = <_NfGuestCell *>_nf_carve(&cursor, n_guests, sizeof(_NfGuestCell))
        w.used = <uint64_t *>_nf_carve(&cursor, nh.words, sizeof(uint64_t))
        w.order = <int *>_nf_carve(&cursor, n_hosts, sizeof(int))
        w.owner = <int *>_nf_carve(&cursor, n_hosts, sizeof(int))
        w.fits = _nf_carve(&cursor, pairs, 1)
        w.pagesizes = <int64_t *>_nf_carve(&cursor, pairs, sizeof(int64_t))
        w.reserved = <int64_t *>_nf_carve(&cursor, pairs, sizeof(int64_t))
        w.pin_base = <Py_ssize_t *>_nf_carve(&cursor, n_guests, sizeof(Py_ssize_t))
        w.chosen = <int *>_nf_carve(&cursor, n_guests, sizeof(int))
        w.taken = _nf_carve(&cursor, n_hosts, 1)
        w.seen = _nf_carve(&cursor, n_hosts, 1)
        for gi in range(n_guests):
            cell = <dict?>guest_cells[gi]
            g = &w.guests[gi]
            g.memory = cell["memory"]
            pagesize = cell.get("pagesize")
            g.pagesize = 0 if pagesize is None else pagesize
            g.policy = _nf_policy(cell.get("cpu_policy"))
            g.thread_policy = _nf_thread_policy(cell.get("cpu_thread_policy"))
            g.n_shared = len(<list?>cell["cpuset"])
            g.vcpu_off = gids.n
            if _nf_pinned(g.policy):
                _nf_push_list(&gids, cell["pcpuset"], &g.vcpu_n)
            else:
                g.vcpu_n = 0
            w.pin_base[gi] = pin_total
            pin_total += g.vcpu_n * n_hosts
        # The pinning found for every pair goes after the guests' vCPUs.
        _nf_reserve(&gids, pin_total)
        w.gids = gids.data
        w.pins = gids.data + gids.n
        w.reserve = 1 if request.get("emulator_threads_policy") == "isolate" else 0
        w.has_limits = bool(limits)
        if w.has_limits:
            w.cpu_ratio = limits["cpu_allocation_ratio"]
            w.ram_ratio = limits["ram_allocation_ratio"]
        with nogil:
            for gi in range(n_guests):
                _nf_sort(w.gids + w.guests[gi].vcpu_off, w.guests[gi].vcpu_n)
            _nf_order_hosts(&w)
            ok = _nf_search(&w)
        if not ok:
            return None
        out_cells = []
        for gi in range(n_guests):
            g = &w.guests[gi]
            h = w.chosen[gi]
            i = gi * n_hosts + h
            pins = w.pins + w.pin_base[gi] + h * g.vcpu_n
            pinning = []
            for k in range(g.vcpu_n):
                pinning.append([w.gids[g.vcpu_off + k], pins[k]])
            out_cells.append({
                "host_cell": w.hosts[w.order[h]].id,
                "pinning": pinning,
                "cpuset_reserved": None if w.reserved[i] < 0 else [w.reserved[i]],
                "pagesize": w.pagesizes[i] if g.pagesize else None,
            })
        return {"cells": out_cells}
    finally:
        _nf_free(work_mem)
        _nf_buf_free(&gids)
