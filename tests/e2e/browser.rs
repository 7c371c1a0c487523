//! A headless Chromium for the browser tests, driven through `chromedriver` over W3C
//! WebDriver (a few JSON requests) and, for what WebDriver does not cover (the page's JS
//! heap), the DevTools protocol through chromedriver's `goog/cdp/execute`.
//!
//! Each [`Browser`] is its own `chromedriver` on a free port and its own Chromium profile in
//! a temporary directory: nothing (cookies, storage, cache) is shared between tests. Tests
//! that use one carry `needs_chromium` in their name and start with
//! `tally_testkit::require!(Chromium)`.
//!
//! Pages of another origin: [`serve_page`] serves one HTML page on `127.0.0.2` or
//! `127.0.0.3`, which are distinct origins (and sites) from tally's `127.0.0.1`.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tally_testkit::ManagedProcess;

/// The arguments every test browser starts with: headless, no sandbox (tests may run as
/// root), and nothing that reaches the network on its own.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
];

/// The element key of W3C WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:{port}`: the chromedriver.
    driver_url: String,
    /// `{driver_url}/session/{id}`.
    session: String,
    // Dropped after the session is ended (see Drop): the driver, then the profile.
    _driver: ManagedProcess,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A browser with a 1280×900 window.
    pub async fn start() -> Result<Browser> {
        let chromium = tally_testkit::needs::chromium_binary().context("no chromium")?;
        let driver = tally_testkit::needs::chromedriver_binary().context("no chromedriver")?;
        let profile = tempfile::tempdir()?;
        let port = tally_testkit::free_port();
        let mut command = std::process::Command::new(driver);
        command.arg(format!("--port={port}"));
        let mut process = ManagedProcess::start(
            "chromedriver",
            command,
            profile.path().join("chromedriver.log"),
        )?;
        process
            .wait_for_line("started successfully", Duration::from_secs(30))
            .await?;
        let driver_url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| (*a).to_owned()).collect();
        args.push(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ));
        args.push("--window-size=1280,900".to_owned());
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "pageLoadStrategy": "normal",
        }}});
        let answer: Value = http
            .post(format!("{driver_url}/session"))
            .json(&capabilities)
            .send()
            .await?
            .json()
            .await?;
        let Some(id) = answer["value"]["sessionId"].as_str() else {
            bail!(
                "chromedriver did not start a session: {answer}\n{}",
                process.log_tail(30)
            );
        };
        Ok(Browser {
            session: format!("{driver_url}/session/{id}"),
            http,
            driver_url,
            _driver: process,
            _profile: profile,
        })
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value> {
        let url = format!("{}{path}", self.session);
        let mut request = self.http.request(method.clone(), &url);
        if method != reqwest::Method::GET {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let answer: Value = response.json().await?;
        if !status.is_success() {
            bail!(
                "webdriver {method} {path} answered {status}: {}",
                answer["value"]["message"]
            );
        }
        Ok(answer["value"].clone())
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.command(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await?;
        Ok(())
    }

    pub async fn reload(&self) -> Result<()> {
        self.command(reqwest::Method::POST, "/refresh", json!({}))
            .await?;
        Ok(())
    }

    /// Runs `script` (a function body: `return …`) in the page with `args`.
    pub async fn eval(&self, script: &str, args: Value) -> Result<Value> {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Runs `script` until it returns something other than `null`/`false`, and returns that;
    /// fails after `deadline` naming `what` and the script's last answer.
    pub async fn wait_for(&self, what: &str, script: &str, deadline: Duration) -> Result<Value> {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let value = self.eval(script, json!([])).await?;
            if !(value.is_null() || value == Value::Bool(false)) {
                return Ok(value);
            }
            if tokio::time::Instant::now() > end {
                let url = self.eval("return location.href", json!([])).await?;
                bail!("{what}: not within {deadline:?} on {url}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn find(&self, css: &str) -> Result<String> {
        let element = self
            .command(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await
            .with_context(|| format!("finding `{css}`"))?;
        element[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no element for `{css}`: {element}"))
    }

    /// Clicks the element `css` selects, as a user would (scrolled into view, hit-tested).
    pub async fn click(&self, css: &str) -> Result<()> {
        let element = self.find(css).await?;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            json!({}),
        )
        .await
        .with_context(|| format!("clicking `{css}`"))?;
        Ok(())
    }

    /// Types `text` into the element `css` selects, after clearing it.
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let element = self.find(css).await?;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/clear"),
            json!({}),
        )
        .await?;
        if !text.is_empty() {
            self.command(
                reqwest::Method::POST,
                &format!("/element/{element}/value"),
                json!({ "text": text }),
            )
            .await?;
        }
        Ok(())
    }

    /// Moves into the `<iframe>` `css` selects: later commands act on its document.
    pub async fn enter_frame(&self, css: &str) -> Result<()> {
        let element = self.find(css).await?;
        self.command(
            reqwest::Method::POST,
            "/frame",
            json!({"id": {ELEMENT: element}}),
        )
        .await?;
        Ok(())
    }

    /// Back to the top-level document.
    pub async fn leave_frames(&self) -> Result<()> {
        self.command(reqwest::Method::POST, "/frame", json!({"id": null}))
            .await?;
        Ok(())
    }

    /// Resizes the window (the viewport follows).
    pub async fn set_window(&self, width: u32, height: u32) -> Result<()> {
        self.command(
            reqwest::Method::POST,
            "/window/rect",
            json!({"width": width, "height": height}),
        )
        .await?;
        Ok(())
    }

    /// A PNG of the viewport, written to `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let encoded = self
            .command(reqwest::Method::GET, "/screenshot", json!({}))
            .await?;
        let png = base64_decode(encoded.as_str().context("screenshot is not text")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// A DevTools protocol command (`Runtime.getHeapUsage`, `HeapProfiler.collectGarbage`…)
    /// on the current page.
    pub async fn cdp(&self, command: &str, params: Value) -> Result<Value> {
        self.command(
            reqwest::Method::POST,
            "/goog/cdp/execute",
            json!({"cmd": command, "params": params}),
        )
        .await
    }

    /// The page's used JS heap in bytes, after a full garbage collection.
    pub async fn js_heap_after_gc(&self) -> Result<u64> {
        self.cdp("HeapProfiler.collectGarbage", json!({})).await?;
        let usage = self.cdp("Runtime.getHeapUsage", json!({})).await?;
        usage["usedSize"]
            .as_f64()
            .map(|bytes| bytes as u64)
            .context("Runtime.getHeapUsage has no usedSize")
    }

    /// Ends the session (Chromium exits) and the driver.
    pub async fn close(self) {
        let _ = self
            .http
            .delete(&self.session)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        // Drop runs too, and finds the session gone.
    }
}

impl Drop for Browser {
    /// Chromium is chromedriver's child but not killed with it: the session is ended over
    /// plain HTTP (no runtime is needed, a test may have failed anywhere) before the driver
    /// goes, so no browser outlives its test.
    fn drop(&mut self) {
        let Some(path) = self.session.strip_prefix(&self.driver_url) else {
            return;
        };
        let host = self.driver_url.trim_start_matches("http://").to_owned();
        let request = format!(
            "DELETE {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        if let Ok(mut stream) = std::net::TcpStream::connect(&host) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = stream.write_all(request.as_bytes());
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
        }
    }
}

fn base64_decode(text: &str) -> Result<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut buffer = 0u32;
    let mut bits = 0;
    for byte in text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
    {
        let value = ALPHABET
            .iter()
            .position(|c| *c == byte)
            .context("not base64")? as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// A web page served by the test itself on `host` (say `127.0.0.2`), so it is a page of
/// another origin than tally's. Every path answers `html`. Stops when dropped.
pub struct Page {
    pub url: String,
    /// The page's origin, `http://host:port`.
    pub origin: String,
    _server: tokio::task::JoinHandle<()>,
}

impl Drop for Page {
    fn drop(&mut self) {
        self._server.abort();
    }
}

pub async fn serve_page(host: &str, html: String) -> Result<Page> {
    let listener = tokio::net::TcpListener::bind((host, 0))
        .await
        .with_context(|| {
            format!("binding {host}:0 (loopback addresses beyond 127.0.0.1 are needed)")
        })?;
    let origin = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new().fallback(move || {
        let html = html.clone();
        async move {
            (
                [
                    ("content-type", "text/html; charset=utf-8"),
                    ("cache-control", "no-store"),
                ],
                html,
            )
        }
    });
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Page {
        url: format!("{origin}/shop"),
        origin,
        _server: server,
    })
}

/// Where screenshots go: `TALLY_SCREENSHOTS` (the committed ones: `docs/screenshots`), or
/// nowhere.
pub fn screenshot_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("TALLY_SCREENSHOTS")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
}

/// Runs a browser scenario `async fn(Deployment) -> Result<()>` as two tests, one per
/// deployment, named `…::needs_chromium::standalone` and
/// `…::needs_chromium::needs_nats_clickhouse_distributed`.
#[macro_export]
macro_rules! for_each_deployment_in_chromium {
    ($scenario:ident) => {
        mod $scenario {
            mod needs_chromium {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn needs_nats_clickhouse_distributed() -> anyhow::Result<()> {
                    tally_testkit::require!(Chromium, NatsServer, ClickHouse);
                    super::super::$scenario($crate::cluster::Deployment::Distributed).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn standalone() -> anyhow::Result<()> {
                    tally_testkit::require!(Chromium);
                    super::super::$scenario($crate::cluster::Deployment::Standalone).await
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn decodes_base64() {
        assert_eq!(super::base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::base64_decode("aGk=").unwrap(), b"hi");
    }
}
