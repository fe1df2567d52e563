//! The authority: the one place that decides who is master of a volume, by compare-and-swap on the
//! volume's epoch. Everything else (the replication peers, `ferroblock status`) only reads it or asks
//! it to change. The embedded default is a file shared by the nodes of one machine.
//!
//! Owns: the `Authority` trait (the contract any authority keeps: a CAS on the epoch, nothing more),
//! and `FileAuthority`, its embedded implementation. Must never: let two CAS from the same epoch both
//! succeed, let an epoch go down, or "repair" a file it cannot read (a damaged file is an error naming
//! it, and the file is left as it is).
//!
//! `FileAuthority` keeps every volume's membership in one JSON file:
//!
//! ```json
//! {"format_version":1,"volumes":{"vol0":{"epoch":1,"master":"n1","slave":"n2","dropped":null}}}
//! ```
//!
//! A CAS takes `flock(LOCK_EX)` on `<file>.lock` (a separate file, because the data file itself is
//! replaced), reads the file, and if the volume's epoch is the expected one writes the new contents to
//! `<file>.tmp`, fsyncs it, renames it over the file and fsyncs the directory. A reader needs no lock:
//! the rename makes each version appear whole. A crash leaves either the old file or the new one.
//! `flock` works between processes of one machine only; across machines the same trait is to be
//! implemented on etcd (a transaction comparing the volume key's epoch), never on a shared file system.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The version of the authority file this build reads and writes.
pub const AUTHORITY_FORMAT_VERSION: u32 = 1;

/// A volume's membership at one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Grows with every change; a peer that sees a higher epoch stops acting on an older one.
    pub epoch: u64,
    /// The node that serves the volume.
    pub master: String,
    /// The node that holds a complete, in-sync copy and may take over; `None` while the master is
    /// solo.
    pub slave: Option<String>,
    /// A node that dropped out of sync, and the last op its copy shares with the master's history:
    /// when it returns it is caught up from there (its own changes after that op are repaired).
    pub dropped: Option<Dropped>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub node: String,
    pub common_op: u64,
}

/// What a compare-and-swap did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The proposed membership is now the volume's.
    Swapped,
    /// The volume's epoch was not the expected one; nothing changed. Carries the current membership.
    Conflict(Membership),
}

/// The store that decides membership. Implementations: `FileAuthority` (one machine); etcd later.
pub trait Authority: Send {
    /// The volume's current membership, or `None` if the authority has none for it.
    fn read(&self, volume: &str) -> Result<Option<Membership>, AuthorityError>;

    /// Replaces the volume's membership with `proposed` if its epoch is `expected_epoch` (0: the
    /// volume has no membership yet, and this creates it). `proposed.epoch` must be above
    /// `expected_epoch` (else `AuthorityError::EpochNotRaised`). Of any number of CAS from the same
    /// expected epoch, at most one returns `Swapped`; the others get `Conflict` with the membership
    /// that won. A CAS on a volume without membership from an epoch other than 0 is
    /// `AuthorityError::UnknownVolume`.
    fn compare_and_swap(
        &self,
        volume: &str,
        expected_epoch: u64,
        proposed: &Membership,
    ) -> Result<CasOutcome, AuthorityError>;
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("authority file {}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("authority file {} is missing (`ferroblock cluster init` creates it)", path.display())]
    Missing { path: PathBuf },
    #[error("authority file {} exists already", path.display())]
    Exists { path: PathBuf },
    #[error(
        "authority file {} is damaged ({detail}); it was left as it is: restore it, or recreate it with `ferroblock cluster init --force`",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "authority file {} has format version {found}; this build reads version {AUTHORITY_FORMAT_VERSION}",
        path.display()
    )]
    UnsupportedVersion { path: PathBuf, found: u64 },
    #[error(
        "volume {volume:?} has no membership in the authority (only a CAS from epoch 0 creates one)"
    )]
    UnknownVolume { volume: String },
    #[error(
        "volume {volume:?}: a CAS must raise the epoch, but the proposed epoch {proposed} is not above the expected {expected}"
    )]
    EpochNotRaised {
        volume: String,
        expected: u64,
        proposed: u64,
    },
}

/// The file's contents.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorityState {
    format_version: u32,
    volumes: BTreeMap<String, Membership>,
}

/// The embedded authority: one JSON file, changed under `flock` by atomic rename.
#[derive(Debug, Clone)]
pub struct FileAuthority {
    path: PathBuf,
    lock_path: PathBuf,
    temp_path: PathBuf,
}

impl FileAuthority {
    /// An authority on an existing file; fails if the file is missing or unreadable.
    pub fn open(path: &Path) -> Result<FileAuthority, AuthorityError> {
        let authority = FileAuthority::at(path);
        authority.load()?;
        Ok(authority)
    }

    /// Creates the file with no volumes. An existing file is an error unless `overwrite`, in which
    /// case every membership in it is forgotten.
    pub fn create(path: &Path, overwrite: bool) -> Result<FileAuthority, AuthorityError> {
        let authority = FileAuthority::at(path);
        let _lock = authority.lock()?;
        if !overwrite && path.exists() {
            return Err(AuthorityError::Exists {
                path: path.to_owned(),
            });
        }
        authority.store(&AuthorityState {
            format_version: AUTHORITY_FORMAT_VERSION,
            volumes: BTreeMap::new(),
        })?;
        Ok(authority)
    }

    fn at(path: &Path) -> FileAuthority {
        let with_suffix = |suffix: &str| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        FileAuthority {
            path: path.to_owned(),
            lock_path: with_suffix(".lock"),
            temp_path: with_suffix(".tmp"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every volume's membership.
    pub fn read_all(&self) -> Result<BTreeMap<String, Membership>, AuthorityError> {
        Ok(self.load()?.volumes)
    }

    fn io_error(&self, action: &'static str) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
        move |source| AuthorityError::Io {
            path: self.path.clone(),
            action,
            source,
        }
    }

    /// Reads and checks the file. Needs no lock: writers replace it by rename.
    fn load(&self) -> Result<AuthorityState, AuthorityError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                return Err(AuthorityError::Missing {
                    path: self.path.clone(),
                });
            }
            Err(error) => return Err(self.io_error("reading")(error)),
        };
        let corrupt = |detail: String| AuthorityError::Corrupt {
            path: self.path.clone(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|error| corrupt(error.to_string()))?;
        match value
            .get("format_version")
            .and_then(|version| version.as_u64())
        {
            Some(version) if version == u64::from(AUTHORITY_FORMAT_VERSION) => {}
            Some(found) => {
                return Err(AuthorityError::UnsupportedVersion {
                    path: self.path.clone(),
                    found,
                });
            }
            None => return Err(corrupt("no format_version".into())),
        }
        serde_json::from_value(value).map_err(|error| corrupt(error.to_string()))
    }

    /// Takes the exclusive lock; released when the returned file is dropped.
    fn lock(&self) -> Result<File, AuthorityError> {
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock_path)
            .map_err(|source| AuthorityError::Io {
                path: self.lock_path.clone(),
                action: "opening the lock file",
                source,
            })?;
        loop {
            match lock.lock() {
                Ok(()) => return Ok(lock),
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(AuthorityError::Io {
                        path: self.lock_path.clone(),
                        action: "locking",
                        source,
                    });
                }
            }
        }
    }

    /// Writes `state` durably: temp file, fsync, rename, directory fsync. Caller holds the lock.
    fn store(&self, state: &AuthorityState) -> Result<(), AuthorityError> {
        let mut text = serde_json::to_vec_pretty(state).map_err(|error| AuthorityError::Io {
            path: self.path.clone(),
            action: "encoding",
            source: error.into(),
        })?;
        text.push(b'\n');
        let mut temp = File::create(&self.temp_path).map_err(|source| AuthorityError::Io {
            path: self.temp_path.clone(),
            action: "creating the temporary file",
            source,
        })?;
        temp.write_all(&text)
            .and_then(|()| temp.sync_all())
            .map_err(|source| AuthorityError::Io {
                path: self.temp_path.clone(),
                action: "writing the temporary file",
                source,
            })?;
        drop(temp);
        std::fs::rename(&self.temp_path, &self.path).map_err(self.io_error("renaming over"))?;
        let directory = match self.path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        File::open(directory)
            .and_then(|directory| directory.sync_all())
            .map_err(self.io_error("syncing its directory"))
    }
}

impl Authority for FileAuthority {
    fn read(&self, volume: &str) -> Result<Option<Membership>, AuthorityError> {
        Ok(self.load()?.volumes.remove(volume))
    }

    fn compare_and_swap(
        &self,
        volume: &str,
        expected_epoch: u64,
        proposed: &Membership,
    ) -> Result<CasOutcome, AuthorityError> {
        if proposed.epoch <= expected_epoch {
            return Err(AuthorityError::EpochNotRaised {
                volume: volume.to_owned(),
                expected: expected_epoch,
                proposed: proposed.epoch,
            });
        }
        let _lock = self.lock()?;
        let mut state = self.load()?;
        match state.volumes.get(volume) {
            Some(current) if current.epoch != expected_epoch => {
                return Ok(CasOutcome::Conflict(current.clone()));
            }
            Some(_) => {}
            None if expected_epoch != 0 => {
                return Err(AuthorityError::UnknownVolume {
                    volume: volume.to_owned(),
                });
            }
            None => {}
        }
        state.volumes.insert(volume.to_owned(), proposed.clone());
        self.store(&state)?;
        Ok(CasOutcome::Swapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            static UNIQUE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "fb-authority-{tag}-{}-{}",
                std::process::id(),
                UNIQUE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn membership(epoch: u64, master: &str, slave: Option<&str>) -> Membership {
        Membership {
            epoch,
            master: master.into(),
            slave: slave.map(Into::into),
            dropped: None,
        }
    }

    #[test]
    fn cas_creates_swaps_and_reports_conflicts() {
        let dir = Dir::new("cas");
        let path = dir.0.join("authority.json");
        let authority = FileAuthority::create(&path, false).unwrap();
        assert_eq!(authority.read("vol0").unwrap(), None);

        let first = membership(1, "n1", Some("n2"));
        assert_eq!(
            authority.compare_and_swap("vol0", 0, &first).unwrap(),
            CasOutcome::Swapped
        );
        assert_eq!(authority.read("vol0").unwrap(), Some(first.clone()));
        // Creating it again, or swapping from a wrong epoch, conflicts and changes nothing.
        for expected in [0, 2, 7] {
            assert_eq!(
                authority
                    .compare_and_swap("vol0", expected, &membership(9, "n3", None))
                    .unwrap(),
                CasOutcome::Conflict(first.clone())
            );
        }
        let solo = Membership {
            epoch: 2,
            master: "n2".into(),
            slave: None,
            dropped: Some(Dropped {
                node: "n1".into(),
                common_op: 41,
            }),
        };
        assert_eq!(
            authority.compare_and_swap("vol0", 1, &solo).unwrap(),
            CasOutcome::Swapped
        );
        // Another handle (another node) sees it.
        let other = FileAuthority::open(&path).unwrap();
        assert_eq!(other.read("vol0").unwrap(), Some(solo.clone()));
        assert_eq!(other.read_all().unwrap().len(), 1);

        assert!(matches!(
            authority.compare_and_swap("vol0", 2, &membership(2, "n1", None)),
            Err(AuthorityError::EpochNotRaised {
                expected: 2,
                proposed: 2,
                ..
            })
        ));
        assert!(matches!(
            authority.compare_and_swap("vol1", 3, &membership(4, "n1", None)),
            Err(AuthorityError::UnknownVolume { volume }) if volume == "vol1"
        ));
        assert_eq!(authority.read("vol0").unwrap(), Some(solo));
    }

    #[test]
    fn create_refuses_an_existing_file_unless_told_to_overwrite() {
        let dir = Dir::new("create");
        let path = dir.0.join("authority.json");
        let authority = FileAuthority::create(&path, false).unwrap();
        authority
            .compare_and_swap("vol0", 0, &membership(1, "n1", Some("n2")))
            .unwrap();
        assert!(matches!(
            FileAuthority::create(&path, false),
            Err(AuthorityError::Exists { .. })
        ));
        assert_eq!(authority.read("vol0").unwrap().unwrap().epoch, 1);
        let fresh = FileAuthority::create(&path, true).unwrap();
        assert_eq!(fresh.read("vol0").unwrap(), None);
    }

    #[test]
    fn damaged_missing_or_newer_files_are_errors_and_left_alone() {
        let dir = Dir::new("corrupt");
        let path = dir.0.join("authority.json");
        assert!(matches!(
            FileAuthority::open(&path),
            Err(AuthorityError::Missing { .. })
        ));
        let authority = FileAuthority::at(&path);
        let damaged: [&[u8]; 4] = [
            b"{\"format_version\":1,\"volumes\":{\"vol0\":{\"epoch\":",
            b"\x00\x01garbage",
            b"{\"volumes\":{}}",
            b"{\"format_version\":1,\"volumes\":{\"vol0\":{\"epoch\":-1,\"master\":\"n1\",\"slave\":null,\"dropped\":null}}}",
        ];
        for bytes in damaged {
            std::fs::write(&path, bytes).unwrap();
            let error = authority.read("vol0").unwrap_err();
            assert!(matches!(error, AuthorityError::Corrupt { .. }), "{error:?}");
            assert!(error.to_string().contains(&path.display().to_string()));
            let error = authority
                .compare_and_swap("vol0", 0, &membership(1, "n1", None))
                .unwrap_err();
            assert!(matches!(error, AuthorityError::Corrupt { .. }), "{error:?}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file was changed");
        }
        std::fs::write(&path, b"{\"format_version\":2,\"volumes\":[]}").unwrap();
        assert!(matches!(
            authority.read("vol0"),
            Err(AuthorityError::UnsupportedVersion { found: 2, .. })
        ));
    }

    /// Threads, each with its own handle (as separate nodes would have), race CAS from the same
    /// expected epoch, round after round: exactly one wins each round, and the losers see the winner.
    #[test]
    fn racing_threads_have_one_winner_per_round() {
        const THREADS: usize = 4;
        const ROUNDS: u64 = 25;
        let dir = Dir::new("threads");
        let path = dir.0.join("authority.json");
        FileAuthority::create(&path, false)
            .unwrap()
            .compare_and_swap("vol0", 0, &membership(1, "init", None))
            .unwrap();
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let barrier = barrier.clone();
                let path = path.clone();
                std::thread::spawn(move || {
                    let authority = FileAuthority::open(&path).unwrap();
                    let me = format!("t{thread}");
                    (0..ROUNDS)
                        .map(|round| {
                            barrier.wait();
                            let proposed = membership(round + 2, &me, None);
                            let outcome = authority
                                .compare_and_swap("vol0", round + 1, &proposed)
                                .unwrap();
                            // Nobody starts the next round before everyone finished this one.
                            barrier.wait();
                            outcome
                        })
                        .collect::<Vec<CasOutcome>>()
                })
            })
            .collect();
        let outcomes: Vec<Vec<CasOutcome>> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        for round in 0..ROUNDS as usize {
            let winners: Vec<usize> = (0..THREADS)
                .filter(|&t| outcomes[t][round] == CasOutcome::Swapped)
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
            let winner = membership(round as u64 + 2, &format!("t{}", winners[0]), None);
            for (thread, outcome) in outcomes.iter().enumerate() {
                if thread != winners[0] {
                    assert_eq!(outcome[round], CasOutcome::Conflict(winner.clone()));
                }
            }
        }
        let last = FileAuthority::open(&path).unwrap().read("vol0").unwrap();
        assert_eq!(last.map(|m| m.epoch), Some(ROUNDS + 1));
    }

    const RACE_DIR_ENV: &str = "FERROBLOCK_AUTHORITY_RACE_DIR";
    const RACE_NAME_ENV: &str = "FERROBLOCK_AUTHORITY_RACE_NAME";
    const RACE_TARGET_EPOCH: u64 = 120;
    const RACE_PROCESSES: usize = 3;

    /// The child side of `racing_processes_never_lose_an_update`: runs only when that test spawns this
    /// test binary with the environment set; a no-op otherwise.
    #[test]
    fn race_child_process() {
        let (Some(dir), Some(name)) = (
            std::env::var_os(RACE_DIR_ENV),
            std::env::var(RACE_NAME_ENV).ok(),
        ) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let go = dir.join("go");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !go.exists() {
            assert!(Instant::now() < deadline, "never told to start");
            std::thread::sleep(Duration::from_millis(1));
        }
        let authority = FileAuthority::open(&dir.join("authority.json")).unwrap();
        let mut won = Vec::new();
        let mut conflicts = 0u64;
        loop {
            let current = authority.read("vol0").unwrap().unwrap();
            if current.epoch >= RACE_TARGET_EPOCH {
                break;
            }
            // Read-modify-CAS: the counter in `dropped` counts successful swaps, so a lost update
            // (a swap based on a state that was no longer current) would show as a short count.
            let count = current.dropped.as_ref().map_or(0, |d| d.common_op);
            let proposed = Membership {
                epoch: current.epoch + 1,
                master: name.clone(),
                slave: None,
                dropped: Some(Dropped {
                    node: name.clone(),
                    common_op: count + 1,
                }),
            };
            match authority
                .compare_and_swap("vol0", current.epoch, &proposed)
                .unwrap()
            {
                CasOutcome::Swapped => won.push(proposed.epoch),
                CasOutcome::Conflict(now) => {
                    assert!(now.epoch > current.epoch);
                    conflicts += 1;
                }
            }
        }
        let text: String = won.iter().map(|epoch| format!("{epoch}\n")).collect();
        std::fs::write(dir.join(format!("won-{name}")), text).unwrap();
        std::fs::write(dir.join(format!("conflicts-{name}")), conflicts.to_string()).unwrap();
    }

    /// Several processes race read-modify-CAS on one volume until its epoch reaches a target: every
    /// epoch is won by exactly one process, and the swap counter equals the number of swaps.
    #[test]
    fn racing_processes_never_lose_an_update() {
        if std::env::var_os(RACE_DIR_ENV).is_some() {
            return; // We are a child.
        }
        let dir = Dir::new("processes");
        FileAuthority::create(&dir.0.join("authority.json"), false)
            .unwrap()
            .compare_and_swap("vol0", 0, &membership(1, "init", None))
            .unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut children: Vec<_> = (0..RACE_PROCESSES)
            .map(|index| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "cluster::authority::tests::race_child_process",
                        "--test-threads=1",
                        "--nocapture",
                    ])
                    .env(RACE_DIR_ENV, &dir.0)
                    .env(RACE_NAME_ENV, format!("p{index}"))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::fs::write(dir.0.join("go"), b"").unwrap();
        for child in &mut children {
            assert!(child.wait().unwrap().success(), "a racing process failed");
        }
        let mut won: Vec<u64> = Vec::new();
        let mut conflicts = 0u64;
        for index in 0..RACE_PROCESSES {
            let text = std::fs::read_to_string(dir.0.join(format!("won-p{index}"))).unwrap();
            won.extend(text.lines().map(|line| line.parse::<u64>().unwrap()));
            let text = std::fs::read_to_string(dir.0.join(format!("conflicts-p{index}"))).unwrap();
            conflicts += text.parse::<u64>().unwrap();
        }
        // Informational: how often a CAS lost a race (depends on scheduling, so not asserted).
        eprintln!("{} swaps, {conflicts} conflicts", won.len());
        won.sort_unstable();
        let expected: Vec<u64> = (2..=RACE_TARGET_EPOCH).collect();
        assert_eq!(won, expected, "every epoch must be won exactly once");
        let last = FileAuthority::open(&dir.0.join("authority.json"))
            .unwrap()
            .read("vol0")
            .unwrap()
            .unwrap();
        assert_eq!(last.epoch, RACE_TARGET_EPOCH);
        assert_eq!(
            last.dropped.map(|d| d.common_op),
            Some(RACE_TARGET_EPOCH - 1),
            "an update was lost"
        );
    }
}
