//! The HTTP load generator's client: HTTP/1.1 over kept-alive connections, as the connection
//! pools of real submitters work. A connection per request would make the benchmark measure
//! TCP set-up and tear-down in the scheduler, not submissions. It reads responses by their
//! `Content-Length`, which every answer of Fleet's API has.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, oneshot};

/// A request waiting for a free connection: its body, and where its status and body go.
type Job = (Vec<u8>, oneshot::Sender<anyhow::Result<(u16, String)>>);

/// How long one exchange may take before its connection is dropped.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Posts JSON bodies to one path. A request takes an idle connection, or opens one more when
/// none is idle, so requests never queue in the client behind slow answers.
#[derive(Clone)]
pub(crate) struct Pool {
    addr: SocketAddr,
    head: Arc<str>,
    jobs: mpsc::UnboundedSender<Job>,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    idle: Arc<AtomicUsize>,
}

impl Pool {
    pub(crate) fn new(addr: SocketAddr, path: &str) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel::<Job>();
        let head =
            format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n");
        Self {
            addr,
            head: head.into(),
            jobs,
            queue: Arc::new(Mutex::new(queue)),
            idle: Default::default(),
        }
    }

    /// Sends one request; returns the status and body.
    pub(crate) async fn post(&self, body: Vec<u8>) -> anyhow::Result<(u16, String)> {
        // Claim an idle connection, or open another.
        let claimed = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if claimed.is_err() {
            self.open();
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((body, reply))
            .map_err(|_| anyhow::anyhow!("the pool stopped"))?;
        answer.await.context("the pool dropped the request")?
    }

    /// A connection: takes requests from the shared queue one at a time, counting itself idle
    /// between them once it has answered one (the request that opened it claimed it already).
    fn open(&self) {
        let (addr, head, queue, idle) = (
            self.addr,
            self.head.clone(),
            self.queue.clone(),
            self.idle.clone(),
        );
        tokio::spawn(async move {
            let mut conn: Option<BufReader<TcpStream>> = None;
            let mut first = true;
            loop {
                if !first {
                    idle.fetch_add(1, Ordering::AcqRel);
                }
                first = false;
                let job = queue.lock().await.recv().await;
                let Some((body, reply)) = job else { return };
                let _ = reply.send(send(&mut conn, addr, &head, &body).await);
            }
        });
    }
}

/// One request on `conn`. A kept-alive connection the server has closed meanwhile fails at
/// once; the request is then sent again once on a new connection.
async fn send(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: SocketAddr,
    head: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let reused = conn.is_some();
    let mut result = exchange(conn, addr, head, body).await;
    if result.is_err() && reused {
        result = exchange(conn, addr, head, body).await;
    }
    result
}

/// One exchange, connecting first when there is no connection; drops the connection on any
/// error or when the server closes it.
async fn exchange(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: SocketAddr,
    head: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let result = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        if conn.is_none() {
            let stream = TcpStream::connect(addr).await.context("connecting")?;
            stream.set_nodelay(true)?;
            *conn = Some(BufReader::new(stream));
        }
        let stream = conn.as_mut().expect("connected above");
        let mut raw = format!("{head}Content-Length: {}\r\n\r\n", body.len()).into_bytes();
        raw.extend_from_slice(body);
        stream.get_mut().write_all(&raw).await?;
        read_response(stream).await
    })
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {EXCHANGE_TIMEOUT:?}")));
    match result {
        Ok((status, body, keep)) => {
            if !keep {
                *conn = None;
            }
            Ok((status, body))
        }
        Err(err) => {
            *conn = None;
            Err(err)
        }
    }
}

/// Status, body, and whether the connection stays open.
async fn read_response(stream: &mut BufReader<TcpStream>) -> anyhow::Result<(u16, String, bool)> {
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        bail!("the connection was closed");
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut length = None;
    let mut keep = true;
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            bail!("the connection was closed in the headers");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.trim().parse::<usize>()?);
            } else if name.eq_ignore_ascii_case("connection")
                && value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("close"))
            {
                keep = false;
            }
        }
    }
    let mut body = vec![0; length.context("an answer without Content-Length")?];
    stream.read_exact(&mut body).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned(), keep))
}
