//! mlops-gateway-dataplane: the inference gateway's HTTP hot path. The Python control plane
//! (`python -m deployer.gateway`) starts it, or finds it already running, and connects to its control
//! socket: routing tables go in, applied-table notices and traffic samples come out (channel.rs,
//! control.rs and frames.rs). It outlives a control plane that dies, serving the last table it applied
//! until another connects; it exits on SIGTERM or SIGINT, or when its control plane says `stop`.

mod channel;
mod control;
mod frames;
mod http;
mod json;
mod metrics;
mod proxy;
mod routes;
mod routing;
mod shadow;

use std::io::Write;
use std::net::{TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use channel::{Channel, Controlled};
use control::Event;
use proxy::{Settings, State};

const USAGE: &str = "usage: mlops-gateway-dataplane --listen HOST:PORT --control-socket PATH [--read-timeout-ms 30000]
    [--connect-timeout-ms 2000] [--node-down-ms 5000] [--sample-rate 0.01] [--pool-max-idle 64]
    [--max-connections 4096] [--client-idle-ms 120000] [--max-body-bytes 67108864]
    [--request-deadline-ms 30000] [--body-buffer-bytes 536870912]
A control plane connects to the Unix socket PATH (made mode 0600), one at a time: routing tables in,
frames (applied tables, samples) out. Without one, the last table goes on being served. SIGTERM, SIGINT
or a `stop` line end it.";

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
    control_socket: PathBuf,
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
        control_socket: PathBuf::new(),
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
            "--control-socket" => {
                if value.is_empty() {
                    return Err("--control-socket must be a path".into());
                }
                a.control_socket = PathBuf::from(value);
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
    if a.control_socket.as_os_str().is_empty() {
        return Err("--control-socket is required".into());
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
    fn mallopt(param: i32, value: i32) -> i32;
    fn sigemptyset(set: *mut SigSet) -> i32;
    fn sigaddset(set: *mut SigSet, sig: i32) -> i32;
    fn pthread_sigmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
    fn sigwait(set: *const SigSet, sig: *mut i32) -> i32;
}
const M_MMAP_THRESHOLD: i32 = -3;
/// glibc's sigset_t: 1024 bits.
#[repr(C)]
struct SigSet([u64; 16]);
const SIG_BLOCK: i32 = 0;
const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

/// SIGTERM and SIGINT, blocked in the calling thread and every thread it starts afterwards: they are
/// taken by `wait_for_stop_signal` alone.
fn stop_signals() -> SigSet {
    let mut set = SigSet([0; 16]);
    unsafe {
        sigemptyset(&mut set);
        sigaddset(&mut set, SIGTERM);
        sigaddset(&mut set, SIGINT);
        pthread_sigmask(SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

fn wait_for_stop_signal(set: &SigSet) -> i32 {
    let mut sig = 0;
    while unsafe { sigwait(set, &mut sig) } != 0 {}
    sig
}

/// The way out when asked to stop: the socket file goes (it would be stale), then the process.
fn exit_cleanly(channel: &Channel, why: std::fmt::Arguments) -> ! {
    channel.remove_file();
    log(format_args!("stopping: {why}"));
    std::process::exit(0)
}

fn main() {
    let signals = stop_signals();
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
    // The port first: a second data plane for the same port stops here, before it touches the socket.
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            log(format_args!("cannot listen on {}: {e}", args.listen));
            std::process::exit(1);
        }
    };
    let channel: &'static Channel = match Channel::bind(&args.control_socket) {
        Ok(c) => Box::leak(Box::new(c)),
        Err(e) => {
            log(format_args!("cannot listen on the control socket {}: {e}", args.control_socket.display()));
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
    let st: &'static State = Box::leak(Box::new(State::new(settings, tx)));
    // The service threads are essential: if one panicked, the whole process goes (the control plane
    // sees its connection end) rather than living on deaf or mute.
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
    essential("frames", Box::new(move || frames::write_frames(rx, channel, &st.metrics.samples_dropped)));
    let (shadow_tx, shadow_rx) = std::sync::mpsc::sync_channel(shadow::QUEUE);
    let _ = st.shadow.set(shadow_tx);
    let shadow_rx: &'static std::sync::Mutex<_> = Box::leak(Box::new(std::sync::Mutex::new(shadow_rx)));
    for _ in 0..shadow::WORKERS {
        essential("shadow", Box::new(move || shadow::work(st, shadow_rx)));
    }
    let plane: &'static Plane = Box::leak(Box::new(Plane { st, channel }));
    essential("control", Box::new(move || channel.serve(plane)));
    essential(
        "signals",
        Box::new(move || {
            let sig = wait_for_stop_signal(&signals);
            exit_cleanly(channel, format_args!("{}", if sig == SIGINT { "SIGINT" } else { "SIGTERM" }))
        }),
    );
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or(args.listen.clone());
    log(format_args!("listening on {local}, control socket {}", channel.path().display()));
    accept_loop(st, listener);
}

/// What the control connection drives: the routing table, the dropped-sample count, the end.
struct Plane {
    st: &'static State,
    channel: &'static Channel,
}

impl Controlled for Plane {
    fn event(&self, conn: u64, ev: Event) {
        let st = self.st;
        match ev {
            Event::None => {}
            Event::SamplesDropped(n) => {
                st.metrics.samples_dropped.fetch_add(n, Ordering::Relaxed);
            }
            Event::Apply(spec) => {
                st.apply(&spec);
                log(format_args!("routing table version {} applied: {}", spec.version, routing::describe(&spec)));
                let _ = st.frames.send(frames::Frame::Applied(conn, spec.version));
            }
            Event::Reject(Some(version), why) => log(format_args!("routing table version {version} rejected: {why}")),
            Event::Reject(None, why) => log(format_args!("control input ignored: {why}")),
            Event::Stop => exit_cleanly(self.channel, format_args!("told to by the control plane")),
        }
    }

    fn linked(&self, conn: u64, up: bool) {
        if up {
            log(format_args!("control plane connected (control connection {conn})"));
        } else {
            let version = self.st.metrics.routes_version.load(Ordering::Relaxed);
            log(format_args!(
                "control connection {conn} ended: serving routing table version {version} until a control plane connects"
            ));
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

    /// The flags every data plane needs, then `rest`.
    fn with(rest: &str) -> Result<Args, String> {
        args(&format!("--listen 127.0.0.1:0 --control-socket /run/gw.sock {rest}"))
    }

    #[test]
    fn flags_are_checked_and_named() {
        let a = with("--read-timeout-ms 500 --sample-rate=1 --pool-max-idle 0").unwrap();
        assert_eq!((a.read_timeout_ms, a.connect_timeout_ms, a.node_down_ms, a.pool_max_idle), (500, 2000, 5000, 0));
        assert_eq!(a.sample_rate, 1.0);
        assert_eq!(a.control_socket, PathBuf::from("/run/gw.sock"));
        assert_eq!((a.max_body_bytes, a.request_deadline_ms, a.body_buffer_bytes), (64 << 20, 30_000, 512 << 20));
        let a = with("--max-body-bytes 1000 --request-deadline-ms 50 --body-buffer-bytes 1000").unwrap();
        assert_eq!((a.max_body_bytes, a.request_deadline_ms, a.body_buffer_bytes), (1000, 50, 1000));
        for (bad, flag) in [
            (args(""), "--listen"),
            (args("--listen nowhere --control-socket s"), "--listen"),
            (args("--listen 127.0.0.1:0"), "--control-socket"),
            (args("--listen 127.0.0.1:0 --control-socket="), "--control-socket"),
            (with("--read-timeout-ms 0"), "--read-timeout-ms"),
            (with("--connect-timeout-ms x"), "--connect-timeout-ms"),
            (with("--sample-rate 1.5"), "--sample-rate"),
            (with("--node-down-ms -1"), "--node-down-ms"),
            (with("--pool-max-idle"), "--pool-max-idle"),
            (with("--bogus 1"), "--bogus"),
            (with("--max-body-bytes 0"), "--max-body-bytes"),
            (with("--request-deadline-ms x"), "--request-deadline-ms"),
            (with("--max-body-bytes 2000 --body-buffer-bytes 1000"), "--body-buffer-bytes"),
        ] {
            let err = bad.err().unwrap();
            assert!(err.contains(flag), "{flag}: {err}");
        }
    }
}
