//! One thread per client connection, blocking sockets. Per request: read and split the head, route it,
//! write the rewritten request to a pooled upstream connection in one writev, relay the response with
//! x-model-version inserted (its head and the body bytes already read in one writev), then stream the
//! rest. Requests on a connection are served in order (pipelined ones wait in the buffer).

use std::borrow::Cow;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::control::TableSpec;
use crate::frames::{self, Frame, Sample};
use crate::http::{self, Chunked, HeadError, Reply, RequestHead, MAX_HEAD};
use crate::metrics::{Metrics, Reason};
use crate::routing::{self, now_ns, Arm, Nodes, Table, UpConn};

pub struct Settings {
    pub read_timeout: Duration,
    pub connect_timeout: Duration,
    pub node_down: Duration,
    /// A request is sampled when a uniform u64 is below this (u64::MAX with `sample_all`).
    pub sample_below: u64,
    pub sample_all: bool,
    pub pool_max_idle: usize,
    pub max_connections: usize,
    /// A client connection silent this long is closed.
    pub client_idle: Duration,
    /// The 504 message, made once ("no response from the model server within 30s").
    pub timeout_message: String,
}

impl Settings {
    pub fn new(
        read_timeout: Duration,
        connect_timeout: Duration,
        node_down: Duration,
        sample_rate: f64,
        pool_max_idle: usize,
        max_connections: usize,
        client_idle: Duration,
    ) -> Settings {
        Settings {
            timeout_message: format!(
                "no response from the model server within {}s",
                http::fmt_g(read_timeout.as_secs_f64())
            ),
            read_timeout,
            connect_timeout,
            node_down,
            sample_below: if sample_rate <= 0.0 { 0 } else { (sample_rate * 18_446_744_073_709_551_616.0) as u64 },
            sample_all: sample_rate >= 1.0,
            pool_max_idle,
            max_connections,
            client_idle,
        }
    }
}

pub struct State {
    pub settings: Settings,
    table: RwLock<Arc<Table>>,
    /// Bumped after each table swap: connection threads compare it (a read, no shared write) and only
    /// take the lock when it moved.
    generation: AtomicU64,
    pub nodes: Nodes,
    pub metrics: Metrics,
    pub ready: AtomicBool,
    pub frames: SyncSender<Frame>,
    pub connections: AtomicUsize,
}

impl State {
    pub fn new(settings: Settings, frames: SyncSender<Frame>) -> State {
        State {
            settings,
            table: RwLock::new(Arc::new(Table::empty())),
            generation: AtomicU64::new(0),
            nodes: Nodes::default(),
            metrics: Metrics::default(),
            ready: AtomicBool::new(false),
            frames,
            connections: AtomicUsize::new(0),
        }
    }

    /// Swaps in a table; requests in flight finish on the arm they were given.
    pub fn apply(&self, spec: &TableSpec) {
        let table = Arc::new(routing::build_table(spec, &self.nodes, &self.metrics));
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table;
        self.generation.fetch_add(1, Ordering::Release);
        self.metrics.routes_version.store(spec.version, Ordering::Relaxed);
        self.ready.store(true, Ordering::Relaxed);
    }

    fn refresh(&self, cached: &mut (u64, Arc<Table>)) {
        let g = self.generation.load(Ordering::Acquire);
        if g != cached.0 {
            cached.1 = self.table.read().unwrap_or_else(|e| e.into_inner()).clone();
            cached.0 = g;
        }
    }

    fn take_out(&self, node: &routing::Node) {
        node.mark_down(now_ns() + self.settings.node_down.as_nanos() as u64);
        crate::log(format_args!("node {} taken out for {:.1}s", node.addr, self.settings.node_down.as_secs_f64()));
    }
}

/// A byte buffer read into in place: `data` is always initialized (zeroed once, when allocated or
/// grown), so reads need no per-read zeroing; consumed bytes are dropped by moving `start`.
struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

const BUF: usize = 64 * 1024;

impl Buf {
    fn new() -> Buf {
        Buf { data: vec![0; BUF], start: 0, end: 0 }
    }

    fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// At least `want` bytes of room after the data: moved to the front, then grown.
    fn room(&mut self, want: usize) {
        if self.data.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.data.len() - self.end < want {
            let size = (self.data.len() * 2).max(self.end + want);
            self.data.resize(size, 0);
        }
    }

    fn fill(&mut self, mut r: impl Read) -> io::Result<usize> {
        self.room(4096);
        let n = r.read(&mut self.data[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Back to the usual size once a large body has gone (an idle connection keeps little).
    fn shrink(&mut self) {
        if self.data.len() > 4 * BUF && self.len() <= BUF {
            let mut data = vec![0; BUF];
            data[..self.len()].copy_from_slice(self.bytes());
            self.end = self.len();
            self.start = 0;
            self.data = data;
        }
    }
}

/// write_all over two slices with writev (a head and a body in one syscall, no copy, no allocation).
fn write_all_v(mut w: &TcpStream, first: &[u8], second: &[u8]) -> io::Result<()> {
    let mut slices = [IoSlice::new(first), IoSlice::new(second)];
    let mut bufs = &mut slices[..];
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

enum Rd {
    Timeout,
    Failed,
}

/// One read from an upstream connection into `buf`, given up at `deadline`. The socket's read timeout
/// is only lowered when what is left is shorter than it (at most 1 ms late), so the usual request on a
/// pooled connection makes no setsockopt call; a timeout that fires early is set again and retried.
fn read_until(up: &mut UpConn, buf: &mut Buf, deadline: Instant) -> Result<usize, Rd> {
    const SLACK: Duration = Duration::from_millis(1);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(Rd::Timeout);
        }
        let left = deadline - now;
        if up.timeout > left + SLACK {
            if up.sock.set_read_timeout(Some(left)).is_err() {
                return Err(Rd::Failed);
            }
            up.timeout = left;
        }
        match buf.fill(&up.sock) {
            Ok(n) => return Ok(n),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                up.timeout = Duration::MAX; // early (a shorter setting from before): set it again
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(Rd::Failed),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Infer,
    Meta,
    Other,
}

/// What a routed request asks of `exchange`.
struct Ask<'a> {
    arm: &'a Arm,
    model: &'a str,
    kind: Kind,
    to: Reply,
    body: &'a [u8],
    sampled: bool,
}

/// How an exchange ended.
enum End {
    /// The response was relayed whole; `keep`: the client connection stays open.
    Complete { status: u16, keep: bool },
    /// Nothing was sent to the client yet: it gets this error.
    Failed(u16, Reason, Cow<'static, str>),
    /// The response had started (or the client is gone): the client connection is closed.
    Broken(Option<Reason>),
}

impl End {
    /// The model server sent something that is not an HTTP response.
    fn bad_response() -> End {
        End::Failed(502, Reason::UpstreamLost, "bad response from the model server".into())
    }

    /// The upstream connection ended before the client was sent anything of the response.
    fn lost() -> End {
        End::Failed(502, Reason::UpstreamLost, "the upstream connection ended mid-response".into())
    }

    /// No response within the read timeout.
    fn timeout(s: &Settings) -> End {
        End::Failed(504, Reason::UpstreamTimeout, s.timeout_message.clone().into())
    }
}

/// Per-connection buffers, reused by every request.
struct Io {
    sock: TcpStream,
    /// Upstream response bytes.
    ubuf: Buf,
    /// The forwarded request head.
    fwd: Vec<u8>,
    /// The response head relayed to the client, or a local response.
    out: Vec<u8>,
    /// A metadata response body, buffered.
    meta: Vec<u8>,
    tried: Vec<usize>,
    sample_head: Vec<u8>,
    sample_body: Vec<u8>,
    rng: u64,
}

impl Io {
    /// Writes a response the gateway makes itself; returns whether the connection stays open.
    fn reply(&mut self, to: Reply, status: u16, content_type: &str, body: &[u8]) -> bool {
        http::local_response(&mut self.out, to, status, content_type, body);
        (&self.sock).write_all(&self.out).is_ok() && to.keep_alive
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: cheap and good enough to decide 1 request in 100
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl Framing {
    /// How many bytes of `avail` belong to the body, and whether it is complete with them.
    fn take(&mut self, avail: &[u8]) -> Result<(usize, bool), ()> {
        Ok(match self {
            Framing::Empty => (0, true),
            Framing::Length(n) => {
                let t = (*n).min(avail.len() as u64);
                *n -= t;
                (t as usize, *n == 0)
            }
            Framing::Chunked(c) => {
                let t = c.feed(avail, None)?;
                (t, c.done())
            }
            Framing::UntilClose => (avail.len(), false),
        })
    }
}

/// Sends the request to a node of the arm (retrying as the spec says) and relays the response.
fn relay(st: &State, io: &mut Io, a: &Ask, deadline: Instant) -> End {
    let arm = a.arm;
    let s = &st.settings;
    io.tried.clear();
    let mut same: Option<usize> = None;
    let (mut up, node_i) = loop {
        // After a pooled connection failed: the same node, a fresh connection. Otherwise the next node.
        let (i, fresh_only) = match same.take() {
            Some(i) => (i, true),
            None => match arm.choose(&io.tried) {
                Some(i) => (i, false),
                None => {
                    return End::Failed(503, Reason::Unavailable, "no node of the routed version is reachable".into())
                }
            },
        };
        let idle = if fresh_only { None } else { arm.nodes[i].pop_idle() };
        let pooled = idle.is_some();
        let mut conn = match idle {
            Some(c) => c,
            None => match arm.nodes[i].connect(s.connect_timeout, s.read_timeout) {
                Ok(c) => c,
                Err(_) => {
                    st.take_out(&arm.nodes[i]);
                    io.tried.push(i);
                    arm.stats.retries.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        if write_all_v(&conn.sock, &io.fwd, a.body).is_ok() {
            io.ubuf.clear();
            match read_until(&mut conn, &mut io.ubuf, deadline) {
                Ok(n) if n > 0 => break (conn, i),
                Err(Rd::Timeout) => return End::timeout(s),
                _ => {}
            }
        }
        // Nothing came back, so the request can be sent again (inference changes no state). A pooled
        // connection the node had closed says nothing about the node: the same node, a new connection.
        arm.stats.retries.fetch_add(1, Ordering::Relaxed);
        if pooled {
            same = Some(i);
        } else {
            st.take_out(&arm.nodes[i]);
            io.tried.push(i);
        }
    };

    // The response head (interim 1xx responses are skipped: the upstream never sees an Expect).
    let mut scanned: Option<usize> = None;
    let (rh, head_end) = loop {
        let b = io.ubuf.bytes();
        let whole = match scanned {
            None => !b.is_empty(),
            Some(from) => http::find_head_end(b, from.saturating_sub(3)).is_some(),
        };
        if whole {
            match http::parse_response_head(b) {
                Err(()) => return End::bad_response(),
                Ok(Some((rh, e))) if (100..200).contains(&rh.status) && rh.status != 101 => {
                    io.ubuf.consume(e);
                    scanned = None;
                    continue;
                }
                Ok(Some((rh, _))) if rh.status == 101 => return End::bad_response(),
                Ok(Some(found)) => break found,
                Ok(None) => {}
            }
        }
        if b.len() > MAX_HEAD {
            return End::bad_response();
        }
        if !b.is_empty() {
            scanned = Some(b.len());
        }
        match read_until(&mut up, &mut io.ubuf, deadline) {
            Ok(0) | Err(Rd::Failed) => return End::lost(),
            Err(Rd::Timeout) => return End::timeout(s),
            Ok(_) => {}
        }
    };
    let status = rh.status;
    let mut framing = if a.to.head || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if rh.chunked {
        Framing::Chunked(Chunked::default())
    } else if let Some(n) = rh.content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let until_close = matches!(framing, Framing::UntilClose);
    let mut reusable = !rh.closes && !until_close;
    let node = &arm.nodes[node_i];

    if a.kind == Kind::Meta && !a.to.head {
        return metadata(st, io, a, up, node, &rh, head_end, framing, reusable, deadline);
    }

    let client_keep = a.to.keep_alive && !until_close;
    {
        let head = &io.ubuf.bytes()[..head_end - 4];
        let out = &mut io.out;
        out.clear();
        out.extend_from_slice(&head[..rh.status_line_end]);
        out.extend_from_slice(&arm.version_header);
        out.extend_from_slice(a.to.connection(client_keep));
        let mut at = rh.status_line_end;
        for r in &rh.strip {
            out.extend_from_slice(&head[at..r.start]);
            at = r.end;
        }
        out.extend_from_slice(&head[at..]);
        out.extend_from_slice(b"\r\n\r\n");
        if a.sampled {
            io.sample_head.clear();
            io.sample_head.extend_from_slice(head);
            io.sample_body.clear();
        }
    }
    let avail = &io.ubuf.bytes()[head_end..];
    let Ok((take, mut done)) = framing.take(avail) else {
        return End::bad_response();
    };
    if take < avail.len() {
        reusable = false; // bytes past the response: that connection is out of step
    }
    if a.sampled {
        io.sample_body.extend_from_slice(&avail[..take]);
    }
    if write_all_v(&io.sock, &io.out, &avail[..take]).is_err() {
        return End::Broken(None);
    }
    while !done {
        io.ubuf.clear();
        match read_until(&mut up, &mut io.ubuf, deadline) {
            Ok(0) if until_close => break,
            Ok(0) | Err(Rd::Failed) => return End::Broken(Some(Reason::UpstreamLost)),
            Err(Rd::Timeout) => return End::Broken(Some(Reason::UpstreamTimeout)),
            Ok(_) => {}
        }
        let avail = io.ubuf.bytes();
        let Ok((take, d)) = framing.take(avail) else {
            return End::Broken(Some(Reason::UpstreamLost));
        };
        done = d;
        if take < avail.len() {
            reusable = false;
        }
        if a.sampled {
            io.sample_body.extend_from_slice(&avail[..take]);
        }
        if (&io.sock).write_all(&avail[..take]).is_err() {
            return End::Broken(None);
        }
    }
    if reusable {
        node.put_idle(up, s.pool_max_idle);
    }
    End::Complete { status, keep: client_keep }
}

/// Model metadata: the body is buffered, its "name" and "versions" rewritten to the logical model and
/// the routed version, and answered with a Content-Length.
#[allow(clippy::too_many_arguments)]
fn metadata(
    st: &State,
    io: &mut Io,
    a: &Ask,
    mut up: UpConn,
    node: &routing::Node,
    rh: &http::ResponseHead,
    head_end: usize,
    mut framing: Framing,
    mut reusable: bool,
    deadline: Instant,
) -> End {
    let reason = String::from_utf8_lossy(rh.reason(&io.ubuf.bytes()[..head_end])).into_owned();
    io.meta.clear();
    io.ubuf.consume(head_end);
    let mut decoder = match framing {
        Framing::Chunked(_) => Some(Chunked::default()),
        _ => None,
    };
    loop {
        let avail = io.ubuf.bytes();
        let (take, done) = match decoder.as_mut() {
            Some(c) => match c.feed(avail, Some(&mut io.meta)) {
                Ok(t) => (t, c.done()),
                Err(()) => return End::bad_response(),
            },
            None => {
                let Ok((t, d)) = framing.take(avail) else {
                    return End::bad_response();
                };
                io.meta.extend_from_slice(&avail[..t]);
                (t, d)
            }
        };
        if take < avail.len() {
            reusable = false;
        }
        if done {
            break;
        }
        io.ubuf.clear();
        match read_until(&mut up, &mut io.ubuf, deadline) {
            Ok(0) if matches!(framing, Framing::UntilClose) => break,
            Ok(0) | Err(Rd::Failed) => return End::lost(),
            Err(Rd::Timeout) => return End::timeout(&st.settings),
            Ok(_) => {}
        }
    }
    if reusable {
        node.put_idle(up, st.settings.pool_max_idle);
    } else {
        drop(up);
    }
    let rewritten =
        if rh.status == 200 { crate::json::rewrite_metadata(&io.meta, a.model, &a.arm.version) } else { None };
    let body: &[u8] = rewritten.as_deref().unwrap_or(&io.meta);
    let out = &mut io.out;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}",
        rh.status,
        reason,
        body.len()
    );
    out.extend_from_slice(&a.arm.version_header);
    out.extend_from_slice(a.to.connection(a.to.keep_alive));
    out.extend_from_slice(b"\r\n\r\n");
    if write_all_v(&io.sock, &io.out, body).is_err() {
        return End::Broken(None);
    }
    End::Complete { status: rh.status, keep: a.to.keep_alive }
}

/// Runs one exchange with its metrics, sample and error answer; returns whether the client
/// connection stays open.
fn exchange(st: &State, io: &mut Io, a: &Ask) -> bool {
    let t0 = Instant::now();
    let infer = a.kind == Kind::Infer;
    let stats = &a.arm.stats;
    if infer {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
    }
    let end = relay(st, io, a, t0 + st.settings.read_timeout);
    let took = t0.elapsed().as_nanos() as u64;
    if infer {
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        stats.observe(took);
        match &end {
            End::Complete { status, .. } if *status >= 500 => stats.error(Reason::Upstream5xx),
            End::Failed(_, reason, _) | End::Broken(Some(reason)) => stats.error(*reason),
            _ => {}
        }
    }
    match end {
        End::Complete { status, keep } => {
            if a.sampled {
                offer_sample(st, io, a, status, took);
            }
            keep
        }
        End::Failed(status, _, message) => io.reply(a.to, status, "application/json", &http::error_body(&message)),
        End::Broken(_) => false,
    }
}

fn offer_sample(st: &State, io: &mut Io, a: &Ask, status: u16, took: u64) {
    let ts_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let sample = Sample {
        model: a.model.to_string(),
        version: a.arm.version.clone(),
        triton_model: a.arm.triton_model.clone(),
        status,
        latency_ns: took,
        ts_us,
        request: a.body.to_vec(),
        request_head: io.fwd.clone(),
        response_head: std::mem::take(&mut io.sample_head),
        response: std::mem::take(&mut io.sample_body),
    };
    if !frames::offer(&st.frames, sample) {
        st.metrics.samples_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a request's body is.
enum Body {
    /// In the connection buffer, at this range (relative to the request's start).
    InBuf(Range<usize>),
    /// Decoded from chunked encoding into `Conn::decoded`.
    Decoded,
}

struct Request {
    head: RequestHead,
    body: Body,
    /// Bytes of the connection buffer this request took (head and raw body).
    total: usize,
}

/// Why a connection's input could not be read as a request: the client gets this, then the close.
struct Refusal(u16, &'static str);

impl From<HeadError> for Refusal {
    fn from(e: HeadError) -> Refusal {
        Refusal(400, e.message())
    }
}

pub struct Conn<'s> {
    st: &'s State,
    io: Io,
    buf: Buf,
    decoded: Vec<u8>,
    dropped: Vec<Range<usize>>,
    table: (u64, Arc<Table>),
}

const SERVER_METADATA: &[u8] = br#"{"name":"mlops-gateway","version":"1","extensions":["binary_tensor_data"]}"#;
const PROMETHEUS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl<'s> Conn<'s> {
    pub fn new(st: &'s State, sock: TcpStream, seed: u64) -> Conn<'s> {
        Conn {
            st,
            io: Io {
                sock,
                ubuf: Buf::new(),
                fwd: Vec::with_capacity(1024),
                out: Vec::with_capacity(1024),
                meta: Vec::new(),
                tried: Vec::new(),
                sample_head: Vec::new(),
                sample_body: Vec::new(),
                rng: seed | 1,
            },
            buf: Buf::new(),
            decoded: Vec::new(),
            dropped: Vec::new(),
            table: (u64::MAX, Arc::new(Table::empty())),
        }
    }

    pub fn run(mut self) {
        loop {
            match self.read_request() {
                Ok(Some(req)) => {
                    let keep = self.handle(&req);
                    self.buf.consume(req.total);
                    if !keep {
                        self.close();
                        return;
                    }
                    self.buf.shrink();
                    self.io.ubuf.shrink();
                    if self.decoded.capacity() > 4 * BUF {
                        self.decoded = Vec::new();
                    }
                }
                Ok(None) => return,
                Err(Refusal(status, message)) => {
                    // What follows cannot be trusted to be a request: answer, then close.
                    self.io.reply(Reply::CLOSE, status, "application/json", &http::error_body(message));
                    self.buf.clear();
                    self.close();
                    return;
                }
            }
        }
    }

    /// Ends the connection. Input still unread would make the kernel reset it, which can destroy the
    /// last response in flight: the write side is shut first and the rest read away (briefly).
    fn close(&mut self) {
        let sock = &self.io.sock;
        let _ = sock.shutdown(Shutdown::Write);
        let until = Instant::now() + Duration::from_secs(2);
        let mut sink = [0u8; 16 * 1024];
        let mut left: usize = 1 << 20;
        while left > 0 {
            let now = Instant::now();
            if now >= until || sock.set_read_timeout(Some((until - now).min(Duration::from_millis(500)))).is_err() {
                break;
            }
            match (&*sock).read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }

    fn fill(&mut self) -> Option<usize> {
        loop {
            match self.buf.fill(&self.io.sock) {
                Ok(0) => return None,
                Ok(n) => return Some(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    fn continue_100(&self, h: &RequestHead, sent: &mut bool) {
        if h.expect_continue && h.http11 && !*sent {
            *sent = true;
            let _ = (&self.io.sock).write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
    }

    /// The next whole request (head and body) in the buffer, reading as needed; None at the end.
    fn read_request(&mut self) -> Result<Option<Request>, Refusal> {
        // The usual head arrives whole in one read and is parsed in one pass. One that arrives in pieces
        // is looked for with an incremental search for its end first, so a client dribbling bytes does
        // not get its head parsed again from the start after every read.
        let mut scanned: Option<usize> = None;
        let head = loop {
            // Blank lines between requests are tolerated (some clients send a CRLF after a body).
            while self.buf.bytes().starts_with(b"\r\n") {
                self.buf.consume(2);
                scanned = None;
            }
            let b = self.buf.bytes();
            if !b.is_empty() {
                let whole = match scanned {
                    None => true,
                    Some(from) => http::find_head_end(b, from.saturating_sub(3)).is_some(),
                };
                if whole {
                    if let Some(h) = http::parse_request_head(b, &mut self.dropped)? {
                        if h.len > MAX_HEAD {
                            return Err(Refusal(431, "request head too large"));
                        }
                        break h;
                    }
                }
                if b.len() > MAX_HEAD {
                    return Err(Refusal(431, "request head too large"));
                }
                scanned = Some(b.len());
            }
            if self.fill().is_none() {
                return Ok(None);
            }
        };
        let head_len = head.len;
        let mut sent_continue = false;
        if head.chunked {
            self.decoded.clear();
            let mut decoder = Chunked::default();
            let mut pos = head_len;
            loop {
                let n = decoder
                    .feed(&self.buf.bytes()[pos..], Some(&mut self.decoded))
                    .map_err(|_| Refusal(400, "bad chunked body"))?;
                pos += n;
                if decoder.done() {
                    break;
                }
                self.continue_100(&head, &mut sent_continue);
                if self.fill().is_none() {
                    return Ok(None);
                }
            }
            return Ok(Some(Request { head, body: Body::Decoded, total: pos }));
        }
        let length = head.content_length.unwrap_or(0);
        let total = u64::try_from(head_len).unwrap_or(u64::MAX).saturating_add(length);
        while (self.buf.len() as u64) < total {
            self.continue_100(&head, &mut sent_continue);
            // Grown as the body arrives (not to a claimed length up front).
            let missing = total - self.buf.len() as u64;
            self.buf.room(missing.min(1 << 20) as usize);
            if self.fill().is_none() {
                return Ok(None);
            }
        }
        let total = total as usize;
        Ok(Some(Request { head, body: Body::InBuf(head_len..total), total }))
    }

    /// Serves one request; returns whether the connection stays open.
    fn handle(&mut self, req: &Request) -> bool {
        let st = self.st;
        let Conn { io, buf, decoded, dropped, table, .. } = self;
        let h = &req.head;
        let bytes = &buf.bytes()[..req.total];
        let method = &bytes[h.method.clone()];
        let url = &bytes[h.url.clone()];
        let (path, query) = match url.iter().position(|&c| c == b'?') {
            Some(q) => (&url[..q], Some(&url[q..])),
            None => (url, None),
        };
        let to = Reply { keep_alive: h.keep_alive, http11: h.http11, head: method == b"HEAD" };

        let Some(rest) = path.strip_prefix(b"/v2/models/") else {
            let (status, ctype, body): (u16, &str, Cow<[u8]>) = match path {
                b"/v2/health/ready" => {
                    (if st.ready.load(Ordering::Relaxed) { 200 } else { 503 }, "application/json", Cow::Borrowed(b""))
                }
                b"/v2/health/live" => (200, "application/json", Cow::Borrowed(b"")),
                b"/metrics" => (200, PROMETHEUS_TYPE, Cow::Owned(st.metrics.render(&st.nodes.counts()).into_bytes())),
                b"/v2" => (200, "application/json", Cow::Borrowed(SERVER_METADATA)),
                _ => (404, "application/json", Cow::Owned(http::error_body("not served by the gateway"))),
            };
            return io.reply(to, status, ctype, &body);
        };
        let (name, tail) = match rest.iter().position(|&c| c == b'/') {
            Some(p) => (&rest[..p], &rest[p + 1..]),
            None => (rest, &b""[..]),
        };
        st.refresh(table);
        let Some(model) = table.1.models.get(name) else {
            let msg = format!("unknown model '{}'", String::from_utf8_lossy(name));
            return io.reply(to, 404, "application/json", &http::error_body(&msg));
        };
        let kind = if tail == b"infer" || tail.ends_with(b"/infer") {
            Kind::Infer
        } else if tail.is_empty() {
            Kind::Meta
        } else {
            Kind::Other
        };
        if kind == Kind::Infer && method != b"POST" {
            return io.reply(to, 405, "application/json", &http::error_body("infer takes POST"));
        }
        let arm = if kind == Kind::Infer { model.pick(h.key.clone().map(|k| &bytes[k])) } else { &model.stable };
        let body: &[u8] = match &req.body {
            Body::InBuf(r) => &bytes[r.clone()],
            Body::Decoded => decoded,
        };

        // The forwarded head: the rewritten request line, then the client's header lines as they came
        // (one copy when none is dropped), then a Content-Length for a de-chunked body.
        let fwd = &mut io.fwd;
        fwd.clear();
        fwd.extend_from_slice(method);
        fwd.push(b' ');
        fwd.extend_from_slice(&arm.prefix);
        if !tail.is_empty() {
            fwd.push(b'/');
            fwd.extend_from_slice(tail);
        }
        if let Some(q) = query {
            fwd.extend_from_slice(q);
        }
        fwd.extend_from_slice(b" HTTP/1.1\r\n");
        let block = h.headers_start..h.len - 2;
        let mut at = block.start;
        for r in dropped.iter() {
            fwd.extend_from_slice(&bytes[at..r.start]);
            at = r.end;
        }
        fwd.extend_from_slice(&bytes[at..block.end]);
        if h.chunked {
            let _ = write!(fwd, "content-length: {}\r\n", body.len());
        }
        fwd.extend_from_slice(b"\r\n");

        let sampled = kind == Kind::Infer
            && (st.settings.sample_all
                || (st.settings.sample_below > 0 && io.next_random() < st.settings.sample_below));
        let ask = Ask { arm, model: &model.name, kind, to, body, sampled };
        exchange(st, io, &ask)
    }
}
