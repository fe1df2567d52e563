//! `ferroblock bench` and `ferroblock plot` against real NBD servers: our own (memory backend) and
//! nbdkit's memory plugin. No sleeps and no timing thresholds: runs are bounded by `--ops`.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use common::{
    DEADLINE, Server, TempDir, describe, ferroblock_bin, qemu_io, require_tool, run_bounded,
};

fn bench(args: &[&str]) -> Output {
    let mut command = Command::new(ferroblock_bin());
    command.arg("bench").args(args);
    run_bounded(&mut command, DEADLINE)
}

fn json_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| {
        panic!(
            "bench --json printed no JSON object ({error}): {}",
            describe(out)
        )
    })
}

fn assert_summary_fields(summary: &serde_json::Value, out: &Output) {
    for field in [
        "iops", "mbps", "mean_us", "p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us",
        "ops", "errors", "seconds",
    ] {
        assert!(
            summary[field].is_number(),
            "field {field} missing or not a number: {}",
            describe(out)
        );
    }
}

fn assert_starts_with(path: &Path, prefixes: &[&[u8]]) {
    let bytes = std::fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    assert!(!bytes.is_empty(), "{} is empty", path.display());
    assert!(
        prefixes.iter().any(|prefix| bytes.starts_with(prefix)),
        "{} starts with {:?}",
        path.display(),
        String::from_utf8_lossy(&bytes[..bytes.len().min(16)])
    );
}

#[test]
fn randrw_mix_with_verify_reports_json_and_plots() {
    let server = Server::start(&["--backend", "memory", "--size", "64M"]);
    let dir = TempDir::new("loadgen");
    let hist = dir.join("run.hlog");
    let hist_text = hist.to_str().expect("utf-8 temp path");
    let out = bench(&[
        &server.uri,
        "--rw",
        "randrw",
        "--bs",
        "4k:50,64k:50",
        "--qd",
        "8",
        "--ops",
        "2000",
        "--verify",
        "--json",
        "--hist",
        hist_text,
    ]);
    assert!(out.status.success(), "bench failed: {}", describe(&out));
    let summary = json_of(&out);
    assert_summary_fields(&summary, &out);
    assert_eq!(summary["ops"], 2000, "{}", describe(&out));
    assert_eq!(summary["errors"], 0, "{}", describe(&out));
    assert!(summary["reads"].as_u64() > Some(0) && summary["writes"].as_u64() > Some(0));

    let prefix = dir.join("chart");
    let mut command = Command::new(ferroblock_bin());
    command
        .args(["plot", hist_text, "--label", "ferroblock memory", "--out"])
        .arg(&prefix);
    let plotted = run_bounded(&mut command, DEADLINE);
    assert!(
        plotted.status.success(),
        "plot failed: {}",
        describe(&plotted)
    );
    let svg: &[&[u8]] = &[b"<svg", b"<?xml"];
    let png: &[&[u8]] = &[b"\x89PNG\r\n\x1a\n"];
    for (suffix, magic) in [
        ("latency.svg", svg),
        ("latency.png", png),
        ("iops.svg", svg),
        ("iops.png", png),
    ] {
        assert_starts_with(&dir.join(&format!("chart-{suffix}")), magic);
    }
}

#[test]
fn ramp_operations_are_neither_counted_nor_recorded() {
    let server = Server::start(&["--backend", "memory", "--size", "64M"]);
    let out = bench(&[
        &server.uri,
        "--rw",
        "randwrite",
        "--qd",
        "4",
        "--ops",
        "500",
        "--ramp",
        "200ms",
        "--json",
    ]);
    assert!(out.status.success(), "bench failed: {}", describe(&out));
    let summary = json_of(&out);
    assert_summary_fields(&summary, &out);
    // --ops counts the measured operations only; the ramp's come on top and are not reported.
    assert_eq!(summary["ops"], 500, "{}", describe(&out));
    assert_eq!(summary["writes"], 500, "{}", describe(&out));
    assert_eq!(
        summary["ramp_seconds"].as_f64(),
        Some(0.2),
        "{}",
        describe(&out)
    );
    for field in [
        "cpu_percent",
        "user_percent",
        "sys_percent",
        "spin_idle_percent",
        "work_percent",
    ] {
        assert!(
            summary[field].as_f64().is_some_and(|value| value >= 0.0),
            "field {field} missing or negative: {}",
            describe(&out)
        );
    }
}

#[test]
fn verify_detects_a_foreign_write() {
    let server = Server::start(&["--backend", "memory", "--size", "64M"]);
    let range = ["--size", "64k", "--bs", "4k", "--qd", "4", "--verify"];
    let mut write = vec![server.uri.as_str(), "--rw", "write", "--ops", "16"];
    write.extend_from_slice(&range);
    let out = bench(&write);
    assert!(
        out.status.success(),
        "verified write failed: {}",
        describe(&out)
    );
    let mut read = vec![server.uri.as_str(), "--rw", "randread", "--ops", "64"];
    read.extend_from_slice(&range);
    let out = bench(&read);
    assert!(
        out.status.success(),
        "clean verified read failed: {}",
        describe(&out)
    );

    qemu_io(&server.uri, &["write -P 0x11 0 64k"]);
    let out = bench(&read);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "overwritten range passed --verify: {}",
        describe(&out)
    );
    assert!(
        stderr.contains("verify failed at offset "),
        "no offset named: {}",
        describe(&out)
    );
}

#[test]
fn invalid_workloads_exit_with_code_2() {
    let uri = "nbd://127.0.0.1:1/none";
    for bad in [
        &["--bs", "1000", "--ops", "1"][..],
        &["--bs", "4k:60,64k:30", "--ops", "1"],
        &["--bs", "4k,64k:50", "--ops", "1"],
        &["--rw", "randrw", "--rwmixread", "101", "--ops", "1"],
        &["--qd", "0", "--ops", "1"],
        &["--conns", "0", "--ops", "1"],
        &["--ops", "0"],
        &[],
        &["--time", "0s"],
        &["--rate", "0", "--ops", "1"],
        &["--rw", "sideways", "--ops", "1"],
        &["--ramp", "soon", "--ops", "1"],
    ] {
        let mut args = vec![uri];
        args.extend_from_slice(bad);
        let out = bench(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "bench {bad:?} should be refused: {}",
            describe(&out)
        );
        assert!(!out.stderr.is_empty(), "bench {bad:?} said nothing");
    }
    let out = bench(&["http://example.com/disk", "--ops", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

#[test]
fn a_range_beyond_the_export_is_refused() {
    let server = Server::start(&["--backend", "memory", "--size", "64M"]);
    let out = bench(&[&server.uri, "--size", "128M", "--ops", "10"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("larger than the export"),
        "{}",
        describe(&out)
    );
}

#[test]
fn works_against_nbdkit() {
    require_tool("nbdkit");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    // nbdkit --run starts the command once it is listening, and exits with the command's status.
    let script = format!(
        "\"$FERROBLOCK_BIN\" bench nbd://127.0.0.1:{port}/ --rw randrw --bs 4k:70,16k:30 \
         --qd 4 --conns 2 --ops 1000 --verify --poll interrupt --json"
    );
    let mut command = Command::new("nbdkit");
    command.env("FERROBLOCK_BIN", ferroblock_bin()).args([
        "-i",
        "127.0.0.1",
        "-p",
        &port,
        "memory",
        "64M",
        "--run",
        &script,
    ]);
    let out = run_bounded(&mut command, DEADLINE);
    assert!(
        out.status.success(),
        "bench against nbdkit failed: {}",
        describe(&out)
    );
    let summary = json_of(&out);
    assert_summary_fields(&summary, &out);
    assert_eq!(summary["ops"], 1000, "{}", describe(&out));
    assert_eq!(summary["errors"], 0, "{}", describe(&out));
    assert_eq!(summary["conns"], 2, "{}", describe(&out));
}

#[test]
fn files_are_driven_through_io_uring_and_verified() {
    let dir = TempDir::new("loadgen-file");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|file| file.set_len(16 << 20))
        .expect("create a 16 MiB image");
    let target = image.to_str().expect("utf-8 temp path");
    let out = bench(&[
        target,
        "--rw",
        "randrw",
        "--bs",
        "4k:50,64k:50",
        "--qd",
        "8",
        "--conns",
        "2",
        "--ops",
        "1000",
        "--verify",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "bench on a file failed: {}",
        describe(&out)
    );
    let summary = json_of(&out);
    assert_summary_fields(&summary, &out);
    assert_eq!(summary["ops"], 1000, "{}", describe(&out));
    assert_eq!(summary["errors"], 0, "{}", describe(&out));

    let range = ["--size", "64k", "--bs", "4k", "--qd", "4", "--verify"];
    let mut write = vec![target, "--rw", "write", "--ops", "16"];
    write.extend_from_slice(&range);
    let out = bench(&write);
    assert!(
        out.status.success(),
        "verified write failed: {}",
        describe(&out)
    );
    // Damage the sector at 8192 behind the benchmark's back.
    let mut bytes = std::fs::read(&image).expect("read the image");
    bytes[8192..8192 + 512].fill(0x11);
    std::fs::write(&image, &bytes).expect("write the image");
    let mut read = vec![target, "--rw", "read", "--ops", "16"];
    read.extend_from_slice(&range);
    let out = bench(&read);
    assert!(
        !out.status.success(),
        "damage passed --verify: {}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("verify failed at offset 8192"),
        "offset not named: {}",
        describe(&out)
    );
}
