//! Shadow traffic: a copy of a request stable answered, sent to the model's shadow arm after the client has
//! its answer, by a few workers of their own (a client thread never waits on them: a copy that does not fit
//! in the bounded queue is dropped and counted in gateway_shadow_dropped_total). The shadow arm's latency
//! and errors go to families of their own (gateway_shadow_*), never to the served ones, and each copy comes
//! back as a sample holding both answers (frames::ShadowAnswer) for the comparison.
//!
//! A shadow failure never takes a node out: the node may serve stable too, and a candidate's failures are
//! what the comparison is for.

use std::io::{Read, Write};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::frames::{self, Sample, ShadowAnswer};
use crate::http::{self, Chunked, MAX_HEAD};
use crate::metrics::Reason;
use crate::proxy::State;
use crate::routing::{Arm, UpConn};

/// Copies waiting for a worker, at most.
pub const QUEUE: usize = 256;
/// Workers sending copies.
pub const WORKERS: usize = 2;

/// A copy to send: the sample of stable's exchange (its forwarded head starts with stable's path prefix).
pub struct Job {
    pub arm: Arc<Arm>,
    pub stable_prefix_len: usize,
    pub sample: Sample,
}

/// Queues a copy without waiting; false when the queue is full (the caller counts the drop).
pub fn offer(tx: &SyncSender<Job>, job: Job) -> bool {
    !matches!(tx.try_send(job), Err(TrySendError::Full(_) | TrySendError::Disconnected(_)))
}

/// A worker: sends copies until the queue's sender is gone.
pub fn work(st: &State, rx: &Mutex<Receiver<Job>>) {
    loop {
        let Ok(mut job) = crate::lock(rx).recv() else { return };
        let (status, took, response, failure) = send(st, &job);
        let stats = &job.arm.stats;
        stats.observe(took);
        match failure {
            Some(reason) => stats.error(reason),
            None if status >= 500 => stats.error(Reason::Upstream5xx),
            None => {}
        }
        job.sample.shadow = Some(ShadowAnswer {
            version: job.arm.version.clone(),
            triton_model: job.arm.triton_model.clone(),
            status,
            latency_ns: took,
            response,
        });
        if !frames::offer(&st.frames, job.sample) {
            st.metrics.samples_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The copy's head: stable's forwarded head with the shadow arm's path prefix.
fn head_for(job: &Job) -> Option<Vec<u8>> {
    let h = &job.sample.request_head;
    let space = h.iter().position(|&c| c == b' ')?;
    let rest = h.get(space + 1 + job.stable_prefix_len..)?;
    let mut out = Vec::with_capacity(h.len() + job.arm.prefix.len());
    out.extend_from_slice(&h[..=space]);
    out.extend_from_slice(&job.arm.prefix);
    out.extend_from_slice(rest);
    Some(out)
}

/// (status, ns taken, body, failure): status 0 with a failure when no answer came.
fn send(st: &State, job: &Job) -> (u16, u64, Vec<u8>, Option<Reason>) {
    let t0 = Instant::now();
    let s = &st.settings;
    let deadline = t0 + s.read_timeout;
    let arm = &job.arm;
    let Some(head) = head_for(job) else { return (0, 0, Vec::new(), Some(Reason::Unavailable)) };
    let mut tried: Vec<usize> = Vec::new();
    let mut failure = Reason::Unavailable;
    while let Some(i) = arm.choose(&tried) {
        tried.push(i);
        let node = &arm.nodes[i];
        // A pooled connection the node closed meanwhile: once more on a fresh one.
        for conn in [node.pop_idle(), None] {
            let mut conn = match conn {
                Some(c) => c,
                None => match node.connect(s.connect_timeout, s.read_timeout) {
                    Ok(c) => c,
                    Err(_) => break,
                },
            };
            let wrote = conn.sock.write_all(&head).and_then(|_| conn.sock.write_all(&job.sample.request));
            if wrote.is_err() {
                continue;
            }
            match read_response(&mut conn, deadline) {
                Ok((status, body, reusable)) => {
                    if reusable {
                        node.put_idle(conn, s.pool_max_idle);
                    }
                    return (status, t0.elapsed().as_nanos() as u64, body, None);
                }
                Err(Reason::UpstreamTimeout) => {
                    return (0, t0.elapsed().as_nanos() as u64, Vec::new(), Some(Reason::UpstreamTimeout))
                }
                Err(r) => failure = r,
            }
        }
    }
    (0, t0.elapsed().as_nanos() as u64, Vec::new(), Some(failure))
}

fn read_more(conn: &mut UpConn, into: &mut Vec<u8>, deadline: Instant) -> Result<(), Reason> {
    if Instant::now() >= deadline {
        return Err(Reason::UpstreamTimeout);
    }
    let mut tmp = [0u8; 16 * 1024];
    match conn.sock.read(&mut tmp) {
        Ok(0) => Err(Reason::UpstreamLost),
        Ok(n) => {
            into.extend_from_slice(&tmp[..n]);
            Ok(())
        }
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(Reason::UpstreamTimeout)
        }
        Err(_) => Err(Reason::UpstreamLost),
    }
}

/// One response, its body decoded: (status, body, whether the connection can be pooled again).
fn read_response(conn: &mut UpConn, deadline: Instant) -> Result<(u16, Vec<u8>, bool), Reason> {
    let mut buf = Vec::with_capacity(8 * 1024);
    let (rh, head_end) = loop {
        match http::parse_response_head(&buf) {
            Err(()) => return Err(Reason::UpstreamLost),
            Ok(Some((rh, e))) if (100..200).contains(&rh.status) => {
                buf.drain(..e);
                continue;
            }
            Ok(Some(found)) => break found,
            Ok(None) if buf.len() > MAX_HEAD => return Err(Reason::UpstreamLost),
            Ok(None) => read_more(conn, &mut buf, deadline)?,
        }
    };
    let mut rest = buf.split_off(head_end);
    let mut body = Vec::new();
    let too_large = |n: usize| n > frames::MAX_SAMPLE_BYTES;
    if rh.status == 204 || rh.status == 304 {
        return Ok((rh.status, body, !rh.closes && rest.is_empty()));
    }
    if rh.chunked {
        let mut c = Chunked::default();
        loop {
            let took = c.feed(&rest, Some(&mut body)).map_err(|_| Reason::UpstreamLost)?;
            if c.done() {
                return Ok((rh.status, body, !rh.closes && took == rest.len()));
            }
            if too_large(body.len()) {
                return Err(Reason::UpstreamLost);
            }
            rest.clear();
            read_more(conn, &mut rest, deadline)?;
        }
    }
    if let Some(n) = rh.content_length {
        let n = usize::try_from(n).map_err(|_| Reason::UpstreamLost)?;
        if too_large(n) {
            return Err(Reason::UpstreamLost);
        }
        while rest.len() < n {
            read_more(conn, &mut rest, deadline)?;
        }
        let reusable = !rh.closes && rest.len() == n;
        rest.truncate(n);
        return Ok((rh.status, rest, reusable));
    }
    loop {
        match read_more(conn, &mut rest, deadline) {
            Err(Reason::UpstreamLost) => return Ok((rh.status, rest, false)), // ended by the close
            Err(e) => return Err(e),
            Ok(()) if too_large(rest.len()) => return Err(Reason::UpstreamLost),
            Ok(()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ArmSpec;
    use crate::metrics::Metrics;
    use crate::routing::Nodes;

    #[test]
    fn a_copy_goes_to_the_shadow_arms_model_with_the_clients_headers() {
        let (nodes, metrics) = (Nodes::default(), Metrics::default());
        let spec = crate::control::TableSpec {
            version: 1,
            models: vec![crate::control::ModelSpec {
                name: "m".into(),
                weight: 0,
                stable: Some(ArmSpec { version: "1".into(), triton_model: "m_v1".into(), nodes: vec!["h:1".into()] }),
                canary: None,
                shadow_share: 100,
                shadow: Some(ArmSpec {
                    version: "2".into(),
                    triton_model: "m_v2_long".into(),
                    nodes: vec!["h:1".into()],
                }),
                capture: None,
            }],
        };
        let t = crate::routing::build_table(&spec, &nodes, &metrics);
        let m = &t.models[&b"m"[..]];
        let job = Job {
            arm: m.mirror().unwrap().clone(),
            stable_prefix_len: m.stable.prefix.len(),
            sample: Sample {
                request_head: b"POST /v2/models/m_v1/infer?x=1 HTTP/1.1\r\nhost: g\r\n\r\n".to_vec(),
                ..Default::default()
            },
        };
        assert_eq!(head_for(&job).unwrap(), b"POST /v2/models/m_v2_long/infer?x=1 HTTP/1.1\r\nhost: g\r\n\r\n");
    }
}
