#!/usr/bin/python3
"""Crash-test client for ferroblock (libnbd, Debian's python3-libnbd).

  crash_client.py write URI LOG SEED   random writes, trims, zeroes (some FUA) with up to 16 requests in
                                       flight, never two overlapping at once, until the server dies;
                                       appends "S id kind offset length" when a request is sent and
                                       "A id" when it is acknowledged.
  crash_client.py verify URI LOG       reads the whole volume and checks every 512-byte sector against
                                       the log: it must hold the content of the last acknowledged
                                       request that covered it (zeros if none), or of a request sent
                                       after that and never acknowledged (in flight at a crash).

Every written sector carries (request id, sector number), so a sector says who wrote it.
"""
import os
import random
import struct
import sys

import nbd

SECTOR = 512
QUEUE_DEPTH = 16


def sector_bytes(op_id, sector):
    head = struct.pack("<QQ", op_id, sector)
    return head + bytes([(op_id * 131 + sector) & 0xFF]) * (SECTOR - len(head))


def payload(op_id, offset, length):
    first = offset // SECTOR
    return b"".join(sector_bytes(op_id, first + i) for i in range(length // SECTOR))


def write(uri, log_path, seed):
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    log = open(log_path, "a", buffering=1)
    # ids continue across runs so that the log stays unambiguous
    next_id = 1
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] == "S":
                    next_id = max(next_id, int(parts[1]) + 1)
    in_flight = {}  # cookie -> (id, offset, length)

    def overlaps(offset, length):
        return any(o < offset + length and offset < o + n for (_, o, n) in in_flight.values())

    try:
        while True:
            while len(in_flight) < QUEUE_DEPTH:
                length = rng.choice([4096, 8192, 16384, 65536, 131072, 512 * rng.randint(1, 64)])
                offset = rng.randrange(0, (size - length) // 4096 + 1) * 4096
                if overlaps(offset, length):
                    break
                op_id = next_id
                next_id += 1
                kind = rng.choices(["write", "trim", "zero"], [8, 1, 1])[0]
                flags = nbd.CMD_FLAG_FUA if rng.random() < 0.3 else 0
                log.write("S %d %s %d %d\n" % (op_id, kind, offset, length))
                if kind == "write":
                    cookie = h.aio_pwrite(payload(op_id, offset, length), offset, flags=flags)
                elif kind == "trim":
                    cookie = h.aio_trim(length, offset, flags=flags)
                else:
                    cookie = h.aio_zero(length, offset, flags=flags)
                in_flight[cookie] = (op_id, offset, length)
            h.poll(-1)
            for cookie in list(in_flight):
                if h.aio_command_completed(cookie):
                    op_id = in_flight.pop(cookie)[0]
                    log.write("A %d\n" % op_id)
    except nbd.Error:
        pass  # the server was killed: the requests still in flight are unknown
    log.close()


def verify(uri, log_path):
    sent = {}
    order = []
    acked = set()
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 5 and parts[0] == "S":
                op_id = int(parts[1])
                sent[op_id] = (parts[2], int(parts[3]), int(parts[4]))
                order.append(op_id)
            elif len(parts) == 2 and parts[0] == "A":
                acked.add(int(parts[1]))
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    sectors = size // SECTOR
    # Per sector: the last acknowledged writer (0 = zeros) and the unacknowledged ones sent after it.
    last_acked = [0] * sectors
    candidates = [None] * sectors
    for op_id in order:
        kind, offset, length = sent[op_id]
        value = op_id if kind == "write" else 0
        for s in range(offset // SECTOR, (offset + length) // SECTOR):
            if op_id in acked:
                last_acked[s] = value
                candidates[s] = None
            else:
                if candidates[s] is None:
                    candidates[s] = set()
                candidates[s].add(value)
    bad = 0
    chunk = 1 << 20
    for base in range(0, size, chunk):
        data = h.pread(min(chunk, size - base), base)
        for i in range(len(data) // SECTOR):
            s = base // SECTOR + i
            got = data[i * SECTOR:(i + 1) * SECTOR]
            allowed = {last_acked[s]} | (candidates[s] or set())
            if got == bytes(SECTOR):
                writer = 0
            else:
                writer = struct.unpack("<Q", got[:8])[0]
                if got != sector_bytes(writer, s):
                    writer = -1  # torn or foreign content
            if writer not in allowed:
                bad += 1
                if bad <= 10:
                    print("sector %d holds %s, allowed %s" % (s, writer, sorted(allowed)))
    print("verified %d sectors, %d requests sent, %d acknowledged, %d bad" % (sectors, len(sent), len(acked), bad))
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(verify(sys.argv[2], sys.argv[3]))
