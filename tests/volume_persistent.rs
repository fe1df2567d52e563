//! The persistent volume copy (`--backend file`, the default) as a real process: data survives restarts
//! and SIGKILL at random moments under a real NBD client with many requests in flight; every damaged or
//! foreign store is refused with an error naming the file and the problem; resize grows only.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    DEADLINE, MIB, Rng, Server, TempDir, describe, require_python_libnbd, require_tool, run_bounded,
};

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/crash_client.py");

fn serve(data_dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--data-dir", data_dir.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn try_serve(data_dir: &Path, extra: &[&str]) -> Result<Server, common::StartFailure> {
    let mut args = vec!["--data-dir", data_dir.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    Server::try_start(&args)
}

fn acknowledged(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|text| text.lines().filter(|line| line.starts_with("A ")).count())
        .unwrap_or(0)
}

fn start_writer(uri: &str, log: &Path, seed: u64) -> Child {
    Command::new("/usr/bin/python3")
        .args([
            CLIENT,
            "write",
            uri,
            log.to_str().unwrap(),
            &seed.to_string(),
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("start crash writer")
}

fn verify(uri: &str, log: &Path) {
    let out = run_bounded(
        Command::new("/usr/bin/python3").args([CLIENT, "verify", uri, log.to_str().unwrap()]),
        DEADLINE,
    );
    assert!(
        out.status.success(),
        "verification after restart failed: {}",
        describe(&out)
    );
}

/// Many writes, trims and zeroes (some FUA) in flight from libnbd; the server is SIGKILLed at a random
/// moment, restarted, and every sector must hold its last acknowledged content or that of a request
/// still in flight at the kill. Several cycles on the same store, so recovery also replays what earlier
/// recoveries left.
#[test]
fn sigkill_under_load_loses_no_acknowledged_write() {
    sigkill_cycles("fdatasync");
}

/// The same in write-back mode: a write is acknowledged once the device has it (not yet synced), which
/// a process kill cannot undo: the kernel finishes every write the process submitted.
#[test]
fn sigkill_under_load_loses_no_acknowledged_write_in_write_back() {
    sigkill_cycles("write-back");
}

fn sigkill_cycles(durability: &str) {
    require_python_libnbd();
    let dir = TempDir::new("crash");
    let log = dir.join("requests.log");
    let mut rng = Rng::new(0x5eed);
    for cycle in 0..5u64 {
        let mut args = vec!["--durability", durability];
        if cycle == 0 {
            args.extend(["--size", "64M"]);
        }
        let mut server = serve(dir.path(), &args);
        if cycle > 0 {
            verify(&server.uri, &log);
        }
        let before = acknowledged(&log);
        let target = before + 50 + rng.below(400) as usize;
        let mut writer = start_writer(&server.uri, &log, 1000 + cycle);
        let deadline = Instant::now() + DEADLINE;
        while acknowledged(&log) < target {
            assert!(
                Instant::now() < deadline,
                "writer made no progress; server stderr:\n{}",
                server.stderr()
            );
            assert!(
                writer.try_wait().expect("poll writer").is_none(),
                "writer exited early"
            );
            std::thread::yield_now();
        }
        server.signal(libc::SIGKILL);
        server.wait_exit(DEADLINE);
        let status =
            common::wait_child(&mut writer, DEADLINE).expect("writer ends when the server dies");
        assert!(status.success(), "writer failed: {status:?}");
    }
    let server = serve(dir.path(), &["--durability", durability]);
    verify(&server.uri, &log);
}

#[test]
fn default_store_survives_a_restart_and_keeps_its_size() {
    require_tool("qemu-io");
    let dir = TempDir::new("restart");
    let mut server = serve(dir.path(), &["--size", "32M"]);
    common::qemu_io(&server.uri, &["write -P 0x3c 1M 3M", "write -z -u 2M 512k"]);
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(DEADLINE).success());
    assert!(
        dir.join("vol0.fbv").is_file(),
        "the store is DATA_DIR/<volume>.fbv"
    );

    // Reopened without --size: the recorded size; the same data.
    let server = serve(dir.path(), &[]);
    let client = server.client();
    assert_eq!(client.info.size, 32 * MIB);
    client.disconnect();
    common::qemu_io(
        &server.uri,
        &[
            "read -P 0x3c 1M 1M",
            "read -P 0 2M 512k",
            "read -P 0x3c 2560k 1536k",
            "read -P 0 0 1M",
        ],
    );
}

/// Every poll mode serves a store it reopened. After a restart the first writes wait until a block
/// vouches for the recovered journal, and are started from inside the copy's end of iteration; in
/// interrupt mode a reactor that slept with their data writes still gathered hung for good (found with
/// `--poll interrupt`, fixed: `VolumeCopy::has_unissued_work`).
#[test]
fn every_poll_mode_serves_a_reopened_store() {
    require_tool("qemu-io");
    for mode in ["interrupt", "adaptive", "busy"] {
        let dir = TempDir::new(&format!("reopen-{mode}"));
        let args = [
            "--size",
            "16M",
            "--poll",
            mode,
            "--durability",
            "write-back",
        ];
        let mut server = serve(dir.path(), &args);
        common::qemu_io(&server.uri, &["write -P 0x11 0 1M"]);
        server.signal(libc::SIGTERM);
        assert!(server.wait_exit(DEADLINE).success(), "{mode}: clean exit");

        let mut server = serve(dir.path(), &args[2..]);
        // Several writes at once (qemu-io's aio commands), then one at a time, then read back.
        common::qemu_io(
            &server.uri,
            &[
                "aio_write -P 0x21 0 4k",
                "aio_write -P 0x22 8k 4k",
                "aio_write -P 0x23 64k 64k",
                "aio_flush",
                "write -P 0x24 1M 4k",
                "read -P 0x21 0 4k",
                "read -P 0x11 4k 4k",
                "read -P 0x22 8k 4k",
                "read -P 0x23 64k 64k",
                "read -P 0x24 1M 4k",
            ],
        );
        server.signal(libc::SIGTERM);
        assert!(
            server.wait_exit(DEADLINE).success(),
            "{mode}: clean exit after reopening"
        );
    }
}

/// `serve` with `args` on the store in `data_dir` must exit with code 1 and a message naming the
/// store file and containing `needle`.
fn refused_at_start(data_dir: &Path, args: &[&str], needle: &str) {
    let mut full = vec!["--data-dir", data_dir.to_str().expect("utf-8 path")];
    full.extend_from_slice(args);
    common::refused_at_start(&full, "vol0.fbv", needle);
}

#[test]
fn resize_grows_only_when_asked() {
    let dir = TempDir::new("resize");
    let mut server = serve(dir.path(), &["--size", "16M"]);
    let mut client = server.client();
    let data = Rng::new(3).bytes(65536);
    assert_eq!(client.write(15 * MIB, &data, 0), 0);
    client.disconnect();
    server.signal(libc::SIGTERM);
    server.wait_exit(DEADLINE);

    for (args, needle) in [
        (&["--size", "32M"][..], "add --resize"),
        (&["--size", "8M", "--resize"][..], "differs"),
    ] {
        refused_at_start(dir.path(), args, needle);
    }

    let server = serve(dir.path(), &["--size", "32M", "--resize"]);
    let mut client = server.client();
    assert_eq!(client.info.size, 32 * MIB);
    assert_eq!(client.read(15 * MIB, 65536).expect("read"), data);
    let more = Rng::new(4).bytes(65536);
    assert_eq!(client.write(31 * MIB, &more, 0), 0);
    assert_eq!(client.read(31 * MIB, 65536).expect("read"), more);
}

/// `--spare-percent` sizes a new store's data area; the store keeps it: reopening without the option
/// serves it, asking for another spare is refused by name, and growing keeps at least the old spare.
#[test]
fn spare_percent_sizes_a_new_store_and_stays_with_it() {
    use ferroblock::journal::superblock::Superblock;
    const GIB: u64 = 1 << 30;
    let dir = TempDir::new("spare");
    let store = dir.join("vol0.fbv");
    // The harness serves sparse stores: the test needs the layout, not 1.7 GiB of reserved disk.
    let mut server = serve(dir.path(), &["--size", "1G", "--spare-percent", "50"]);
    let chosen = Superblock::new_layout(1, "vol0", GIB, Some(50)).expect("fits");
    let default = Superblock::new_layout(1, "vol0", GIB, None).expect("fits");
    assert!(chosen.spare_bytes() >= GIB / 2 - 4096 && default.spare_bytes() == 64 * MIB);
    let length = std::fs::metadata(&store).expect("store").len();
    assert_eq!(length, chosen.store_bytes(), "a 50 % spare");
    let mut client = server.client();
    let data = Rng::new(11).bytes(65536);
    assert_eq!(client.write(GIB - 65536, &data, 0), 0);
    client.disconnect();
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(DEADLINE).success());

    for args in [&[][..], &["--spare-percent", "50"][..]] {
        let mut server = serve(dir.path(), args);
        let mut client = server.client();
        assert_eq!(
            client.read(GIB - 65536, 65536).expect("read"),
            data,
            "{args:?}"
        );
        client.disconnect();
        server.signal(libc::SIGTERM);
        assert!(server.wait_exit(DEADLINE).success(), "{args:?}");
        assert_eq!(std::fs::metadata(&store).expect("store").len(), length);
    }

    refused_at_start(dir.path(), &["--spare-percent", "20"], "--spare-percent 20");
    assert_eq!(std::fs::metadata(&store).expect("store").len(), length);

    // Growing to 2 GiB without the option: the default spare of 2 GiB (64 MiB) is smaller than the
    // store's, which stays; the journal stays where it is.
    let server = serve(dir.path(), &["--size", "2G", "--resize"]);
    let mut client = server.client();
    assert_eq!(client.info.size, 2 * GIB);
    assert_eq!(client.read(GIB - 65536, 65536).expect("read"), data);
    let grown_data = (2 * GIB + chosen.spare_bytes()).next_multiple_of(4096);
    assert_eq!(
        std::fs::metadata(&store).expect("store").len(),
        chosen.data_offset + grown_data
    );
    drop(client);
    drop(server);
    // 512 MiB is now 25 % of the volume: asking for 50 % again is refused, and says how to keep it.
    refused_at_start(
        dir.path(),
        &["--spare-percent", "50"],
        "omit --spare-percent",
    );
    // Growing with a larger share raises the spare: 40 % of 3 GiB.
    let server = serve(
        dir.path(),
        &["--size", "3G", "--resize", "--spare-percent", "40"],
    );
    assert_eq!(server.client().info.size, 3 * GIB);
    let raised = (3 * GIB + 3 * GIB / 100 * 40).next_multiple_of(4096);
    assert_eq!(
        std::fs::metadata(&store).expect("store").len(),
        chosen.data_offset + raised
    );
}

/// Data the allocator placed beyond where the default data area would end reads back after a restart:
/// a 256 MiB volume with a 100 % spare (the default would be 64 MiB), written whole and then half
/// overwritten, puts the overwrites at 256-384 MiB of the data area (next-fit allocation).
#[test]
fn data_in_a_larger_spare_survives_a_restart() {
    let dir = TempDir::new("spare-data");
    let fill = |mib: u64, round: u8| vec![(mib as u8) ^ round; MIB as usize];
    let mut server = serve(dir.path(), &["--size", "256M", "--spare-percent", "100"]);
    let mut client = server.client();
    for mib in 0..256 {
        assert_eq!(client.write(mib * MIB, &fill(mib, 0x5a), 0), 0);
    }
    for mib in 0..128 {
        assert_eq!(client.write(mib * MIB, &fill(mib, 0xa5), 0), 0);
    }
    client.disconnect();
    server.signal(libc::SIGKILL);
    server.wait_exit(DEADLINE);
    // Something was written past the end of the default data area (the store file is sparse).
    let default =
        ferroblock::journal::superblock::Superblock::new_layout(1, "vol0", 256 * MIB, None)
            .expect("fits");
    let past_default = default.data_offset + default.data_bytes;
    let file = std::fs::File::open(dir.join("vol0.fbv")).expect("store");
    // SAFETY: lseek on a descriptor this function owns; it only moves the file offset.
    let found = unsafe {
        libc::lseek(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            past_default as libc::off_t,
            libc::SEEK_DATA,
        )
    };
    assert!(
        found >= past_default as libc::off_t,
        "no data past {past_default} (lseek: {found})"
    );

    let server = serve(dir.path(), &[]);
    let mut client = server.client();
    for mib in 0..256 {
        let round = if mib < 128 { 0xa5 } else { 0x5a };
        assert!(
            client.read(mib * MIB, MIB as u32).expect("read") == fill(mib, round),
            "MiB {mib} after the restart"
        );
    }
}

/// A spare that would take the store past the largest file is refused before anything is written.
#[test]
fn a_spare_too_large_for_any_store_is_refused() {
    let dir = TempDir::new("spare-huge");
    refused_at_start(
        dir.path(),
        &["--size", "4096P", "--spare-percent", "300"],
        "lower --size or --spare-percent",
    );
    assert!(
        !dir.join("vol0.fbv").exists(),
        "the refused store is not left behind"
    );
}

/// Writes some data, stops cleanly, damages the store with `damage`, and expects start-up to fail with
/// exit code 1 and a message naming the file and containing `needle`.
fn refused_after(damage: impl FnOnce(&Path), needle: &str) {
    require_tool("qemu-io");
    let dir = TempDir::new("damage");
    let mut server = serve(dir.path(), &["--size", "16M"]);
    for round in 0..4 {
        let command = format!("write -P {} {}M 1M", 0x10 + round, round * 2);
        common::qemu_io(&server.uri, &[&command]);
    }
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(DEADLINE).success());
    let store = dir.join("vol0.fbv");
    let before = std::fs::read(&store).expect("read store");
    damage(&store);
    let damaged = std::fs::read(&store).expect("read store");
    refused_at_start(dir.path(), &[], needle);
    // Refusing never "repairs": the store is left exactly as it was found.
    assert!(std::fs::read(&store).expect("read store") == damaged);
    drop(before);
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open store");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).expect("read byte");
    byte[0] ^= 0x40;
    file.write_all_at(&byte, offset).expect("write byte");
}

#[test]
fn corrupted_superblock_is_refused() {
    refused_after(|store| flip_byte(store, 30), "superblock checksum mismatch");
}

#[test]
fn foreign_file_is_refused() {
    refused_after(|store| flip_byte(store, 0), "not a ferroblock volume");
}

#[test]
fn truncated_store_is_refused() {
    refused_after(
        |store| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(store)
                .expect("open store");
            file.set_len(8 * MIB).expect("truncate");
        },
        "truncated",
    );
}

#[test]
fn damaged_durable_journal_block_is_refused() {
    // Block seq 0 sits at 4 KiB; later blocks were written after it was durable and vouch for it.
    refused_after(|store| flip_byte(store, 4096 + 200), "damaged");
}

#[test]
fn another_volumes_store_is_refused() {
    let dir = TempDir::new("foreign");
    let mut server = serve(dir.path(), &["--size", "8M"]);
    server.signal(libc::SIGTERM);
    server.wait_exit(DEADLINE);
    std::fs::copy(dir.join("vol0.fbv"), dir.join("vol1.fbv")).expect("copy store");
    let failure = match try_serve(dir.path(), &["--volume", "vol1"]) {
        Ok(_) => panic!("vol0's store must not be served as vol1"),
        Err(failure) => failure,
    };
    assert!(
        failure.stderr.contains("vol1.fbv") && failure.stderr.contains("holds volume \"vol0\""),
        "{}",
        failure.stderr
    );
}

/// Overwrite-heavy load: the store never grows past its fixed layout (redirect-on-write space is
/// reused, journal space is reclaimed by checkpoints), and nothing fails for lack of space.
#[test]
fn overwriting_many_times_stays_within_the_store() {
    require_tool("fio");
    require_tool("qemu-io");
    let dir = TempDir::new("overwrite");
    // A reserved (default) store: the layout bounds what the file may ever use.
    let data_dir = dir.path().to_str().unwrap();
    let server = Server::start_raw(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--size",
        "32M",
        "--data-dir",
        data_dir,
    ]);
    let store = dir.join("vol0.fbv");
    let size_before = std::fs::metadata(&store).expect("store").len();
    // 20 full overwrites of the volume in 4 KiB random writes (enough notes to wrap the journal), each
    // loop verified.
    let out = run_bounded(
        Command::new("fio").current_dir(dir.path()).args([
            "--name=overwrite",
            "--ioengine=nbd",
            &format!("--uri={}", server.uri),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--loops=20",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--output-format=json",
        ]),
        Duration::from_secs(300),
    );
    assert!(out.status.success(), "fio: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&text[text.find('{').expect("fio json")..]).expect("fio json");
    assert_eq!(json["jobs"][0]["error"], 0, "{text}");
    assert!(json["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0) >= 640 * MIB);
    let metadata = std::fs::metadata(&store).expect("store");
    assert_eq!(
        metadata.len(),
        size_before,
        "the store's size is fixed by its layout"
    );
    use std::os::unix::fs::MetadataExt;
    // (plus the file system's own extent-tree blocks, which st_blocks counts too)
    assert!(
        metadata.blocks() * 512 <= size_before + MIB,
        "allocated bytes exceed the layout"
    );
    let log = server.stderr();
    assert!(!log.contains("volume copy failed"), "{log}");
    // The journal wrapped: checkpoints reclaimed it while writes went on.
    assert!(
        log.contains("checkpoint durable"),
        "no checkpoint was written:\n{log}"
    );

    // Recovery from a checkpoint plus the journal after it: a last full pattern, SIGKILL, restart.
    common::qemu_io(&server.uri, &["write -P 0x77 0 32M"]);
    let mut server = server;
    server.signal(libc::SIGKILL);
    server.wait_exit(DEADLINE);
    let server = serve(dir.path(), &[]);
    let recovered = server.stderr();
    assert!(
        recovered.contains("volume recovered") && !recovered.contains("checkpoint=0 "),
        "{recovered}"
    );
    common::qemu_io(&server.uri, &["read -P 0x77 0 32M"]);
}

/// Device errors reach the host as NBD errors and nothing that failed is acknowledged: the server runs
/// under a file-size limit (RLIMIT_FSIZE via prlimit) that makes data writes past the first few MiB of
/// the data area fail with EFBIG, a real error from the kernel through io_uring.
#[test]
fn device_errors_reach_the_host_and_are_never_acknowledged() {
    require_tool("prlimit");
    let dir = TempDir::new("eio");
    let mut server = serve(dir.path(), &["--size", "32M"]);
    server.signal(libc::SIGTERM);
    server.wait_exit(DEADLINE);
    let store = dir.join("vol0.fbv");
    let data_offset = {
        use std::os::unix::fs::FileExt;
        let mut sector = [0u8; 512];
        std::fs::File::open(&store)
            .expect("store")
            .read_exact_at(&mut sector, 0)
            .expect("superblock");
        u64::from_le_bytes(sector[48..56].try_into().unwrap())
    };
    let limit = format!("--fsize={}", data_offset + 4 * MIB);
    let args = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ];
    let server =
        Server::try_start_wrapped(&["prlimit", &limit], &args).expect("server under prlimit");
    let mut client = server.client();
    let mut acknowledged = Vec::new();
    let mut first_error = None;
    for index in 0..16u64 {
        let data = Rng::new(index).bytes(MIB as usize);
        match client.write(index * MIB, &data, 0) {
            0 => acknowledged.push((index, data)),
            errno => {
                first_error = Some(errno);
                break;
            }
        }
    }
    assert!(!acknowledged.is_empty(), "writes within the limit succeed");
    assert_eq!(
        first_error,
        Some(5),
        "a failed device write is EIO to the host"
    );
    // The copy refuses further writes (it cannot order them after a failed note) but serves reads.
    assert_eq!(client.write(20 * MIB, &[1u8; 4096], 0), 5);
    assert_eq!(
        client.flush(),
        5,
        "a flush after a lost write must not claim durability"
    );
    for (index, data) in &acknowledged {
        assert!(
            client.read(index * MIB, MIB as u32).expect("read") == *data,
            "acknowledged {index} reads back"
        );
    }
    client.disconnect();
    drop(server);

    // Without the limit the store recovers: every acknowledged write is there, the failed one is not.
    let server = serve(dir.path(), &[]);
    let mut client = server.client();
    for (index, data) in &acknowledged {
        assert!(
            client.read(index * MIB, MIB as u32).expect("read") == *data,
            "acknowledged {index} after restart"
        );
    }
    let failed_index = acknowledged.len() as u64;
    assert_eq!(
        client.read(failed_index * MIB, MIB as u32).expect("read"),
        vec![0u8; MIB as usize]
    );
    assert_eq!(
        client.write(20 * MIB, &[2u8; 4096], 0),
        0,
        "writable again after recovery"
    );
}

/// A new store is reserved whole by default (so that durable writes never allocate file system blocks
/// and never meet ENOSPC); `--sparse` leaves it to grow where written.
#[test]
fn new_stores_are_reserved_unless_sparse() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("reserve");
    for (volume, sparse) in [("thick", false), ("thin", true)] {
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--size",
            "64M",
            "--volume",
            volume,
        ];
        args.extend(["--data-dir", dir.path().to_str().unwrap()]);
        if sparse {
            args.push("--sparse");
        }
        let _server = Server::start_raw(&args);
        let metadata = std::fs::metadata(dir.join(&format!("{volume}.fbv"))).expect("store");
        let allocated = metadata.blocks() * 512;
        if sparse {
            assert!(
                allocated < MIB,
                "{volume}: {allocated} bytes allocated for a sparse store"
            );
        } else {
            assert!(
                allocated >= metadata.len(),
                "{volume}: only {allocated} of {} bytes reserved",
                metadata.len()
            );
            journal_is_written(&dir.join(&format!("{volume}.fbv")), 64 * MIB);
        }
    }
}

/// A reserved store's journal region holds written blocks (zeros) from creation, not "unwritten"
/// extents, while its data area is still unwritten: `filefrag -v` (FIEMAP) tells them apart.
fn journal_is_written(store: &Path, volume_size: u64) {
    require_tool("filefrag");
    let layout =
        ferroblock::journal::superblock::Superblock::new_layout(1, "vol0", volume_size, None)
            .expect("fits");
    let block = 4096;
    let journal = (
        layout.journal_offset / block,
        layout.data_offset / block, // exclusive
    );
    let out = run_bounded(
        Command::new("filefrag").args(["-v", "-b4096", store.to_str().expect("utf-8 path")]),
        DEADLINE,
    );
    assert!(out.status.success(), "filefrag: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    // Rows: "  0:        0..   30719:   52692992..  52723711:  30720:            flags"
    let mut journal_unwritten = Vec::new();
    let mut data_unwritten = false;
    for line in text.lines() {
        let Some((_, rest)) = line.split_once(':') else {
            continue;
        };
        let Some((range, _)) = rest.split_once(':') else {
            continue;
        };
        let Some((first, last)) = range.trim().split_once("..") else {
            continue;
        };
        let (Ok(first), Ok(last)) = (first.trim().parse::<u64>(), last.trim().parse::<u64>())
        else {
            continue;
        };
        if !line.contains("unwritten") {
            continue;
        }
        if first < journal.1 && last >= journal.0 {
            journal_unwritten.push(line.to_string());
        }
        if last >= journal.1 {
            data_unwritten = true;
        }
    }
    assert!(
        journal_unwritten.is_empty(),
        "journal blocks {journal:?} still unwritten: {journal_unwritten:?}\n{text}"
    );
    assert!(
        data_unwritten,
        "no unwritten data extent: the check cannot tell written from reserved here\n{text}"
    );
}

/// Runs `program args` as root: directly when the tests run as root, else through `sudo -n` (CI runs
/// as root or with password-less sudo; anything else fails here, naming what is missing).
fn as_root(program: &str, args: &[&str]) -> std::process::Output {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let mut command = if root {
        Command::new(program)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.args(["-n", program]);
        sudo
    };
    command.args(args);
    let out = run_bounded(&mut command, DEADLINE);
    assert!(
        out.status.success(),
        "`{program} {}` needs root (or password-less sudo): {}",
        args.join(" "),
        describe(&out)
    );
    out
}

/// A loop device over a file in a temporary directory, detached on drop.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn attach(backing: &Path) -> LoopDevice {
        require_tool("losetup");
        let out = as_root(
            "losetup",
            &[
                "--find",
                "--show",
                "--direct-io=on",
                backing.to_str().expect("utf-8 path"),
            ],
        );
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(path.starts_with("/dev/loop"), "losetup printed {path:?}");
        // SAFETY: getuid has no preconditions and touches no memory.
        let uid = unsafe { libc::getuid() };
        if uid != 0 {
            as_root("chown", &[&uid.to_string(), &path]);
        }
        LoopDevice { path }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
        let _ = Command::new("sudo")
            .args(["-n", "losetup", "-d", &self.path])
            .status();
    }
}

/// A raw block device as the store (`--path /dev/...`): formatted when its first sector is zero,
/// written through O_DIRECT io_uring, reopened with its data after a restart, and refused when it is
/// too small for the volume.
#[test]
fn a_block_device_can_be_the_store() {
    require_tool("qemu-io");
    let dir = TempDir::new("blockdev");
    let backing = dir.join("disk.img");
    let file = std::fs::File::create(&backing).expect("backing file");
    file.set_len(256 * MIB).expect("size the backing file");
    drop(file);
    let device = LoopDevice::attach(&backing);
    let data_dir = dir.join("data");
    let device_path = device.path.clone();
    let args = |size: Option<&'static str>| -> Vec<&str> {
        let mut args = vec!["--path", device_path.as_str()];
        if let Some(size) = size {
            args.extend(["--size", size]);
        }
        args
    };

    // Too small for a 1 GiB volume: refused, naming the device, and left untouched (still zero).
    let failure = match try_serve(&data_dir, &args(Some("1G"))) {
        Ok(_) => panic!("a 1 GiB volume on a 256 MiB device must be refused"),
        Err(failure) => failure,
    };
    assert!(
        failure.stderr.contains(&device.path),
        "the error names the device: {}",
        failure.stderr
    );
    let mut first = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&backing).expect("backing"),
        &mut first,
        0,
    )
    .expect("read the first sector");
    assert!(
        first.iter().all(|&b| b == 0),
        "a refused device is not written"
    );

    let mut server = serve(&data_dir, &args(Some("64M")));
    common::qemu_io(
        &server.uri,
        &["write -P 0x5d 1M 2M", "write -P 0x6e 60M 4k"],
    );
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(DEADLINE).success());
    // The device now carries the store: superblock first.
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&backing).expect("backing"),
        &mut first,
        0,
    )
    .expect("read the superblock");
    assert_eq!(&first[..8], b"FBVOLUM1", "superblock magic on the device");

    let server = serve(&data_dir, &args(None));
    let client = server.client();
    assert_eq!(client.info.size, 64 * MIB, "the recorded size");
    client.disconnect();
    common::qemu_io(
        &server.uri,
        &[
            "read -P 0x5d 1M 2M",
            "read -P 0x6e 60M 4k",
            "read -P 0 0 1M",
        ],
    );
}
