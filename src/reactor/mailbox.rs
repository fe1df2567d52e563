//! Cross-core messaging: the only thing reactors share.
//!
//! Owns: each reactor's inbound rings (one bounded lock-free ring per sending reactor, so every ring has a
//! single producer), its waker, and the flag saying it is about to sleep. Must never: block a sender (a
//! full ring returns the message, and the sender parks it), or wake a reactor that is busy polling (the
//! waker is a syscall; it is used only when the target announced it sleeps).

use std::sync::atomic::{AtomicBool, Ordering, fence};

use crossbeam_queue::ArrayQueue;
use mio::net::TcpStream;

use crate::volume::{IoCompletion, IoRequest};

/// Messages each (sender, receiver) ring holds before senders park.
pub const RING_CAPACITY: usize = 1024;

/// What crosses between reactors.
#[derive(Debug)]
pub enum Message {
    /// A request for a volume the receiver owns.
    Io(IoRequest),
    /// A completion for a connection the receiver owns.
    Done(IoCompletion),
    /// A freshly accepted client for the receiver to serve.
    Accept(TcpStream, std::net::SocketAddr),
}

pub struct Mailbox {
    rings: Box<[ArrayQueue<Message>]>,
    waker: mio::Waker,
    sleeping: AtomicBool,
}

impl Mailbox {
    pub fn new(senders: usize, waker: mio::Waker) -> Mailbox {
        Mailbox {
            rings: (0..senders)
                .map(|_| ArrayQueue::new(RING_CAPACITY))
                .collect(),
            waker,
            sleeping: AtomicBool::new(false),
        }
    }

    /// Posts from reactor `from`; gives the message back when that ring is full.
    pub fn post(&self, from: usize, message: Message) -> Result<(), Message> {
        self.rings[from].push(message)
    }

    /// Takes the next message sent by reactor `from`.
    pub fn take(&self, from: usize) -> Option<Message> {
        self.rings[from].pop()
    }

    pub fn is_empty(&self) -> bool {
        self.rings.iter().all(ArrayQueue::is_empty)
    }

    /// Called by the owner before it sleeps; returns false (and stays awake) if messages are waiting.
    /// Pairs with `wake_if_sleeping`: both sides fence, so either the sender sees the flag or the owner
    /// sees the message.
    pub fn prepare_sleep(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !self.is_empty() {
            self.sleeping.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn woke_up(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }

    /// Called by a sender after posting.
    pub fn wake_if_sleeping(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Unconditional wake-up (shutdown).
    pub fn wake(&self) {
        if let Err(error) = self.waker.wake() {
            tracing::error!(%error, "cannot wake a reactor");
        }
    }
}
