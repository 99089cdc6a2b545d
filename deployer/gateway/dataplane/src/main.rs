//! mlops-gateway-dataplane: the inference gateway's HTTP hot path. The Python control plane
//! (`python -m deployer.gateway`) starts it, feeds it routing tables on stdin and reads applied-table
//! notices and traffic samples from stdout (see control.rs and frames.rs for both formats).

mod control;
mod frames;
mod http;
mod json;
mod metrics;
mod proxy;
mod routes;
mod routing;

use std::io::{BufRead, Write};
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use control::{ControlParser, Event};
use proxy::{Settings, State};

const USAGE: &str =
    "usage: mlops-gateway-dataplane --listen HOST:PORT [--read-timeout-ms 30000] [--connect-timeout-ms 2000]
    [--node-down-ms 5000] [--sample-rate 0.01] [--pool-max-idle 64] [--max-connections 4096]
    [--client-idle-ms 120000] [--max-body-bytes 67108864] [--request-deadline-ms 30000]
    [--body-buffer-bytes 536870912]
Routing tables arrive on stdin; frames (applied tables, samples) leave on stdout; EOF on stdin ends it.";

/// A mutex's guard even if a thread panicked while holding it: a bug met by one connection's thread
/// ends that connection, never the gateway's shared state (pools, node table, metrics).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One line on stderr, written whole (the control plane interleaves it with its own log).
pub fn log(args: std::fmt::Arguments) {
    let line = format!("dataplane: {args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

struct Args {
    listen: String,
    read_timeout_ms: u64,
    connect_timeout_ms: u64,
    node_down_ms: u64,
    sample_rate: f64,
    pool_max_idle: usize,
    max_connections: usize,
    client_idle_ms: u64,
    max_body_bytes: u64,
    request_deadline_ms: u64,
    body_buffer_bytes: u64,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut a = Args {
        listen: String::new(),
        read_timeout_ms: 30_000,
        connect_timeout_ms: 2_000,
        node_down_ms: 5_000,
        sample_rate: 0.01,
        pool_max_idle: 64,
        max_connections: 4096,
        client_idle_ms: 120_000,
        max_body_bytes: proxy::DEFAULT_MAX_BODY,
        request_deadline_ms: proxy::DEFAULT_REQUEST_DEADLINE.as_millis() as u64,
        body_buffer_bytes: proxy::DEFAULT_BODY_BUFFER as u64,
    };
    let mut i = 0;
    while i < argv.len() {
        let (flag, inline) = match argv[i].split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (argv[i].clone(), None),
        };
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = match inline {
            Some(v) => v,
            None => {
                i += 1;
                argv.get(i).cloned().ok_or_else(|| format!("{flag} needs a value"))?
            }
        };
        let positive_in = |v: &str, unit: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag} must be a positive integer ({unit}), not {v:?}"))
        };
        let positive = |v: &str| positive_in(v, "ms");
        match flag.as_str() {
            "--listen" => {
                if value.to_socket_addrs().map(|mut it| it.next().is_none()).unwrap_or(true) {
                    return Err(format!("--listen must be HOST:PORT, not {value:?}"));
                }
                a.listen = value;
            }
            "--read-timeout-ms" => a.read_timeout_ms = positive(&value)?,
            "--connect-timeout-ms" => a.connect_timeout_ms = positive(&value)?,
            "--node-down-ms" => {
                a.node_down_ms =
                    value.parse().map_err(|_| format!("--node-down-ms must be an integer >= 0 (ms), not {value:?}"))?
            }
            "--sample-rate" => {
                a.sample_rate = value
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("--sample-rate must be a fraction 0..1, not {value:?}"))?
            }
            "--pool-max-idle" => {
                a.pool_max_idle =
                    value.parse().map_err(|_| format!("--pool-max-idle must be an integer >= 0, not {value:?}"))?
            }
            "--max-connections" => a.max_connections = positive(&value)? as usize,
            "--client-idle-ms" => a.client_idle_ms = positive(&value)?,
            "--max-body-bytes" => a.max_body_bytes = positive_in(&value, "bytes")?,
            "--request-deadline-ms" => a.request_deadline_ms = positive(&value)?,
            "--body-buffer-bytes" => a.body_buffer_bytes = positive_in(&value, "bytes")?,
            _ => return Err(format!("unknown flag {flag}")),
        }
        i += 1;
    }
    if a.listen.is_empty() {
        return Err("--listen is required".into());
    }
    if a.body_buffer_bytes < a.max_body_bytes {
        return Err(format!(
            "--body-buffer-bytes ({}) must be at least --max-body-bytes ({}): the largest body must fit",
            a.body_buffer_bytes, a.max_body_bytes
        ));
    }
    Ok(a)
}

extern "C" {
    fn prctl(option: i32, ...) -> i32;
    fn mallopt(param: i32, value: i32) -> i32;
}
const PR_SET_PDEATHSIG: i32 = 1;
const SIGTERM: u64 = 15;
const M_MMAP_THRESHOLD: i32 = -3;

fn main() {
    // No orphan if the control plane dies without closing our stdin (stdin's EOF covers the rest).
    unsafe {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
    }
    // Connection buffers (64 KiB) and request bodies are mapped on their own and unmapped when freed, so
    // their memory goes back to the system when a burst of connections ends. Left to itself, glibc
    // raises this threshold after each large free (to 32 MiB) and keeps such blocks in its heaps.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 64 * 1024);
    }
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            std::process::exit(0);
        }
        Err(msg) => {
            eprintln!("mlops-gateway-dataplane: {msg}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            log(format_args!("cannot listen on {}: {e}", args.listen));
            std::process::exit(1);
        }
    };
    let mut settings = Settings::new(
        Duration::from_millis(args.read_timeout_ms),
        Duration::from_millis(args.connect_timeout_ms),
        Duration::from_millis(args.node_down_ms),
        args.sample_rate,
        args.pool_max_idle,
        args.max_connections,
        Duration::from_millis(args.client_idle_ms),
    );
    settings.max_body = args.max_body_bytes;
    settings.request_deadline = Duration::from_millis(args.request_deadline_ms);
    settings.body_buffer = usize::try_from(args.body_buffer_bytes).unwrap_or(usize::MAX);
    let (tx, rx) = std::sync::mpsc::sync_channel(1000);
    // Frames go to fd 1 unbuffered by std (Stdout would flush at every newline byte of a sample);
    // write_frames batches them itself.
    let stdout = unsafe { std::fs::File::from_raw_fd(1) };
    // The two service threads are essential: if one panicked, the whole process goes (the control
    // plane sees it exit) rather than living on deaf or mute.
    let essential = |what: &'static str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(what.into())
            .spawn(move || {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                    log(format_args!("the {what} thread failed"));
                    std::process::exit(70);
                }
            })
            .expect("a thread");
    };
    essential("frames", Box::new(move || frames::write_frames(rx, stdout)));
    let st: &'static State = Box::leak(Box::new(State::new(settings, tx)));
    essential("control", Box::new(move || control_loop(st)));
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or(args.listen.clone());
    log(format_args!("listening on {local}"));
    accept_loop(st, listener);
}

/// Tables from stdin, one at a time; stdin's end is the control plane's end, and ours.
fn control_loop(st: &'static State) {
    let mut stdin = std::io::stdin().lock();
    let mut parser = ControlParser::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        match stdin.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => std::process::exit(0),
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        match parser.line(text.trim_end_matches('\n')) {
            Event::None => {}
            Event::SamplesDropped(n) => {
                st.metrics.samples_dropped.fetch_add(n, Ordering::Relaxed);
            }
            Event::Apply(spec) => {
                st.apply(&spec);
                log(format_args!("routing table version {} applied: {}", spec.version, routing::describe(&spec)));
                let _ = st.frames.send(frames::Frame::Applied(spec.version));
            }
            Event::Reject(Some(version), why) => log(format_args!("routing table version {version} rejected: {why}")),
            Event::Reject(None, why) => log(format_args!("control input ignored: {why}")),
        }
    }
}

fn accept_loop(st: &'static State, listener: TcpListener) {
    let mut seed = routing::now_ns().wrapping_mul(0x9E37_79B9_7F4A_7C15);
    loop {
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: wait for connections to end rather than spin.
                if !matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        if st.connections.load(Ordering::Relaxed) >= st.settings.max_connections {
            proxy::refuse_connection(st, sock);
            continue;
        }
        let _ = sock.set_nodelay(true);
        // A client that stops reading its response, or sends nothing (an idle keep-alive connection, half a
        // request), does not hold its thread and connection slot forever.
        let _ = sock.set_write_timeout(Some(st.settings.read_timeout.max(Duration::from_secs(1))));
        let _ = sock.set_read_timeout(Some(st.settings.client_idle));
        st.connections.fetch_add(1, Ordering::Relaxed);
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let s = seed;
        let spawned = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || {
            // Counted out even if the thread panics: a bug met by one connection ends that
            // connection only (panics unwind; the other threads go on).
            struct Counted(&'static State);
            impl Drop for Counted {
                fn drop(&mut self) {
                    self.0.connections.fetch_sub(1, Ordering::Relaxed);
                }
            }
            let _counted = Counted(st);
            proxy::Conn::new(st, sock, s).run();
        });
        if spawned.is_err() {
            st.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse_args(&s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
    }

    #[test]
    fn flags_are_checked_and_named() {
        let a = args("--listen 127.0.0.1:0 --read-timeout-ms 500 --sample-rate=1 --pool-max-idle 0").unwrap();
        assert_eq!((a.read_timeout_ms, a.connect_timeout_ms, a.node_down_ms, a.pool_max_idle), (500, 2000, 5000, 0));
        assert_eq!(a.sample_rate, 1.0);
        assert_eq!((a.max_body_bytes, a.request_deadline_ms, a.body_buffer_bytes), (64 << 20, 30_000, 512 << 20));
        let a = args("--listen 127.0.0.1:0 --max-body-bytes 1000 --request-deadline-ms 50 --body-buffer-bytes 1000")
            .unwrap();
        assert_eq!((a.max_body_bytes, a.request_deadline_ms, a.body_buffer_bytes), (1000, 50, 1000));
        for (bad, flag) in [
            ("", "--listen"),
            ("--listen nowhere", "--listen"),
            ("--listen 127.0.0.1:0 --read-timeout-ms 0", "--read-timeout-ms"),
            ("--listen 127.0.0.1:0 --connect-timeout-ms x", "--connect-timeout-ms"),
            ("--listen 127.0.0.1:0 --sample-rate 1.5", "--sample-rate"),
            ("--listen 127.0.0.1:0 --node-down-ms -1", "--node-down-ms"),
            ("--listen 127.0.0.1:0 --pool-max-idle", "--pool-max-idle"),
            ("--listen 127.0.0.1:0 --bogus 1", "--bogus"),
            ("--listen 127.0.0.1:0 --max-body-bytes 0", "--max-body-bytes"),
            ("--listen 127.0.0.1:0 --request-deadline-ms x", "--request-deadline-ms"),
            ("--listen 127.0.0.1:0 --max-body-bytes 2000 --body-buffer-bytes 1000", "--body-buffer-bytes"),
        ] {
            let err = args(bad).err().unwrap();
            assert!(err.contains(flag), "{bad}: {err}");
        }
    }
}
