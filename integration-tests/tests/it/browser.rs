//! Headless Chromium driven over the DevTools protocol: navigate, evaluate JavaScript, take
//! screenshots. Enough to test the dashboard as a user would, without a Node toolchain.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use fleet_testkit::{ManagedProcess, TestEnv, free_ports, which};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One headless Chromium with one page.
#[derive(Debug)]
pub(crate) struct Browser {
    _process: ManagedProcess,
    socket: Socket,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium (installed by `deploy/local/setup.sh`) and attaches to its first page.
    pub(crate) async fn launch(env: &TestEnv) -> Self {
        let chromium = which("chromium")
            .expect("chromium is not installed: run `bash deploy/local/setup.sh` (make test does)");
        let [port] = free_ports::<1>();
        let profile = env.dir.join("chromium-profile");
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--window-size=1280,900".into(),
            format!("--remote-debugging-port={port}"),
            format!("--user-data-dir={}", profile.display()),
            "about:blank".into(),
        ];
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = ManagedProcess::spawn(
            "chromium",
            &chromium,
            &arg_refs,
            &[],
            &env.dir.join("chromium.log"),
        );
        let devtools: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let ws_url = page_socket_url(devtools).await;
        let (socket, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .expect("attach to the page");
        let mut browser = Self {
            _process: process,
            socket,
            next_id: 0,
        };
        browser.call("Page.enable", json!({})).await;
        browser
    }

    /// Sends one DevTools command and returns its result (events in between are skipped).
    pub(crate) async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket
            .send(Message::text(command))
            .await
            .expect("send to Chromium");
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("Chromium closed the connection")
                .expect("DevTools message");
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if value["id"] == id {
                assert!(value.get("error").is_none(), "{method}: {value}");
                return value["result"].clone();
            }
        }
    }

    pub(crate) async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    pub(crate) async fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|err| panic!("{expression}: {err}"))
    }

    /// Like [`Browser::eval`], but a JavaScript exception is an `Err` (e.g. while the page is
    /// still loading).
    pub(crate) async fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        match result.get("exceptionDetails") {
            Some(details) => Err(details.clone()),
            None => Ok(result["result"]["value"].clone()),
        }
    }

    /// Waits until `expression` is true in the page.
    pub(crate) async fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self.try_eval(expression).await == Ok(Value::Bool(true)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for: {what} ({expression})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Saves a PNG of the page.
    pub(crate) async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}

/// The DevTools WebSocket URL of Chromium's first page, once the endpoint answers.
async fn page_socket_url(devtools: SocketAddr) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(devtools).await.is_ok() {
            let list =
                fleet_testkit::http::request(devtools, "GET", "/json/list", None, None).await;
            if let Ok(Value::Array(targets)) = serde_json::from_str::<Value>(&list.body)
                && let Some(url) = targets
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|p| p["webSocketDebuggerUrl"].as_str())
            {
                return url.to_string();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Chromium's DevTools endpoint did not come up (see chromium.log)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
