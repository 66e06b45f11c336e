# The image copier: one file to another as fast as the kernel allows, keeping holes.
#
# Order of attempts: a reflink (FICLONE: shared extents, O(1) on btrfs and XFS), then
# copy_file_range (in-kernel, no user-space buffers), then sendfile, then pread/pwrite.
# Only the data extents found with SEEK_DATA/SEEK_HOLE are copied, at their offsets, and the
# destination is sized with ftruncate at the end, so every hole of the source stays a hole.

import os as _copy_os

from libc.errno cimport errno, ENXIO, EINVAL, ENOSYS, EXDEV, EOPNOTSUPP, EINTR, ENOTTY, ENOMEM
from libc.stdlib cimport malloc, free
from libc.string cimport strerror
from posix.types cimport off_t
from posix.stat cimport struct_stat, fstat
from posix.fcntl cimport open as c_open, O_RDONLY, O_WRONLY, O_CREAT, O_TRUNC, O_CLOEXEC
from posix.unistd cimport close as c_close, unlink as c_unlink, ftruncate as c_ftruncate
from posix.unistd cimport fsync as c_fsync, lseek as c_lseek, pread as c_pread, pwrite as c_pwrite

cdef extern from "<unistd.h>" nogil:
    enum:
        SEEK_DATA
        SEEK_HOLE
    ssize_t copy_file_range(int fd_in, off_t *off_in, int fd_out, off_t *off_out,
                            size_t length, unsigned int flags)

cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/fs.h>" nogil:
    enum:
        FICLONE

cdef enum _CopyMethod:
    _M_REFLINK = 0
    _M_CFR = 1
    _M_SENDFILE = 2
    _M_RW = 3

_COPY_METHOD_NAMES = ("reflink", "copy_file_range", "sendfile", "readwrite")

cdef enum:
    # Bytes moved per kernel call: large enough that the syscall cost is noise.
    _COPY_STEP = 8 << 20
    _RW_BUF = 1 << 20


cdef inline bint _copy_fallback(int err) noexcept nogil:
    # Errors meaning "this mechanism does not work between these files", not "the copy failed".
    return err == EXDEV or err == ENOSYS or err == EINVAL or err == EOPNOTSUPP or err == ENOTTY


cdef int _copy_range(int sfd, int dfd, off_t start, off_t end, int *method,
                     char **buf, off_t *copied) noexcept nogil:
    """Copy [start, end) to the same offsets, falling back between methods; 0 or an errno."""
    cdef off_t off_in = start
    cdef off_t off_out = start
    cdef ssize_t n = 0
    cdef ssize_t w
    cdef ssize_t k
    cdef size_t want
    while off_in < end:
        want = <size_t>(end - off_in)
        if want > _COPY_STEP:
            want = _COPY_STEP
        if method[0] == _M_CFR:
            n = copy_file_range(sfd, &off_in, dfd, &off_out, want, 0)
            if n < 0:
                if errno == EINTR:
                    continue
                if _copy_fallback(errno) and copied[0] == 0:
                    method[0] = _M_SENDFILE
                    continue
                return errno
        elif method[0] == _M_SENDFILE:
            if c_lseek(dfd, off_out, 0) < 0:
                return errno
            n = sendfile(dfd, sfd, &off_in, want)
            if n < 0:
                if errno == EINTR:
                    continue
                if _copy_fallback(errno) and copied[0] == 0:
                    method[0] = _M_RW
                    continue
                return errno
            off_out += n
        else:
            if buf[0] == NULL:
                buf[0] = <char *>malloc(_RW_BUF)
                if buf[0] == NULL:
                    return ENOMEM
            if want > _RW_BUF:
                want = _RW_BUF
            n = c_pread(sfd, buf[0], want, off_in)
            if n < 0:
                if errno == EINTR:
                    continue
                return errno
            w = 0
            while w < n:
                k = c_pwrite(dfd, buf[0] + w, <size_t>(n - w), off_out + w)
                if k < 0:
                    if errno == EINTR:
                        continue
                    return errno
                w += k
            off_in += n
            off_out += n
        if n == 0:
            # The source shrank under us: a copy that silently ends short is worse than an error.
            return ENXIO
        copied[0] += n
    return 0


cdef int _next_extent(int sfd, off_t pos, off_t size, bint *seekable,
                      off_t *start, off_t *end) noexcept nogil:
    """Find the next data extent at or after pos: 1 found, 0 none left, -errno on error."""
    cdef off_t d
    cdef off_t h
    if pos >= size:
        return 0
    if not seekable[0]:
        start[0] = pos
        end[0] = size
        return 1
    d = c_lseek(sfd, pos, SEEK_DATA)
    if d < 0:
        if errno == ENXIO:
            return 0
        if errno == EINVAL or errno == EOPNOTSUPP:
            # The file system cannot tell holes from data: copy everything.
            seekable[0] = False
            start[0] = pos
            end[0] = size
            return 1
        return -errno
    h = c_lseek(sfd, d, SEEK_HOLE)
    if h < 0:
        return -errno
    if h > size:
        h = size
    start[0] = d
    end[0] = h
    return 1


cdef object _copy_error(int err, str path):
    return OSError(err, strerror(err).decode(), path)


def copy_file(str src, str dst, object progress=None, bint sync=True,
              long long progress_step=256 << 20):
    """Copy ``src`` to ``dst`` (created or truncated), keeping holes.

    Returns ``(data_bytes, method)``: the bytes of data copied (holes excluded) and the
    mechanism that did it (``reflink``, ``copy_file_range``, ``sendfile``, ``readwrite``, or
    ``none`` for a file without data). ``progress(done, total)`` is called with the GIL held
    every ``progress_step`` bytes of data and once at the end. ``sync`` fsyncs ``dst``. On any
    error, or an exception from ``progress``, ``dst`` is removed and the error raised.
    """
    cdef bytes bsrc = _copy_os.fsencode(src)
    cdef bytes bdst = _copy_os.fsencode(dst)
    cdef const char *csrc = bsrc
    cdef const char *cdst = bdst
    cdef int sfd = -1
    cdef int dfd = -1
    cdef int err = 0
    cdef int r = 0
    cdef struct_stat st
    cdef off_t size = 0
    cdef off_t pos = 0
    cdef off_t start = 0
    cdef off_t end = 0
    cdef off_t total = 0
    cdef off_t copied = 0
    cdef off_t reported = 0
    cdef bint seekable = True
    cdef int method = _M_CFR
    cdef bint used = False
    cdef char *buf = NULL
    if progress_step <= 0:
        raise ValueError("progress_step must be positive")

    with nogil:
        sfd = c_open(csrc, O_RDONLY | O_CLOEXEC)
        if sfd < 0:
            err = errno
        elif fstat(sfd, &st) < 0:
            err = errno
    if err:
        if sfd >= 0:
            c_close(sfd)
        raise _copy_error(err, src)
    size = st.st_size
    try:
        # Opening the destination truncates it: when it is the source, that would be the end.
        try:
            dst_st = _copy_os.stat(dst)
        except FileNotFoundError:
            dst_st = None
        if dst_st is not None and dst_st.st_dev == st.st_dev and dst_st.st_ino == st.st_ino:
            raise _copy_error(EINVAL, dst)
        with nogil:
            dfd = c_open(cdst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if dfd < 0:
                err = errno
        if err:
            raise _copy_error(err, dst)
        try:
            with nogil:
                # Total data first, so that progress has a meaningful denominator.
                while True:
                    r = _next_extent(sfd, pos, size, &seekable, &start, &end)
                    if r <= 0:
                        break
                    total += end - start
                    pos = end
                if r < 0:
                    err = -r
                elif total > 0 and ioctl(dfd, FICLONE, sfd) == 0:
                    method = _M_REFLINK
                    copied = total
                    used = True
            if err:
                raise _copy_error(err, src if r < 0 else dst)
            pos = 0
            while method != _M_REFLINK:
                with nogil:
                    r = _next_extent(sfd, pos, size, &seekable, &start, &end)
                    if r > 0:
                        # Slices of progress_step keep the callback at its pace on huge extents.
                        if end - start > progress_step:
                            end = start + progress_step
                        err = _copy_range(sfd, dfd, start, end, &method, &buf, &copied)
                        used = True
                        pos = end
                if r < 0:
                    raise _copy_error(-r, src)
                if err:
                    raise _copy_error(err, dst)
                if r == 0:
                    break
                if progress is not None and copied - reported >= progress_step:
                    reported = copied
                    progress(int(copied), int(total))
            with nogil:
                # Sized at the end, not first: writes that extend the file are the common,
                # fastest case in every file system, and the holes between extents (and after
                # the last one) appear by themselves.
                if method != _M_REFLINK and c_ftruncate(dfd, size) < 0:
                    err = errno
                elif sync and c_fsync(dfd) < 0:
                    err = errno
            if err:
                raise _copy_error(err, dst)
            if progress is not None:
                progress(int(copied), int(total))
            r = c_close(dfd)
            dfd = -1
            if r < 0:
                raise _copy_error(errno, dst)
        except BaseException:
            if dfd >= 0:
                c_close(dfd)
            c_unlink(cdst)
            raise
    finally:
        c_close(sfd)
        if buf != NULL:
            free(buf)
    return int(copied), (_COPY_METHOD_NAMES[method] if used else "none")
