//! End to end in a real browser: headless Chromium opens the search page, a query is typed into
//! the box and submitted with Enter, and the result images must load (`naturalWidth > 0`).
//!
//! Chromium is driven over the DevTools protocol (a websocket; `tungstenite`, a few dozen lines of
//! client below). Policy when Chromium is missing: the test prints `skipped: chromium not found`
//! and passes, unless `CNCLIP_REQUIRE_BROWSER=1` (set by `.ci/run`, which installs Debian's
//! `chromium`), where it fails. `$CHROMIUM` names another binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use common::*;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_query_renders_result_images() -> Result<()> {
    let Some(chromium) = find_chromium() else {
        if std::env::var("CNCLIP_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
            bail!("chromium not found and CNCLIP_REQUIRE_BROWSER=1 (install Debian's `chromium`)");
        }
        eprintln!("skipped: chromium not found (set CHROMIUM or install Debian's `chromium`)");
        return Ok(());
    };
    let dir = temp_dir("browser");
    let checkpoint = tiny_checkpoint(&dir, 11)?;
    let gallery = folder_gallery(&dir, 6)?;
    let server = TestServer::start(config(&dir, &checkpoint, &gallery)).await?;
    // Issue 18.1: a second service started with `--text-prompt`.
    let mut prompted = config(&dir, &checkpoint, &gallery);
    prompted.text_prompt = true;
    let prompted = TestServer::start(prompted).await?;
    let base = server.url("");
    let prompted_base = prompted.url("");
    let profile = dir.join("profile");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-browser.png");
    let outcome = tokio::task::spawn_blocking(move || {
        drive(&chromium, &profile, &base, &prompted_base, &shot)
    })
    .await?;
    server.stop().await?;
    prompted.stop().await?;
    outcome
}

/// The `prompt=` of every `/api/search` request the page has made, in order.
const SEARCH_PROMPTS: &str = r#"performance.getEntriesByType('resource')
    .map(e => new URL(e.name))
    .filter(u => u.pathname === '/api/search')
    .map(u => u.searchParams.get('prompt'))"#;

/// Types `query` into the search box as a person would and presses Enter.
fn type_and_submit(browser: &mut Browser, page: &str, query: &str) -> Result<()> {
    browser.eval(page, "document.getElementById('q').value = ''")?;
    browser.eval(page, "document.getElementById('q').focus()")?;
    browser.call("Input.insertText", json!({"text": query}), Some(page))?;
    for kind in ["keyDown", "keyUp"] {
        let mut key = json!({"type": kind, "key": "Enter", "code": "Enter",
                             "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13});
        if kind == "keyDown" {
            key["text"] = json!("\r");
        }
        browser.call("Input.dispatchKeyEvent", key, Some(page))?;
    }
    Ok(())
}

fn drive(chromium: &Path, profile: &Path, base: &str, prompted: &str, shot: &Path) -> Result<()> {
    let mut browser = Browser::launch(chromium, profile)?;
    let result = (|| -> Result<()> {
        let page = browser.open(&format!("{base}/"))?;
        // The new tab starts on about:blank; wait for the search page itself.
        browser.wait_for(
            &page,
            "document.readyState === 'complete' && document.getElementById('q') !== null",
            "the search page to load",
        )?;

        // Type the query as a person would, then press Enter in the box.
        browser.eval(&page, "document.getElementById('q').focus()")?;
        browser.call(
            "Input.insertText",
            json!({"text": "红色连衣裙"}),
            Some(&page),
        )?;
        for kind in ["keyDown", "keyUp"] {
            let mut key = json!({"type": kind, "key": "Enter", "code": "Enter",
                                 "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13});
            if kind == "keyDown" {
                key["text"] = json!("\r");
            }
            browser.call("Input.dispatchKeyEvent", key, Some(&page))?;
        }
        let state = browser.wait_for_images(&page, 6)?;
        assert_eq!(state["query"], "红色连衣裙", "{state}");
        assert!(
            state["location"]
                .as_str()
                .unwrap_or_default()
                .contains("q=%E7%BA%A2%E8%89%B2"),
            "{state}"
        );
        let shot_data = browser.call("Page.captureScreenshot", json!({}), Some(&page))?;
        if let Some(png) = shot_data["data"].as_str()
            && let Ok(bytes) = muge_data::base64::decode_cn_clip(png.as_bytes())
        {
            let _ = std::fs::write(shot, bytes);
        }

        // A shared link (`/?q=…&k=…`) runs its search on load.
        let page = browser.open(&format!("{base}/?q=%E8%93%9D%E8%89%B2&k=3"))?;
        browser.wait_for(
            &page,
            "document.getElementById('q') !== null",
            "the shared link to load",
        )?;
        let state = browser.wait_for_images(&page, 3)?;
        assert_eq!(state["query"], "蓝色", "{state}");
        // Without --text-prompt the page's queries went without the prompt.
        let prompts = browser.eval(&page, SEARCH_PROMPTS)?;
        assert_eq!(prompts, json!(["0"]), "{prompts}");

        // With --text-prompt the checkbox starts ticked and queries send prompt=1; unticked by
        // hand, the next query sends prompt=0.
        let page = browser.open(&format!("{prompted}/"))?;
        browser.wait_for(
            &page,
            "document.readyState === 'complete' && document.getElementById('q') !== null",
            "the prompted service's page to load",
        )?;
        assert_eq!(
            browser.eval(&page, "document.getElementById('prompt').checked")?,
            json!(true),
            "the prompt checkbox must start ticked on a --text-prompt service"
        );
        type_and_submit(&mut browser, &page, "红色连衣裙")?;
        browser.wait_for_images(&page, 6)?;
        browser.eval(&page, "document.getElementById('prompt').click()")?;
        type_and_submit(&mut browser, &page, "绿色")?;
        browser.wait_for(
            &page,
            &format!("{SEARCH_PROMPTS}.length === 2"),
            "the second query",
        )?;
        browser.wait_for_images(&page, 6)?;
        let prompts = browser.eval(&page, SEARCH_PROMPTS)?;
        assert_eq!(prompts, json!(["1", "0"]), "{prompts}");
        Ok(())
    })();
    browser.close();
    result
}

/// A headless Chromium and its DevTools websocket.
struct Browser {
    child: Child,
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Browser {
    fn launch(chromium: &Path, profile: &Path) -> Result<Browser> {
        let mut child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-quic",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1200,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", chromium.display()))?;
        // Chromium prints the browser websocket's address on stderr once it listens.
        let stderr = child.stderr.take().context("chromium stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("ws://")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line[at..].trim().to_string());
                }
                // Keep draining so Chromium never blocks on a full pipe.
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("chromium did not report a DevTools address within 60 s");
            }
        };
        let (socket, _) = tungstenite::connect(url.as_str())
            .with_context(|| format!("connecting to DevTools at {url}"))?;
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        }
        Ok(Browser {
            child,
            socket,
            next_id: 0,
        })
    }

    /// Sends one command (to a page session when given) and returns its result.
    fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::Text(message.to_string().into()))?;
        loop {
            let Message::Text(text) = self.socket.read()? else {
                continue;
            };
            let reply: Value = serde_json::from_str(text.as_str())?;
            if reply["id"] == id {
                if let Some(error) = reply.get("error") {
                    bail!("{method} failed: {error}");
                }
                return Ok(reply["result"].clone());
            }
        }
    }

    /// Opens `url` in a new tab and returns the tab's session id.
    fn open(&mut self, url: &str) -> Result<String> {
        let target = self.call("Target.createTarget", json!({"url": url}), None)?;
        let target_id = target["targetId"].clone();
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
            None,
        )?;
        attached["sessionId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no session id in {attached}"))
    }

    fn eval(&mut self, session: &str, expression: &str) -> Result<Value> {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            Some(session),
        )?;
        if let Some(exception) = result.get("exceptionDetails") {
            bail!("{expression}: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    fn wait_for(&mut self, session: &str, condition: &str, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.eval(session, condition)? == json!(true) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("timed out waiting for {what}")
    }

    /// Waits until the grid shows `n` images that all loaded, and returns the page's state.
    fn wait_for_images(&mut self, session: &str, n: usize) -> Result<Value> {
        const STATE: &str = r#"(() => {
            const imgs = [...document.querySelectorAll('#results img')];
            return {
                images: imgs.length,
                loaded: imgs.filter(i => i.complete && i.naturalWidth > 0 && i.dataset.loaded === '1').length,
                failed: imgs.filter(i => i.dataset.failed === '1').length,
                query: document.getElementById('q').value,
                status: document.getElementById('status').textContent,
                location: location.search,
            };
        })()"#;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut state = Value::Null;
        while Instant::now() < deadline {
            state = self.eval(session, STATE)?;
            if state["failed"].as_u64().unwrap_or(0) > 0 {
                bail!("result images failed to load: {state}");
            }
            if state["images"] == n && state["loaded"] == n {
                return Ok(state);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("expected {n} loaded result images; the page shows {state}")
    }

    fn close(mut self) {
        let _ = self.call("Browser.close", json!({}), None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
