//! `--backend null` (like SPDK's null bdev): stores nothing, so it measures the protocol and reactors
//! alone. Writes succeed and vanish; reads return zeros, never another request's data.

mod common;

use common::{MIB, Rng, Server};

#[test]
fn null_backend_accepts_everything_and_reads_zeros() {
    let server = Server::start(&["--backend", "null", "--size", "1T"]);
    let mut client = server.client_structured();
    assert_eq!(client.info.size, 1 << 40);
    let data = Rng::new(9).bytes(MIB as usize);
    assert_eq!(client.write(0, &data, 0), 0);
    assert_eq!(client.write((1 << 40) - MIB, &data, 0), 0);
    // The read buffer may have carried the write's bytes before: it must come back zeroed.
    assert_eq!(
        client.read(0, MIB as u32).expect("read"),
        vec![0u8; MIB as usize]
    );
    assert_eq!(client.trim(0, MIB as u32), 0);
    assert_eq!(client.flush(), 0);
    common::qemu_io(
        &server.uri,
        &["write -P 7 0 64k", "read -P 0 0 64k", "write -z 1M 1M"],
    );
}
