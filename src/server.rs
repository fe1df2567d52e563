//! Server wiring: turns a `ServeConfig` into running reactors.
//!
//! Owns: start-up (store, listener, reactors, signal handling) and orderly shutdown. Must never: serve IO
//! itself; everything after start-up happens on the reactors.

use std::io::Write;
use std::sync::Arc;
use std::thread;

use mio::{Poll, Token};

use crate::config::{Backend, ServeConfig};
use crate::frontend::nbd::ExportInfo;
use crate::frontend::nbd::proto::TransmissionFlags;
use crate::io::file::{FileStore, FileStoreError};
use crate::io::memory::MemoryStore;
use crate::metrics::Metrics;
use crate::reactor::{Mailbox, Reactor, ReactorSetup, Shutdown};
use crate::volume::open::{OpenError, open_copy};
use crate::volume::{Store, Volume};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] FileStoreError),
    #[error(transparent)]
    Volume(#[from] OpenError),
    #[error("cannot set up reactor {reactor}: {source}")]
    Reactor {
        reactor: usize,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("reactor {reactor} failed: {source}")]
    ReactorFailed {
        reactor: usize,
        source: std::io::Error,
    },
}

/// Runs the server until SIGTERM or SIGINT; returns once every client has been answered and closed.
pub fn serve(config: ServeConfig) -> Result<(), ServeError> {
    // The single volume lives on the first reactor; connections spread over all of them.
    let volume_id = 0;
    let create_parent = |path: &std::path::Path| match path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        Some(parent) => std::fs::create_dir_all(parent).map_err(|source| ServeError::DataDir {
            path: parent.to_path_buf(),
            source,
        }),
        None => Ok(()),
    };
    let (store, size_bytes) = match config.backend {
        Backend::Memory => (Store::Memory(MemoryStore::new()), config.size_or_default()),
        Backend::Null => (Store::Null, config.size_or_default()),
        Backend::Raw => {
            create_parent(&config.path)?;
            let file = FileStore::open(&config.path, config.size_or_default(), volume_id)?;
            tracing::info!(path = %config.path.display(), direct = file.is_direct(), "raw backing store opened");
            (Store::Raw(file), config.size_or_default())
        }
        Backend::File => {
            create_parent(&config.path)?;
            let opened = open_copy(
                &config.path,
                &config.volume,
                config.size_bytes,
                config.resize,
                config.durability,
                config.preallocate,
            )?;
            let size = opened.copy.superblock().volume_size;
            (
                Store::Persistent {
                    copy: Box::new(opened.copy),
                    file: opened.file,
                },
                size,
            )
        }
    };
    let volume = Volume::new(volume_id, size_bytes, store);
    let mut flags = TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_CACHE
        | TransmissionFlags::SEND_FAST_ZERO;
    if volume.flush_is_global() {
        flags |= TransmissionFlags::CAN_MULTI_CONN;
    }
    let exports: Arc<[ExportInfo]> = Arc::from(vec![ExportInfo {
        name: config.volume.clone(),
        description: format!("ferroblock {:?} volume", config.backend).to_lowercase(),
        size_bytes,
        flags,
    }]);
    let owners: Arc<[u16]> = Arc::from(vec![0u16]);

    let listener = std::net::TcpListener::bind(config.listen)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .map_err(|source| ServeError::Listen {
            address: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Listen {
        address: config.listen,
        source,
    })?;
    let mut listener = Some(mio::net::TcpListener::from_std(listener));

    let reactors = config.cores.len();
    let metrics = Arc::new(Metrics::new(&[config.volume.as_str()], reactors));
    if let Some(address) = config.metrics {
        let bound = crate::metrics::serve(address, metrics.clone())
            .map_err(|source| ServeError::Listen { address, source })?;
        tracing::info!(address = %bound, "metrics at http://{bound}/metrics");
    }
    let mut polls = Vec::with_capacity(reactors);
    let mut mailboxes = Vec::with_capacity(reactors);
    for reactor in 0..reactors {
        let setup_error = |source| ServeError::Reactor { reactor, source };
        let poll = Poll::new().map_err(setup_error)?;
        let waker = mio::Waker::new(poll.registry(), Token(0)).map_err(setup_error)?;
        mailboxes.push(Mailbox::new(reactors, waker));
        polls.push(poll);
    }
    let mailboxes: Arc<[Mailbox]> = Arc::from(mailboxes);
    let shutdown = Arc::new(Shutdown::new());

    // The kernel's io_uring workers (fsync, dsync writes) go to cores without reactors when there are
    // any, else anywhere: never only onto a reactor's own core, where busy polling would starve them.
    let allowed = crate::config::available_cores();
    let free: Vec<usize> = allowed
        .iter()
        .copied()
        .filter(|core| !config.cores.contains(core))
        .collect();
    let worker_cpus = if free.is_empty() { allowed } else { free };
    let mut volume = Some(volume);
    let mut handles = Vec::with_capacity(reactors);
    for (id, poll) in polls.into_iter().enumerate() {
        let setup = ReactorSetup {
            id,
            core: Some(core_affinity::CoreId {
                id: config.cores[id],
            }),
            poll_mode: config.poll_mode,
            spin: config.spin,
            poll,
            listener: if id == 0 { listener.take() } else { None },
            volumes: if id == 0 {
                volume.take().into_iter().collect()
            } else {
                Vec::new()
            },
            owners: owners.clone(),
            exports: exports.clone(),
            mailboxes: mailboxes.clone(),
            shutdown: shutdown.clone(),
            metrics: metrics.clone(),
            worker_cpus: worker_cpus.clone(),
        };
        let reactor = Reactor::new(setup).map_err(|source| ServeError::Reactor {
            reactor: id,
            source,
        })?;
        let handle = thread::Builder::new()
            .name(format!("reactor-{id}"))
            .spawn(move || reactor.run())
            .map_err(|source| ServeError::Reactor {
                reactor: id,
                source,
            })?;
        handles.push(handle);
    }

    install_signal_handlers(shutdown.clone(), mailboxes.clone())?;
    tracing::info!(
        address = %local, volume = %config.volume, size_bytes, backend = ?config.backend,
        cores = ?config.cores, poll = ?config.poll_mode, "serving"
    );
    // The one line on stdout: scripts and tests read the URI from it.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "ferroblock: serving nbd://{local}/{}",
        config.volume
    );
    let _ = stdout.flush();
    drop(stdout);

    let mut first_error = None;
    for (reactor, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                first_error.get_or_insert(ServeError::ReactorFailed { reactor, source });
            }
            Err(_) => {
                first_error.get_or_insert(ServeError::ReactorFailed {
                    reactor,
                    source: std::io::Error::other("reactor thread panicked"),
                });
            }
        }
    }
    tracing::info!("shut down cleanly");
    first_error.map_or(Ok(()), Err)
}

/// SIGTERM / SIGINT start an orderly shutdown; a second one exits at once.
fn install_signal_handlers(
    shutdown: Arc<Shutdown>,
    mailboxes: Arc<[Mailbox]>,
) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // A write past a file-size limit must fail with EFBIG (reported to the host as an IO error), not
    // kill the process.
    // SAFETY: setting a signal's disposition to SIG_IGN before any thread depends on it.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut received = 0;
            for signal in signals.forever() {
                received += 1;
                if received > 1 {
                    tracing::warn!(signal, "second signal: exiting without draining");
                    std::process::exit(130);
                }
                tracing::info!(signal, "shutting down: finishing in-flight requests");
                shutdown.request(&mailboxes);
            }
        })
        .map_err(ServeError::Signals)?;
    Ok(())
}
