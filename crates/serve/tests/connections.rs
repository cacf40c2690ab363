//! Issue 18.3: the connection layer's limits over real sockets on 127.0.0.1 — hyper's header-read
//! timeout (slow senders, idle keep-alive connections), the connection cap, and the bounded
//! graceful-shutdown window. Every wait is bounded; the slack on each time bound is 2 s, for a
//! loaded 2-core machine running a debug build (the bounds themselves come from the limits set).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Scheduling slack on top of a limit before a test calls it missed.
const SLACK: Duration = Duration::from_secs(2);

/// Reads until the server closes the connection (EOF or reset) or `limit` passes; returns when
/// it closed (`None`: still open at `limit`) and what it sent.
async fn wait_for_close(stream: &mut TcpStream, limit: Duration) -> (Option<Instant>, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (None, received),
            Ok(Ok(0) | Err(_)) => return (Some(Instant::now()), received),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// A slow-loris client sending its header 1 byte per second is disconnected once the header
/// timeout has passed, not served or kept open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_senders_are_disconnected() -> Result<()> {
    let dir = temp_dir("slowloris");
    let checkpoint = tiny_checkpoint(&dir, 21)?;
    let gallery = folder_gallery(&dir, 2)?;
    let mut config = config(&dir, &checkpoint, &gallery);
    let timeout = Duration::from_secs(2);
    config.limits.header_read_timeout = timeout;
    let server = TestServer::start(config).await?;
    let addr = server.addr;
    let clients: Vec<_> = (0..30)
        .map(|_| {
            tokio::spawn(async move {
                let start = Instant::now();
                let stream = TcpStream::connect(addr).await?;
                let (mut reader, mut writer) = stream.into_split();
                let header = format!(
                    "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                    "a".repeat(40)
                );
                let writing = tokio::spawn(async move {
                    for byte in header.bytes() {
                        if writer.write_all(&[byte]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                });
                let mut buf = [0u8; 1024];
                let limit = timeout + SLACK + Duration::from_secs(5);
                let closed = loop {
                    match tokio::time::timeout(limit, reader.read(&mut buf)).await {
                        Err(_) => break None,
                        Ok(Ok(0) | Err(_)) => break Some(start.elapsed()),
                        Ok(Ok(_)) => continue,
                    }
                };
                writing.abort();
                anyhow::Ok(closed)
            })
        })
        .collect();
    for client in clients {
        let Some(after) = client.await?? else {
            bail!("a client sending 1 header byte/s was still connected after {timeout:?} + 7 s");
        };
        // Closed by the header timer: not before it ran out, and within the slack after.
        assert!(
            after + Duration::from_millis(100) >= timeout && after <= timeout + SLACK,
            "disconnected after {after:?}; the header timeout is {timeout:?}"
        );
    }
    // The server still serves.
    let response = client().get(server.url("/healthz")).send().await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    server.stop().await
}

/// More idle sockets than the connection cap: each is closed by the header timer (hyper's timer
/// also covers a kept-alive connection between requests), so a normal query is served after at
/// most ⌈idle / cap⌉ header timeouts instead of never, and the process never holds more than the
/// cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_cap_do_not_starve_queries() -> Result<()> {
    let dir = temp_dir("idle");
    let checkpoint = tiny_checkpoint(&dir, 22)?;
    let gallery = folder_gallery(&dir, 2)?;
    let mut config = config(&dir, &checkpoint, &gallery);
    let timeout = Duration::from_secs(1);
    let cap: usize = 4;
    let idle: usize = 12;
    config.limits.header_read_timeout = timeout;
    config.limits.max_connections = cap;
    let server = TestServer::start(config).await?;

    // A kept-alive connection after one complete request is idle too.
    let mut kept = TcpStream::connect(server.addr).await?;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), kept.read(&mut buf)).await??;
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let (closed, _) = wait_for_close(&mut kept, timeout + SLACK).await;
    assert!(
        closed.is_some(),
        "an idle kept-alive connection stayed open past {timeout:?}"
    );

    let start = Instant::now();
    let mut sockets = Vec::new();
    for _ in 0..idle {
        sockets.push(TcpStream::connect(server.addr).await?);
    }
    // Served after the idle connections ahead of it in the backlog have timed out, cap at a time.
    let rounds = idle.div_ceil(cap) as u32;
    let bound = timeout * rounds + SLACK;
    let response = client()
        .get(server.url("/api/search?q=包&k=1"))
        .timeout(bound + Duration::from_secs(5))
        .send()
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let took = start.elapsed();
    assert!(
        took <= bound,
        "the query waited {took:?}; the bound is {bound:?}"
    );
    // And every idle socket was closed by the server, none left open.
    for (i, socket) in sockets.iter_mut().enumerate() {
        let (closed, _) =
            wait_for_close(socket, bound.saturating_sub(start.elapsed()) + SLACK).await;
        let Some(closed) = closed else {
            bail!(
                "idle socket {i} is still open {:?} after it connected",
                start.elapsed()
            );
        };
        assert!(
            closed - start <= bound + SLACK,
            "idle socket {i} closed after {:?}",
            closed - start
        );
    }
    server.stop().await
}

/// After the shutdown signal, a half-sent request (header or body) keeps the server for at most
/// the shutdown window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_do_not_hold_shutdown() -> Result<()> {
    let dir = temp_dir("shutdown-window");
    let checkpoint = tiny_checkpoint(&dir, 23)?;
    let gallery = folder_gallery(&dir, 2)?;
    let mut config = config(&dir, &checkpoint, &gallery);
    let window = Duration::from_millis(500);
    config.limits.shutdown_timeout = window;
    // Both longer than the test: only the window can end these requests.
    config.limits.header_read_timeout = Duration::from_secs(60);
    config.limits.request_timeout = Duration::from_secs(60);
    let server = TestServer::start(config).await?;
    let mut half_header = TcpStream::connect(server.addr).await?;
    half_header
        .write_all(b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Le")
        .await?;
    let mut half_body = TcpStream::connect(server.addr).await?;
    half_body
        .write_all(b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n\x89PNG")
        .await?;
    // Let the server read what was sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    tokio::time::timeout(window + SLACK + Duration::from_secs(8), server.stop())
        .await
        .map_err(|_| {
            anyhow::anyhow!("the server was still running 10 s after the shutdown signal")
        })??;
    let took = start.elapsed();
    assert!(
        took <= window + SLACK,
        "shutdown took {took:?}; the window is {window:?}"
    );
    for (name, socket) in [
        ("half header", &mut half_header),
        ("half body", &mut half_body),
    ] {
        let (closed, _) = wait_for_close(socket, SLACK).await;
        assert!(closed.is_some(), "{name}: still connected after shutdown");
    }
    Ok(())
}

/// Where a child service process (see [`service_child`]) builds its files.
const CHILD_DIR: &str = "CNCLIP_SERVE_CHILD_DIR";
/// The child's limits: `shutdown_ms,header_ms,max_connections`.
const CHILD_LIMITS: &str = "CNCLIP_SERVE_CHILD_LIMITS";

/// The child: the whole service through `cnclip_serve::run` (its own runtime, Ctrl-C/SIGTERM
/// handling), printing its address. Does nothing when run as a normal test.
#[test]
fn service_child() -> Result<()> {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return Ok(());
    };
    let limits: Vec<u64> = std::env::var(CHILD_LIMITS)?
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let dir = std::path::PathBuf::from(dir);
    let checkpoint = tiny_checkpoint(&dir, 24)?;
    let gallery = folder_gallery(&dir, 2)?;
    let mut config = config(&dir, &checkpoint, &gallery);
    config.limits.shutdown_timeout = Duration::from_millis(limits[0]);
    config.limits.header_read_timeout = Duration::from_millis(limits[1]);
    config.limits.max_connections = limits[2] as usize;
    cnclip_serve::run(&config, "127.0.0.1:0", |addr, _| {
        println!("LISTENING {addr}");
    })?;
    println!("STOPPED");
    Ok(())
}

/// A child service process (this test binary running [`service_child`]), killed when dropped.
struct Child {
    process: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: TempDir,
}

impl Child {
    /// Starts the child with `limits` (see [`CHILD_LIMITS`]), under `sh -c '<shell>; exec …'`
    /// when `shell` is given (e.g. a `ulimit`), and waits for its address.
    fn start(name: &str, limits: &str, shell: Option<&str>) -> Result<Child> {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let dir = temp_dir(name);
        let exe = std::env::current_exe()?;
        let args = [
            "--exact",
            "service_child",
            "--nocapture",
            "--test-threads=1",
        ];
        let mut command = match shell {
            Some(shell) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{shell}; exec \"$0\" \"$@\""))
                    .arg(&exe)
                    .args(args);
                c
            }
            None => {
                let mut c = Command::new(&exe);
                c.args(args);
                c
            }
        };
        let mut process = command
            .env(CHILD_DIR, &*dir)
            .env(CHILD_LIMITS, limits)
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = process.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let addr = loop {
            let Ok(line) = rx.recv_timeout(Duration::from_secs(120)) else {
                let _ = process.kill();
                let _ = process.wait();
                bail!("the child service did not start within 120 s");
            };
            // The harness's "test service_child ... " may precede it on the line.
            if let Some(at) = line.find("LISTENING ") {
                break line[at + "LISTENING ".len()..].trim().parse()?;
            }
        };
        Ok(Child {
            process,
            addr,
            _dir: dir,
        })
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.process.try_wait() {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

/// One `GET` over a fresh connection; the response's first line.
fn get_status_line(addr: std::net::SocketAddr, path: &str, limit: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, limit)?;
    stream.set_read_timeout(Some(limit))?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.lines().next().unwrap_or_default().to_string())
}

/// A stuck shutdown as a user meets it: the service process gets SIGTERM while a client has sent
/// half a request header, and must exit (cleanly) within the shutdown window, not wait for it.
#[test]
fn sigterm_ends_the_process_within_the_window() -> Result<()> {
    use std::io::Write;
    let window = Duration::from_millis(500);
    let mut child = Child::start("sigterm", "500,60000,256", None)?;
    // One complete request (the signal handler is installed once the accept loop runs) …
    let line = get_status_line(child.addr, "/healthz", Duration::from_secs(20))?;
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    // … then half a header, and SIGTERM.
    let mut half = std::net::TcpStream::connect(child.addr)?;
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: ")?;
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.process.id().to_string()])
        .status()?;
    assert!(status.success(), "kill -TERM failed");
    let limit = window + SLACK;
    loop {
        if let Some(status) = child.process.try_wait()? {
            let took = start.elapsed();
            assert!(status.success(), "the service exited with {status}");
            assert!(
                took <= limit,
                "exit took {took:?} after SIGTERM; the window is {window:?}"
            );
            return Ok(());
        }
        if start.elapsed() > limit + Duration::from_secs(8) {
            bail!("the service was still running 10 s after SIGTERM (window {window:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Descriptor exhaustion: 150 idle sockets against a service limited to 128 open
/// descriptors (`ulimit -n 128`) made every normal query fail. With a cap of 64 connections and
/// a 2 s header timeout, a query sent behind them is answered within ⌈150/64⌉ = 3 timeouts
/// (+ slack), and the service never runs out of descriptors.
#[test]
fn idle_sockets_under_a_descriptor_limit_do_not_starve_queries() -> Result<()> {
    let timeout = Duration::from_secs(2);
    let (idle, cap) = (150usize, 64usize);
    let child = Child::start(
        "nofile",
        &format!("10000,{},{cap}", timeout.as_millis()),
        Some("ulimit -n 128"),
    )?;
    let line = get_status_line(child.addr, "/healthz", Duration::from_secs(20))?;
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let start = Instant::now();
    let sockets: Vec<_> = (0..idle)
        .map(|_| std::net::TcpStream::connect(child.addr))
        .collect::<Result<_, _>>()?;
    let bound = timeout * idle.div_ceil(cap) as u32 + SLACK;
    let line = get_status_line(child.addr, "/api/search?q=%E5%8C%85&k=1", bound + SLACK)
        .with_context(|| format!("a query behind {idle} idle sockets got no answer"))?;
    let took = start.elapsed();
    assert!(line.starts_with("HTTP/1.1 200"), "{line:?} after {took:?}");
    assert!(
        took <= bound,
        "the query waited {took:?}; the bound is {bound:?}"
    );
    drop(sockets);
    Ok(())
}
