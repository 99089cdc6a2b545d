//! Prometheus figures of the gateway. The hot path only touches relaxed atomics on its arm's stats;
//! the text is built at scrape time, in prometheus_client's layout (sorted label names, float values).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Upper bounds of the latency buckets, in ns (the last bucket, +Inf, has none).
pub const BOUNDS_NS: [u64; 16] = [
    500_000,
    1_000_000,
    2_000_000,
    3_000_000,
    5_000_000,
    7_500_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
const LE: [&str; 17] = [
    "0.0005", "0.001", "0.002", "0.003", "0.005", "0.0075", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0",
    "2.5", "5.0", "10.0", "+Inf",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Upstream5xx = 0,
    Unavailable = 1,
    UpstreamLost = 2,
    UpstreamTimeout = 3,
}
const REASONS: [&str; 4] = ["upstream_5xx", "unavailable", "upstream_lost", "upstream_timeout"];

/// The figures of one (model, version); kept across routing tables.
#[derive(Default)]
pub struct ArmStats {
    buckets: [AtomicU64; 17],
    sum_ns: AtomicU64,
    pub in_flight: AtomicI64,
    errors: [AtomicU64; 4],
    pub retries: AtomicU64,
    /// Inference exchanges sampled (those dropped on the way to Redis included).
    pub samples: AtomicU64,
}

impl ArmStats {
    pub fn observe(&self, ns: u64) {
        let i = BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(16);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn error(&self, reason: Reason) {
        self.errors[reason as usize].fetch_add(1, Relaxed);
    }
}

#[derive(Default)]
pub struct Metrics {
    arms: Mutex<BTreeMap<(String, String), Arc<ArmStats>>>,
    /// Shadow arms' figures, in families of their own (gateway_shadow_*): never counted as served.
    shadow_arms: Mutex<BTreeMap<(String, String), Arc<ArmStats>>>,
    /// Mirrored requests dropped: the shadow queue was full.
    pub shadow_dropped: AtomicU64,
    pub samples_dropped: AtomicU64,
    pub routes_version: AtomicU64,
}

/// A node's take-out count, as the exposition reads it.
pub struct NodeCount {
    pub addr: String,
    pub marked_down: u64,
}

impl Metrics {
    /// The stats of (model, version), made on first use.
    pub fn arm(&self, model: &str, version: &str) -> Arc<ArmStats> {
        let mut arms = crate::lock(&self.arms);
        arms.entry((model.to_string(), version.to_string())).or_default().clone()
    }

    /// The whole exposition text (format 0.0.4).
    pub fn shadow_arm(&self, model: &str, version: &str) -> Arc<ArmStats> {
        let mut arms = crate::lock(&self.shadow_arms);
        arms.entry((model.to_string(), version.to_string())).or_default().clone()
    }

    /// The shadow families, only once a shadow arm has existed.
    fn render_shadow(&self, s: &mut String) {
        let arms: Vec<((String, String), Arc<ArmStats>)> = {
            let arms = crate::lock(&self.shadow_arms);
            arms.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        if arms.is_empty() {
            return;
        }
        family(
            s,
            "gateway_shadow_request_duration_seconds",
            "histogram",
            "Mirrored (shadow) request latency, from the copy's first byte sent to the shadow arm's last byte read",
        );
        histograms(s, "gateway_shadow_request_duration_seconds", &arms);
        family(
            s,
            "gateway_shadow_request_errors_total",
            "counter",
            "Mirrored (shadow) requests that failed, by reason (as gateway_request_errors_total)",
        );
        errors(s, "gateway_shadow_request_errors_total", &arms);
        family(s, "gateway_shadow_dropped_total", "counter", "Requests not mirrored: the shadow queue was full");
        let _ = writeln!(s, "gateway_shadow_dropped_total {}", int(self.shadow_dropped.load(Relaxed)));
    }

    pub fn render(&self, nodes: &[NodeCount]) -> String {
        let arms: Vec<((String, String), Arc<ArmStats>)> = {
            let arms = crate::lock(&self.arms);
            arms.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let mut s = String::with_capacity(4096 + arms.len() * 2048);
        family(&mut s, "gateway_request_duration_seconds", "histogram",
               "Inference request latency through the gateway, from the request's last byte read to the response's last byte relayed");
        histograms(&mut s, "gateway_request_duration_seconds", &arms);
        family(&mut s, "gateway_requests_in_flight", "gauge", "Inference requests being served");
        for ((model, version), a) in &arms {
            let _ = writeln!(
                s,
                "gateway_requests_in_flight{{model=\"{}\",version=\"{}\"}} {}.0",
                escape(model),
                escape(version),
                a.in_flight.load(Relaxed)
            );
        }
        family(&mut s, "gateway_request_errors_total", "counter",
               "Inference requests that failed, by reason: upstream_5xx (upstream status >= 500), unavailable (no node reachable), upstream_lost (the upstream connection ended mid-response), upstream_timeout (no complete response within the read timeout)");
        errors(&mut s, "gateway_request_errors_total", &arms);
        family(
            &mut s,
            "gateway_upstream_retries_total",
            "counter",
            "Requests sent again to another node after a connection failure",
        );
        for ((model, version), a) in &arms {
            let _ = writeln!(
                s,
                "gateway_upstream_retries_total{{model=\"{}\",version=\"{}\"}} {}",
                escape(model),
                escape(version),
                int(a.retries.load(Relaxed))
            );
        }
        family(&mut s, "gateway_node_marked_down_total", "counter", "Times a node was taken out after a failure");
        let mut nodes: Vec<&NodeCount> = nodes.iter().filter(|n| n.marked_down > 0).collect();
        nodes.sort_by(|a, b| a.addr.cmp(&b.addr));
        for n in nodes {
            let _ =
                writeln!(s, "gateway_node_marked_down_total{{node=\"{}\"}} {}", escape(&n.addr), int(n.marked_down));
        }
        family(
            &mut s,
            "gateway_samples_total",
            "counter",
            "Answered inference requests sampled (by the model's capture, else the sample rate; mirrored ones always), \
             those then dropped included",
        );
        for ((model, version), a) in &arms {
            let _ = writeln!(
                s,
                "gateway_samples_total{{model=\"{}\",version=\"{}\"}} {}",
                escape(model),
                escape(version),
                int(a.samples.load(Relaxed))
            );
        }
        family(
            &mut s,
            "gateway_samples_dropped_total",
            "counter",
            "Sampled requests dropped: the sampling queue was full, or no control plane was connected",
        );
        let _ = writeln!(s, "gateway_samples_dropped_total {}", int(self.samples_dropped.load(Relaxed)));
        family(&mut s, "gateway_routes_version", "gauge", "Version of the routing table in use");
        let _ = writeln!(s, "gateway_routes_version {}", int(self.routes_version.load(Relaxed)));
        self.render_shadow(&mut s);
        s
    }
}

/// A latency histogram per model and version.
fn histograms(s: &mut String, name: &str, arms: &[((String, String), Arc<ArmStats>)]) {
    for ((model, version), a) in arms {
        let (m, v) = (escape(model), escape(version));
        let mut total = 0u64;
        for (le, b) in LE.iter().zip(&a.buckets) {
            total += b.load(Relaxed);
            let _ = writeln!(s, "{name}_bucket{{le=\"{le}\",model=\"{m}\",version=\"{v}\"}} {}", int(total));
        }
        let _ = writeln!(s, "{name}_count{{model=\"{m}\",version=\"{v}\"}} {}", int(total));
        let sum = a.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(s, "{name}_sum{{model=\"{m}\",version=\"{v}\"}} {sum:?}");
    }
}

/// An error counter per model, version and reason.
fn errors(s: &mut String, name: &str, arms: &[((String, String), Arc<ArmStats>)]) {
    for ((model, version), a) in arms {
        // Like prometheus_client: a reason appears once it has happened.
        let mut by_reason: Vec<(&str, u64)> =
            REASONS.iter().zip(&a.errors).map(|(r, n)| (*r, n.load(Relaxed))).filter(|(_, n)| *n > 0).collect();
        by_reason.sort();
        for (reason, n) in by_reason {
            let (m, v) = (escape(model), escape(version));
            let _ = writeln!(s, "{name}{{model=\"{m}\",reason=\"{reason}\",version=\"{v}\"}} {}", int(n));
        }
    }
}

fn family(s: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A count as prometheus_client prints its float values ("3.0").
fn int(n: u64) -> String {
    format!("{n}.0")
}

/// A label value escaped for the text format.
pub fn escape(v: &str) -> String {
    if !v.contains(['\\', '"', '\n']) {
        return v.to_string();
    }
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_le_buckets() {
        let a = ArmStats::default();
        for ns in [500_000, 500_001, 1_200_000, 300_000_000, 20_000_000_000] {
            a.observe(ns);
        }
        let counts: Vec<u64> = a.buckets.iter().map(|b| b.load(Relaxed)).collect();
        assert_eq!(counts[0], 1); // 0.0005 is "le"
        assert_eq!(counts[1], 1);
        assert_eq!(counts[2], 1);
        assert_eq!(counts[11], 1); // 0.5
        assert_eq!(counts[16], 1); // +Inf
    }

    #[test]
    fn exposition_matches_prometheus_client() {
        let m = Metrics::default();
        let a = m.arm("echo", "1");
        a.observe(1_200_000);
        a.observe(300_000_000);
        a.error(Reason::UpstreamTimeout);
        a.error(Reason::Upstream5xx);
        a.samples.fetch_add(2, Relaxed);
        m.routes_version.store(3, Relaxed);
        let text = m.render(&[
            NodeCount { addr: "127.0.0.1:1".into(), marked_down: 1 },
            NodeCount { addr: "b:2".into(), marked_down: 0 },
        ]);
        let expected = "\
# HELP gateway_request_duration_seconds Inference request latency through the gateway, from the request's last byte read to the response's last byte relayed
# TYPE gateway_request_duration_seconds histogram
gateway_request_duration_seconds_bucket{le=\"0.0005\",model=\"echo\",version=\"1\"} 0.0
gateway_request_duration_seconds_bucket{le=\"0.001\",model=\"echo\",version=\"1\"} 0.0
gateway_request_duration_seconds_bucket{le=\"0.002\",model=\"echo\",version=\"1\"} 1.0
gateway_request_duration_seconds_bucket{le=\"0.003\",model=\"echo\",version=\"1\"} 1.0
gateway_request_duration_seconds_bucket{le=\"0.005\",model=\"echo\",version=\"1\"} 1.0
gateway_request_duration_seconds_bucket{le=\"0.0075\",model=\"echo\",version=\"1\"} 1.0
gateway_request_duration_seconds_bucket{le=\"0.01\",model=\"echo\",version=\"1\"} 1.0
gateway_request_duration_seconds_bucket{le=\"0.025\",model=\"echo\",version=\"1\"} 1.0
gateway_request_duration_seconds_bucket{le=\"0.05\",model=\"echo\",version=\"1\"} 1.0
gateway_request_duration_seconds_bucket{le=\"0.1\",model=\"echo\",version=\"1\"} 1.0
gateway_request_duration_seconds_bucket{le=\"0.25\",model=\"echo\",version=\"1\"} 1.0
gateway_request_duration_seconds_bucket{le=\"0.5\",model=\"echo\",version=\"1\"} 2.0
gateway_request_duration_seconds_bucket{le=\"1.0\",model=\"echo\",version=\"1\"} 2.0
gateway_request_duration_seconds_bucket{le=\"2.5\",model=\"echo\",version=\"1\"} 2.0
gateway_request_duration_seconds_bucket{le=\"5.0\",model=\"echo\",version=\"1\"} 2.0
gateway_request_duration_seconds_bucket{le=\"10.0\",model=\"echo\",version=\"1\"} 2.0
gateway_request_duration_seconds_bucket{le=\"+Inf\",model=\"echo\",version=\"1\"} 2.0
gateway_request_duration_seconds_count{model=\"echo\",version=\"1\"} 2.0
gateway_request_duration_seconds_sum{model=\"echo\",version=\"1\"} 0.3012
# HELP gateway_requests_in_flight Inference requests being served
# TYPE gateway_requests_in_flight gauge
gateway_requests_in_flight{model=\"echo\",version=\"1\"} 0.0
# HELP gateway_request_errors_total Inference requests that failed, by reason: upstream_5xx (upstream status >= 500), unavailable (no node reachable), upstream_lost (the upstream connection ended mid-response), upstream_timeout (no complete response within the read timeout)
# TYPE gateway_request_errors_total counter
gateway_request_errors_total{model=\"echo\",reason=\"upstream_5xx\",version=\"1\"} 1.0
gateway_request_errors_total{model=\"echo\",reason=\"upstream_timeout\",version=\"1\"} 1.0
# HELP gateway_upstream_retries_total Requests sent again to another node after a connection failure
# TYPE gateway_upstream_retries_total counter
gateway_upstream_retries_total{model=\"echo\",version=\"1\"} 0.0
# HELP gateway_node_marked_down_total Times a node was taken out after a failure
# TYPE gateway_node_marked_down_total counter
gateway_node_marked_down_total{node=\"127.0.0.1:1\"} 1.0
# HELP gateway_samples_total Answered inference requests sampled (by the model's capture, else the sample rate; mirrored ones always), those then dropped included
# TYPE gateway_samples_total counter
gateway_samples_total{model=\"echo\",version=\"1\"} 2.0
# HELP gateway_samples_dropped_total Sampled requests dropped: the sampling queue was full, or no control plane was connected
# TYPE gateway_samples_dropped_total counter
gateway_samples_dropped_total 0.0
# HELP gateway_routes_version Version of the routing table in use
# TYPE gateway_routes_version gauge
gateway_routes_version 3.0
";
        assert_eq!(text, expected);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape("plain"), "plain");
    }
}
