//! A Unix-socket proxy in front of a real server that can lose one reply, or
//! turn into a black hole.
//!
//! It forwards bytes both ways unchanged, except:
//! - with a [`LoseReply`], once: the first reply at least `min_len` bytes long
//!   to a request that contained `command` is swallowed and the connection
//!   closed, as when a network path dies after the server acted but before the
//!   client heard back ("the command ran, the reply was lost");
//! - while [`FaultProxy::black_hole`] is on, no byte gets through either way
//!   and nothing is closed: a network partition, a link that looks alive to
//!   both ends. What was sent meanwhile is held and arrives in order when it
//!   ends, as TCP retransmits it (dropping bytes from the middle of a stream
//!   is something no real link does to a client);
//! - while [`FaultProxy::refuse`] is on, open connections are closed and new
//!   ones closed at once: the server is unreachable.
//!   [`FaultProxy::refuse_after_loss`] turns it on the moment the reply is
//!   lost, so the client cannot ask again what happened.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The one reply to lose.
#[derive(Debug, Clone)]
pub struct LoseReply {
    /// A command name as it appears in the request (matched case-insensitively).
    pub command: String,
    /// Replies shorter than this pass (e.g. an empty `XREADGROUP` answer).
    pub min_len: usize,
}

#[derive(Debug)]
struct Shared {
    fault: Option<LoseReply>,
    black_hole: AtomicBool,
    refusing: AtomicBool,
    refuse_after_loss: AtomicBool,
    armed: AtomicBool,
    fired: AtomicUsize,
    closed: AtomicBool,
}

/// A running proxy; stops accepting when dropped (open connections end with their peers).
#[derive(Debug)]
pub struct FaultProxy {
    dir: tempfile::TempDir,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on a new socket and forwards every connection to `target`,
    /// losing the reply `fault` describes.
    pub fn start(target: &Path, fault: LoseReply) -> Self {
        Self::with(target, Some(fault))
    }

    /// Listens on a new socket and forwards every connection to `target`
    /// unchanged (until [`FaultProxy::black_hole`]).
    pub fn transparent(target: &Path) -> Self {
        Self::with(target, None)
    }

    fn with(target: &Path, fault: Option<LoseReply>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cc-proxy")
            .tempdir()
            .expect("temp dir");
        let listener = UnixListener::bind(dir.path().join("proxy.sock")).expect("bind proxy");
        let shared = Arc::new(Shared {
            fault,
            black_hole: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            refuse_after_loss: AtomicBool::new(false),
            armed: AtomicBool::new(true),
            fired: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        });
        let target = target.to_owned();
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if accepting.closed.load(Ordering::SeqCst) {
                    return;
                }
                if accepting.refusing.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = UnixStream::connect(&target) else {
                    continue;
                };
                let shared = accepting.clone();
                std::thread::spawn(move || pump(client, server, shared));
            }
        });
        Self { dir, shared }
    }

    /// The socket clients connect to.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("proxy.sock")
    }

    /// `unix://` URL of the proxy socket (for a Redis target).
    pub fn redis_url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Holds every byte either way while `on`, closing nothing; what was
    /// held is delivered, in order, when it is turned off.
    pub fn black_hole(&self, on: bool) {
        self.shared.black_hole.store(on, Ordering::SeqCst);
    }

    /// Closes every connection, and each new one at once, while `on`.
    pub fn refuse(&self, on: bool) {
        self.shared.refusing.store(on, Ordering::SeqCst);
    }

    /// Starts refusing connections when the reply is lost.
    pub fn refuse_after_loss(&self, on: bool) {
        self.shared.refuse_after_loss.store(on, Ordering::SeqCst);
    }

    /// How many replies were lost (0 or 1).
    pub fn fired(&self) -> usize {
        self.shared.fired.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Wake the accept loop so its thread ends.
        self.shared.closed.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(self.socket());
        let _ = std::fs::remove_file(self.socket());
    }
}

/// What to do with a chunk read from one side.
enum Chunk {
    /// Write it to the other side.
    Forward,
    /// Swallow it and close the connection (the lost reply).
    Lose,
}

/// How long a read waits, so bytes held by a black hole go out soon after it ends.
const HOLD_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Copies `from` to `to` until either side closes or the proxy refuses.
/// While the black hole is on, what is read is held back, and written in
/// order once it is off: a network partition, as TCP endpoints see one.
fn forward(
    mut from: UnixStream,
    mut to: UnixStream,
    shared: &Shared,
    mut inspect: impl FnMut(&[u8]) -> Chunk,
) {
    let _ = from.set_read_timeout(Some(HOLD_POLL));
    let mut buf = vec![0u8; 64 * 1024];
    let mut held = Vec::new();
    loop {
        if shared.refusing.load(Ordering::SeqCst) {
            break;
        }
        let hole = shared.black_hole.load(Ordering::SeqCst);
        if !hole && !held.is_empty() {
            if to.write_all(&held).is_err() {
                break;
            }
            held.clear();
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        if hole {
            held.extend_from_slice(&buf[..n]);
            continue;
        }
        match inspect(&buf[..n]) {
            Chunk::Lose => break,
            Chunk::Forward => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// Forwards one connection: requests on a helper thread, replies here.
fn pump(client: UnixStream, server: UnixStream, shared: Arc<Shared>) {
    let asked = Arc::new(AtomicBool::new(false));
    let (Ok(client_in), Ok(server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let requests = {
        let (asked, shared) = (asked.clone(), shared.clone());
        let command = shared
            .fault
            .as_ref()
            .map(|f| f.command.to_ascii_lowercase().into_bytes());
        std::thread::spawn(move || {
            forward(client_in, server_out, &shared, |chunk| {
                if let Some(command) = &command {
                    let chunk = chunk.to_ascii_lowercase();
                    let found = chunk
                        .windows(command.len())
                        .any(|w| w == command.as_slice());
                    asked.store(found, Ordering::SeqCst);
                }
                Chunk::Forward
            });
        })
    };
    forward(server, client, &shared, |chunk| {
        if shared
            .fault
            .as_ref()
            .is_some_and(|f| chunk.len() >= f.min_len)
            && asked.load(Ordering::SeqCst)
            && shared.armed.swap(false, Ordering::SeqCst)
        {
            if shared.refuse_after_loss.load(Ordering::SeqCst) {
                shared.refusing.store(true, Ordering::SeqCst);
            }
            shared.fired.fetch_add(1, Ordering::SeqCst);
            return Chunk::Lose;
        }
        Chunk::Forward
    });
    let _ = requests.join();
}
