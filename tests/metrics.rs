//! The Prometheus endpoint, scraped with a real HTTP client (curl) and parsed: counters, bytes, the
//! in-flight gauge, op numbers and commit watermark, latency histograms, reactor loop accounting.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use common::{DEADLINE, Server, describe, require_tool, run_bounded};

fn metrics_address(server: &Server) -> String {
    let log = server.stderr();
    let start = log
        .find("metrics at http://")
        .expect("the server logs its metrics address")
        + "metrics at http://".len();
    log[start..]
        .split(['/', ' ', '\n'])
        .next()
        .expect("address")
        .to_string()
}

/// `name{labels}` -> value, for every sample line.
fn scrape(address: &str) -> HashMap<String, f64> {
    let out = run_bounded(
        Command::new("curl").args(["-sf", &format!("http://{address}/metrics")]),
        DEADLINE,
    );
    assert!(out.status.success(), "curl: {}", describe(&out));
    let text = String::from_utf8(out.stdout).expect("utf-8 exposition");
    let mut samples = HashMap::new();
    for line in text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("malformed line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("malformed value in {line:?}"));
        assert!(
            samples.insert(name.to_string(), value).is_none(),
            "duplicate sample {name}"
        );
    }
    samples
}

#[test]
fn prometheus_endpoint_counts_what_clients_did() {
    require_tool("curl");
    let server = Server::start(&["--size", "16M", "--metrics", "127.0.0.1:0"]);
    let address = metrics_address(&server);
    common::qemu_io(
        &server.uri,
        &[
            "write -P 1 0 64k",
            "write -P 2 64k 64k",
            "write -P 3 128k 64k",
            "read -P 2 64k 64k",
            "flush",
        ],
    );
    let samples = scrape(&address);
    let get = |name: &str| {
        *samples
            .get(name)
            .unwrap_or_else(|| panic!("missing {name}"))
    };
    assert_eq!(
        get("ferroblock_requests_total{volume=\"vol0\",kind=\"write\"}"),
        3.0
    );
    assert_eq!(
        get("ferroblock_bytes_total{volume=\"vol0\",kind=\"write\"}"),
        196608.0
    );
    assert_eq!(
        get("ferroblock_requests_total{volume=\"vol0\",kind=\"read\"}"),
        1.0
    );
    assert_eq!(
        get("ferroblock_bytes_total{volume=\"vol0\",kind=\"read\"}"),
        65536.0
    );
    assert!(get("ferroblock_requests_total{volume=\"vol0\",kind=\"flush\"}") >= 1.0);
    assert_eq!(
        get("ferroblock_request_errors_total{volume=\"vol0\",kind=\"write\"}"),
        0.0
    );
    assert_eq!(get("ferroblock_requests_in_flight{volume=\"vol0\"}"), 0.0);
    // Three writes: ops 1..=3 committed, the next op is 4.
    assert_eq!(get("ferroblock_committed_op{volume=\"vol0\"}"), 3.0);
    assert_eq!(get("ferroblock_next_op{volume=\"vol0\"}"), 4.0);
    // One note each; qemu-io writes one at a time, so each note's data went either inline with its
    // journal block or in one data write of its own.
    assert_eq!(get("ferroblock_store_notes_total{volume=\"vol0\"}"), 3.0);
    assert_eq!(
        get("ferroblock_store_inline_notes_total{volume=\"vol0\"}")
            + get("ferroblock_store_data_writes_total{volume=\"vol0\"}"),
        3.0
    );
    // The three notes' homes are consecutive: their batch is still gathering, or written in at
    // most one 64 KiB piece per note. Three writes take no checkpoint.
    assert!(get("ferroblock_store_home_writes_total{volume=\"vol0\"}") <= 3.0);
    assert_eq!(
        get("ferroblock_store_checkpoints_total{volume=\"vol0\"}"),
        0.0
    );
    assert_eq!(
        get("ferroblock_request_duration_seconds_count{volume=\"vol0\",kind=\"write\"}"),
        3.0
    );
    assert_eq!(
        get(
            "ferroblock_request_duration_seconds_bucket{volume=\"vol0\",kind=\"write\",le=\"+Inf\"}"
        ),
        3.0
    );
    assert!(get("ferroblock_request_duration_seconds_sum{volume=\"vol0\",kind=\"write\"}") > 0.0);
    assert!(get("ferroblock_reactor_iterations_total{reactor=\"0\"}") > 0.0);
    assert!(
        get("ferroblock_reactor_busy_seconds_total{reactor=\"0\"}")
            + get("ferroblock_reactor_idle_seconds_total{reactor=\"0\"}")
            > 0.0
    );

    // Anything else gets an error page; the endpoint and the target go on.
    let out = run_bounded(
        Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{address}/other"),
        ]),
        DEADLINE,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    let mut raw = TcpStream::connect(&address).expect("connect to metrics");
    raw.write_all(&[0xff; 300]).expect("send garbage");
    raw.write_all(b"\r\n\r\n").expect("send end");
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert_eq!(
        scrape(&address)["ferroblock_requests_total{volume=\"vol0\",kind=\"write\"}"],
        3.0
    );
}
