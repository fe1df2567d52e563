//! Validation of transmission-phase requests: the edge where client bytes become volume requests.
//!
//! Owns: every rule a request must satisfy (known command and flags, alignment, bounds, limits, negotiated
//! features) and the protocol error a violation earns. Pure: no IO, no state but what is passed in.
//! Must never: let an unchecked offset or length reach a volume.

use crate::frontend::nbd::proto::{
    BLOCK_SIZE_MIN, Command, CommandFlags, NbdErrno, REQUEST_LENGTH_MAX, RequestHeader,
};
use crate::volume::{IoFlags, IoKind};

/// What the connection knows about its session when it validates a request.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub export_size_bytes: u64,
    pub structured_replies: bool,
    pub base_allocation: bool,
}

/// A request the volume may execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidRequest {
    pub cookie: u64,
    pub kind: IoKind,
    pub flags: IoFlags,
    pub offset: u64,
    /// Bytes the volume works on (for block status, clamped to the export's end).
    pub length: u32,
    /// Payload bytes that follow the header on the wire (writes only).
    pub payload: u32,
}

/// The decision about one request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Execute(ValidRequest),
    /// Reply with `errno`; `discard` payload bytes follow the header and must be skipped.
    Reject {
        cookie: u64,
        errno: NbdErrno,
        discard: u32,
        reason: &'static str,
    },
    /// NBD_CMD_DISC: finish what is in flight, then close.
    Disconnect,
}

const FLAGS_KNOWN: CommandFlags = CommandFlags::FUA
    .union(CommandFlags::NO_HOLE)
    .union(CommandFlags::DF)
    .union(CommandFlags::REQ_ONE)
    .union(CommandFlags::FAST_ZERO);

pub fn validate(header: &RequestHeader, limits: &SessionLimits) -> Decision {
    let cookie = header.cookie;
    let payload = if header.command == Command::Write {
        header.length
    } else {
        0
    };
    let reject = |errno, reason| Decision::Reject {
        cookie,
        errno,
        discard: payload,
        reason,
    };
    let kind = match header.command {
        Command::Disconnect => return Decision::Disconnect,
        Command::Read => IoKind::Read,
        Command::Write => IoKind::Write,
        Command::Flush => IoKind::Flush,
        Command::Trim => IoKind::Trim,
        Command::Cache => IoKind::Cache,
        Command::WriteZeroes => IoKind::WriteZeroes,
        Command::BlockStatus => IoKind::BlockStatus,
        Command::Unknown(_) => return reject(NbdErrno::Inval, "unknown command"),
    };
    let flags = header.flags;
    if !FLAGS_KNOWN.contains(flags) {
        return reject(NbdErrno::Inval, "unknown command flags");
    }
    let only_for = |flag: CommandFlags, allowed: bool| !flags.contains(flag) || allowed;
    if !only_for(CommandFlags::NO_HOLE, kind == IoKind::WriteZeroes)
        || !only_for(CommandFlags::FAST_ZERO, kind == IoKind::WriteZeroes)
        || !only_for(CommandFlags::REQ_ONE, kind == IoKind::BlockStatus)
        || !only_for(
            CommandFlags::DF,
            kind == IoKind::Read && limits.structured_replies,
        )
    {
        return reject(NbdErrno::Inval, "command flag not valid for this command");
    }
    let mut io_flags = IoFlags::empty();
    io_flags.set(
        IoFlags::FUA,
        flags.contains(CommandFlags::FUA) && kind != IoKind::Read,
    );
    io_flags.set(IoFlags::NO_HOLE, flags.contains(CommandFlags::NO_HOLE));
    io_flags.set(IoFlags::FAST_ZERO, flags.contains(CommandFlags::FAST_ZERO));
    io_flags.set(IoFlags::ONE_EXTENT, flags.contains(CommandFlags::REQ_ONE));

    if kind == IoKind::Flush {
        // Offset and length are reserved for flush; accept whatever the client sent.
        return Decision::Execute(ValidRequest {
            cookie,
            kind,
            flags: io_flags,
            offset: 0,
            length: 0,
            payload: 0,
        });
    }
    if kind == IoKind::BlockStatus && !limits.base_allocation {
        return reject(
            NbdErrno::Inval,
            "block status without a negotiated metadata context",
        );
    }
    let length = header.length;
    if length == 0 {
        return reject(NbdErrno::Inval, "zero-length request");
    }
    if matches!(kind, IoKind::Read | IoKind::Write) && length > REQUEST_LENGTH_MAX {
        return reject(
            NbdErrno::Inval,
            "request longer than the maximum block size",
        );
    }
    let sector = u64::from(BLOCK_SIZE_MIN);
    // Block status lengths are hints (clients ask for "up to here"); everything else must be aligned.
    let length_aligned = kind == IoKind::BlockStatus || u64::from(length).is_multiple_of(sector);
    if !header.offset.is_multiple_of(sector) || !length_aligned {
        return reject(
            NbdErrno::Inval,
            "offset or length not a multiple of the minimum block size",
        );
    }
    let end = header.offset.checked_add(u64::from(length));
    if end.is_none_or(|end| end > limits.export_size_bytes) {
        let errno = match kind {
            IoKind::Write | IoKind::Trim | IoKind::WriteZeroes => NbdErrno::NoSpc,
            _ => NbdErrno::Inval,
        };
        return reject(errno, "request beyond the end of the export");
    }
    Decision::Execute(ValidRequest {
        cookie,
        kind,
        flags: io_flags,
        offset: header.offset,
        length,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SessionLimits = SessionLimits {
        export_size_bytes: 1 << 20,
        structured_replies: true,
        base_allocation: true,
    };

    fn header(command: Command, flags: CommandFlags, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 9,
            offset,
            length,
        }
    }

    fn errno_of(decision: Decision) -> Option<(NbdErrno, u32)> {
        match decision {
            Decision::Reject { errno, discard, .. } => Some((errno, discard)),
            _ => None,
        }
    }

    #[test]
    fn good_requests_execute() {
        let decision = validate(
            &header(Command::Write, CommandFlags::FUA, 4096, 8192),
            &LIMITS,
        );
        let Decision::Execute(request) = decision else {
            panic!("{decision:?}")
        };
        assert_eq!(
            (request.kind, request.flags, request.payload),
            (IoKind::Write, IoFlags::FUA, 8192)
        );
        let status = validate(
            &header(Command::BlockStatus, CommandFlags::REQ_ONE, 0, 1000),
            &LIMITS,
        );
        assert!(matches!(
            status,
            Decision::Execute(ValidRequest { length: 1000, .. })
        ));
        assert_eq!(
            validate(
                &header(Command::Disconnect, CommandFlags::empty(), 0, 0),
                &LIMITS
            ),
            Decision::Disconnect
        );
    }

    #[test]
    fn each_violation_earns_its_errno() {
        let none = CommandFlags::empty();
        let cases = [
            (
                header(Command::Unknown(99), none, 0, 512),
                (NbdErrno::Inval, 0),
            ),
            (
                header(Command::Write, none, 0, REQUEST_LENGTH_MAX + 512),
                (NbdErrno::Inval, REQUEST_LENGTH_MAX + 512),
            ),
            (
                header(Command::Read, none, (1 << 20) - 512, 1024),
                (NbdErrno::Inval, 0),
            ),
            (
                header(Command::Write, none, (1 << 20) - 512, 1024),
                (NbdErrno::NoSpc, 1024),
            ),
            (
                header(Command::Trim, none, u64::MAX - 511, 1024),
                (NbdErrno::NoSpc, 0),
            ),
            (header(Command::Read, none, 100, 512), (NbdErrno::Inval, 0)),
            (header(Command::Write, none, 0, 100), (NbdErrno::Inval, 100)),
            (header(Command::Read, none, 0, 0), (NbdErrno::Inval, 0)),
            (
                header(Command::Read, CommandFlags::FAST_ZERO, 0, 512),
                (NbdErrno::Inval, 0),
            ),
            (
                header(
                    Command::Read,
                    CommandFlags::from_bits_retain(0x4000),
                    0,
                    512,
                ),
                (NbdErrno::Inval, 0),
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(
                errno_of(validate(&request, &LIMITS)),
                Some(expected),
                "{request:?}"
            );
        }
        let plain = SessionLimits {
            structured_replies: false,
            base_allocation: false,
            ..LIMITS
        };
        assert_eq!(
            errno_of(validate(
                &header(Command::BlockStatus, none, 0, 512),
                &plain
            )),
            Some((NbdErrno::Inval, 0))
        );
        assert_eq!(
            errno_of(validate(
                &header(Command::Read, CommandFlags::DF, 0, 512),
                &plain
            )),
            Some((NbdErrno::Inval, 0))
        );
    }
}
