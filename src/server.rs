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
    #[error("authority: {0}")]
    Authority(String),
    #[error(
        "--durability write-back is for single-node volumes: a replicated write is acknowledged \
         only once both copies have it committed durably (use fdatasync or dsync)"
    )]
    WriteBackReplicated,
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
    warn_unused_spare(&config);
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
                config.spare_percent,
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
    let exports: Arc<[ExportInfo]> = Arc::from(vec![ExportInfo::new(
        config.volume.clone(),
        format!("ferroblock {:?} volume", config.backend).to_lowercase(),
        size_bytes,
        flags,
    )]);
    run(Plan {
        listen: config.listen,
        volumes: vec![volume],
        exports,
        cores: config.cores.clone(),
        io_worker_cores: config.io_worker_cores.clone(),
        poll_mode: config.poll_mode,
        spin: config.spin,
        metrics: config.metrics,
        replication: None,
        status: None,
        describe: format!("backend {:?}", config.backend).to_lowercase(),
    })
}

/// What `run` starts: the volumes (all on the first reactor) and how they are served.
struct Plan {
    listen: std::net::SocketAddr,
    volumes: Vec<Volume>,
    exports: Arc<[ExportInfo]>,
    cores: Vec<usize>,
    io_worker_cores: Option<Vec<usize>>,
    poll_mode: crate::reactor::PollMode,
    spin: std::time::Duration,
    metrics: Option<std::net::SocketAddr>,
    replication: Option<crate::replication::hub::ReplicationHub>,
    status: Option<Arc<crate::cluster::status::StatusBoard>>,
    describe: String,
}

/// Starts the reactors of a plan and waits for them to stop.
fn run(plan: Plan) -> Result<(), ServeError> {
    let Plan {
        listen,
        volumes,
        exports,
        cores,
        io_worker_cores,
        poll_mode,
        spin,
        metrics: metrics_address,
        replication,
        status,
        describe,
    } = plan;
    let owners: Arc<[u16]> = Arc::from(vec![0u16; volumes.len()]);
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .map_err(|source| ServeError::Listen {
            address: listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Listen {
        address: listen,
        source,
    })?;
    let mut listener = Some(mio::net::TcpListener::from_std(listener));

    let reactors = cores.len();
    let names: Vec<&str> = exports.iter().map(|export| export.name.as_str()).collect();
    let metrics = Arc::new(Metrics::new(&names, reactors));
    if let Some(board) = status {
        let _ = metrics.attach_status(board);
    }
    if let Some(address) = metrics_address {
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

    // The kernel's io_uring workers (fsync, dsync writes) go where --io-worker-cores says, else to
    // cores without reactors when there are any, else anywhere: by default never only onto a
    // reactor's own core, where busy polling would starve them (adaptive and interrupt reactors
    // leave their core to them: see tuning.md for when sharing it is the better placement).
    let allowed = crate::config::available_cores();
    let free: Vec<usize> = allowed
        .iter()
        .copied()
        .filter(|core| !cores.contains(core))
        .collect();
    let worker_cpus = match io_worker_cores {
        Some(chosen) => chosen,
        None if free.is_empty() => allowed,
        None => free,
    };
    let mut volumes = Some(volumes);
    let mut replication = replication;
    let mut handles = Vec::with_capacity(reactors);
    for (id, poll) in polls.into_iter().enumerate() {
        let setup = ReactorSetup {
            id,
            core: Some(core_affinity::CoreId { id: cores[id] }),
            poll_mode,
            spin,
            poll,
            listener: if id == 0 { listener.take() } else { None },
            volumes: if id == 0 {
                volumes.take().unwrap_or_default()
            } else {
                Vec::new()
            },
            owners: owners.clone(),
            exports: exports.clone(),
            mailboxes: mailboxes.clone(),
            shutdown: shutdown.clone(),
            metrics: metrics.clone(),
            worker_cpus: worker_cpus.clone(),
            replication: if id == 0 { replication.take() } else { None },
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
    tracing::info!(address = %local, volumes = ?names, %describe, cores = ?cores, poll = ?poll_mode, "serving");
    // The one line on stdout per volume: scripts and tests read the URI from it.
    let mut stdout = std::io::stdout().lock();
    for name in &names {
        let _ = writeln!(stdout, "ferroblock: serving nbd://{local}/{name}");
    }
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

/// Serves one node of a cluster: every volume the node holds, replicated with its peer.
/// A larger spare saves syncs only where syncs are not made per batch anyway: write-back mode on a
/// persistent volume. Elsewhere it costs space and nothing else: say so rather than ignore it.
fn warn_unused_spare(config: &ServeConfig) {
    if let Some(percent) = config.spare_percent {
        let effect = config.backend == Backend::File
            && config.durability == crate::volume::copy::Durability::WriteBack;
        if !effect {
            tracing::warn!(
                spare_percent = percent,
                "--spare-percent only reduces syncs with --backend file --durability write-back; \
                 here it only lays out a larger data area (for a new volume)"
            );
        }
    }
}

pub fn serve_node(
    cluster: &crate::cluster::config::ClusterConfig,
    node_id: &str,
    config: ServeConfig,
) -> Result<(), ServeError> {
    use crate::cluster::authority::{Authority, FileAuthority};
    use crate::replication::hub::{HubSettings, ReplicatedVolume, ReplicationHub};
    use crate::replication::peer::Timing;

    if config.durability == crate::volume::copy::Durability::WriteBack {
        return Err(ServeError::WriteBackReplicated);
    }
    warn_unused_spare(&config);
    let node = cluster.node(node_id).expect("checked by load_serve_node");
    std::fs::create_dir_all(&node.data_dir).map_err(|source| ServeError::DataDir {
        path: node.data_dir.clone(),
        source,
    })?;
    let settings = &cluster.cluster;
    let timing = Timing {
        heartbeat_interval_us: settings.heartbeat_interval_ms * 1000,
        lease_timeout_us: settings.lease_timeout_ms * 1000,
        takeover_timeout_us: settings.takeover_timeout_ms * 1000,
    };
    let held: Vec<_> = cluster
        .volumes
        .iter()
        .filter(|volume| volume.peers.iter().any(|peer| peer == node_id))
        .collect();
    let names: Vec<&str> = held.iter().map(|volume| volume.name.as_str()).collect();
    let board = Arc::new(crate::cluster::status::StatusBoard::new(node_id, &names));
    let mut volumes = Vec::new();
    let mut export_list = Vec::new();
    let mut replicated = Vec::new();
    for (index, volume_config) in held.iter().enumerate() {
        let path = node.data_dir.join(format!("{}.fbv", volume_config.name));
        let opened = open_copy(
            &path,
            &volume_config.name,
            Some(volume_config.size_bytes),
            false,
            config.durability,
            config.preallocate,
            config.spare_percent,
        )?;
        let size_bytes = opened.copy.superblock().volume_size;
        let marker = node
            .data_dir
            .join(format!("{}.catching-up", volume_config.name));
        if opened.created {
            // A new, empty store is whole only while the volume is too (the authority's first
            // epoch, before anything was written): otherwise it must be caught up before it may act
            // as an in-sync slave (e.g. a node whose store an operator removed to reprovision it).
            let first_epoch = FileAuthority::open(&settings.authority)
                .ok()
                .and_then(|authority| authority.read(&volume_config.name).ok().flatten())
                .is_none_or(|membership| membership.epoch <= 1);
            if !first_epoch {
                std::fs::write(&marker, b"").map_err(|source| ServeError::DataDir {
                    path: marker.clone(),
                    source,
                })?;
            }
        }
        let mut copy = Box::new(opened.copy);
        // The master streams every note it creates to its slave.
        copy.set_note_outbox(true);
        let mut volume = Volume::new(
            index as u32,
            size_bytes,
            Store::Persistent {
                copy,
                file: opened.file,
            },
        );
        volume.set_gate(crate::volume::ServingGate {
            writes: false,
            reads: false,
        });
        volumes.push(volume);
        let export = ExportInfo::new(
            volume_config.name.clone(),
            format!("ferroblock replicated volume ({node_id})"),
            size_bytes,
            TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_FUA
                | TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_CACHE
                | TransmissionFlags::SEND_FAST_ZERO
                | TransmissionFlags::CAN_MULTI_CONN,
        );
        export
            .offered
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let authority = FileAuthority::open(&settings.authority).map_err(|error| {
            ServeError::Authority(format!("{}: {error}", settings.authority.display()))
        })?;
        let mut replica = ReplicatedVolume::new(
            index as u32,
            &volume_config.name,
            node_id,
            timing,
            Box::new(authority),
            Some((board.clone(), index)),
        );
        replica.offered = Some(export.offered.clone());
        replica.incomplete_marker = Some(marker);
        replicated.push(replica);
        export_list.push(export);
    }
    let listener = std::net::TcpListener::bind(node.replication)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .map_err(|source| ServeError::Listen {
            address: node.replication,
            source,
        })?;
    let hub = ReplicationHub::new(
        HubSettings {
            node: node_id.to_string(),
            secret: settings.secret.as_bytes().to_vec(),
            timing,
            addresses: cluster
                .nodes
                .iter()
                .map(|node| (node.id.clone(), node.replication))
                .collect(),
        },
        mio::net::TcpListener::from_std(listener),
        replicated,
        crate::reactor::REPLICATION_TOKEN_BASE,
    );
    run(Plan {
        listen: node.nbd,
        volumes,
        exports: Arc::from(export_list),
        cores: config.cores.clone(),
        io_worker_cores: config.io_worker_cores.clone(),
        poll_mode: config.poll_mode,
        spin: config.spin,
        metrics: Some(node.metrics),
        replication: Some(hub),
        status: Some(board),
        describe: format!("cluster node {node_id}"),
    })
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
