//! Frames to the control plane on the control connection: `<kind: 1 byte><len: u32 LE><payload>`.
//! 'H': hello, the connection is the control connection (payload: the data plane's process id in ASCII);
//! 'R': refused, another control plane is connected (payload: why), then the close. Those two are
//! written by the channel as it takes the connection; the rest by one thread: 'A': a table was applied
//! (payload: its version in ASCII), 'S': a traffic sample (payload: fields).

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use crate::channel::Channel;

/// Samples waiting for the control plane hold at most this many bytes together (and a larger one is
/// never taken): past it, samples are dropped, so a burst of large requests cannot pile up in memory.
pub const MAX_SAMPLE_BYTES: usize = 64 << 20;

/// Bytes of the samples queued now.
static QUEUED: AtomicUsize = AtomicUsize::new(0);

/// A sampled exchange, owned (the connection's buffers are reused by the next request).
#[derive(Default)]
pub struct Sample {
    pub model: String,
    pub version: String,
    pub triton_model: String,
    pub status: u16,
    pub latency_ns: u64,
    /// Unix time, in µs.
    pub ts_us: u64,
    pub request: Vec<u8>,
    pub request_head: Vec<u8>,
    pub response_head: Vec<u8>,
    pub response: Vec<u8>,
    /// A mirrored request: the shadow arm's answer to the same request (shadow.rs).
    pub shadow: Option<ShadowAnswer>,
}

/// The shadow arm's answer; status 0 when there was none (no node, lost, timed out).
#[derive(Default)]
pub struct ShadowAnswer {
    pub version: String,
    pub triton_model: String,
    pub status: u16,
    pub latency_ns: u64,
    pub response: Vec<u8>,
}

impl Sample {
    pub fn bytes(&self) -> usize {
        self.request.len()
            + self.request_head.len()
            + self.response_head.len()
            + self.response.len()
            + self.shadow.as_ref().map_or(0, |s| s.response.len())
    }
}

pub enum Frame {
    Hello(u32),
    Refused(String),
    /// A table version applied for the control connection of this number (for it only: a table sent
    /// by a connection that has ended is acknowledged to nobody).
    Applied(u64, u64),
    Sample(Box<Sample>),
}

fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// Appends one frame to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 5]);
    let kind = match frame {
        Frame::Hello(pid) => {
            out.extend_from_slice(pid.to_string().as_bytes());
            b'H'
        }
        Frame::Refused(why) => {
            out.extend_from_slice(why.as_bytes());
            b'R'
        }
        Frame::Applied(_, v) => {
            out.extend_from_slice(v.to_string().as_bytes());
            b'A'
        }
        Frame::Sample(s) => {
            field(out, "model", s.model.as_bytes());
            field(out, "version", s.version.as_bytes());
            field(out, "triton_model", s.triton_model.as_bytes());
            field(out, "status", s.status.to_string().as_bytes());
            field(out, "latency_ms", format!("{:.3}", s.latency_ns as f64 / 1e6).as_bytes());
            field(out, "ts", format!("{}.{:06}", s.ts_us / 1_000_000, s.ts_us % 1_000_000).as_bytes());
            field(out, "request", &s.request);
            field(out, "request_head", &s.request_head);
            field(out, "response_head", &s.response_head);
            field(out, "response", &s.response);
            if let Some(sh) = &s.shadow {
                field(out, "shadow_version", sh.version.as_bytes());
                field(out, "shadow_triton_model", sh.triton_model.as_bytes());
                field(out, "shadow_status", sh.status.to_string().as_bytes());
                field(out, "shadow_latency_ms", format!("{:.3}", sh.latency_ns as f64 / 1e6).as_bytes());
                field(out, "shadow_response", &sh.response);
            }
            b'S'
        }
    };
    let len = (out.len() - start - 5) as u32;
    out[start] = kind;
    out[start + 1..start + 5].copy_from_slice(&len.to_le_bytes());
}

/// One frame's bytes.
pub fn encoded(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut out);
    out
}

/// Offers a sample without waiting: false when the queue is full, in frames or in bytes (the caller
/// counts the drop).
pub fn offer(tx: &SyncSender<Frame>, s: Sample) -> bool {
    let n = s.bytes();
    if QUEUED.fetch_add(n, Ordering::Relaxed) + n > MAX_SAMPLE_BYTES {
        QUEUED.fetch_sub(n, Ordering::Relaxed);
        return false;
    }
    match tx.try_send(Frame::Sample(Box::new(s))) {
        Err(TrySendError::Full(_)) => {
            QUEUED.fetch_sub(n, Ordering::Relaxed);
            false
        }
        _ => true,
    }
}

/// A frame taken off the queue: its bytes no longer count.
fn dequeued(f: &Frame) {
    if let Frame::Sample(s) = f {
        QUEUED.fetch_sub(s.bytes(), Ordering::Relaxed);
    }
}

/// The writer thread's loop: every frame waiting is written, then one flush per batch, to the control
/// connection of the moment; with none (or one that stopped reading), samples are dropped and counted
/// in `dropped`.
pub fn write_frames(rx: Receiver<Frame>, channel: &Channel, dropped: &AtomicU64) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut sink = (0, None);
    while let Ok(first) = rx.recv() {
        channel.refresh_sink(&mut sink);
        buf.clear();
        let (mut lost, mut carried) = (0, 0);
        let mut add = |f: Frame, buf: &mut Vec<u8>| {
            dequeued(&f);
            match f {
                Frame::Sample(_) if sink.1.is_none() => lost += 1,
                Frame::Applied(conn, _) if sink.1.is_none() || conn != sink.0 => {}
                f => {
                    carried += u64::from(matches!(f, Frame::Sample(_)));
                    encode(&f, buf)
                }
            }
        };
        add(first, &mut buf);
        while buf.len() < 4 << 20 {
            match rx.try_recv() {
                Ok(f) => add(f, &mut buf),
                Err(_) => break,
            }
        }
        if let Some(s) = sink.1.as_mut() {
            // A control plane that stopped reading is gone (its reader sees the end): frames are dropped
            // until another connects rather than blocking anyone.
            if !buf.is_empty() && (s.write_all(&buf).is_err() || s.flush().is_err()) {
                let _ = s.shutdown(std::net::Shutdown::Both);
                sink.1 = None;
                lost += carried;
            }
        }
        dropped.fetch_add(lost, Ordering::Relaxed);
        if buf.capacity() > 8 << 20 {
            buf = Vec::with_capacity(64 * 1024); // a large sample's memory goes back
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_kind_length_payload() {
        let mut out = Vec::new();
        encode(&Frame::Applied(1, 42), &mut out);
        assert_eq!(out, b"A\x02\x00\x00\x0042");
        assert_eq!(encoded(&Frame::Hello(7)), b"H\x01\x00\x00\x007");
        assert_eq!(encoded(&Frame::Refused("busy".into())), b"R\x04\x00\x00\x00busy");
        out.clear();
        let s = Sample {
            model: "echo".into(),
            version: "2".into(),
            triton_model: "echo_v2".into(),
            status: 200,
            latency_ns: 1_234_567,
            ts_us: 1_700_000_000_000_042,
            request: b"body".to_vec(),
            request_head: b"POST / HTTP/1.1\r\n\r\n".to_vec(),
            response_head: b"HTTP/1.1 200 OK".to_vec(),
            response: vec![],
            shadow: None,
        };
        encode(&Frame::Sample(Box::new(s)), &mut out);
        assert_eq!(out[0], b'S');
        assert_eq!(u32::from_le_bytes(out[1..5].try_into().unwrap()) as usize, out.len() - 5);
        let mut fields = Vec::new();
        let mut p = &out[5..];
        while !p.is_empty() {
            let n = u16::from_le_bytes([p[0], p[1]]) as usize;
            let name = String::from_utf8(p[2..2 + n].to_vec()).unwrap();
            p = &p[2 + n..];
            let m = u32::from_le_bytes(p[..4].try_into().unwrap()) as usize;
            fields.push((name, p[4..4 + m].to_vec()));
            p = &p[4 + m..];
        }
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "model",
                "version",
                "triton_model",
                "status",
                "latency_ms",
                "ts",
                "request",
                "request_head",
                "response_head",
                "response"
            ]
        );
        assert_eq!(fields[3].1, b"200");
        assert_eq!(fields[4].1, b"1.235");
        assert_eq!(fields[5].1, b"1700000000.000042");
        assert_eq!(fields[7].1, b"POST / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn a_full_queue_drops_samples() {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        assert!(offer(&tx, Sample::default()));
        assert!(!offer(&tx, Sample::default()));
        drop(rx);
    }
}
