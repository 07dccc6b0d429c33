//! A loopback TCP proxy in front of Redis that loses replies on purpose: a request that
//! contains a chosen byte string reaches Redis and runs, but its connection is cut before the
//! reply comes back, as a timeout or a reset connection does in production.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The proxy; it stops when dropped.
#[derive(Debug)]
pub struct ReplyCut {
    addr: SocketAddr,
    armed: Arc<Mutex<Armed>>,
    task: tokio::task::JoinHandle<()>,
}

/// Which requests lose their replies.
#[derive(Debug, Default)]
struct Armed {
    pattern: Option<Vec<u8>>,
    /// Every matching request, not only the next one.
    every: bool,
    cuts: usize,
}

impl Armed {
    /// Whether `request` loses its reply (counted as a cut).
    fn cuts(&mut self, request: &[u8]) -> bool {
        let hit = self
            .pattern
            .as_ref()
            .is_some_and(|p| request.windows(p.len()).any(|w| w == p.as_slice()));
        if hit {
            self.cuts += 1;
            if !self.every {
                self.pattern = None;
            }
        }
        hit
    }
}

impl ReplyCut {
    /// Starts a proxy on a free loopback port that forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let armed: Arc<Mutex<Armed>> = Arc::default();
        let task = tokio::spawn({
            let armed = armed.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(relay(client, upstream, armed.clone()));
                }
            }
        });
        Self { addr, armed, task }
    }

    /// `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Loses the reply of the next request that contains `pattern` (once).
    pub fn cut_reply_of(&self, pattern: &[u8]) {
        self.arm(pattern, false);
    }

    /// Loses the reply of every request that contains `pattern` from now on.
    pub fn cut_replies_of(&self, pattern: &[u8]) {
        self.arm(pattern, true);
    }

    fn arm(&self, pattern: &[u8], every: bool) {
        let mut armed = self.armed.lock().unwrap();
        armed.pattern = Some(pattern.to_vec());
        armed.every = every;
    }

    /// How many replies were lost so far.
    pub fn cuts(&self) -> usize {
        self.armed.lock().unwrap().cuts
    }

    /// Whether an armed cut has happened.
    pub fn has_cut(&self) -> bool {
        self.cuts() > 0
    }
}

impl Drop for ReplyCut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards one client connection. When a request holds the armed pattern, replies stop at
/// once and the connection ends shortly after, so Redis runs the request and its reply goes
/// nowhere.
async fn relay(client: TcpStream, upstream: SocketAddr, armed: Arc<Mutex<Armed>>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let replies = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let cut = armed.lock().unwrap().cuts(&buf[..n]);
        if cut {
            // No reply reaches the client from now on; the rest of the request (a client may
            // write one in pieces) still goes to Redis for a moment, then the connection ends.
            replies.abort();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
            let mut n = n;
            while server_write.write_all(&buf[..n]).await.is_ok() {
                match tokio::time::timeout_at(deadline, client_read.read(&mut buf)).await {
                    Ok(Ok(more)) if more > 0 => n = more,
                    Ok(_) => break,
                    Err(_) => return,
                }
            }
            tokio::time::sleep_until(deadline).await;
            return;
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    replies.abort();
}
