//! The raw store (`--backend raw`, block for block in a file, through io_uring): data written by real
//! clients reaches the backing file, survives a restart, FUA and flush work, trims punch holes, a size
//! mismatch is refused; and, for every backend, requests forwarded between reactors land on the
//! volume's owner.

mod common;

use std::process::Command;

use common::{
    DEADLINE, MIB, Rng, Server, TempDir, describe, require_tool, run_bounded, sha256_file,
    write_random_file,
};

fn file_server(dir: &TempDir, size: &str) -> Server {
    let path = dir.join("volume.raw");
    Server::start(&[
        "--backend",
        "raw",
        "--path",
        path.to_str().expect("utf-8 path"),
        "--size",
        size,
    ])
}

#[test]
fn qemu_img_data_reaches_the_file_and_survives_a_restart() {
    require_tool("qemu-img");
    require_tool("nbdcopy");
    let dir = TempDir::new("file-restart");
    let source = dir.join("source.img");
    write_random_file(&source, 32 * MIB, 7);

    let mut server = file_server(&dir, "32M");
    let out = run_bounded(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&source)
            .arg(&server.uri),
        DEADLINE,
    );
    assert!(out.status.success(), "qemu-img convert: {}", describe(&out));
    let out = run_bounded(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(&server.uri),
        DEADLINE,
    );
    assert!(out.status.success(), "qemu-img compare: {}", describe(&out));
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_exit(DEADLINE).success(),
        "clean exit; stderr:\n{}",
        server.stderr()
    );

    // The backing file itself holds the image.
    assert_eq!(sha256_file(&dir.join("volume.raw")), sha256_file(&source));

    // And a new server on the same file serves it back.
    let server = file_server(&dir, "32M");
    let copy = dir.join("copy.img");
    let out = run_bounded(
        Command::new("nbdcopy").arg(&server.uri).arg(&copy),
        DEADLINE,
    );
    assert!(out.status.success(), "nbdcopy: {}", describe(&out));
    assert_eq!(sha256_file(&copy), sha256_file(&source));
}

#[test]
fn fua_writes_zeroes_trims_and_block_status_on_a_file() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let dir = TempDir::new("file-ops");
    let server = file_server(&dir, "16M");
    common::qemu_io(
        &server.uri,
        &[
            "write -f -P 0x5a 0 4M",
            "discard 1M 1M",
            "write -z -u 3M 1M",
            "flush",
            "read -P 0x5a 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x5a 2M 1M",
            "read -P 0 3M 1M",
        ],
    );

    let out = run_bounded(
        Command::new("nbdinfo").args(["--map", &server.uri]),
        DEADLINE,
    );
    assert!(out.status.success(), "nbdinfo --map: {}", describe(&out));
    // Expect: data [0,1M), hole [1M,2M), data [2M,3M), hole from 3M to the end.
    let map: Vec<(u64, u64, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (
                fields[0].parse().unwrap(),
                fields[1].parse().unwrap(),
                fields[2].parse().unwrap(),
            )
        })
        .collect();
    let state_at = |offset: u64| {
        map.iter()
            .find(|(start, length, _)| (*start..start + length).contains(&offset))
            .map(|entry| entry.2)
    };
    assert_eq!(state_at(0), Some(0), "{map:?}");
    assert_eq!(state_at(MIB + 4096), Some(3), "{map:?}");
    assert_eq!(state_at(2 * MIB + 4096), Some(0), "{map:?}");
    assert_eq!(state_at(3 * MIB + 4096), Some(3), "{map:?}");
    assert_eq!(state_at(15 * MIB), Some(3), "{map:?}");
}

#[test]
fn an_existing_file_of_another_size_is_refused() {
    let dir = TempDir::new("file-size");
    let path = dir.join("volume.raw");
    std::fs::write(&path, vec![1u8; 1 << 20]).expect("write 1 MiB file");
    // A 1 MiB file must not be served as a 2 MiB volume.
    common::refused_at_start(
        &[
            "--backend",
            "raw",
            "--path",
            path.to_str().unwrap(),
            "--size",
            "2M",
        ],
        "volume.raw",
        "1048576",
    );
    // The file is untouched.
    assert_eq!(std::fs::read(&path).expect("read back"), vec![1u8; 1 << 20]);
}

/// Connections are spread round-robin over the reactors; the volume lives on the first one, so every other
/// connection forwards its IO through the mailbox rings. Each client writes its own region and every
/// client reads every region back.
#[test]
fn requests_forwarded_between_reactors_see_one_volume() {
    let dir = TempDir::new("file-reactors");
    for backend in ["memory", "raw", "file"] {
        let path = dir.join(&format!("{backend}.raw"));
        let server = Server::start(&[
            "--backend",
            backend,
            "--path",
            path.to_str().unwrap(),
            "--size",
            "8M",
        ]);
        let mut clients: Vec<_> = (0..4).map(|_| server.client()).collect();
        let mut rng = Rng::new(11);
        let regions: Vec<Vec<u8>> = (0..clients.len()).map(|_| rng.bytes(256 * 1024)).collect();
        for (index, client) in clients.iter_mut().enumerate() {
            let offset = index as u64 * MIB;
            assert_eq!(
                client.write(offset, &regions[index], 0),
                0,
                "{backend}: write by client {index}"
            );
        }
        for (reader, client) in clients.iter_mut().enumerate() {
            assert_eq!(client.flush(), 0);
            for (index, expected) in regions.iter().enumerate() {
                let data = client
                    .read(index as u64 * MIB, expected.len() as u32)
                    .expect("read");
                assert!(
                    data == *expected,
                    "{backend}: client {reader} reads region {index} wrong"
                );
            }
        }
    }
}
