#!/usr/bin/python3
"""libnbd-driven NBD edge cases for ferroblock.

Usage: /usr/bin/python3 tests/nbd_edge_cases.py nbd://127.0.0.1:PORT/vol0

Needs Debian's python3-libnbd (the `nbd` module), importable only by
/usr/bin/python3.  Expects a fresh memory-backend server (all zeros, sparse)
of at least 16 MiB.  Exits 0 and prints "ALL EDGE CASES PASSED" on success;
otherwise prints every failed check and exits 1.
"""

import errno
import os
import sys
import traceback
from urllib.parse import urlparse

try:
    import nbd
except ImportError as e:  # pragma: no cover
    print("cannot import nbd (install python3-libnbd and use /usr/bin/python3): %s" % e)
    sys.exit(2)

PAGE = 4096
MIB = 1024 * 1024
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO

failures = []


class CheckFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def connect(uri, strict=None):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if strict is not None:
        h.set_strict_mode(strict)
    h.connect_uri(uri)
    return h


def expect_errno(fn, want, what):
    """Run fn(); it must raise nbd.Error with errno `want` (an errno number)."""
    try:
        fn()
    except nbd.Error as e:
        check(
            e.errnum == want,
            "%s: expected %s, got errno %s (%s)"
            % (what, errno.errorcode[want], e.errnum, e),
        )
        return
    raise CheckFailed("%s: expected failure with %s, but it succeeded" % (what, errno.errorcode[want]))


def extents(h, offset, count, flags=0):
    """block_status as a list of (offset, length, flags), truncated to the request."""
    got = []

    def cb(metacontext, off, entries, err):
        if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        pos = off
        for i in range(0, len(entries), 2):
            got.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(count, offset, cb, flags)
    check(got, "block_status at %d+%d returned no extents" % (offset, count))
    check(got[0][0] == offset, "block_status extents do not start at the request offset")
    return got


def page_flags(h, offset, count):
    """Status flags for every 4 KiB page in [offset, offset+count) (aligned): the AND of the flags of
    every extent overlapping the page, so a page with any data in it reads as data whatever the
    server's allocation granularity."""
    end = offset + count
    pages = [None] * (count // PAGE)
    pos = offset
    while pos < end:
        ext = extents(h, pos, end - pos)
        check(len(ext) > 0, "no extents returned at %d" % pos)
        for (o, length, fl) in ext:
            check(length > 0, "zero-length extent")
            stop = min(o + length, end)
            first = (max(o, offset) - offset) // PAGE
            last = (stop - 1 - offset) // PAGE
            for p in range(first, last + 1):
                pages[p] = fl if pages[p] is None else (pages[p] & fl)
            pos = stop
            if pos >= end:
                break
    return pages


def pattern(byte, n):
    return bytes([byte]) * n


# ---------------------------------------------------------------------------


def t_opt_mode(uri, export):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    check(h.aio_is_negotiating(), "not in negotiation after connect in opt mode")
    check(h.get_structured_replies_negotiated(), "structured replies not negotiated")

    names = []
    n = h.opt_list(lambda name, desc: names.append(name) or 0)
    check(export in names, "opt_list did not list %r: %r" % (export, names))
    check(n == len(names), "opt_list count %d != %d callbacks" % (n, len(names)))

    h.set_export_name(export)
    h.opt_info()
    size = h.get_size()
    check(size >= 16 * MIB, "opt_info size %d too small" % size)
    check(h.get_block_size(nbd.SIZE_MINIMUM) == 512, "opt_info min block size")

    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    check(nbd.CONTEXT_BASE_ALLOCATION in ctxs, "meta contexts listed: %r" % ctxs)
    # With an empty query list the server lists everything it supports.
    h.clear_meta_contexts()
    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    check(nbd.CONTEXT_BASE_ALLOCATION in ctxs, "meta contexts (all) listed: %r" % ctxs)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

    # Unknown export: opt_info fails, connection stays usable.
    h.set_export_name("no-such-export")
    try:
        h.opt_info()
        raise CheckFailed("opt_info for an unknown export succeeded")
    except nbd.Error:
        pass
    try:
        h.opt_go()
        raise CheckFailed("opt_go for an unknown export succeeded")
    except nbd.Error:
        pass
    check(h.aio_is_negotiating(), "handle left negotiation after a failed opt_go")

    h.set_export_name(export)
    h.opt_go()
    check(h.aio_is_ready(), "not ready after opt_go")
    check(h.get_size() == size, "size changed between opt_info and opt_go")
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
    h.shutdown()


def t_unknown_export_uri(uri, export):
    u = urlparse(uri)
    bad = "nbd://%s/no-such-export" % u.netloc
    h = nbd.NBD()
    try:
        h.connect_uri(bad)
        raise CheckFailed("connect_uri to an unknown export succeeded")
    except nbd.Error:
        pass


def t_abort(uri, export):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.opt_abort()
    check(h.aio_is_closed() or h.aio_is_dead(), "handle not closed after opt_abort")


def t_block_size_and_flags(uri, export):
    h = connect(uri)
    check(h.get_block_size(nbd.SIZE_MINIMUM) == 512,
          "minimum block size %d" % h.get_block_size(nbd.SIZE_MINIMUM))
    check(h.get_block_size(nbd.SIZE_PREFERRED) == 4096,
          "preferred block size %d" % h.get_block_size(nbd.SIZE_PREFERRED))
    check(h.get_block_size(nbd.SIZE_MAXIMUM) == 33554432,
          "maximum block size %d" % h.get_block_size(nbd.SIZE_MAXIMUM))
    for name in ["can_multi_conn", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_cache", "can_df", "can_flush"]:
        check(getattr(h, name)() is True, "%s() is not true" % name)
    check(h.is_read_only() is False, "export is read-only")
    check(h.get_structured_replies_negotiated(), "structured replies not negotiated")
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
    check(h.get_protocol() == "newstyle-fixed", "protocol %s" % h.get_protocol())
    h.shutdown()


def t_fua_write_read(uri, export):
    h = connect(uri)
    buf = os.urandom(64 * 1024)
    h.pwrite(buf, 1 * MIB, nbd.CMD_FLAG_FUA)
    check(h.pread(len(buf), 1 * MIB) == buf, "FUA write did not read back")
    # DF read of a range mixing data and hole: exactly one content chunk.
    chunks = []

    def chunk(data, off, status, err):
        chunks.append((off, len(data), status))
        return 0

    got = h.pread_structured(128 * 1024, 1 * MIB, chunk, nbd.CMD_FLAG_DF)
    check(got[:len(buf)] == buf and got[len(buf):] == bytes(64 * 1024), "DF read contents")
    content = [c for c in chunks if c[2] in (nbd.READ_DATA, nbd.READ_HOLE)]
    check(len(content) == 1, "DF read returned %d content chunks: %r" % (len(content), chunks))
    h.flush()
    h.shutdown()


def t_zero_flags(uri, export):
    h = connect(uri)
    base = 2 * MIB
    h.pwrite(pattern(0x5A, 64 * 1024), base)

    # NO_HOLE: reads zero, and the range is not reported as a hole.
    h.zero(16 * 1024, base, nbd.CMD_FLAG_NO_HOLE)
    check(h.pread(16 * 1024, base) == bytes(16 * 1024), "NO_HOLE zero did not read as zero")
    flags = page_flags(h, base, 16 * 1024)
    check(all(f & nbd.STATE_HOLE == 0 for f in flags),
          "NO_HOLE zeroed pages reported as holes: %r" % flags)

    # FAST_ZERO: succeeds on the memory backend, reads zero.
    h.zero(16 * 1024, base + 16 * 1024, nbd.CMD_FLAG_FAST_ZERO)
    check(h.pread(16 * 1024, base + 16 * 1024) == bytes(16 * 1024), "FAST_ZERO did not read as zero")

    # Plain zero of whole pages frees them: hole+zero.
    h.zero(16 * 1024, base + 32 * 1024)
    check(h.pread(16 * 1024, base + 32 * 1024) == bytes(16 * 1024), "zero did not read as zero")
    flags = page_flags(h, base + 32 * 1024, 16 * 1024)
    check(all(f == HOLE_ZERO for f in flags), "zeroed whole pages not hole+zero: %r" % flags)

    # Untouched rest still has the data.
    check(h.pread(16 * 1024, base + 48 * 1024) == pattern(0x5A, 16 * 1024), "neighbouring data damaged")

    # Partial-page zero: reads zero, surrounding bytes intact.
    h.zero(512, base + 48 * 1024 + 1024)
    got = h.pread(4096, base + 48 * 1024)
    check(got == pattern(0x5A, 1024) + bytes(512) + pattern(0x5A, 2560), "partial-page zero")
    h.flush()
    h.shutdown()


def t_block_status(uri, export):
    h = connect(uri)
    base = 4 * MIB
    span = 64 * 1024
    # Never written: hole+zero.
    flags = page_flags(h, base, span)
    check(all(f == HOLE_ZERO for f in flags), "fresh range not hole+zero: %r" % flags)

    # Write pages 2..5 (4 pages): data.
    h.pwrite(os.urandom(4 * PAGE), base + 2 * PAGE)
    # Sub-page write into page 10: the whole page becomes data.
    h.pwrite(pattern(0x77, 512), base + 10 * PAGE + 1024)
    flags = page_flags(h, base, span)
    want = [HOLE_ZERO] * 16
    for p in (2, 3, 4, 5, 10):
        want[p] = 0
    check(flags == want, "after writes: %r, want %r" % (flags, want))
    check(h.pread(PAGE, base + 10 * PAGE) == bytes(1024) + pattern(0x77, 512) + bytes(2560),
          "sub-page write contents")

    # Trim page 3: hole+zero again, reads zero.
    h.trim(PAGE, base + 3 * PAGE)
    check(h.pread(PAGE, base + 3 * PAGE) == bytes(PAGE), "trimmed page does not read as zero")
    # Zero page 4 (no flags): freed.
    h.zero(PAGE, base + 4 * PAGE)
    want[3] = HOLE_ZERO
    want[4] = HOLE_ZERO
    flags = page_flags(h, base, span)
    check(flags == want, "after trim/zero: %r, want %r" % (flags, want))

    # REQ_ONE: exactly one extent, starting at the offset.
    got = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            got.append(list(entries))
        return 0

    h.block_status(span, base, cb, nbd.CMD_FLAG_REQ_ONE)
    check(len(got) == 1 and len(got[0]) == 2, "REQ_ONE returned %r" % got)
    check(got[0][1] == HOLE_ZERO and 0 < got[0][0] <= 2 * PAGE,
          "REQ_ONE extent %r (want hole+zero, at most 2 pages)" % got)

    # Extents never go past the end of the export.
    size = h.get_size()
    ext = extents(h, size - 8 * PAGE, 8 * PAGE)
    check(ext[-1][0] + ext[-1][1] <= size, "extent past the end of the export: %r" % ext)
    h.shutdown()


def t_cache_flush(uri, export):
    h = connect(uri)
    h.pwrite(pattern(0x42, 8192), 6 * MIB)
    h.cache(8192, 6 * MIB)
    h.cache(MIB, 7 * MIB)  # never written
    h.flush()
    check(h.pread(8192, 6 * MIB) == pattern(0x42, 8192), "data after cache/flush")
    h.shutdown()


def t_multi_conn(uri, export):
    a = connect(uri)
    b = connect(uri)
    buf = os.urandom(32 * 1024)
    a.pwrite(buf, 8 * MIB)
    a.flush()
    check(b.pread(len(buf), 8 * MIB) == buf, "second connection does not see the first's write")
    b.trim(32 * 1024, 8 * MIB)
    b.flush()
    check(a.pread(len(buf), 8 * MIB) == bytes(len(buf)), "trim on one connection not seen on the other")
    a.shutdown()
    b.shutdown()


def t_errors_from_server(uri, export):
    # Strict mode off: libnbd sends the bad requests and the server must
    # reject them.
    h = connect(uri, strict=0)
    size = h.get_size()
    expect_errno(lambda: h.pread(8192, size - 4096), errno.EINVAL, "pread past end")
    expect_errno(lambda: h.pread(512, size), errno.EINVAL, "pread at end")
    expect_errno(lambda: h.cache(8192, size - 4096), errno.EINVAL, "cache past end")
    expect_errno(lambda: extents(h, size - 4096, 8192), errno.EINVAL, "block_status past end")
    expect_errno(lambda: h.pwrite(bytes(8192), size - 4096), errno.ENOSPC, "pwrite past end")
    expect_errno(lambda: h.trim(8192, size - 4096), errno.ENOSPC, "trim past end")
    expect_errno(lambda: h.zero(8192, size - 4096), errno.ENOSPC, "zero past end")
    check(h.pread(4096, size - 4096) == bytes(4096), "last page modified by rejected writes")

    expect_errno(lambda: h.pread(512, 1), errno.EINVAL, "unaligned offset pread")
    expect_errno(lambda: h.pread(100, 0), errno.EINVAL, "unaligned length pread")
    expect_errno(lambda: h.pwrite(b"x" * 100, 9 * MIB), errno.EINVAL, "unaligned pwrite")
    expect_errno(lambda: h.pwrite(b"x" * 512, 9 * MIB + 3), errno.EINVAL, "unaligned-offset pwrite")
    expect_errno(lambda: h.trim(100, 9 * MIB), errno.EINVAL, "unaligned trim")
    expect_errno(lambda: h.zero(100, 9 * MIB), errno.EINVAL, "unaligned zero")
    check(h.pread(4096, 9 * MIB) == bytes(4096), "rejected unaligned writes changed data")

    expect_errno(lambda: h.pread(0, 4096), errno.EINVAL, "zero-length pread")
    expect_errno(lambda: h.pwrite(b"", 4096), errno.EINVAL, "zero-length pwrite")
    expect_errno(lambda: h.trim(0, 4096), errno.EINVAL, "zero-length trim")
    expect_errno(lambda: h.zero(0, 4096), errno.EINVAL, "zero-length zero")

    expect_errno(lambda: h.pread(32 * MIB + 512, 0), errno.EINVAL, "pread over 32 MiB")

    # The connection still works after all those errors.
    buf = os.urandom(4096)
    h.pwrite(buf, 10 * MIB)
    check(h.pread(4096, 10 * MIB) == buf, "connection unusable after errors")
    h.shutdown()


def t_max_request(uri, export):
    h = connect(uri)
    size = h.get_size()
    n = 32 * MIB
    if size < n + 12 * MIB:
        return
    buf = os.urandom(n)
    h.pwrite(buf, 12 * MIB)
    check(h.pread(n, 12 * MIB) == buf, "32 MiB request round trip")
    h.trim(n, 12 * MIB)
    h.shutdown()


TESTS = [
    t_opt_mode,
    t_unknown_export_uri,
    t_abort,
    t_block_size_and_flags,
    t_fua_write_read,
    t_zero_flags,
    t_block_status,
    t_cache_flush,
    t_multi_conn,
    t_errors_from_server,
    t_max_request,
]


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    uri = sys.argv[1]
    export = urlparse(uri).path.lstrip("/")
    for t in TESTS:
        try:
            t(uri, export)
            print("ok   %s" % t.__name__)
        except CheckFailed as e:
            failures.append("%s: %s" % (t.__name__, e))
            print("FAIL %s: %s" % (t.__name__, e))
        except Exception as e:  # nbd.Error or a bug: report with traceback
            failures.append("%s: unexpected %s: %s" % (t.__name__, type(e).__name__, e))
            print("FAIL %s: unexpected %s: %s" % (t.__name__, type(e).__name__, e))
            traceback.print_exc()
        sys.stdout.flush()
    if failures:
        print("\n%d edge case(s) FAILED:" % len(failures))
        for f in failures:
            print("  - " + f)
        sys.exit(1)
    print("ALL EDGE CASES PASSED")


if __name__ == "__main__":
    main()
