//! A Unix-socket proxy in front of a real server that can lose one reply, or
//! turn into a black hole.
//!
//! It forwards bytes both ways unchanged, except:
//! - with a [`LoseReply`], once: the first reply at least `min_len` bytes long
//!   to a request that contained `command` is swallowed and the connection
//!   closed, as when a network path dies after the server acted but before the
//!   client heard back ("the command ran, the reply was lost");
//! - while [`FaultProxy::black_hole`] is on, every byte either way is dropped
//!   and nothing is closed: a half-open link that looks alive to both ends;
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

    /// Drops every byte either way while `on`, closing nothing.
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

/// Forwards one connection: requests on this thread's helper, replies here.
fn pump(client: UnixStream, server: UnixStream, shared: Arc<Shared>) {
    let asked = Arc::new(AtomicBool::new(false));
    let (Ok(mut client_in), Ok(mut server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let requests = {
        let asked = asked.clone();
        let shared = shared.clone();
        let command = shared
            .fault
            .as_ref()
            .map(|f| f.command.to_ascii_lowercase().into_bytes());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = client_in.read(&mut buf) {
                if n == 0 || shared.refusing.load(Ordering::SeqCst) {
                    break;
                }
                if shared.black_hole.load(Ordering::SeqCst) {
                    continue;
                }
                if let Some(command) = &command {
                    let chunk = buf[..n].to_ascii_lowercase();
                    asked.store(
                        chunk
                            .windows(command.len())
                            .any(|w| w == command.as_slice()),
                        Ordering::SeqCst,
                    );
                }
                if server_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = server_out.shutdown(std::net::Shutdown::Write);
        })
    };
    let (mut server_in, mut client_out) = (server, client);
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = server_in.read(&mut buf) {
        if n == 0 || shared.refusing.load(Ordering::SeqCst) {
            break;
        }
        if shared.black_hole.load(Ordering::SeqCst) {
            continue;
        }
        if shared.fault.as_ref().is_some_and(|f| n >= f.min_len)
            && asked.load(Ordering::SeqCst)
            && shared.armed.swap(false, Ordering::SeqCst)
        {
            if shared.refuse_after_loss.load(Ordering::SeqCst) {
                shared.refusing.store(true, Ordering::SeqCst);
            }
            shared.fired.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if client_out.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client_out.shutdown(std::net::Shutdown::Both);
    let _ = server_in.shutdown(std::net::Shutdown::Both);
    let _ = requests.join();
}
