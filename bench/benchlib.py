"""Shared helpers for the scripts in bench/ (compare, nbd-compare, idle-cpu, volume-compare, ab-compare,
loadgen-goals): building, starting and stopping targets (ferroblock, nbdkit, qemu-nbd, nbd-server), running
the clients (`ferroblock bench`, fio) and parsing their output, reading a process's CPU time from /proc,
describing the machine and the file system, and updating one section of RESULTS.md.

Only processes started here are ever signalled, always by their own PID.
"""

import datetime
import json
import os
import platform
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
RELEASE = os.path.join(ROOT, "target", "release")
FERROBLOCK = os.path.join(RELEASE, "ferroblock")
TCP_PINGPONG = os.path.join(RELEASE, "examples", "tcp-pingpong")
VOLUME_BENCH = os.path.join(RELEASE, "examples", "volume-bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Every process started through this module, so that an interrupted run can clean up after itself.
_STARTED = []


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def env_str(name, default):
    return os.environ.get(name, default)


def env_float(name, default):
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else float(default)


def env_int(name, default):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else int(default)


def env_list(name, default):
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def command_line(env_prefixes=("BENCH_", "IDLE_")):
    """The command as it was typed, with the benchmark's environment variables in front."""
    env = [
        f"{key}={shlex.quote(value)}"
        for key, value in sorted(os.environ.items())
        if key.startswith(env_prefixes)
    ]
    argv0 = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join(env + [argv0] + [shlex.quote(arg) for arg in sys.argv[1:]])


def build(examples=("tcp-pingpong",)):
    """cargo build --release of the server and the bench examples (one cargo invocation)."""
    command = ["cargo", "build", "--release", "--bin", "ferroblock"]
    for example in examples:
        command += ["--example", example]
    log("building: " + " ".join(command))
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout)
        raise SystemExit(f"build failed: {' '.join(command)}")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def taskset(cpus):
    return ["taskset", "-c", cpus] if cpus else []


class Target:
    """One NBD server process: ferroblock in one poll mode, or nbdkit."""

    def __init__(self, name, kind, argv, log_path):
        self.name = name
        self.kind = kind
        self.argv = argv
        self.log_path = log_path
        self.proc = None
        self.uri = None
        self.stopped = False  # SIGSTOPped by us
        self.exit_code = None

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def pause(self):
        """SIGSTOP: an idle target (above all a busy-polling one) must not steal the measured one's core."""
        if self.alive() and not self.stopped:
            os.kill(self.pid, signal.SIGSTOP)
            self.stopped = True

    def resume(self):
        if self.alive() and self.stopped:
            os.kill(self.pid, signal.SIGCONT)
            self.stopped = False

    def stop(self, timeout=15):
        """SIGTERM, wait, SIGKILL as a last resort; returns the exit code (negative: killed by a signal)."""
        if self.proc is None:
            return None
        if self.alive():
            self.resume()
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit {timeout} s after SIGTERM; sending SIGKILL to pid {self.pid}")
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self.exit_code = self.proc.returncode
        if self in _STARTED:
            _STARTED.remove(self)
        return self.exit_code

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, errors="replace") as handle:
                text = strip_ansi(handle.read())
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self):
        """WARN/ERROR lines and panics in the target's stderr."""
        try:
            with open(self.log_path, errors="replace") as handle:
                text = strip_ansi(handle.read())
        except OSError:
            return []
        return [line for line in text.splitlines() if re.search(r"\b(WARN|ERROR)\b|panicked|fatal", line)]


def strip_ansi(text):
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def start_ferroblock(poll, cpus, log_dir, size="1G", extra=(), name=None, cores=None, backend="memory"):
    """ferroblock serve on a system-chosen port; waits for its 'serving nbd://...' line.

    `cpus` (e.g. "0") is both the taskset mask and, unless `cores` says otherwise, the --cores list, so
    every thread of the process (reactors, signal thread, main) stays on the target's core(s). `backend`
    "file" (with e.g. `extra=["--data-dir", DIR]`) serves a persistent volume."""
    name = name or f"ferroblock-{poll}"
    # A persistent volume's (or a raw store's) fsyncs and dsync writes run on io_uring's kernel workers,
    # which ferroblock places on cores without reactors: confining the whole process with taskset would
    # put them back on the reactor's core, where a busy-polling reactor starves them. --cores still pins
    # the reactors.
    confine = [] if backend in ("file", "raw") else taskset(cpus)
    argv = confine + [
        FERROBLOCK, "serve", "--listen", "127.0.0.1:0", "--backend", backend, "--size", size,
        "--poll", poll,
    ]
    cores = cpus if cores is None else cores
    if cores:
        argv += ["--cores", cores]
    argv += list(extra)
    log_path = os.path.join(log_dir, f"{name}.log")
    target = Target(name, "ferroblock", argv, log_path)
    with open(log_path, "w") as stderr:
        target.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)
    _STARTED.append(target)
    deadline = time.monotonic() + 15
    line = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([target.proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(target.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
            if b"\n" in line:
                break
        elif target.proc.poll() is not None:
            break
    text = line.decode(errors="replace").strip()
    if not text.startswith("ferroblock: serving nbd://"):
        target.stop()
        raise RuntimeError(f"{name} did not start ({' '.join(argv)}): {text!r}\n{target.log_tail()}")
    target.uri = text.split()[-1]
    return target


def start_nbdkit(cpus, log_dir, size="1G", threads=None, name="nbdkit", plugin=None):
    """nbdkit -f memory SIZE (or the plugin and arguments in `plugin`, e.g. ["file", PATH, "cache=none"])
    on a free port; waits for its pid file (written once it listens)."""
    port = free_port()
    pidfile = os.path.join(log_dir, f"{name}.pid")
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    argv = taskset(cpus) + ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), "-P", pidfile]
    if threads:
        argv += ["-t", str(threads)]
    argv += list(plugin) if plugin else ["memory", size]
    log_path = os.path.join(log_dir, f"{name}.log")
    target = Target(name, "nbdkit", argv, log_path)
    with open(log_path, "w") as stderr:
        target.proc = subprocess.Popen(argv, stdout=stderr, stderr=stderr, stdin=subprocess.DEVNULL)
    _STARTED.append(target)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if os.path.exists(pidfile) and os.path.getsize(pidfile) > 0:
            break
        if target.proc.poll() is not None:
            break
        time.sleep(0.05)
    else:
        target.stop()
        raise RuntimeError(f"nbdkit did not start: {' '.join(argv)}\n{target.log_tail()}")
    if target.proc.poll() is not None:
        raise RuntimeError(f"nbdkit exited at start: {' '.join(argv)}\n{target.log_tail()}")
    target.uri = f"nbd://127.0.0.1:{port}/"
    return target


def start_qemu_nbd(cpus, log_dir, path, name="qemu-nbd", export="vol0", extra=("--cache=none", "--aio=io_uring")):
    """qemu-nbd -f raw EXTRA -x EXPORT -b 127.0.0.1 -p PORT -t --pid-file PIDFILE PATH on a free port;
    waits for its pid file and for the port to accept a connection (-t: the probe does not end it)."""
    port = free_port()
    pidfile = os.path.join(log_dir, f"{name}.pid")
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    argv = taskset(cpus) + ["qemu-nbd", "-f", "raw", *extra, "-x", export, "-b", "127.0.0.1", "-p", str(port),
                            "-t", "--pid-file", pidfile, path]
    log_path = os.path.join(log_dir, f"{name}.log")
    target = Target(name, "qemu-nbd", argv, log_path)
    with open(log_path, "w") as stderr:
        target.proc = subprocess.Popen(argv, stdout=stderr, stderr=stderr, stdin=subprocess.DEVNULL)
    _STARTED.append(target)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if target.proc.poll() is not None:
            raise RuntimeError(f"qemu-nbd exited at start: {' '.join(argv)}\n{target.log_tail()}")
        if os.path.exists(pidfile) and os.path.getsize(pidfile) > 0 and port_accepts(port):
            break
        time.sleep(0.05)
    else:
        target.stop()
        raise RuntimeError(f"qemu-nbd did not start: {' '.join(argv)}\n{target.log_tail()}")
    target.uri = f"nbd://127.0.0.1:{port}/{export}"
    return target


def port_accepts(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def stop_all():
    for target in list(_STARTED):
        try:
            target.stop(timeout=5)
        except Exception as error:  # noqa: BLE001 - best effort at exit
            log(f"stopping {target.name}: {error}")


def cpu_ticks(pid):
    """utime+stime of a whole process (all its threads) in clock ticks, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted from after comm


def cpu_nanos(pid):
    """CPU time of a whole process in ns: the sum of its threads' on-CPU time from
    /proc/PID/task/*/schedstat (exact, unlike the tick-sampled utime/stime), falling back to
    /proc/PID/stat. None if the process is gone."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                    total += int(handle.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return None
    if total == 0:
        ticks = cpu_ticks(pid)
        return None if ticks is None else ticks * 1_000_000_000 // CLK_TCK
    return total


def thread_cpu_nanos(pid):
    """{thread name/tid: on-CPU ns} for every thread of a process (from schedstat)."""
    result = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as handle:
                comm = handle.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                result[f"{comm}/{tid}"] = int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return result


def system_busy_ticks():
    """(busy, steal) clock ticks summed over all CPUs from /proc/stat: busy is everything but idle and
    iowait (steal included, since a hypervisor running someone else is load too)."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal, steal


class CpuSampler:
    """CPU use of some processes between `start()` and `stop()`, in percent of one core (from their
    threads' schedstat, exact), and the CPU use of everything else on the machine (`other`: all CPUs' busy
    time from /proc/stat less these processes' utime+stime, both tick-based)."""

    def __init__(self, pids):
        self.pids = dict(pids)
        self.begin = {}
        self.system_begin = None
        self.t0 = None
        self.percent = {}

    def start(self):
        self.t0 = time.monotonic()
        self.begin = {key: cpu_nanos(pid) for key, pid in self.pids.items()}
        self.begin_ticks = {key: cpu_ticks(pid) for key, pid in self.pids.items()}
        self.system_begin = system_busy_ticks()

    def stop(self):
        elapsed = time.monotonic() - self.t0
        system_end = system_busy_ticks()
        ours = 0.0  # seconds, from the same tick-based source as /proc/stat
        for key, pid in self.pids.items():
            end = cpu_nanos(pid)
            end_ticks = cpu_ticks(pid)
            if end is None or self.begin.get(key) is None or elapsed <= 0:
                self.percent[key] = None
            else:
                self.percent[key] = 100.0 * (end - self.begin[key]) / 1e9 / elapsed
            if end_ticks is not None and self.begin_ticks.get(key) is not None:
                ours += (end_ticks - self.begin_ticks[key]) / CLK_TCK
        other = (system_end[0] - self.system_begin[0]) / CLK_TCK - ours
        self.percent["other"] = max(0.0, 100.0 * other / elapsed)
        self.percent["steal"] = 100.0 * (system_end[1] - self.system_begin[1]) / CLK_TCK / elapsed
        return self.percent


def _run(command):
    try:
        return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def machine_description():
    """Key/value pairs describing the machine, the tools and the source under test."""
    lscpu = _run(["lscpu"])
    fields = {}
    for line in lscpu.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    mem_gib = "?"
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    mem_gib = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    try:
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as handle:
            clocksource = handle.read().strip()
    except OSError:
        clocksource = "?"
    try:
        with open("/etc/debian_version") as handle:
            distro = "Debian " + handle.read().strip()
    except OSError:
        distro = platform.platform()
    revision = _run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"])
    loadavg = "?"
    try:
        with open("/proc/loadavg") as handle:
            loadavg = " ".join(handle.read().split()[:3])
    except OSError:
        pass
    return [
        ("CPU", f"{fields.get('Model name', '?')} ({fields.get('Vendor ID', '?')}), "
                f"{fields.get('CPU(s)', '?')} CPUs, {fields.get('Thread(s) per core', '?')} thread(s)/core, "
                f"hypervisor: {fields.get('Hypervisor vendor', 'none')}"),
        ("Memory", mem_gib),
        ("Kernel", f"{platform.release()} ({distro}), clocksource {clocksource}"),
        ("Load average at start", loadavg),
        ("fio", _run(["fio", "--version"])),
        ("nbdkit", _run(["nbdkit", "--version"])),
        ("rustc", _run(["rustc", "--version"])),
        ("ferroblock source", f"git {revision}" + (" + uncommitted changes in src/" if dirty.strip() else "")),
    ]


def file_system_description(path):
    """Key/value pairs for the file system holding `path`: type, device, mount options, the block device's
    write cache / FUA / rotational flags, and free space."""
    df = _run(["df", "-T", "-B1", path]).splitlines()
    fs_type = device = "?"
    free = None
    if len(df) >= 2:
        fields = df[-1].split()
        if len(fields) >= 7:
            device, fs_type = fields[0], fields[1]
            free = int(fields[4]) if fields[4].isdigit() else None
    options = "?"
    try:
        best = ""
        with open("/proc/mounts") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 4 and (os.path.abspath(path) + "/").startswith(parts[1].rstrip("/") + "/") \
                        and len(parts[1]) >= len(best):
                    best, options = parts[1], parts[3]
    except OSError:
        pass
    queue = {}
    base = os.path.basename(os.path.realpath(device)) if device.startswith("/dev/") else ""
    for candidate in (base, re.sub(r"p?\d+$", "", base)):
        directory = f"/sys/block/{candidate}/queue"
        if candidate and os.path.isdir(directory):
            for key in ("write_cache", "fua", "rotational", "scheduler"):
                try:
                    with open(os.path.join(directory, key)) as handle:
                        queue[key] = handle.read().strip()
                except OSError:
                    pass
            break
    device_text = device
    if queue:
        device_text += " (" + ", ".join(f"{key} {value}" for key, value in queue.items()) + ")"
    return {
        "fs_type": fs_type,
        "device": device_text,
        "mount_options": options,
        "free_bytes": free,
    }


def device_irq_core(path):
    """The CPU that takes most interrupts of the block device holding `path` (its completions, and the
    wake-ups of whoever waits for them, land there), or None if it cannot be told (no /proc/interrupts
    line names the device's driver instance)."""
    df = _run(["df", "-B1", path]).splitlines()
    if len(df) < 2:
        return None
    base = os.path.basename(os.path.realpath(df[-1].split()[0]))
    for candidate in (base, re.sub(r"p?\d+$", "", base)):
        try:
            instance = os.path.basename(os.path.realpath(f"/sys/block/{candidate}/device"))
        except OSError:
            continue
        if not candidate or not os.path.isdir(f"/sys/block/{candidate}"):
            continue
        counts = None
        try:
            with open("/proc/interrupts") as handle:
                cpus = len(handle.readline().split())
                for line in handle:
                    parts = line.split()
                    if any(part.startswith(instance + "-") or part == instance for part in parts[cpus + 1:]):
                        row = [int(value) for value in parts[1:cpus + 1] if value.isdigit()]
                        if len(row) == cpus:
                            counts = row if counts is None else [a + b for a, b in zip(counts, row)]
        except OSError:
            return None
        if counts and max(counts) > 0:
            return counts.index(max(counts))
    return None


class LoopTmpfsDevice:
    """ext4 on a loop device backed by a sparse file in /dev/shm: O_DIRECT works (a block device), a
    flush costs the loop driver an fsync of a tmpfs file (nothing to write back), and every target's
    files share the one file system. Made at the start of the run, removed at the end."""

    def __init__(self, gib):
        if os.geteuid() != 0:
            raise SystemExit("BENCH_DEVICE=loop-tmpfs needs root (losetup, mkfs.ext4, mount)")
        handle, self.backing = tempfile.mkstemp(prefix="ferroblock-bench-loop-", dir="/dev/shm")
        os.close(handle)
        self.mount_point = tempfile.mkdtemp(prefix="ferroblock-bench-loop-")
        self.loop = None
        self.mounted = False
        try:
            with open(self.backing, "wb") as handle:
                handle.truncate(int(gib * (1 << 30)))
            self.loop = subprocess.run(["losetup", "--find", "--show", self.backing], check=True,
                                       capture_output=True, text=True).stdout.strip()
            subprocess.run(["mkfs.ext4", "-q", "-E", "nodiscard", self.loop], check=True)
            subprocess.run(["mount", self.loop, self.mount_point], check=True)
            self.mounted = True
        except BaseException:
            self.remove()
            raise

    def remove(self):
        if self.mounted:
            subprocess.run(["umount", self.mount_point], check=False)
            self.mounted = False
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], check=False)
            self.loop = None
        for remove in (lambda: os.rmdir(self.mount_point), lambda: os.unlink(self.backing)):
            try:
                remove()
            except OSError:
                pass


def allocated_bytes(path):
    """Disk space actually allocated (st_blocks) under a directory tree or for one file."""
    total = 0
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                pass
    return total


def zero_fill(path, start, end, chunk=1 << 20):
    """Writes zeros over bytes [start, end) of `path` with O_DIRECT, then fdatasync: blocks that read as
    zeros already (reserved with fallocate, i.e. "unwritten" extents on ext4/xfs) keep their content but
    become written, so that later writes no longer convert extents (a file system journal commit at the
    next sync). `start` and `end` must be multiples of 4096."""
    import mmap
    if start % 4096 or end % 4096:
        raise ValueError("zero_fill needs 4096-aligned bounds")
    buffer = mmap.mmap(-1, chunk)  # page-aligned, zeroed
    view = memoryview(buffer)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        offset = start
        while offset < end:
            length = min(chunk, end - offset)
            written = os.pwrite(fd, view[:length], offset)
            if written <= 0:
                raise OSError(f"short write at {offset} of {path}")
            offset += written
        os.fdatasync(fd)
    finally:
        os.close(fd)
        view.release()
        buffer.close()


def wait_quiet(max_wait, percent):
    """Waits (up to `max_wait` s) until the rest of the machine uses less than `percent` of a core;
    returns the seconds waited and the last load seen (None if not waiting at all)."""
    if max_wait <= 0:
        return 0.0, None
    started = time.monotonic()
    while True:
        sampler = CpuSampler({})
        sampler.start()
        time.sleep(0.5)
        load = sampler.stop()["other"]
        waited = time.monotonic() - started
        if load < percent or waited >= max_wait:
            return waited, load


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


RESULTS_HEADER = """# ferroblock benchmark results

Written by the scripts in bench/ (see bench/README.md); each script replaces only its own section.
"""


def update_section(path, name, body):
    """Replaces the text between `<!-- BEGIN name -->` and `<!-- END name -->` in `path` (appending the
    section if absent), so that nbd-compare and idle-cpu can share one RESULTS.md."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    try:
        with open(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        text = RESULTS_HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail.lstrip("\n")
    else:
        text = text.rstrip() + "\n\n" + block
    with open(path, "w") as handle:
        handle.write(text)


def markdown_table(header, rows, align=None):
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def compact_json(document):
    """JSON with one top-level key per line and each list item (e.g. one run) on its own line: small, and
    still diffable."""
    def rounded(value):
        if isinstance(value, float):
            return round(value, 3)
        if isinstance(value, dict):
            return {key: rounded(item) for key, item in value.items()}
        if isinstance(value, list):
            return [rounded(item) for item in value]
        return value

    lines = []
    for key, value in document.items():
        value = rounded(value)
        if isinstance(value, list) and value:
            items = ",\n".join("  " + json.dumps(item, separators=(",", ":")) for item in value)
            lines.append(f"{json.dumps(key)}: [\n{items}\n ]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def make_log_dir(prefix):
    return tempfile.mkdtemp(prefix=prefix)


# ----------------------------------------------------------------------------------------------------
# Process trees (nbd-server serves each connection from a forked child)


def descendants(pid):
    """`pid` and every process below it (from /proc/*/stat's ppid field)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


class TreeCpuSampler(CpuSampler):
    """CpuSampler whose keys listed in `trees` count the whole process tree below their pid (children that
    appear during the window count from their birth; children that exit during it are lost)."""

    def __init__(self, pids, trees=()):
        super().__init__(pids)
        self.trees = set(trees)

    def _tree_nanos(self, pid):
        return {child: cpu_nanos(child) or 0 for child in descendants(pid)}

    def start(self):
        super().start()
        self.tree_begin = {key: self._tree_nanos(self.pids[key]) for key in self.trees}

    def stop(self):
        percent = super().stop()
        elapsed = time.monotonic() - self.t0
        for key in self.trees:
            end = self._tree_nanos(self.pids[key])
            begin = self.tree_begin.get(key, {})
            nanos = sum(value - begin.get(child, 0) for child, value in end.items())
            percent[key] = 100.0 * nanos / 1e9 / elapsed if elapsed > 0 else None
        return percent


# ----------------------------------------------------------------------------------------------------
# nbd-server (Debian package nbd-server)


class DaemonTarget(Target):
    """A server that daemonizes (nbd-server): the process we started exits once the daemon is up; the
    daemon's pid comes from its pid file and is the only one ever signalled."""

    def __init__(self, name, kind, argv, log_path):
        super().__init__(name, kind, argv, log_path)
        self.daemon_pid = None

    @property
    def pid(self):
        return self.daemon_pid

    def alive(self):
        if self.daemon_pid is None:
            return False
        try:
            with open(f"/proc/{self.daemon_pid}/stat") as handle:
                stat = handle.read()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] != "Z"

    def stop(self, timeout=15):
        if self.daemon_pid is None:
            return None
        code = 0
        if self.alive():
            self.resume()
            os.kill(self.daemon_pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive():
                log(f"{self.name}: no exit {timeout} s after SIGTERM; sending SIGKILL to pid {self.daemon_pid}")
                os.kill(self.daemon_pid, signal.SIGKILL)
                code = -signal.SIGKILL
        self.exit_code = code
        if self in _STARTED:
            _STARTED.remove(self)
        return code


def start_nbd_server(cpus, log_dir, path, name="nbd-server", export="vol0"):
    """nbd-server serving `path` as export `export` (its config section name; nbd-server refuses the empty
    name) on a free port, from a config file written to `log_dir`, with FLUSH and FUA advertised (each
    FLUSH an fdatasync). nbd-server forks a child per connection; its -d (no daemon) mode serves a single
    connection and exits, which fio's nbd engine (a probe connection, then the job's) cannot use, so it
    runs as a daemon with a pid file, and only that pid is ever signalled."""
    port = free_port()
    config = os.path.join(log_dir, f"{name}.conf")
    pidfile = os.path.join(log_dir, f"{name}.pid")
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    with open(config, "w") as handle:
        handle.write(f"[generic]\n    port = {port}\n    listenaddr = 127.0.0.1\n    allowlist = true\n"
                     f"[{export}]\n    exportname = {os.path.abspath(path)}\n    flush = true\n    fua = true\n")
    argv = taskset(cpus) + ["nbd-server", "-C", config, "-p", pidfile]
    log_path = os.path.join(log_dir, f"{name}.log")
    target = DaemonTarget(name, "nbd-server", argv, log_path)
    with open(log_path, "w") as stderr:
        target.proc = subprocess.Popen(argv, stdout=stderr, stderr=stderr, stdin=subprocess.DEVNULL)
    _STARTED.append(target)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if os.path.exists(pidfile) and os.path.getsize(pidfile) > 0 and port_accepts(port):
            with open(pidfile) as handle:
                target.daemon_pid = int(handle.read().split()[0])
            break
        if target.proc.poll() not in (None, 0):
            break
        time.sleep(0.05)
    if target.daemon_pid is None:
        raise RuntimeError(f"nbd-server did not start: {' '.join(argv)}\n{target.log_tail()}")
    target.proc.wait(timeout=15)  # the foreground parent exits once the daemon runs
    target.uri = f"nbd://127.0.0.1:{port}/{export}"
    return target


# ----------------------------------------------------------------------------------------------------
# ferroblock's persistent store


def read_superblock(path):
    """(journal_offset, journal_bytes, data_offset, data_bytes) from a store's superblock (layout in
    src/journal/superblock.rs: u64 little-endian fields from byte 32)."""
    import struct
    with open(path, "rb") as handle:
        sector = handle.read(64)
    return struct.unpack_from("<QQQQ", sector, 32)


def zero_fill_store(path):
    """Makes a freshly created (never written) store's journal and data area written blocks of zeros:
    what they already read as, so the store's contents are unchanged, but no extent is left unwritten
    (ext4 and xfs convert an unwritten extent on its first write: a journal commit on the next sync)."""
    journal_offset, journal_bytes, data_offset, data_bytes = read_superblock(path)
    end = os.path.getsize(path)
    if (journal_offset % 4096 or journal_offset + journal_bytes != data_offset
            or data_offset + data_bytes > end or end % 4096):
        raise RuntimeError(f"{path}: unexpected superblock layout {read_superblock(path)}, size {end}")
    started = time.monotonic()
    zero_fill(path, journal_offset, end)
    return time.monotonic() - started


def start_ferroblock_file(cpus, log_dir, data_dir, size="1G", poll="adaptive", extra=(), name="ferroblock-file",
                          written=True):
    """ferroblock serve --backend file on `data_dir` (created). With `written`, the store the first start
    reserves (fallocate) is zero-written with the server stopped, and the server started again: writes then
    land on written blocks, as they would on a store in use."""
    os.makedirs(data_dir, exist_ok=True)
    args = ["--data-dir", data_dir, *extra]
    target = start_ferroblock(poll, cpus, log_dir, size, args, name=name, backend="file")
    if not written:
        return target
    code = target.stop()
    if code != 0:
        raise RuntimeError(f"{name} exited {code} on SIGTERM after creating its store")
    seconds = zero_fill_store(os.path.join(data_dir, "vol0.fbv"))
    log(f"{name}: store zero-written in {seconds:.1f} s; restarting")
    first_log = target.log_path + ".create"
    os.replace(target.log_path, first_log)
    target = start_ferroblock(poll, cpus, log_dir, size, args, name=name, backend="file")
    target.create_log = first_log
    return target


# ----------------------------------------------------------------------------------------------------
# Clients: `ferroblock bench` and fio's nbd engine


def duration_arg(seconds):
    """Seconds as a `ferroblock bench` duration (whole milliseconds)."""
    return f"{int(round(seconds * 1000))}ms"


def bench_command(uri, rw, qd, seconds, ramp, bs="4k", conns=1, poll="busy", cpus="", hist=None, extra=()):
    """`ferroblock bench URI ... --json` (optionally pinned with taskset, --hist FILE)."""
    command = taskset(cpus) + [
        FERROBLOCK, "bench", uri, "--rw", rw, "--bs", str(bs), "--qd", str(qd), "--conns", str(conns),
        "--time", duration_arg(seconds), "--ramp", duration_arg(ramp), "--poll", poll, "--json",
    ]
    if hist:
        command += ["--hist", hist]
    return command + list(extra)


BENCH_FIELDS = ("iops", "mbps", "mean_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "ops", "errors",
                "cpu_percent", "spin_idle_percent", "work_percent")


def parse_bench(text):
    """The figures of a `ferroblock bench --json` run (its last JSON line); raises on errors or no ops."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            result = json.loads(line)
            break
    else:
        raise RuntimeError(f"no JSON line in ferroblock bench output: {text.strip()[-500:]!r}")
    if result.get("errors"):
        raise RuntimeError(f"ferroblock bench reported {result['errors']} errors")
    return {key: result.get(key) for key in BENCH_FIELDS}


def fio_nbd_command(uri, rw, qd, seconds, ramp, bs="4k", cpus="", extra=()):
    """fio with its nbd engine (libnbd), one job, one connection, JSON output; latency is `lat_ns`."""
    return taskset(cpus) + [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
        *extra, "--time_based", f"--runtime={int(round(seconds * 1000))}ms",
        f"--ramp_time={int(round(ramp * 1000))}ms", "--thread", "--norandommap", "--randrepeat=0",
        "--lat_percentiles=1", "--output-format=json",
    ]


def parse_fio(text, rw):
    """IOPS and total latency (`lat_ns`) of fio's first job, read or write side by `rw`."""
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    side = job["read" if rw in ("read", "randread") else "write"]
    lat = side["lat_ns"]
    percentiles = lat.get("percentile", {})
    return {
        "iops": side["iops"],
        "mbps": side["bw_bytes"] / 1e6,
        "mean_us": lat["mean"] / 1000,
        "p50_us": percentiles.get("50.000000", 0) / 1000,
        "p99_us": percentiles.get("99.000000", 0) / 1000,
        "p999_us": percentiles.get("99.900000", 0) / 1000,
        "ops": side["total_ios"],
        "fio_cpu_percent": job["usr_cpu"] + job["sys_cpu"],
    }


def prefill_nbd(target, size, cpus=""):
    """Writes the whole export once (fio, sequential 1 MiB writes at QD 8), so that reads hit data and
    writes overwrite; returns (seconds, command)."""
    command = taskset(cpus) + [
        "fio", "--name=prefill", "--ioengine=nbd", f"--uri={target.uri}", "--rw=write", "--bs=1M",
        "--iodepth=8", f"--size={size}", "--thread", "--output-format=json",
    ]
    target.resume()
    started = time.monotonic()
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    finally:
        target.pause()
    if result.returncode != 0:
        raise RuntimeError(f"prefill of {target.name} failed: {result.stderr.strip()[-2000:]}")
    return time.monotonic() - started, command


def shown(command, env=None):
    """A command as it can be typed, paths made relative to the repository."""
    text = " ".join(shlex.quote(str(arg)) for arg in command).replace(ROOT + "/", "")
    if env:
        text = " ".join(f"{key}={value}" for key, value in env.items()) + " " + text
    return text


def run_measured(command, ramp, seconds, target=None, env=None, timeout=None, window=True, label="",
                 quiet_wait=0.0, quiet_percent=10.0, tree=False):
    """Runs a client `command` whose measured period starts `ramp` s after it does and lasts `seconds`;
    samples its CPU (and the target's, its whole process tree with `tree`, and everything else's) over a
    window inside that period. The target, if any, is resumed for the run and paused after it.
    Returns (stdout, cpu dict with client/target/other/steal percent, elapsed seconds)."""
    waited, load = wait_quiet(quiet_wait, quiet_percent)
    if waited > 1:
        log(f"waited {waited:.0f} s for a quiet machine (other load now {load:.0f}%)")
    if target is not None:
        target.resume()
        time.sleep(0.1)
    full_env = dict(os.environ, **env) if env else None
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    pids = {"client": proc.pid}
    if target is not None:
        pids["target"] = target.pid
    cpu = {}
    timeout = timeout or (ramp + seconds + 120)
    try:
        if window:
            sampler = TreeCpuSampler(pids, trees=("target",) if tree and target is not None else ())
            margin = min(0.3, seconds / 10)
            time.sleep(max(0.0, started + ramp + margin + 0.1 - time.monotonic()))
            if proc.poll() is None:
                sampler.start()
                time.sleep(max(0.0, started + ramp + seconds - margin - time.monotonic()))
                cpu = sampler.stop()
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its pid
            stdout, stderr = proc.communicate()
            raise RuntimeError(f"{label or 'command'} timed out after {timeout:.0f} s: {shown(command)}") from None
    finally:
        if target is not None:
            target.pause()
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {shown(command, env)}\n{stderr.strip()[-2000:]}")
    return stdout, cpu, time.monotonic() - started


def tool_version(command):
    """First line of a tool's version output, or 'not found'."""
    text = _run(command)
    return text.splitlines()[0] if text and text != "unavailable" else "not found"


def uptime():
    return _run(["uptime"])
