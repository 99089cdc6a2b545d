//! Routing state: tables (replaced whole), their models and arms, and the upstream nodes with their
//! idle connection pools and health, which outlive tables.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::control::{ArmSpec, CaptureSpec, TableSpec};
use crate::metrics::{ArmStats, Metrics, NodeCount};

/// zlib.crc32 (IEEE, reflected): request keys land in the same bucket on every gateway, Python's too.
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| t[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}

/// Monotonic ns since the process started, never 0 (0 in `down_until` means "in service").
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// A keep-alive connection to a node, with the read timeout its socket has now (so that a request
/// usually needs no setsockopt: see proxy::read_until).
pub struct UpConn {
    pub sock: TcpStream,
    pub timeout: Duration,
}

pub struct Node {
    pub addr: String,
    resolved: Option<SocketAddr>,
    idle: Mutex<Vec<UpConn>>,
    /// now_ns() until which the node is out; 0 while in service.
    down_until: AtomicU64,
    marked_down: AtomicU64,
}

impl Node {
    pub fn new(addr: &str) -> Node {
        Node {
            addr: addr.to_string(),
            resolved: addr.parse().ok(),
            idle: Mutex::new(Vec::new()),
            down_until: AtomicU64::new(0),
            marked_down: AtomicU64::new(0),
        }
    }

    /// The most recently pooled idle connection (LIFO: the warmest).
    pub fn pop_idle(&self) -> Option<UpConn> {
        crate::lock(&self.idle).pop()
    }

    pub fn put_idle(&self, c: UpConn, max: usize) {
        let mut idle = crate::lock(&self.idle);
        if idle.len() < max {
            idle.push(c);
        }
    }

    /// Takes the node out until `until` (now_ns scale); its idle connections are dropped.
    pub fn mark_down(&self, until: u64) {
        self.down_until.store(until, Relaxed);
        let idle = std::mem::take(&mut *crate::lock(&self.idle));
        drop(idle);
        self.marked_down.fetch_add(1, Relaxed);
    }

    /// A new connection, TCP_NODELAY, with the read and write timeouts set.
    pub fn connect(&self, connect_timeout: Duration, io_timeout: Duration) -> std::io::Result<UpConn> {
        let sock = match self.resolved {
            Some(a) => TcpStream::connect_timeout(&a, connect_timeout)?,
            None => {
                // A host name: resolved at each connect (rare: connections are pooled), every address tried.
                let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
                let mut found = None;
                for a in self.addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, connect_timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                found.ok_or(last)?
            }
        };
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(io_timeout))?;
        sock.set_write_timeout(Some(io_timeout))?;
        Ok(UpConn { sock, timeout: io_timeout })
    }
}

pub struct Arm {
    pub version: String,
    pub triton_model: String,
    /// "/v2/models/<triton model>": the forwarded path's start.
    pub prefix: Vec<u8>,
    /// "\r\nx-model-version: <version>": inserted after the relayed status line.
    pub version_header: Vec<u8>,
    pub nodes: Vec<Arc<Node>>,
    rr: AtomicUsize,
    pub stats: Arc<ArmStats>,
}

impl Arm {
    /// Next node (index) round robin, skipping `tried` and nodes taken out; when every untried node
    /// is out, the one out the longest (earliest back) is tried anyway. None: nothing untried is left.
    pub fn choose(&self, tried: &[usize]) -> Option<usize> {
        let n = self.nodes.len();
        let rr = self.rr.fetch_add(1, Relaxed).wrapping_add(1);
        if tried.is_empty() {
            // The usual case: the next node, in service (no clock read).
            let i = rr % n;
            if self.nodes[i].down_until.load(Relaxed) == 0 {
                return Some(i);
            }
        }
        let now = now_ns();
        let mut fallback: Option<(usize, u64)> = None;
        for k in 0..n {
            let i = (rr + k) % n;
            if tried.contains(&i) {
                continue;
            }
            let node = &self.nodes[i];
            let until = node.down_until.load(Relaxed);
            if until != 0 {
                if until > now {
                    if fallback.is_none_or(|(_, u)| until < u) {
                        fallback = Some((i, until));
                    }
                    continue;
                }
                let _ = node.down_until.compare_exchange(until, 0, Relaxed, Relaxed);
                // its time out is over
            }
            return Some(i);
        }
        fallback.map(|(i, _)| i)
    }
}

/// A probability as a threshold for a uniform random u64 (no float arithmetic on the request path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    below: u64,
    all: bool,
}

impl Rate {
    pub fn new(fraction: f64) -> Rate {
        Rate {
            below: if fraction <= 0.0 { 0 } else { (fraction * 18_446_744_073_709_551_616.0) as u64 },
            all: fraction >= 1.0,
        }
    }

    /// Whether an event of this probability happens; `random` (a uniform u64) is only drawn when the
    /// rate is neither 0 nor 1.
    pub fn hit(self, random: impl FnOnce() -> u64) -> bool {
        self.all || (self.below > 0 && random() < self.below)
    }
}

/// A model's own traffic capture (its table entry's `capture`), in place of the global --sample-rate:
/// every inference request is sampled while fewer than `floor_per_s` of the model's have been in this
/// second (of the data plane's monotonic clock), past that each with probability `fraction`.
pub struct Capture {
    floor_per_s: u64,
    fraction: Rate,
    /// The second counted (high 32 bits) and the requests taken by the floor in it (low 32 bits), in one
    /// word so that a new second and its first count are one compare-and-swap: no lock, no count lost to
    /// a race with the reset.
    window: AtomicU64,
}

impl Capture {
    pub fn new(spec: &CaptureSpec) -> Capture {
        Capture {
            floor_per_s: u64::from(spec.floor_per_s),
            fraction: Rate::new(spec.fraction),
            window: AtomicU64::new(0),
        }
    }

    /// Whether this request is sampled (a clock read only when there is a floor).
    pub fn take(&self, random: impl FnOnce() -> u64) -> bool {
        self.take_in(|| now_ns() / 1_000_000_000, random)
    }

    /// The same, `second` telling the time.
    fn take_in(&self, second: impl FnOnce() -> u64, random: impl FnOnce() -> u64) -> bool {
        (self.floor_per_s > 0 && self.within_floor(second())) || self.fraction.hit(random)
    }

    /// Counts a request into `second`'s floor; false when the floor of that second is full.
    fn within_floor(&self, second: u64) -> bool {
        let second = second & 0xffff_ffff; // 136 years of seconds
        let mut window = self.window.load(Relaxed);
        loop {
            let (counted, taken) = (window >> 32, window & 0xffff_ffff);
            // A thread that read the clock just before another moved the window on counts in the new second.
            let next = if second > counted {
                (second << 32) | 1
            } else if taken < self.floor_per_s {
                window + 1
            } else {
                return false;
            };
            match self.window.compare_exchange_weak(window, next, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(now) => window = now,
            }
        }
    }
}

pub struct Model {
    pub name: String,
    pub stable: Arm,
    pub canary: Option<Arm>,
    /// Canary weight, 0 when there is no canary.
    pub weight: u64,
    spread: AtomicU64,
    /// Mirrored after stable answered, never seen by a client (shadow.rs); shared with the shadow workers.
    pub shadow: Option<Arc<Arm>>,
    /// Percent of stable's requests mirrored, 0 when there is no shadow arm.
    pub shadow_share: u64,
    shadow_spread: AtomicU64,
    /// None: sampled at the global --sample-rate.
    pub capture: Option<Capture>,
}

impl Model {
    /// The arm of an inference request: by the request key's hash bucket (sticky, the same on every
    /// gateway) or, unkeyed, exactly `weight` of every 100 consecutive requests to the canary.
    pub fn pick(&self, key: Option<&[u8]>) -> &Arm {
        let Some(canary) = &self.canary else { return &self.stable };
        let w = self.weight;
        let to_canary = if w == 0 {
            false
        } else if w >= 100 {
            true
        } else if let Some(k) = key {
            u64::from(crc32(k)) % 100 < w
        } else {
            let n = self.spread.fetch_add(1, Relaxed);
            spread_to_canary(n, w)
        };
        if to_canary {
            canary
        } else {
            &self.stable
        }
    }
}

impl Model {
    /// The shadow arm when this request, answered by stable, is to be mirrored: exactly `shadow_share` of
    /// every 100 consecutive ones.
    pub fn mirror(&self) -> Option<&Arc<Arm>> {
        let shadow = self.shadow.as_ref()?;
        let n = self.shadow_spread.fetch_add(1, Relaxed);
        spread_to_canary(n, self.shadow_share).then_some(shadow)
    }
}

/// Whether request number `n` (0, 1, ...) goes to the canary at weight `w`: any 100 consecutive
/// numbers hold exactly `w` canary ones, evenly spaced.
pub fn spread_to_canary(n: u64, w: u64) -> bool {
    (n + 1) * w / 100 > n * w / 100
}

pub struct Table {
    pub models: HashMap<Box<[u8]>, Model>,
}

impl Table {
    pub fn empty() -> Table {
        Table { models: HashMap::new() }
    }
}

/// Nodes by "host:port", kept for the life of the process.
#[derive(Default)]
pub struct Nodes {
    by_addr: Mutex<HashMap<String, Arc<Node>>>,
}

impl Nodes {
    pub fn get(&self, addr: &str) -> Arc<Node> {
        let mut m = crate::lock(&self.by_addr);
        m.entry(addr.to_string()).or_insert_with(|| Arc::new(Node::new(addr))).clone()
    }

    pub fn counts(&self) -> Vec<NodeCount> {
        let m = crate::lock(&self.by_addr);
        m.values().map(|n| NodeCount { addr: n.addr.clone(), marked_down: n.marked_down.load(Relaxed) }).collect()
    }
}

fn build_arm(spec: &ArmSpec, nodes: &Nodes, stats: Arc<ArmStats>) -> Arm {
    Arm {
        version: spec.version.clone(),
        triton_model: spec.triton_model.clone(),
        prefix: format!("/v2/models/{}", spec.triton_model).into_bytes(),
        version_header: format!("\r\nx-model-version: {}", spec.version).into_bytes(),
        nodes: spec.nodes.iter().map(|a| nodes.get(a)).collect(),
        rr: AtomicUsize::new(0),
        stats,
    }
}

/// The runtime table of a validated spec (every model has its stable arm: ControlParser checked).
pub fn build_table(spec: &TableSpec, nodes: &Nodes, metrics: &Metrics) -> Table {
    let mut models = HashMap::with_capacity(spec.models.len());
    for m in &spec.models {
        let Some(stable) = &m.stable else { continue };
        let served = |a: &ArmSpec| build_arm(a, nodes, metrics.arm(&m.name, &a.version));
        let canary = m.canary.as_ref().map(served);
        let shadow = m.shadow.as_ref().map(|a| Arc::new(build_arm(a, nodes, metrics.shadow_arm(&m.name, &a.version))));
        let model = Model {
            name: m.name.clone(),
            stable: served(stable),
            weight: if canary.is_some() { u64::from(m.weight) } else { 0 },
            canary,
            spread: AtomicU64::new(0),
            shadow_share: if shadow.is_some() { u64::from(m.shadow_share) } else { 0 },
            shadow,
            shadow_spread: AtomicU64::new(0),
            capture: m.capture.as_ref().map(Capture::new),
        };
        models.insert(m.name.as_bytes().into(), model);
    }
    Table { models }
}

/// "echo=1 / 2 @ 10%, other=3" for the log.
pub fn describe(spec: &TableSpec) -> String {
    if spec.models.is_empty() {
        return "no models".into();
    }
    let parts: Vec<String> = spec
        .models
        .iter()
        .map(|m| {
            let stable = m.stable.as_ref().map_or("?", |a| a.version.as_str());
            let mut extra =
                m.shadow.as_ref().map_or(String::new(), |s| format!(" (shadow {} @ {}%)", s.version, m.shadow_share));
            if let Some(c) = &m.capture {
                extra += &format!(" (capture {}/s, then {})", c.floor_per_s, c.fraction);
            }
            match &m.canary {
                Some(c) => format!("{}={} / {} @ {}%{extra}", m.name, stable, c.version, m.weight),
                None => format!("{}={}{extra}", m.name, stable),
            }
        })
        .collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ModelSpec;

    #[test]
    fn crc32_is_zlibs() {
        // zlib.crc32(b"") == 0, zlib.crc32(b"123456789") == 0xCBF43926, zlib.crc32(b"user-1") == 2116437524
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414F_A339);
        assert_eq!(crc32(b"user-1"), 2_116_437_524);
        assert_eq!(crc32(b"user-17"), 1_880_864_953);
    }

    #[test]
    fn the_spread_is_exact_in_any_window_of_100() {
        for w in 0..=100u64 {
            let picks: Vec<bool> = (0..1000).map(|n| spread_to_canary(n, w)).collect();
            for start in [0usize, 1, 37, 899] {
                assert_eq!(picks[start..start + 100].iter().filter(|p| **p).count() as u64, w, "w={w} start={start}");
            }
        }
        // evenly spaced: at 50% they alternate
        assert_eq!(
            (0..6).map(|n| spread_to_canary(n, 50)).collect::<Vec<_>>(),
            [false, true, false, true, false, true]
        );
    }

    fn spec(weight: u32, nodes: &[&str]) -> TableSpec {
        let arm = |v: &str| ArmSpec {
            version: v.into(),
            triton_model: format!("m_v{v}"),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
        };
        TableSpec {
            version: 1,
            models: vec![ModelSpec {
                name: "m".into(),
                weight,
                stable: Some(arm("1")),
                canary: Some(arm("2")),
                shadow_share: 25,
                shadow: Some(arm("3")),
                capture: None,
            }],
        }
    }

    #[test]
    fn models_pick_arms_by_weight_and_key() {
        let (nodes, metrics) = (Nodes::default(), Metrics::default());
        let t = build_table(&spec(30, &["h:1"]), &nodes, &metrics);
        let m = &t.models[&b"m"[..]];
        let canary = (0..1000).filter(|_| m.pick(None).version == "2").count();
        assert_eq!(canary, 300);
        for i in 0..50 {
            let key = format!("user-{i}");
            let want = if crc32(key.as_bytes()) % 100 < 30 { "2" } else { "1" };
            assert_eq!(m.pick(Some(key.as_bytes())).version, want);
        }
        let t0 = build_table(&spec(0, &["h:1"]), &nodes, &metrics);
        assert!((0..10).all(|_| t0.models[&b"m"[..]].pick(Some(b"x")).version == "1"));
        let t100 = build_table(&spec(100, &["h:1"]), &nodes, &metrics);
        assert!((0..10).all(|_| t100.models[&b"m"[..]].pick(Some(b"x")).version == "2"));
        assert_eq!(t.models[&b"m"[..]].stable.prefix, b"/v2/models/m_v1");
        assert_eq!(t.models[&b"m"[..]].canary.as_ref().unwrap().version_header, b"\r\nx-model-version: 2");
        // a quarter of the requests mirrored, evenly spaced; the shadow arm's latencies are kept apart
        let mirrored: Vec<bool> = (0..400).map(|_| m.mirror().is_some()).collect();
        assert_eq!(mirrored.iter().filter(|x| **x).count(), 100);
        assert_eq!(&mirrored[..8], [false, false, false, true, false, false, false, true]);
        assert!(!Arc::ptr_eq(&m.shadow.as_ref().unwrap().stats, &metrics.arm("m", "3")));
        assert!(Arc::ptr_eq(&m.shadow.as_ref().unwrap().stats, &metrics.shadow_arm("m", "3")));
    }

    #[test]
    fn a_capture_takes_its_floor_in_each_second_then_its_fraction() {
        let c = Capture::new(&CaptureSpec { fraction: 0.25, floor_per_s: 10 });
        // Within the floor every request is taken, and no random number is drawn for it.
        assert!((0..10).all(|_| c.take_in(|| 7, || unreachable!())));
        // Past it, a quarter: of these four randoms only 0 is below a quarter of 2^64.
        let mut n = 0u64;
        let taken = (0..40)
            .filter(|_| {
                c.take_in(
                    || 7,
                    || {
                        n += 1;
                        (n % 4) << 62
                    },
                )
            })
            .count();
        assert_eq!(taken, 10);
        // A new second has its floor again; a clock read late, from the second before, counts in it.
        assert!((0..9).all(|_| c.take_in(|| 8, || u64::MAX)));
        assert!(c.take_in(|| 7, || u64::MAX));
        assert!(!c.take_in(|| 8, || u64::MAX));
        assert!((0..10).all(|_| c.take_in(|| 100, || u64::MAX)));
    }

    #[test]
    fn a_capture_at_fraction_0_takes_nothing_past_its_floor() {
        let c = Capture::new(&CaptureSpec { fraction: 0.0, floor_per_s: 3 });
        let taken: Vec<bool> = (0..100).map(|_| c.take_in(|| 1, || 0)).collect();
        assert_eq!(taken.iter().filter(|t| **t).count(), 3);
        assert!(taken[..3].iter().all(|t| *t));
        assert_eq!((0..100).filter(|_| c.take_in(|| 2, || 0)).count(), 3);
        // Without a floor either: nothing at all, with neither the clock nor a random number read.
        let none = Capture::new(&CaptureSpec { fraction: 0.0, floor_per_s: 0 });
        assert!((0..100).all(|_| !none.take_in(|| unreachable!(), || unreachable!())));
        let all = Capture::new(&CaptureSpec { fraction: 1.0, floor_per_s: 0 });
        assert!((0..100).all(|_| all.take_in(|| unreachable!(), || unreachable!())));
    }

    #[test]
    fn a_captures_floor_is_exact_under_concurrent_requests() {
        let c = Capture::new(&CaptureSpec { fraction: 0.0, floor_per_s: 1000 });
        let taken = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let n = (0..1000).filter(|_| c.take_in(|| 3, || 0)).count();
                    taken.fetch_add(n, Relaxed);
                });
            }
        });
        assert_eq!(taken.load(Relaxed), 1000);
    }

    #[test]
    fn models_without_a_capture_have_none_and_those_with_one_keep_it() {
        let (nodes, metrics) = (Nodes::default(), Metrics::default());
        let mut with = spec(0, &["h:1"]);
        with.models[0].capture = Some(CaptureSpec { fraction: 0.0, floor_per_s: 2 });
        let m = &build_table(&with, &nodes, &metrics).models[&b"m"[..]];
        let c = m.capture.as_ref().unwrap();
        assert_eq!((0..5).filter(|_| c.take_in(|| 1, || 0)).count(), 2);
        assert!(build_table(&spec(0, &["h:1"]), &nodes, &metrics).models[&b"m"[..]].capture.is_none());
    }

    #[test]
    fn nodes_outlive_tables_and_down_nodes_are_skipped() {
        let (nodes, metrics) = (Nodes::default(), Metrics::default());
        let t1 = build_table(&spec(0, &["a:1", "b:2", "c:3"]), &nodes, &metrics);
        let t2 = build_table(&spec(0, &["c:3"]), &nodes, &metrics);
        let arm = &t1.models[&b"m"[..]].stable;
        assert!(Arc::ptr_eq(&arm.nodes[2], &t2.models[&b"m"[..]].stable.nodes[0]));
        // round robin over all three
        let mut seen: Vec<usize> = (0..6).map(|_| arm.choose(&[]).unwrap()).collect();
        seen.sort();
        assert_eq!(seen, [0, 0, 1, 1, 2, 2]);
        arm.nodes[1].mark_down(now_ns() + 10_000_000_000);
        assert!((0..10).all(|_| arm.choose(&[]) != Some(1)));
        assert_eq!(arm.choose(&[0, 2]), Some(1)); // all untried nodes are out: tried anyway
        arm.nodes[0].mark_down(now_ns() + 20_000_000_000);
        assert_eq!(arm.choose(&[2]), Some(1)); // out the longest = back the soonest
        assert_eq!(arm.choose(&[0, 1, 2]), None);
        arm.nodes[2].mark_down(1); // a take-out already over
        assert_eq!(arm.choose(&[]), Some(2));
        let counts = nodes.counts();
        assert_eq!(counts.iter().map(|c| c.marked_down).sum::<u64>(), 3);
    }
}
