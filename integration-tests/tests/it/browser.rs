//! Headless Chromium driven over the DevTools protocol with `chromiumoxide`: navigate, evaluate
//! JavaScript, take screenshots. Enough to test the dashboard as a user would, without a Node
//! toolchain.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::cdp::js_protocol::runtime::EvaluateParams;
use chromiumoxide::error::CdpError;
use chromiumoxide::handler::HandlerConfig;
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::page::ScreenshotParams;
use futures::StreamExt;
use serde_json::Value;

use fleet_testkit::{ManagedProcess, TestEnv, free_ports, which};

/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// One headless Chromium with one page.
#[derive(Debug)]
pub(crate) struct Browser {
    page: chromiumoxide::Page,
    /// Keeps the connection's command channel open.
    _browser: chromiumoxide::Browser,
    /// Drives the DevTools connection (aborted on drop).
    handler: tokio::task::JoinHandle<()>,
    /// Chromium itself, with its output in `chromium.log`; killed when dropped (last).
    _process: ManagedProcess,
}

impl Browser {
    /// Starts Chromium (installed by `deploy/local/setup.sh`) and opens a page in it.
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
        // Started here rather than by `chromiumoxide::Browser::launch`, which reads Chromium's
        // stderr itself: this way the output lands in the test's log and the process is
        // registered for clean-up like every other process a test starts.
        let process = ManagedProcess::spawn(
            "chromium",
            &chromium,
            &arg_refs,
            &[],
            &env.dir.join("chromium.log"),
        );
        let devtools: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let ws_url = browser_socket_url(devtools).await;
        let config = HandlerConfig {
            // The page is 1280×900 like the window (chromiumoxide's default is 800×600).
            viewport: Some(Viewport {
                width: 1280,
                height: 900,
                device_scale_factor: None,
                emulating_mobile: false,
                is_landscape: false,
                has_touch: false,
            }),
            request_timeout: COMMAND_TIMEOUT,
            ..HandlerConfig::default()
        };
        let (browser, mut handler) =
            chromiumoxide::Browser::connect_with_config(ws_url.as_str(), config)
                .await
                .expect("attach to Chromium");
        // The handler routes every command's answer and every event; it must be polled for
        // anything to happen. A message it cannot parse is skipped, not fatal.
        let handler = tokio::spawn(async move { while handler.next().await.is_some() {} });
        let page = browser.new_page("about:blank").await.expect("open a page");
        Self {
            page,
            _browser: browser,
            handler,
            _process: process,
        }
    }

    /// Navigates to `url` and waits until it has loaded; a change of the fragment only (the
    /// dashboard's routes) never loads a page, so for one it waits until the page has the URL.
    pub(crate) async fn navigate(&mut self, url: &str) {
        let current = self.page.url().await.ok().flatten().unwrap_or_default();
        let document = |url: &str| url.split('#').next().unwrap_or_default().to_string();
        if url.contains('#') && document(&current) == document(url) {
            let quoted = serde_json::to_string(url).expect("a URL as a JS string");
            self.eval(&format!("location.href = {quoted}; true")).await;
            self.wait_for(url, &format!("location.href === {quoted}"))
                .await;
            return;
        }
        self.page
            .goto(url)
            .await
            .unwrap_or_else(|err| panic!("navigate to {url}: {err}"));
    }

    /// Reloads the page and waits until it has loaded.
    pub(crate) async fn reload(&mut self) {
        self.page
            .reload()
            .await
            .unwrap_or_else(|err| panic!("reload: {err}"));
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    pub(crate) async fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|err| panic!("{expression}: {err}"))
    }

    /// Like [`Browser::eval`], but a JavaScript exception (or a protocol error, e.g. while the
    /// page is still loading) is an `Err`.
    pub(crate) async fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
        // `Runtime.evaluate` of the expression as it is (a statement block included), not
        // chromiumoxide's guess at whether it is a function.
        let params = EvaluateParams::builder()
            .expression(expression)
            .await_promise(true)
            .return_by_value(true)
            .build()
            .expect("Runtime.evaluate parameters");
        match self.page.evaluate_expression(params).await {
            Ok(result) => Ok(result.value().cloned().unwrap_or(Value::Null)),
            Err(CdpError::JavascriptException(details)) => {
                Err(serde_json::to_value(&*details).unwrap_or(Value::Null))
            }
            Err(err) => Err(Value::String(err.to_string())),
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
        let png = self
            .page
            .screenshot(
                ScreenshotParams::builder()
                    .format(CaptureScreenshotFormat::Png)
                    .build(),
            )
            .await
            .expect("screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.handler.abort();
    }
}

/// The browser's DevTools WebSocket URL, once the endpoint answers.
async fn browser_socket_url(devtools: SocketAddr) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(devtools).await.is_ok() {
            let version =
                fleet_testkit::http::request(devtools, "GET", "/json/version", None, None).await;
            if let Ok(info) = serde_json::from_str::<Value>(&version.body)
                && let Some(url) = info["webSocketDebuggerUrl"].as_str()
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
