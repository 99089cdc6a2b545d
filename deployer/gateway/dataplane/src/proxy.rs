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
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::control::TableSpec;
use crate::frames::{self, Frame, Sample};
use crate::http::{self, ChunkError, Chunked, HeadError, Reply, RequestHead, MAX_HEAD};
use crate::metrics::{Metrics, Reason};
use crate::routes::{self, Call, Local, Route};
use crate::routing::{self, now_ns, Arm, Nodes, Rate, Table, UpConn};

/// Largest request body taken by default (--max-body-bytes): a Triton infer request of a few large tensors.
pub const DEFAULT_MAX_BODY: u64 = 64 << 20;
/// Longest a request's head and body may take to arrive by default (--request-deadline-ms).
pub const DEFAULT_REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Request body bytes buffered at once, all connections together, by default (--body-buffer-bytes).
pub const DEFAULT_BODY_BUFFER: usize = 512 << 20;
/// Connections refused for being over --max-connections that are lingered over at once (their request
/// read away so the 503 is not lost to a reset); past that, a refused connection is closed at once.
const MAX_LINGERING_REFUSALS: usize = 64;

pub struct Settings {
    pub read_timeout: Duration,
    pub connect_timeout: Duration,
    pub node_down: Duration,
    /// The share of inference requests sampled, for models without a capture of their own.
    pub sample: Rate,
    pub pool_max_idle: usize,
    pub max_connections: usize,
    /// A client connection silent this long is closed.
    pub client_idle: Duration,
    /// The 504 message, made once ("no response from the model server within 30s").
    pub timeout_message: String,
    /// A request whose body is longer gets a 413 (before its body is read).
    pub max_body: u64,
    /// A request whose head and body have not all arrived this long after its first byte gets a 408.
    pub request_deadline: Duration,
    /// Request bodies past a connection's own buffer are held in memory up to this many bytes, all
    /// connections together (see Budget).
    pub body_buffer: usize,
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
            sample: Rate::new(sample_rate),
            pool_max_idle,
            max_connections,
            client_idle,
            max_body: DEFAULT_MAX_BODY,
            request_deadline: DEFAULT_REQUEST_DEADLINE,
            body_buffer: DEFAULT_BODY_BUFFER,
        }
    }
}

/// The memory request bodies may take past the connections' own buffers, shared by all connections:
/// with it, the data plane's memory is bounded by --max-connections times a connection's buffers, plus
/// this, whatever the clients send.
pub struct Budget {
    left: Mutex<usize>,
    freed: Condvar,
}

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        Budget { left: Mutex::new(bytes), freed: Condvar::new() }
    }

    /// Takes `n` bytes; if they are not free, waits for other connections to give some back, until
    /// `until` (None: no wait). False if they could not be had.
    fn take(&self, n: usize, until: Option<Instant>) -> bool {
        let mut left = crate::lock(&self.left);
        loop {
            if *left >= n {
                *left -= n;
                return true;
            }
            let Some(until) = until else { return false };
            let now = Instant::now();
            if now >= until {
                return false;
            }
            left = self.freed.wait_timeout(left, until - now).map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    fn give(&self, n: usize) {
        if n > 0 {
            *crate::lock(&self.left) += n;
            self.freed.notify_all();
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
    pub budget: Budget,
    /// The shadow workers' queue (shadow.rs), once they run.
    pub shadow: std::sync::OnceLock<SyncSender<crate::shadow::Job>>,
    /// Refused connections being lingered over (MAX_LINGERING_REFUSALS).
    lingering: AtomicUsize,
}

impl State {
    pub fn new(settings: Settings, frames: SyncSender<Frame>) -> State {
        State {
            budget: Budget::new(settings.body_buffer),
            lingering: AtomicUsize::new(0),
            settings,
            table: RwLock::new(Arc::new(Table::empty())),
            generation: AtomicU64::new(0),
            nodes: Nodes::default(),
            metrics: Metrics::default(),
            ready: AtomicBool::new(false),
            frames,
            connections: AtomicUsize::new(0),
            shadow: std::sync::OnceLock::new(),
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

    /// At least `want` bytes of room after the data: moved to the front, then grown (doubling, but not
    /// past `max` bytes in all unless `want` needs it).
    fn room(&mut self, want: usize, max: usize) {
        if self.data.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.data.len() - self.end < want {
            let size = (self.data.len() * 2).max(self.end + want).min(max.max(self.end + want));
            self.data.resize(size, 0);
        }
    }

    fn fill(&mut self, r: impl Read) -> io::Result<usize> {
        self.fill_within(r, 4096, usize::MAX)
    }

    /// One read, after making room for `want` bytes without growing past `max` bytes.
    fn fill_within(&mut self, mut r: impl Read, want: usize, max: usize) -> io::Result<usize> {
        self.room(want, max);
        let n = r.read(&mut self.data[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Bytes allocated.
    fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Drops the `n` bytes `at` bytes into the data, closing the gap.
    fn cut(&mut self, at: usize, n: usize) {
        let a = self.start + at;
        self.data.copy_within(a + n..self.end, a);
        self.end -= n;
    }

    /// Back to the usual size once a large body has gone (an idle connection keeps little, and a
    /// request body's memory goes back to the budget).
    fn shrink(&mut self) {
        if self.data.len() > BUF && self.len() <= BUF {
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
    /// The shadow arm this request is copied to once stable answered (it is sampled then too).
    mirror: Option<&'a Arc<Arm>>,
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
    /// A piece of response body as the client or the sample gets it (decoded from chunked encoding).
    piece: Vec<u8>,
    tried: Vec<usize>,
    sample_head: Vec<u8>,
    sample_body: Vec<u8>,
    /// The sampled response grew past what the sample queue takes: the sample is dropped.
    sample_overflow: bool,
    rng: u64,
}

impl Io {
    /// Writes a response the gateway makes itself; returns whether the connection stays open.
    fn reply(&mut self, to: Reply, status: u16, content_type: &str, body: &[u8]) -> bool {
        self.reply_with(to, status, content_type, b"", body)
    }

    /// The same, with `extra` header lines ("\r\nname: value" each).
    fn reply_with(&mut self, to: Reply, status: u16, content_type: &str, extra: &[u8], body: &[u8]) -> bool {
        http::local_response_with(&mut self.out, to, status, content_type, extra, body);
        (&self.sock).write_all(&self.out).is_ok() && to.keep_alive
    }

    /// A JSON error the gateway makes itself.
    fn error(&mut self, to: Reply, status: u16, message: &str) -> bool {
        self.reply(to, status, "application/json", &http::error_body(message))
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

    /// Adds `io.piece` to the sampled response, unless the sample outgrows what the queue takes.
    fn keep_sample_piece(&mut self) {
        if self.sample_overflow {
            return;
        }
        if self.sample_body.len() + self.piece.len() > frames::MAX_SAMPLE_BYTES {
            self.sample_overflow = true;
            self.sample_body = Vec::new();
            return;
        }
        self.sample_body.extend_from_slice(&self.piece);
    }
}

enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl Framing {
    /// How many bytes of `avail` belong to the body, and whether it is complete with them. The body's
    /// bytes, decoded if chunked, are appended to `decoded` if given.
    fn take(&mut self, avail: &[u8], decoded: Option<&mut Vec<u8>>) -> Result<(usize, bool), ChunkError> {
        let (t, done) = match self {
            Framing::Empty => return Ok((0, true)),
            Framing::Length(n) => {
                let t = (*n).min(avail.len() as u64);
                *n -= t;
                (t as usize, *n == 0)
            }
            Framing::Chunked(c) => {
                let t = c.feed(avail, decoded)?;
                return Ok((t, c.done()));
            }
            Framing::UntilClose => (avail.len(), false),
        };
        if let Some(d) = decoded {
            d.extend_from_slice(&avail[..t]);
        }
        Ok((t, done))
    }
}

/// Appends `head[from..]` to `out` less the `cut` ranges (in order, inside it).
fn copy_without(out: &mut Vec<u8>, head: &[u8], from: usize, cut: &[Range<usize>]) {
    let mut at = from;
    for r in cut {
        out.extend_from_slice(&head[at..r.start]);
        at = r.end;
    }
    out.extend_from_slice(&head[at..]);
}

/// A model metadata response larger than this is not buffered (Triton's are a few KB).
const MAX_METADATA: usize = 1 << 20;

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

    // An HTTP/1.0 client cannot read chunked encoding: it gets the body decoded, delimited by the close.
    let dechunk = rh.chunked && !a.to.http11;
    let dechunk_body = dechunk && matches!(framing, Framing::Chunked(_));
    let client_keep = a.to.keep_alive && !until_close && !dechunk_body;
    {
        let head = &io.ubuf.bytes()[..head_end - 4];
        let out = &mut io.out;
        out.clear();
        out.extend_from_slice(&head[..rh.status_line_end]);
        out.extend_from_slice(&arm.version_header);
        out.extend_from_slice(a.to.connection(client_keep));
        if dechunk {
            let mut cut: Vec<Range<usize>> = rh.strip.iter().chain(&rh.coding).cloned().collect();
            cut.sort_by_key(|r| r.start);
            copy_without(out, head, rh.status_line_end, &cut);
        } else {
            copy_without(out, head, rh.status_line_end, &rh.strip);
        }
        out.extend_from_slice(b"\r\n\r\n");
        if a.sampled {
            io.sample_head.clear();
            io.sample_head.extend_from_slice(head);
            io.sample_body.clear();
            io.sample_overflow = false;
        }
    }
    // The body as it comes, or decoded into io.piece where the client or the sample needs it so.
    let decode = dechunk_body || a.sampled;
    let avail = &io.ubuf.bytes()[head_end..];
    io.piece.clear();
    let Ok((take, mut done)) = framing.take(avail, decode.then_some(&mut io.piece)) else {
        return End::bad_response();
    };
    if take < avail.len() {
        reusable = false; // bytes past the response: that connection is out of step
    }
    let body = if dechunk_body { &io.piece[..] } else { &avail[..take] };
    if write_all_v(&io.sock, &io.out, body).is_err() {
        return End::Broken(None);
    }
    if a.sampled {
        io.keep_sample_piece();
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
        io.piece.clear();
        let Ok((take, d)) = framing.take(avail, decode.then_some(&mut io.piece)) else {
            return End::Broken(Some(Reason::UpstreamLost));
        };
        done = d;
        if take < avail.len() {
            reusable = false;
        }
        let body = if dechunk_body { &io.piece[..] } else { &avail[..take] };
        if (&io.sock).write_all(body).is_err() {
            return End::Broken(None);
        }
        if a.sampled {
            io.keep_sample_piece();
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
    loop {
        let avail = io.ubuf.bytes();
        let Ok((take, done)) = framing.take(avail, Some(&mut io.meta)) else {
            return End::bad_response();
        };
        if take < avail.len() {
            reusable = false;
        }
        if done {
            break;
        }
        if io.meta.len() > MAX_METADATA {
            return End::bad_response();
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
        End::Failed(status, _, message) => io.error(a.to, status, &message),
        End::Broken(_) => false,
    }
}

fn offer_sample(st: &State, io: &mut Io, a: &Ask, status: u16, took: u64) {
    a.arm.stats.samples.fetch_add(1, Ordering::Relaxed);
    if io.sample_overflow {
        let dropped = if a.mirror.is_some() { &st.metrics.shadow_dropped } else { &st.metrics.samples_dropped };
        dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
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
        shadow: None,
    };
    if let Some(arm) = a.mirror {
        // Copied to the shadow arm now that the client has its answer; the sample leaves with both answers.
        let job = crate::shadow::Job { arm: arm.clone(), stable_prefix_len: a.arm.prefix.len(), sample };
        if !st.shadow.get().is_some_and(|tx| crate::shadow::offer(tx, job)) {
            st.metrics.shadow_dropped.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
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
    /// Bytes of the connection buffer this request took (its head, and its body unless decoded).
    total: usize,
}

/// Why a connection's input could not be read as a request: the client gets this, then the close.
struct Refusal(u16, Cow<'static, str>);

impl From<HeadError> for Refusal {
    fn from(e: HeadError) -> Refusal {
        Refusal(400, e.message().into())
    }
}

impl Refusal {
    fn too_large(s: &Settings) -> Refusal {
        Refusal(413, format!("request body larger than the gateway's limit of {} bytes", s.max_body).into())
    }

    fn late(s: &Settings) -> Refusal {
        let secs = http::fmt_g(s.request_deadline.as_secs_f64());
        Refusal(408, format!("the request did not arrive whole within {secs}s").into())
    }

    fn busy() -> Refusal {
        Refusal(503, "the gateway is receiving too many request bodies at once; retry later".into())
    }
}

/// What a connection's buffers hold past their own size (BUF each): what it needs of the body budget.
fn over_own(buf_capacity: usize, decoded_capacity: usize) -> usize {
    buf_capacity.saturating_sub(BUF) + decoded_capacity.saturating_sub(BUF)
}

/// Ends a connection whose input may not all have been read. Input still unread would make the kernel
/// reset it, which can destroy the response in flight (or the client, still sending, never reads it):
/// the write side is shut first and what the client sends is read away, up to `max` bytes for `time`.
fn linger_close(sock: &TcpStream, time: Duration, max: usize) {
    let _ = sock.shutdown(Shutdown::Write);
    let until = Instant::now() + time;
    let mut sink = [0u8; 16 * 1024];
    let mut left = max;
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

/// Refuses a connection over --max-connections with a 503 the client gets to read: it is lingered
/// over on a small thread of its own, MAX_LINGERING_REFUSALS at a time (past that, closed at once).
pub fn refuse_connection(st: &'static State, sock: TcpStream) {
    let mut out = Vec::new();
    http::local_response(&mut out, Reply::CLOSE, 503, "application/json", &http::error_body("too many connections"));
    if st.lingering.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING_REFUSALS {
        st.lingering.fetch_sub(1, Ordering::Relaxed);
        let _ = (&sock).write_all(&out);
        return;
    }
    let spawned = std::thread::Builder::new().stack_size(64 * 1024).spawn(move || {
        let _ = sock.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = (&sock).write_all(&out);
        linger_close(&sock, Duration::from_secs(1), 1 << 20);
        st.lingering.fetch_sub(1, Ordering::Relaxed);
    });
    if spawned.is_err() {
        st.lingering.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Conn<'s> {
    st: &'s State,
    io: Io,
    buf: Buf,
    decoded: Vec<u8>,
    dropped: Vec<Range<usize>>,
    table: (u64, Arc<Table>),
    /// The client socket's read timeout as last set (Duration::MAX: not known).
    timeout: Duration,
    /// When the request being read must have arrived whole: set once it arrives in more than one read.
    deadline: Option<Instant>,
    /// Bytes of the body budget this connection holds.
    held: usize,
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        self.st.budget.give(self.held);
    }
}

const SERVER_METADATA: &[u8] = br#"{"name":"mlops-gateway","version":"1","extensions":["binary_tensor_data"]}"#;
const PROMETHEUS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A socket read timeout may fire this much early or late.
const SLACK: Duration = Duration::from_millis(1);

impl<'s> Conn<'s> {
    /// A connection whose socket has --client-idle-ms as its read timeout.
    pub fn new(st: &'s State, sock: TcpStream, seed: u64) -> Conn<'s> {
        Conn {
            st,
            io: Io {
                sock,
                ubuf: Buf::new(),
                fwd: Vec::with_capacity(1024),
                out: Vec::with_capacity(1024),
                meta: Vec::new(),
                piece: Vec::new(),
                tried: Vec::new(),
                sample_head: Vec::new(),
                sample_body: Vec::new(),
                sample_overflow: false,
                rng: seed | 1,
            },
            buf: Buf::new(),
            decoded: Vec::new(),
            dropped: Vec::new(),
            table: (u64::MAX, Arc::new(Table::empty())),
            timeout: st.settings.client_idle,
            deadline: None,
            held: 0,
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
                    if self.decoded.capacity() > BUF {
                        self.decoded = Vec::new();
                    }
                    if self.io.meta.capacity() > BUF {
                        self.io.meta = Vec::new();
                    }
                    self.settle();
                }
                Ok(None) => return,
                Err(Refusal(status, message)) => {
                    // What follows cannot be trusted to be a request: answer, then close.
                    self.io.error(Reply::CLOSE, status, &message);
                    self.buf.clear();
                    self.close();
                    return;
                }
            }
        }
    }

    fn close(&mut self) {
        linger_close(&self.io.sock, Duration::from_secs(2), 1 << 20);
    }

    /// Makes the budget this connection holds cover buffers of these capacities, waiting for it until
    /// `until` (None: not at all). False if it could not be had.
    fn hold(&mut self, buf_capacity: usize, decoded_capacity: usize, until: Option<Instant>) -> bool {
        let need = over_own(buf_capacity, decoded_capacity);
        if need <= self.held {
            return true;
        }
        if !self.st.budget.take(need - self.held, until) {
            return false;
        }
        self.held = need;
        true
    }

    /// Gives back the budget the buffers no longer need.
    fn settle(&mut self) {
        let need = over_own(self.buf.capacity(), self.decoded.capacity());
        if need < self.held {
            self.st.budget.give(self.held - need);
            self.held = need;
        }
    }

    /// Reads more of a request into the buffer (room made for `want` bytes, the buffer not grown past
    /// `max`). Ok(false): the client closed, failed or was silent for --client-idle-ms; a 408 refusal
    /// once the request has been arriving for longer than --request-deadline-ms.
    fn more(&mut self, want: usize, max: usize) -> Result<bool, Refusal> {
        let s = &self.st.settings;
        if self.deadline.is_none() && self.buf.len() > 0 {
            self.deadline = Some(Instant::now() + s.request_deadline);
        }
        loop {
            // The socket's timeout: the idle one, or what is left of the deadline when that is shorter.
            // Lowered only when it must be (it can fire a little early: then it is set again).
            let wait = match self.deadline {
                None => s.client_idle,
                Some(d) => {
                    let now = Instant::now();
                    if now + SLACK >= d {
                        return Err(Refusal::late(s));
                    }
                    (d - now).min(s.client_idle)
                }
            };
            if self.timeout > wait + SLACK || (self.deadline.is_none() && self.timeout != wait) {
                if self.io.sock.set_read_timeout(Some(wait)).is_err() {
                    return Ok(false);
                }
                self.timeout = wait;
            }
            match self.buf.fill_within(&self.io.sock, want, max) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if self.timeout >= s.client_idle {
                        return Ok(false); // silent for the idle time
                    }
                    self.timeout = Duration::MAX; // the deadline's share: checked at the top, set again
                }
                Err(_) => return Ok(false),
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
        self.deadline = None;
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
                            return Err(Refusal(431, "request head too large".into()));
                        }
                        break h;
                    }
                }
                if b.len() > MAX_HEAD {
                    return Err(Refusal(431, "request head too large".into()));
                }
                scanned = Some(b.len());
            }
            if !self.more(4096, usize::MAX)? {
                return Ok(None);
            }
        };
        let s = &self.st.settings;
        let head_len = head.len;
        let mut sent_continue = false;
        if head.chunked {
            self.decoded.clear();
            let mut decoder = Chunked::with_limit(s.max_body);
            loop {
                // Room for what the raw bytes can decode to, within the limit, before they are fed.
                let raw = self.buf.len() - head_len;
                let room = self.decoded.len() + raw.min(s.max_body as usize - self.decoded.len());
                if room > self.decoded.capacity() {
                    let capacity = room.max(2 * self.decoded.capacity()).min((s.max_body as usize).max(room));
                    if !self.hold(self.buf.capacity(), capacity, None) {
                        return Err(Refusal::busy());
                    }
                    self.decoded.reserve_exact(capacity - self.decoded.len());
                }
                let n = match decoder.feed(&self.buf.bytes()[head_len..], Some(&mut self.decoded)) {
                    Ok(n) => n,
                    Err(ChunkError::Bad) => return Err(Refusal(400, "bad chunked body".into())),
                    Err(ChunkError::TooLarge) => return Err(Refusal::too_large(&self.st.settings)),
                };
                // The raw bytes go as they are decoded: the buffer keeps the head and what is unread.
                self.buf.cut(head_len, n);
                if decoder.done() {
                    break;
                }
                self.continue_100(&head, &mut sent_continue);
                if !self.more(4096, usize::MAX)? {
                    return Ok(None);
                }
            }
            return Ok(Some(Request { head, body: Body::Decoded, total: head_len }));
        }
        let length = head.content_length.unwrap_or(0);
        if length > s.max_body {
            // Said before a byte of it is read (and, with Expect: 100-continue, before it is sent).
            return Err(Refusal::too_large(s));
        }
        let total = head_len + length as usize;
        if self.buf.len() < total && total > BUF {
            // Past the connection's own buffer, the body takes memory from the shared budget: waited
            // for (the body is not read meanwhile) until the request's deadline.
            let until = *self.deadline.get_or_insert_with(|| Instant::now() + s.request_deadline);
            if !self.hold(self.buf.capacity().max(total), self.decoded.capacity(), Some(until)) {
                return Err(Refusal::busy());
            }
        }
        while self.buf.len() < total {
            self.continue_100(&head, &mut sent_continue);
            // Grown as the body arrives (not to a claimed length up front), never past the body's end.
            let missing = total - self.buf.len();
            if !self.more(missing.min(1 << 20), total)? {
                return Ok(None);
            }
        }
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
        // After a method the gateway does not serve, the connection is closed.
        let keep_alive = h.keep_alive && routes::served_method(method);
        let to = Reply { keep_alive, http11: h.http11, head: method == b"HEAD" };

        let (name, tail, call) = match routes::route(path) {
            Route::NotFound => return io.error(to, 404, "not served by the gateway"),
            route if !route.allows(method) => {
                let allow = route.allow();
                let message = http::error_body(&format!("method not allowed: this route takes {allow}"));
                let extra = format!("\r\nallow: {allow}");
                return io.reply_with(to, 405, "application/json", extra.as_bytes(), &message);
            }
            Route::Local(local) => {
                let (status, ctype, body): (u16, &str, Cow<[u8]>) = match local {
                    Local::Ready => (
                        if st.ready.load(Ordering::Relaxed) { 200 } else { 503 },
                        "application/json",
                        Cow::Borrowed(b""),
                    ),
                    Local::Live => (200, "application/json", Cow::Borrowed(b"")),
                    Local::Metrics => {
                        (200, PROMETHEUS_TYPE, Cow::Owned(st.metrics.render(&st.nodes.counts()).into_bytes()))
                    }
                    Local::ServerMetadata => (200, "application/json", Cow::Borrowed(SERVER_METADATA)),
                };
                return io.reply(to, status, ctype, &body);
            }
            Route::Model { name, tail, call } => (name, tail, call),
        };
        st.refresh(table);
        let Some(model) = table.1.models.get(name) else {
            let msg = format!("unknown model '{}'", String::from_utf8_lossy(name));
            return io.error(to, 404, &msg);
        };
        let kind = match call {
            Call::Infer => Kind::Infer,
            Call::Metadata if tail.is_empty() => Kind::Meta,
            Call::Metadata | Call::Ready => Kind::Other,
        };
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
        copy_without(fwd, &bytes[..h.len - 2], h.headers_start, dropped);
        if h.chunked {
            let _ = write!(fwd, "content-length: {}\r\n", body.len());
        }
        fwd.extend_from_slice(b"\r\n");

        let mirror = if kind == Kind::Infer && std::ptr::eq(arm, &model.stable) { model.mirror() } else { None };
        // A mirrored request is always sampled (its sample carries both answers) and takes nothing from
        // the model's capture floor.
        let sampled = kind == Kind::Infer
            && (mirror.is_some()
                || match &model.capture {
                    Some(capture) => capture.take(|| io.next_random()),
                    None => st.settings.sample.hit(|| io.next_random()),
                });
        let ask = Ask { arm, model: &model.name, kind, to, body, sampled, mirror };
        exchange(st, io, &ask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_budget_is_shared_and_waited_for() {
        let b = Budget::new(100);
        assert!(b.take(60, None));
        assert!(!b.take(60, None));
        assert!(!b.take(60, Some(Instant::now() + Duration::from_millis(20))));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                b.give(60);
            });
            assert!(b.take(100, Some(Instant::now() + Duration::from_secs(10))));
        });
        assert!(!b.take(1, None));
    }

    #[test]
    fn framings_hand_over_the_body_decoded() {
        let mut out = Vec::new();
        let mut f = Framing::Chunked(Chunked::default());
        assert_eq!(f.take(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nNEXT", Some(&mut out)), Ok((20, true)));
        assert_eq!(out, b"abcde");
        out.clear();
        let mut f = Framing::Length(4);
        assert_eq!(f.take(b"abc", Some(&mut out)), Ok((3, false)));
        assert_eq!(f.take(b"dNEXT", Some(&mut out)), Ok((1, true)));
        assert_eq!(out, b"abcd");
        assert_eq!(Framing::Empty.take(b"x", Some(&mut out)), Ok((0, true)));
        assert_eq!(Framing::UntilClose.take(b"xy", None), Ok((2, false)));
    }

    #[test]
    fn a_buffer_grows_no_further_than_asked() {
        let mut b = Buf::new();
        b.room(200_000, 150_000);
        assert_eq!(b.capacity(), 200_000);
        let mut b = Buf::new();
        b.room(70_000, 100_000);
        assert_eq!(b.capacity(), 100_000); // doubling, up to the cap
        b.end = 5;
        b.data[..5].copy_from_slice(b"abcde");
        b.cut(1, 3);
        assert_eq!(b.bytes(), b"ae");
        b.shrink();
        assert_eq!(b.capacity(), BUF);
    }
}
