//! Command-line behaviour: flag validation, sizes, signals, backends.

mod common;

use common::nbd;
use common::*;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `ferroblock serve <args>` expecting a quick exit with code 2.
fn expect_usage_error(args: &[&str], needle: &str, flag: &str) {
    let out = run_bounded(
        Command::new(ferroblock_bin()).arg("serve").args(args),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "`ferroblock serve {}`: expected exit code 2\n{}",
        args.join(" "),
        describe(&out)
    );
    assert!(
        !stdout.contains("serving"),
        "`ferroblock serve {}` claimed to serve:\n{}",
        args.join(" "),
        describe(&out)
    );
    assert!(
        !stderr.trim().is_empty(),
        "`ferroblock serve {}`: no message on stderr",
        args.join(" ")
    );
    assert!(
        stderr.contains(needle) || stderr.to_lowercase().contains(flag),
        "`ferroblock serve {}`: stderr does not mention {needle:?} or {flag:?}:\n{stderr}",
        args.join(" ")
    );
    assert!(
        !stderr.contains("panicked"),
        "`ferroblock serve {}` panicked:\n{stderr}",
        args.join(" ")
    );
}

#[test]
fn invalid_flag_values_exit_2_with_a_message() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let missing_core = (std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        + 4096)
        .to_string();
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (vec!["--size", "12Q"], "12Q", "size"),
        (vec!["--size", "-5"], "-5", "size"),
        (vec!["--size=-5"], "-5", "size"),
        (vec!["--size", "1000"], "1000", "size"),
        (vec!["--size", "abc"], "abc", "size"),
        (vec!["--size", ""], "size", "size"),
        (vec!["--spare-percent", "1001"], "1001", "spare-percent"),
        (vec!["--spare-percent", "-1"], "-1", "spare-percent"),
        (vec!["--backend", "bogus"], "bogus", "backend"),
        (vec!["--poll", "sometimes"], "sometimes", "poll"),
        (vec!["--cores", "abc"], "abc", "core"),
        (
            vec!["--cores", missing_core.as_str()],
            missing_core.as_str(),
            "core",
        ),
        (
            vec!["--io-worker-cores", missing_core.as_str()],
            missing_core.as_str(),
            "io-worker-cores",
        ),
        (vec!["--no-such-flag"], "no-such-flag", "no-such-flag"),
    ];
    for (extra, needle, flag) in cases {
        let mut args = vec!["--listen", listen.as_str()];
        args.extend(extra);
        expect_usage_error(&args, needle, flag);
        // Nothing is listening on the requested port.
        assert!(
            TcpStream::connect(&listen).is_err(),
            "something is listening on {listen} after `serve {}`",
            args.join(" ")
        );
    }
    for bad in ["not-an-address", "127.0.0.1:99999", "127.0.0.1:port", ""] {
        expect_usage_error(
            &["--listen", bad],
            if bad.is_empty() { "listen" } else { bad },
            "listen",
        );
    }
}

#[test]
fn default_size_is_1g_and_suffixes_are_binary() {
    let cases: &[(&[&str], u64)] = &[
        (&[], GIB),
        (&["--size", "512M"], 512 * MIB),
        (&["--size", "1G"], GIB),
        (&["--size", "4096"], 4096),
        (&["--size", "64K"], 64 * KIB),
        (&["--size", "2T"], 2 << 40),
    ];
    for (args, want) in cases {
        let srv = Server::start(args);
        assert!(
            srv.uri.starts_with("nbd://127.0.0.1:") && srv.uri.ends_with("/vol0"),
            "URI {:?}",
            srv.uri
        );
        let c = srv.client();
        assert_eq!(c.info.size, *want, "export size for {args:?}");
        c.disconnect();
    }
}

#[test]
fn one_terabyte_memory_backend_is_sparse() {
    let mut srv = Server::start(&["--size", "1T"]);
    let tib = 1u64 << 40;
    let mut c = srv.client();
    assert_eq!(c.info.size, tib);
    assert_zeros(
        &c.read(tib - 4096, 4096).expect("READ at 1T-4096"),
        "unwritten space at 1T-4096",
    );
    assert_zeros(&c.read(tib / 2, 1 << 20).unwrap(), "READ tib / 2, 1 << 20");
    let data = Rng::new(1).bytes(4096);
    c.write_verify(tib - 4096, &data);
    assert_zeros(&c.read(tib - 8192, 4096).unwrap(), "READ tib - 8192, 4096");
    let r = c.command(0, nbd::CMD_READ, tib, 512, &[]).unwrap();
    assert_eq!(r.error, nbd::EINVAL, "READ at 1T");
    c.disconnect();

    // Sparse: resident memory is nowhere near 1 TiB (generous bound).
    srv.assert_alive();
    let status = std::fs::read_to_string(format!("/proc/{}/status", srv.pid)).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    assert!(
        rss_kib < 1024 * 1024,
        "server RSS {rss_kib} KiB for a 1T sparse export"
    );
}

#[test]
fn size_512_bytes_works() {
    let srv = Server::start(&["--size", "512"]);
    let mut c = srv.client();
    assert_eq!(c.info.size, 512);
    assert_zeros(&c.read(0, 512).unwrap(), "READ 0, 512");
    let data = Rng::new(2).bytes(512);
    c.write_verify(0, &data);
    assert_eq!(
        c.read(512, 512).err(),
        Some(nbd::EINVAL),
        "READ past a 512-byte export"
    );
    assert_eq!(
        c.write(512, &data, 0),
        nbd::ENOSPC,
        "WRITE past a 512-byte export"
    );
    assert_eq!(c.write_zeroes(0, 512, 0), 0);
    assert_zeros(&c.read(0, 512).unwrap(), "READ 0, 512");
    assert_eq!(c.flush(), 0);
    c.disconnect();
    let mut c = srv.client_structured();
    let bs = c.block_status(0, 512, 0);
    assert_eq!(bs.error, 0, "{bs:?}");
    let total: u64 = bs.extents.iter().map(|e| e.1 as u64).sum();
    assert!(total > 0 && total <= 512, "extents {bs:?}");
    c.disconnect();
}

#[test]
fn volume_name_is_used() {
    let srv = Server::start(&["--volume", "data1", "--size", "1M"]);
    assert!(srv.uri.ends_with("/data1"), "URI {:?}", srv.uri);
    assert_eq!(srv.export, "data1");
    let mut c = NbdConn::connect(&srv.addr);
    assert_eq!(c.opt_list().unwrap().unwrap(), vec!["data1".to_string()]);
    assert_eq!(
        c.opt_go("vol0", &[]).unwrap().err(),
        Some(nbd::REP_ERR_UNKNOWN),
        "GO vol0 on a server exporting data1"
    );
    let info = c.opt_go("data1", &[]).unwrap().expect("GO data1");
    assert_eq!(info.size, MIB);
    c.write_verify(0, &Rng::new(3).bytes(4096));
    c.disconnect();
}

#[test]
fn every_poll_mode_serves_io() {
    for mode in ["busy", "adaptive", "interrupt"] {
        let mut srv = Server::start(&["--poll", mode, "--size", "16M"]);
        assert_healthy(&srv.addr, &srv.export, 4096, 4);
        let mut c = srv.client_structured();
        c.write_verify(MIB, &Rng::new(5).bytes(256 * 1024));
        c.disconnect();
        srv.signal(libc::SIGTERM);
        let st = srv.wait_exit(Duration::from_secs(30));
        assert_eq!(st.code(), Some(0), "--poll {mode}: exit after SIGTERM");
        assert!(!srv.stderr().contains("panicked"), "{}", srv.stderr());
    }
}

#[test]
fn cores_pinning_serves_io() {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut lists = vec!["0".to_string()];
    if n >= 2 {
        lists.push("0,1".to_string());
    }
    for list in lists {
        let srv = Server::start(&["--cores", &list, "--size", "16M"]);
        assert_healthy(&srv.addr, &srv.export, 0, 6);
    }
}

/// `--io-worker-cores` places the kernel's io_uring workers: after a write and a flush (an fsync runs
/// on an io-wq worker), every `iou-wrk` thread of the server may run only on the chosen core.
#[test]
fn io_worker_cores_place_the_io_uring_workers() {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let chosen = if n >= 2 { "1" } else { "0" };
    let srv = Server::start(&["--cores", "0", "--io-worker-cores", chosen, "--size", "16M"]);
    let mut conn = srv.client();
    assert_eq!(conn.write(0, &[7u8; 4096], 0), 0);
    assert_eq!(conn.flush(), 0);
    let mut workers = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{}/task", srv.pid)).expect("task list") {
        let task = entry.expect("task entry").path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.starts_with("iou-wrk") {
            let status = std::fs::read_to_string(task.join("status")).expect("task status");
            let allowed = status
                .lines()
                .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
                .expect("Cpus_allowed_list")
                .trim()
                .to_string();
            workers.push(allowed);
        }
    }
    assert!(!workers.is_empty(), "no io_uring worker after a flush");
    assert!(
        workers.iter().all(|allowed| allowed == chosen),
        "workers allowed on {workers:?}, expected {chosen}"
    );
}

/// Polls (bounded) until `pred` holds.
fn wait_until(what: &str, deadline: Duration, mut pred: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !pred() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_during_fio_workload_exits_cleanly() {
    require_tool("fio");
    let mut srv = Server::start(&["--size", "64M"]);
    let dir = TempDir::new("fio-load");
    let mut fio = Command::new("fio")
        .current_dir(dir.path())
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri),
            "--rw=write",
            "--bs=64k",
            "--iodepth=16",
            "--size=64M",
            "--time_based",
            "--runtime=60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning fio");

    // The workload is active once its first (sequential, random-content)
    // write at offset 0 is visible.
    let mut probe = srv.client();
    wait_until("fio to start writing", Duration::from_secs(30), || {
        probe.read(0, 65536).unwrap().iter().any(|&b| b != 0)
    });
    drop(probe);

    srv.signal(libc::SIGTERM);
    let st = srv.wait_exit(Duration::from_secs(30));
    let fio_status = wait_child(&mut fio, Duration::from_secs(30));
    if fio_status.is_none() {
        let _ = fio.kill();
        let _ = fio.wait();
    }
    let stderr = srv.stderr();
    assert_eq!(
        st.code(),
        Some(0),
        "exit status after SIGTERM: {st:?}\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "server panicked:\n{stderr}");
    assert!(
        fio_status.is_some(),
        "fio was still running 30 s after the server exited (not disconnected)"
    );
    assert!(
        TcpStream::connect(&srv.addr).is_err(),
        "server still accepting after SIGTERM"
    );
}

#[test]
fn sigint_during_qemu_io_workload_exits_cleanly() {
    require_tool("qemu-io");
    let mut srv = Server::start(&["--size", "64M"]);
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &srv.uri, "-c", "write -P 0x5a 0 64k"]);
    for i in 0..2000u64 {
        let off = (i % 60) * MIB;
        cmd.args(["-c", &format!("write -P 0x6b {off} 1M")]);
        cmd.args(["-c", &format!("read -P 0x6b {off} 1M")]);
    }
    let mut qio = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning qemu-io");
    let mut probe = srv.client();
    wait_until("qemu-io to start writing", Duration::from_secs(30), || {
        probe.read(0, 512).unwrap().iter().any(|&b| b != 0)
    });
    drop(probe);

    srv.signal(libc::SIGINT);
    let st = srv.wait_exit(Duration::from_secs(30));
    if wait_child(&mut qio, Duration::from_secs(30)).is_none() {
        let _ = qio.kill();
        let _ = qio.wait();
        panic!("qemu-io still running 30 s after the server exited");
    }
    let stderr = srv.stderr();
    assert_eq!(
        st.code(),
        Some(0),
        "exit status after SIGINT: {st:?}\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "server panicked:\n{stderr}");
}

#[test]
fn sigterm_with_idle_clients_disconnects_them() {
    let mut srv = Server::start(&["--size", "16M"]);
    let mut in_transmission = srv.client();
    in_transmission.write_verify(0, &Rng::new(7).bytes(4096));
    let mut structured = srv.client_structured();
    let mut negotiating = NbdConn::connect(&srv.addr);
    let mut silent = tcp_connect(&srv.addr);

    srv.signal(libc::SIGTERM);
    let st = srv.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "exit after SIGTERM:\n{}", srv.stderr());
    assert!(!srv.stderr().contains("panicked"), "{}", srv.stderr());
    assert_disconnected(&mut in_transmission.stream, "client in transmission");
    assert_disconnected(&mut structured.stream, "structured client");
    assert_disconnected(&mut negotiating.stream, "client in negotiation");
    assert_disconnected(&mut silent, "silent client");
}

#[test]
fn file_backend_persists_data() {
    let dir = TempDir::new("file-backend");
    let path = dir.join("disk.img");
    let path_s = path.to_str().unwrap().to_string();
    let data = Rng::new(8).bytes(128 * 1024);

    // Missing file: created with the requested size.
    let mut srv = Server::start(&["--backend", "raw", "--path", &path_s, "--size", "8M"]);
    assert_eq!(
        std::fs::metadata(&path)
            .expect("backing file created")
            .len(),
        8 * MIB
    );
    let mut c = srv.client();
    assert_eq!(c.info.size, 8 * MIB);
    assert_zeros(&c.read(0, 4096).unwrap(), "READ 0, 4096");
    c.write_verify(MIB, &data);
    assert_eq!(c.write(7 * MIB, &data, nbd::CMD_FLAG_FUA), 0, "FUA write");
    assert_eq!(c.flush(), 0);
    c.disconnect();
    srv.signal(libc::SIGTERM);
    let st = srv.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", srv.stderr());

    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.len() as u64, 8 * MIB);
    assert!(
        on_disk[MIB as usize..(MIB as usize + data.len())] == data[..],
        "data at 1M not in the file"
    );
    assert!(
        on_disk[7 * MIB as usize..(7 * MIB as usize + data.len())] == data[..],
        "FUA data at 7M not in the file"
    );
    assert!(on_disk[..MIB as usize].iter().all(|&b| b == 0));

    // Restart on the same file: the data is served back.
    let srv = Server::start(&["--backend", "raw", "--path", &path_s, "--size", "8M"]);
    let mut c = srv.client();
    assert_bytes(
        &c.read(MIB, data.len() as u32).unwrap(),
        &data,
        "data after restart",
    );
    // Trim / write-zeroes on a file read back as zeros.
    assert_eq!(c.write_zeroes(MIB, 64 * 1024, 0), 0);
    assert_zeros(&c.read(MIB, 64 * 1024).unwrap(), "READ MIB, 64 * 1024");
    assert_bytes(
        &c.read(MIB + 64 * 1024, 64 * 1024).unwrap(),
        &data[64 * 1024..],
        "data after the zeroed range",
    );
    c.disconnect();
}

#[test]
fn file_backend_serves_existing_image() {
    let dir = TempDir::new("file-existing");
    let path = dir.join("existing.img");
    write_random_file(&path, 4 * MIB, 9);
    let expect = std::fs::read(&path).unwrap();
    let srv = Server::start(&[
        "--backend",
        "raw",
        "--path",
        path.to_str().unwrap(),
        "--size",
        "4M",
    ]);
    let mut c = srv.client_structured();
    assert_eq!(c.info.size, 4 * MIB);
    for off in (0..4 * MIB).step_by(MIB as usize) {
        let got = c.read(off, MIB as u32).unwrap();
        assert!(
            got[..] == expect[off as usize..(off + MIB) as usize],
            "content at {off}"
        );
    }
    c.disconnect();
}

/// Reads one reply; None on EOF or a connection error.
fn next_simple_reply(s: &mut TcpStream) -> Option<(u64, u32)> {
    use std::io::Read;
    let mut b = [0u8; 16];
    s.read_exact(&mut b).ok()?;
    let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
    assert_eq!(magic, nbd::SIMPLE_REPLY_MAGIC, "bad reply magic {magic:#x}");
    let error = u32::from_be_bytes(b[4..8].try_into().unwrap());
    let handle = u64::from_be_bytes(b[8..16].try_into().unwrap());
    Some((handle, error))
}

#[test]
fn sigterm_finishes_in_flight_writes() {
    // Writes are streamed while the server is told to stop; every write the
    // server acknowledged must be in the backing file after a clean exit.
    let dir = TempDir::new("inflight");
    let path = dir.join("disk.img");
    let mut srv = Server::start(&[
        "--backend",
        "raw",
        "--path",
        path.to_str().unwrap(),
        "--size",
        "32M",
    ]);
    let c = srv.client();
    let mut reader = c.stream.try_clone().unwrap();
    let mut writer = c.stream.try_clone().unwrap();
    const N: u64 = 256;
    const LEN: usize = 64 * 1024;
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        for i in 0..N {
            let mut msg =
                NbdConn::request_bytes(0, nbd::CMD_WRITE, 0x100 + i, i * LEN as u64, LEN as u32)
                    .to_vec();
            msg.extend_from_slice(&Rng::new(i).bytes(LEN));
            if writer.write_all(&msg).is_err() {
                return i;
            }
        }
        N
    });
    let mut acked = Vec::new();
    let first = next_simple_reply(&mut reader).expect("first reply");
    assert_eq!(first.1, 0, "first WRITE failed");
    acked.push(first.0);
    srv.signal(libc::SIGTERM);
    while let Some((handle, error)) = next_simple_reply(&mut reader) {
        assert!(
            (0x100..0x100 + N).contains(&handle),
            "reply with unknown handle {handle:#x}"
        );
        assert!(!acked.contains(&handle), "duplicate reply for {handle:#x}");
        assert!(
            error == 0 || error == nbd::ESHUTDOWN,
            "WRITE {handle:#x} during shutdown failed with errno {error}"
        );
        if error == 0 {
            acked.push(handle);
        }
    }
    let st = srv.wait_exit(Duration::from_secs(30));
    let sent = sender.join().unwrap();
    eprintln!(
        "{} of {N} writes acknowledged, {sent} fully sent",
        acked.len()
    );
    assert_eq!(st.code(), Some(0), "{}", srv.stderr());
    assert!(!srv.stderr().contains("panicked"), "{}", srv.stderr());
    let file = std::fs::read(&path).unwrap();
    for h in acked {
        let i = h - 0x100;
        let off = (i as usize) * LEN;
        assert_bytes(
            &file[off..off + LEN],
            &Rng::new(i).bytes(LEN),
            &format!("acknowledged WRITE {i} in the backing file"),
        );
    }
    drop(c);
}

#[test]
fn file_backend_size_mismatch_never_loses_data() {
    // The contract only says a missing file is created at --size. For an
    // existing file of another size the server may either adapt (extend a
    // smaller file, keeping its content) or refuse with a message and a
    // non-zero exit; it must never truncate or alter the file's data.
    for (file_len, size_arg, size) in [(MIB, "4M", 4 * MIB), (8 * MIB, "4M", 4 * MIB)] {
        let dir = TempDir::new("file-mismatch");
        let path = dir.join("existing.img");
        write_random_file(&path, file_len, 11);
        let orig = std::fs::read(&path).unwrap();
        match Server::try_start(&[
            "--backend",
            "raw",
            "--path",
            path.to_str().unwrap(),
            "--size",
            size_arg,
        ]) {
            Ok(srv) => {
                let mut c = srv.client();
                assert_eq!(
                    c.info.size, size,
                    "file of {file_len} bytes, --size {size_arg}"
                );
                let keep = file_len.min(size);
                assert_bytes(
                    &c.read(0, keep as u32).unwrap(),
                    &orig[..keep as usize],
                    "original content",
                );
                if size > file_len {
                    assert_zeros(
                        &c.read(file_len, (size - file_len) as u32).unwrap(),
                        "extended area",
                    );
                }
                c.disconnect();
                drop(srv);
                let now = std::fs::read(&path).unwrap();
                assert!(
                    now.len() as u64 >= file_len,
                    "backing file shrank from {file_len} to {} bytes",
                    now.len()
                );
                assert_bytes(&now[..file_len as usize], &orig, "backing file content");
            }
            Err(f) => {
                assert!(
                    f.status.is_some_and(|s| !s.success()),
                    "refusal must be a non-zero exit: {f:?}"
                );
                assert!(!f.stderr.trim().is_empty(), "refusal without a message");
                assert!(!f.stderr.contains("panicked"), "{}", f.stderr);
                assert_bytes(&std::fs::read(&path).unwrap(), &orig, "file after refusal");
            }
        }
    }
}
