//! Real NBD clients (qemu-img, qemu-io, nbdcopy, nbdinfo, fio, libnbd via
//! Python) against the memory backend. Each test runs its own server.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TOOL_DEADLINE: Duration = Duration::from_secs(120);

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_success(out: &std::process::Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", describe(out));
}

/// Builds a 64 MiB raw image of random data with a few all-zero regions
/// (so clients exercise their zero/hole paths too).
fn make_source_image(path: &std::path::Path, seed: u64) {
    write_random_file(path, 64 * MIB, seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open source image");
    use std::io::{Seek, SeekFrom, Write};
    for (off, len) in [
        (MIB, MIB),
        (10 * MIB, 3 * MIB),
        (40 * MIB, 4096),
        (63 * MIB, MIB),
    ] {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&vec![0u8; len as usize]).unwrap();
    }
    f.sync_all().ok();
}

#[test]
fn qemu_img_convert_then_compare() {
    require_tool("qemu-img");
    let srv = Server::start(&["--size", "128M"]);
    let dir = TempDir::new("qemu-img");
    let src = dir.join("src.img");
    make_source_image(&src, 0x1234);

    let out = run_bounded(
        Command::new("qemu-img").args(["info", "--output=json", &srv.uri]),
        TOOL_DEADLINE,
    );
    assert_success(&out, "qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], 128 * MIB, "qemu-img info: {info}");

    let out = run_bounded(
        Command::new("qemu-img").args([
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &srv.uri,
        ]),
        TOOL_DEADLINE,
    );
    assert_success(&out, "qemu-img convert to nbd");

    // The 64 MiB image must match and the rest of the 128 MiB export must read
    // as zeros (qemu-img compare checks the extra area of the larger image).
    let out = run_bounded(
        Command::new("qemu-img").args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &srv.uri,
        ]),
        TOOL_DEADLINE,
    );
    assert_success(&out, "qemu-img compare");
    assert!(
        stdout_of(&out).contains("Images are identical"),
        "qemu-img compare output: {}",
        describe(&out)
    );

    // And a modified source must be detected as different (the comparison is real).
    let mut f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(5 * MIB + 17)).unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    let out = run_bounded(
        Command::new("qemu-img").args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &srv.uri,
        ]),
        TOOL_DEADLINE,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare should report a difference:\n{}",
        describe(&out)
    );
}

#[test]
fn nbdcopy_both_ways_sha256_equal() {
    require_tool("nbdcopy");
    let srv = Server::start(&["--size", "64M"]);
    let dir = TempDir::new("nbdcopy");
    let src = dir.join("src.img");
    let back = dir.join("back.img");
    make_source_image(&src, 0x5678);

    let out = run_bounded(
        Command::new("nbdcopy").args(["--flush", src.to_str().unwrap(), &srv.uri]),
        TOOL_DEADLINE,
    );
    assert_success(&out, "nbdcopy file -> nbd");
    let out = run_bounded(
        Command::new("nbdcopy").args([&srv.uri, back.to_str().unwrap()]),
        TOOL_DEADLINE,
    );
    assert_success(&out, "nbdcopy nbd -> file");
    assert_eq!(
        std::fs::metadata(&back).unwrap().len(),
        64 * MIB,
        "copied-back image size"
    );
    assert_eq!(
        sha256_file(&src),
        sha256_file(&back),
        "sha256 of the image copied back differs from the source"
    );

    // Single connection, synchronous, small requests: a different code path.
    let back2 = dir.join("back2.img");
    let out = run_bounded(
        Command::new("nbdcopy").args([
            "--connections=1",
            "--synchronous",
            "--request-size=65536",
            &srv.uri,
            back2.to_str().unwrap(),
        ]),
        TOOL_DEADLINE,
    );
    assert_success(&out, "nbdcopy --synchronous nbd -> file");
    assert_eq!(sha256_file(&src), sha256_file(&back2));
}

#[test]
fn qemu_io_patterns_zero_discard_flush() {
    require_tool("qemu-io");
    let srv = Server::start(&["--size", "32M"]);
    let cmds: &[&str] = &[
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -P 0xcd 1M 3M",
        "read -P 0xcd 1M 3M",
        // write zeroes in the middle of written data
        "write -z 1M 1M",
        "read -P 0 1M 1M",
        "read -P 0xcd 2M 2M",
        "read -P 0xab 0 1M",
        // zero with unmap allowed
        "write -P 0x11 4M 2M",
        "write -z -u 4M 64k",
        "read -P 0 4M 64k",
        "read -P 0x11 4160k 1984k",
        // discard whole pages: they read back as zeros on the memory backend
        "discard 5M 512k",
        "read -P 0 5M 512k",
        "read -P 0x11 5632k 512k",
        // FUA write
        "write -f -P 0x22 6M 64k",
        "read -P 0x22 6M 64k",
        // sub-page and unaligned-to-page (but 512-aligned) writes
        "write -P 0x33 7M 512",
        "read -P 0x33 7M 512",
        "read -P 0 7340544 3584",
        "write -P 0x34 7341568 1536",
        "read -P 0x33 7M 512",
        "read -P 0 7340544 512",
        "read -P 0x34 7341568 1536",
        // never-written space reads as zeros
        "read -P 0 16M 1M",
        // the last bytes of the export
        "write -P 0x55 32764k 4k",
        "read -P 0x55 32764k 4k",
        // asynchronous writes in flight together
        "aio_write -P 0x44 8M 64k",
        "aio_write -P 0x45 9M 128k",
        "aio_write -P 0x46 10M 4k",
        "aio_flush",
        "read -P 0x44 8M 64k",
        "read -P 0x45 9M 128k",
        "read -P 0x46 10M 4k",
        "flush",
        // big request, larger than qemu's default cluster, spanning many pages
        "write -P 0x66 12M 4M",
        "read -P 0x66 12M 4M",
        "flush",
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &srv.uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run_bounded(&mut cmd, TOOL_DEADLINE);
    let text = format!(
        "{}{}",
        stdout_of(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("Pattern verification failed"),
        "qemu-io pattern mismatch:\n{text}"
    );
    assert!(
        !text.to_lowercase().contains("failed"),
        "qemu-io reported a failure:\n{text}"
    );
    assert_success(&out, "qemu-io");
    let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    let want = |prefix: &str| cmds.iter().filter(|c| c.starts_with(prefix)).count();
    assert_eq!(
        count("wrote "),
        want("write") + want("aio_write"),
        "not every write completed:\n{text}"
    );
    assert_eq!(
        count("read "),
        want("read"),
        "not every read completed:\n{text}"
    );
    assert_eq!(
        count("discard "),
        want("discard"),
        "not every discard completed:\n{text}"
    );
}

#[test]
fn fio_randrw_verify_crc32c() {
    fio_verify(&["--size", "64M"], &[]);
}

/// The same in write-back mode, with a FLUSH after every 8 writes (fio `--fsync=8`) so that flushes
/// that wait for a sync are interleaved with the verified IO.
#[test]
fn fio_randrw_verify_crc32c_write_back() {
    fio_verify(
        &["--size", "64M", "--durability", "write-back"],
        &["--fsync=8"],
    );
}

fn fio_verify(server_args: &[&str], fio_args: &[&str]) {
    require_tool("fio");
    let srv = Server::start(server_args);
    // fio drops files (e.g. verify state) into its working directory.
    let dir = TempDir::new("fio");
    let out = run_bounded(
        Command::new("fio")
            .current_dir(dir.path())
            .args([
                "--name=ferroblock-verify",
                "--ioengine=nbd",
                &format!("--uri={}", srv.uri),
                "--rw=randrw",
                "--bsrange=4k-128k",
                "--iodepth=16",
                "--size=64M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--verify_state_save=0",
                "--output-format=json",
            ])
            .args(fio_args),
        Duration::from_secs(240),
    );
    let stdout = stdout_of(&out);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_success(&out, "fio");
    assert!(
        !stdout.contains("verify:") && !stderr.contains("verify:"),
        "fio reported verify errors:\n{}",
        describe(&out)
    );
    let json_start = stdout
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in fio output:\n{}", describe(&out)));
    let v: serde_json::Value =
        serde_json::from_str(&stdout[json_start..]).expect("parsing fio JSON");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error: {job}");
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let read = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(written > 0, "fio wrote nothing: {job}");
    assert!(read > 0, "fio read nothing: {job}");
}

/// Parses `nbdinfo --map` text output into merged (offset, length, type) runs.
fn parse_map(text: &str) -> Vec<(u64, u64, u32)> {
    let mut runs: Vec<(u64, u64, u32)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let off: u64 = f[0]
            .parse()
            .unwrap_or_else(|_| panic!("bad map line {line:?}"));
        let len: u64 = f[1]
            .parse()
            .unwrap_or_else(|_| panic!("bad map line {line:?}"));
        let ty: u32 = f[2]
            .parse()
            .unwrap_or_else(|_| panic!("bad map line {line:?}"));
        if let Some(last) = runs.last_mut() {
            assert_eq!(last.0 + last.1, off, "map is not contiguous: {text}");
            if last.2 == ty {
                last.1 += len;
                continue;
            }
        }
        runs.push((off, len, ty));
    }
    runs
}

#[test]
fn nbdinfo_map_shows_trimmed_range_as_hole() {
    require_tool("nbdinfo");
    let srv = Server::start(&["--size", "16M"]);
    let mut c = srv.client();
    let data = Rng::new(77).bytes(MIB as usize);
    for i in 0..4 {
        c.write_verify(i * MIB, &data);
    }
    assert_eq!(c.trim(MIB, MIB as u32), 0, "TRIM");
    // Zeroing whole pages frees them too.
    assert_eq!(
        c.write_zeroes(3 * MIB, 256 * KIB as u32, 0),
        0,
        "WRITE_ZEROES"
    );
    assert_eq!(c.flush(), 0);
    c.disconnect();

    let out = run_bounded(
        Command::new("nbdinfo").args(["--map", &srv.uri]),
        TOOL_DEADLINE,
    );
    assert_success(&out, "nbdinfo --map");
    let text = stdout_of(&out);
    let runs = parse_map(&text);
    let expected = vec![
        (0, MIB, 0),
        (MIB, MIB, 3),
        (2 * MIB, MIB, 0),
        (3 * MIB, 256 * KIB, 3),
        (3 * MIB + 256 * KIB, 768 * KIB, 0),
        (4 * MIB, 12 * MIB, 3),
    ];
    assert_eq!(runs, expected, "nbdinfo --map output:\n{text}");

    // The trimmed range reads back as zeros.
    let mut c = srv.client();
    assert_zeros(&c.read(MIB, MIB as u32).unwrap(), "READ MIB, MIB as u32");
    assert_bytes(
        &c.read(0, 4096).unwrap(),
        &data[..4096],
        "data before the trimmed range",
    );
    c.disconnect();

    // nbdinfo's general view of the export.
    let out = run_bounded(
        Command::new("nbdinfo").args(["--json", &srv.uri]),
        TOOL_DEADLINE,
    );
    assert_success(&out, "nbdinfo --json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 16 * MIB, "{e}");
    assert_eq!(e["export-name"], srv.export.as_str(), "{e}");
    for flag in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[flag], true, "{flag} should be true: {e}");
    }
    assert_eq!(e["is_read_only"], false, "{e}");
    assert_eq!(e["block_size_minimum"], 512, "{e}");
    assert_eq!(e["block_size_preferred"], 4096, "{e}");
    assert_eq!(e["block_size_maximum"], 33554432, "{e}");
    assert!(
        e["contexts"]
            .as_array()
            .map(|a| a.iter().any(|c| c == "base:allocation"))
            .unwrap_or(false),
        "base:allocation not listed: {e}"
    );
}

fn spawn_qemu_io(uri: &str, cmds: &[String]) -> Child {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning qemu-io")
}

fn finish(child: Child, what: &str) -> String {
    let out = child.wait_with_output().expect("waiting for qemu-io");
    let text = format!(
        "{}{}",
        stdout_of(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.to_lowercase().contains("failed"),
        "{what}:\n{}",
        describe(&out)
    );
    text
}

#[test]
fn parallel_clients_on_disjoint_regions() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let srv = Server::start(&["--size", "64M"]);
    const REGION: u64 = 16 * MIB;
    let pattern = |i: u64| 0x10 + i as u8;

    // 4 writers at once, each on its own 16 MiB region, in 1 MiB and odd-sized pieces.
    let writers: Vec<Child> = (0..4u64)
        .map(|i| {
            let base = i * REGION;
            let mut cmds: Vec<String> = (0..15)
                .map(|j| format!("write -P {} {} 1M", pattern(i), base + j * MIB))
                .collect();
            cmds.push(format!("write -P {} {} 768k", pattern(i), base + 15 * MIB));
            cmds.push(format!(
                "write -P {} {} 256k",
                pattern(i),
                base + 15 * MIB + 768 * KIB
            ));
            cmds.push("flush".to_string());
            spawn_qemu_io(&srv.uri, &cmds)
        })
        .collect();
    for (i, w) in writers.into_iter().enumerate() {
        let text = finish(w, &format!("writer {i}"));
        assert_eq!(
            text.lines().filter(|l| l.starts_with("wrote ")).count(),
            17,
            "writer {i}:\n{text}"
        );
    }

    // 4 verifiers at once.
    let readers: Vec<Child> = (0..4u64)
        .map(|i| {
            let cmds: Vec<String> = (0..4)
                .map(|j| format!("read -P {} {} 4M", pattern(i), i * REGION + j * 4 * MIB))
                .collect();
            spawn_qemu_io(&srv.uri, &cmds)
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let text = finish(r, &format!("reader {i}"));
        assert!(
            !text.contains("Pattern verification failed"),
            "reader {i}:\n{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("read ")).count(),
            4,
            "reader {i}:\n{text}"
        );
    }

    // And the whole export, copied out with a multi-connection nbdcopy.
    let dir = TempDir::new("parallel");
    let out_img = dir.join("all.img");
    let out = run_bounded(
        Command::new("nbdcopy").args([&srv.uri, out_img.to_str().unwrap()]),
        TOOL_DEADLINE,
    );
    assert_success(&out, "nbdcopy");
    let all = std::fs::read(&out_img).unwrap();
    assert_eq!(all.len() as u64, 4 * REGION);
    for i in 0..4u64 {
        let region = &all[(i * REGION) as usize..((i + 1) * REGION) as usize];
        if let Some(pos) = region.iter().position(|&b| b != pattern(i)) {
            panic!(
                "region {i}: byte at {} is {:#x}, expected {:#x}",
                i * REGION + pos as u64,
                region[pos],
                pattern(i)
            );
        }
    }
}

#[test]
fn libnbd_python_edge_cases() {
    require_python_libnbd();
    let srv = Server::start(&["--size", "64M"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nbd_edge_cases.py");
    let out = run_bounded(
        Command::new("/usr/bin/python3").args([script, &srv.uri]),
        TOOL_DEADLINE,
    );
    assert!(
        out.status.success(),
        "nbd_edge_cases.py failed:\n{}\nserver stderr:\n{}",
        describe(&out),
        srv.stderr()
    );
    assert!(
        stdout_of(&out).contains("ALL EDGE CASES PASSED"),
        "edge case script did not finish:\n{}",
        describe(&out)
    );
}
