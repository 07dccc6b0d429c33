//! A loopback TCP proxy in front of Redis that loses one reply on purpose: the request that
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
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplyCut {
    /// Starts a proxy on a free loopback port that forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let armed: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
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
        *self.armed.lock().unwrap() = Some(pattern.to_vec());
    }

    /// Whether the armed cut has happened.
    pub fn has_cut(&self) -> bool {
        self.armed.lock().unwrap().is_none()
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
async fn relay(client: TcpStream, upstream: SocketAddr, armed: Arc<Mutex<Option<Vec<u8>>>>) {
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
        let cut = {
            let mut armed = armed.lock().unwrap();
            let hit = armed
                .as_ref()
                .is_some_and(|p| buf[..n].windows(p.len()).any(|w| w == p.as_slice()));
            if hit {
                *armed = None;
            }
            hit
        };
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
