//! The control channel: a Unix socket (mode 0600: only the platform's user steers the gateway) on which
//! one control plane at a time sends tables and `dropped`/`stop` lines (control.rs) and reads frames
//! (frames.rs). Every connection is first sent a frame: 'H' (hello, payload: this process's id) when it
//! becomes the control connection, or 'R' (refused, payload: why) followed by the close.
//!
//! A second control plane is refused while the first is connected, rather than replacing it: a
//! replaced one would see its connection end, take its data plane for dead, and exit or reconnect,
//! and two control planes started by mistake would take the gateway from each other in turn, each
//! applying its own table. A dead control plane never blocks its successor: the kernel closes a dead
//! process's socket (SIGKILL included) before its parent can see it exit, and a connection whose peer
//! has closed is replaced even if its reader has not got to the end yet.
//!
//! When the control connection ends, the data plane goes on serving the last table it applied and waits
//! for another; meanwhile samples are dropped and counted. What a connection sent is applied only while
//! it is the control connection: a table half sent by a dead control plane is never applied.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::control::{ControlParser, Event};
use crate::frames::{self, Frame};

/// What the channel drives: events of the control connection, and connections coming and going.
pub trait Controlled: Send + Sync {
    /// An event read from connection `conn` while it is the control connection (called one at a time).
    fn event(&self, conn: u64, ev: Event);
    /// Connection `conn` became the control connection (true) or stopped being it (false).
    fn linked(&self, conn: u64, up: bool);
}

pub struct Channel {
    path: PathBuf,
    /// The socket file this process made (device, inode): removed at exit only if it is still that one.
    file: (u64, u64),
    listener: UnixListener,
    /// The control connection (its number, the stream). Its events are handled with this held, so one
    /// that has been replaced or has ended handles nothing more.
    active: Mutex<Option<(u64, UnixStream)>>,
    /// The frame writer's handle on the control connection, apart so that it never waits for an event
    /// being handled (which may wait for the writer).
    sink: Mutex<Option<(u64, UnixStream)>>,
    /// The control connection's number, 0 when none.
    current: AtomicU64,
}

extern "C" {
    fn umask(mask: u32) -> u32;
    fn poll(fds: *mut PollFd, n: std::ffi::c_ulong, timeout_ms: i32) -> i32;
}

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}
const POLLHUP: i16 = 0x10;
const POLLERR: i16 = 0x8;
const POLLRDHUP: i16 = 0x2000;

/// Whether the peer of `s` has closed its end (a dead process's socket is closed as it dies).
fn hung_up(s: &UnixStream) -> bool {
    let mut p = PollFd { fd: s.as_raw_fd(), events: POLLRDHUP, revents: 0 };
    let n = unsafe { poll(&mut p, 1, 0) };
    n > 0 && p.revents & (POLLHUP | POLLRDHUP | POLLERR) != 0
}

fn error(kind: io::ErrorKind, what: String) -> io::Error {
    io::Error::new(kind, what)
}

/// The socket made with mode 0600 from the start (no moment when another user could connect). The umask
/// is the process's: called before other threads start, so no other file is made meanwhile.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let old = unsafe { umask(0o177) };
    let bound = UnixListener::bind(path);
    unsafe { umask(old) };
    bound
}

impl Channel {
    /// Listens at `path`. A socket file nobody listens on (its data plane died) is replaced; a live one,
    /// or a file that is not a socket, is an error.
    pub fn bind(path: &Path) -> io::Result<Channel> {
        let listener = match bind_private(path) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let shown = path.display();
                if !std::fs::symlink_metadata(path)?.file_type().is_socket() {
                    return Err(error(e.kind(), format!("{shown} exists and is not a socket")));
                }
                match UnixStream::connect(path) {
                    Ok(_) => return Err(error(e.kind(), format!("a data plane already listens on {shown}"))),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(e),
                }
                crate::log(format_args!("replacing the stale control socket {shown} (nobody listens on it)"));
                std::fs::remove_file(path)?;
                bind_private(path)?
            }
            bound => bound?,
        };
        let meta = std::fs::metadata(path)?;
        Ok(Channel {
            path: path.to_path_buf(),
            file: (meta.dev(), meta.ino()),
            listener,
            active: Mutex::new(None),
            sink: Mutex::new(None),
            current: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still the one this process made.
    pub fn remove_file(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    /// Takes connections for ever, each served by a thread of its own while it is the control connection.
    pub fn serve(&'static self, to: &'static dyn Controlled) {
        let mut number = 0;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    number += 1;
                    self.admit(number, stream, to);
                }
                // Out of descriptors and the like: wait rather than spin.
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }

    fn admit(&'static self, conn: u64, mut stream: UnixStream, to: &'static dyn Controlled) {
        let mut active = crate::lock(&self.active);
        if let Some((old, old_stream)) = active.as_ref() {
            let old = *old;
            if !hung_up(old_stream) {
                drop(active);
                crate::log(format_args!("control connection {conn} refused: control connection {old} is live"));
                let why = format!("another control plane is connected (connection {old})");
                let _ = stream.write_all(&frames::encoded(&Frame::Refused(why)));
                return;
            }
            self.unlink(&mut active, old, to);
        }
        let streams = (stream.try_clone(), stream.try_clone());
        let hello = frames::encoded(&Frame::Hello(std::process::id()));
        let (Ok(reader), Ok(sink)) = streams else { return };
        if stream.write_all(&hello).is_err() {
            return;
        }
        *active = Some((conn, stream));
        *crate::lock(&self.sink) = Some((conn, sink));
        self.current.store(conn, Ordering::Release);
        to.linked(conn, true);
        drop(active);
        let spawned =
            std::thread::Builder::new().name(format!("control-{conn}")).spawn(move || self.read(conn, reader, to));
        if spawned.is_err() {
            let mut active = crate::lock(&self.active);
            self.unlink(&mut active, conn, to);
        }
    }

    /// Connection `conn` is no longer the control connection (if it was).
    fn unlink(&self, active: &mut Option<(u64, UnixStream)>, conn: u64, to: &dyn Controlled) {
        if matches!(active, Some((a, _)) if *a == conn) {
            if let Some((_, s)) = active.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            let _ = self.current.compare_exchange(conn, 0, Ordering::AcqRel, Ordering::Relaxed);
            let mut sink = crate::lock(&self.sink);
            if matches!(*sink, Some((s, _)) if s == conn) {
                *sink = None;
            }
            to.linked(conn, false);
        }
    }

    fn read(&self, conn: u64, stream: UnixStream, to: &dyn Controlled) {
        // Unlinked however this ends, a panic included: a connection nobody reads never holds the gateway.
        struct Unlink<'a>(&'a Channel, u64, &'a dyn Controlled);
        impl Drop for Unlink<'_> {
            fn drop(&mut self) {
                let mut active = crate::lock(&self.0.active);
                self.0.unlink(&mut active, self.1, self.2);
            }
        }
        let _unlink = Unlink(self, conn, to);
        let mut input = BufReader::new(stream);
        let mut parser = ControlParser::default();
        let mut line = Vec::new();
        loop {
            line.clear();
            if !matches!(input.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                return;
            }
            let ev = parser.line(String::from_utf8_lossy(&line).trim_end_matches('\n'));
            let active = crate::lock(&self.active);
            if !matches!(*active, Some((a, _)) if a == conn) {
                return;
            }
            if ev != Event::None {
                to.event(conn, ev);
            }
        }
    }

    /// The frame writer's stream for the control connection: `cached` is (its number, the stream), or
    /// None when there is no control connection or writing to it failed.
    pub fn refresh_sink(&self, cached: &mut (u64, Option<UnixStream>)) {
        let now = self.current.load(Ordering::Acquire);
        if now != cached.0 {
            *cached = match crate::lock(&self.sink).take() {
                Some((conn, s)) if conn == now => (conn, Some(s)),
                _ => (now, None),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::TableSpec;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<String>>,
    }

    impl Controlled for Recorder {
        fn event(&self, conn: u64, ev: Event) {
            let what = match ev {
                Event::Apply(TableSpec { version, .. }) => format!("{conn} apply {version}"),
                Event::SamplesDropped(n) => format!("{conn} dropped {n}"),
                Event::Stop => format!("{conn} stop"),
                other => format!("{conn} {other:?}"),
            };
            crate::lock(&self.seen).push(what);
        }
        fn linked(&self, conn: u64, up: bool) {
            crate::lock(&self.seen).push(format!("{conn} {}", if up { "up" } else { "down" }));
        }
    }

    impl Recorder {
        fn wait_for(&self, what: &str) {
            let until = Instant::now() + Duration::from_secs(10);
            while !crate::lock(&self.seen).iter().any(|s| s == what) {
                assert!(Instant::now() < until, "{what} not seen in {:?}", crate::lock(&self.seen));
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        fn seen(&self) -> Vec<String> {
            crate::lock(&self.seen).clone()
        }
    }

    /// Held by the tests while they make files: binding changes the process's umask for a moment.
    static FILES: Mutex<()> = Mutex::new(());

    fn temp_path(name: &str) -> PathBuf {
        let _files = crate::lock(&FILES);
        let dir = std::env::temp_dir().join(format!("dataplane-channel-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("control.sock")
    }

    fn bind(path: &Path) -> io::Result<Channel> {
        let _files = crate::lock(&FILES);
        Channel::bind(path)
    }

    /// A channel serving a recorder, both for the rest of the test run.
    fn served(name: &str) -> (&'static Channel, &'static Recorder) {
        let channel: &'static Channel = Box::leak(Box::new(bind(&temp_path(name)).unwrap()));
        let recorder: &'static Recorder = Box::leak(Box::default());
        std::thread::spawn(move || channel.serve(recorder));
        (channel, recorder)
    }

    /// (kind, payload) of the next frame.
    fn frame(s: &mut UnixStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).unwrap();
        let mut payload = vec![0; u32::from_le_bytes(head[1..].try_into().unwrap()) as usize];
        s.read_exact(&mut payload).unwrap();
        (head[0], payload)
    }

    fn hello(channel: &Channel) -> UnixStream {
        let mut s = UnixStream::connect(channel.path()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(frame(&mut s), (b'H', std::process::id().to_string().into_bytes()));
        s
    }

    #[test]
    fn the_socket_is_private_and_a_stale_one_is_replaced() {
        let path = temp_path("bind");
        let first = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let err = bind(&path).err().unwrap();
        assert!(err.to_string().contains("already listens"), "{err}");
        drop(first); // the listener closes, its file stays: stale
        assert!(path.exists());
        let second = bind(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        second.remove_file();
        assert!(!path.exists());
        {
            let _files = crate::lock(&FILES);
            std::fs::write(&path, b"not a socket").unwrap();
        }
        let err = bind(&path).err().unwrap();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }

    #[test]
    fn the_socket_file_is_removed_only_while_it_is_this_channels() {
        let path = temp_path("remove");
        let channel = bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = bind(&path).unwrap(); // someone else's now
        channel.remove_file();
        assert!(path.exists());
        other.remove_file();
        assert!(!path.exists());
    }

    #[test]
    fn one_control_plane_at_a_time_and_a_successor_once_it_is_gone() {
        let (channel, recorder) = served("one");
        let mut first = hello(channel);
        recorder.wait_for("1 up");
        let mut second = UnixStream::connect(channel.path()).unwrap();
        second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (kind, why) = frame(&mut second);
        assert_eq!((kind, String::from_utf8(why).unwrap().contains("another control plane")), (b'R', true));
        assert_eq!(second.read(&mut [0; 1]).unwrap(), 0); // then closed
        first.write_all(b"table\t3\nend\n").unwrap();
        recorder.wait_for("1 apply 3");
        drop(first);
        recorder.wait_for("1 down");
        let mut third = hello(channel);
        recorder.wait_for("3 up");
        third.write_all(b"dropped\t2\nstop\n").unwrap();
        recorder.wait_for("3 stop");
        assert_eq!(recorder.seen(), ["1 up", "1 apply 3", "1 down", "3 up", "3 dropped 2", "3 stop"]);
    }

    #[test]
    fn a_hung_up_peer_is_told_from_a_live_one() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!hung_up(&a));
        (&b).write_all(b"unread").unwrap();
        assert!(!hung_up(&b));
        drop(b);
        assert!(hung_up(&a)); // with bytes still unread from it
    }

    #[test]
    fn a_closed_control_connection_is_replaced_even_before_its_reader_sees_the_end() {
        // Connection 100 is set up as the control connection with no reader, as when its reader has not
        // yet got to its end: only the accepting side can notice that its peer closed.
        let channel: &'static Channel = Box::leak(Box::new(bind(&temp_path("replace")).unwrap()));
        let recorder: &'static Recorder = Box::leak(Box::default());
        let (ours, peer) = UnixStream::pair().unwrap();
        *crate::lock(&channel.active) = Some((100, ours));
        channel.current.store(100, Ordering::Release);
        std::thread::spawn(move || channel.serve(recorder));
        let mut refused = UnixStream::connect(channel.path()).unwrap();
        assert_eq!(frame(&mut refused).0, b'R');
        (&peer).write_all(b"table\t9\n").unwrap();
        drop(peer);
        let mut second = hello(channel);
        recorder.wait_for("2 up"); // the refused connection was number 1
        second.write_all(b"table\t4\nend\n").unwrap();
        recorder.wait_for("2 apply 4");
        assert_eq!(recorder.seen(), ["100 down", "2 up", "2 apply 4"]);
    }

    #[test]
    fn the_frame_writer_follows_the_control_connection_and_counts_what_nobody_takes() {
        let (channel, recorder) = served("sink");
        let dropped: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let (tx, rx) = std::sync::mpsc::sync_channel(10);
        std::thread::spawn(move || frames::write_frames(rx, channel, dropped));
        let sample = || Frame::Sample(Box::new(frames::Sample { model: "m".into(), ..Default::default() }));
        tx.send(Frame::Applied(1, 5)).unwrap();
        tx.send(sample()).unwrap(); // counted once written off: after the frame before it
        let until = Instant::now() + Duration::from_secs(10);
        while dropped.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < until, "the sample sent with no control plane is not counted");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut first = hello(channel); // connection 1: the table applied before it was is not acknowledged
        recorder.wait_for("1 up");
        for f in [Frame::Applied(7, 6), Frame::Applied(1, 8), sample()] {
            tx.send(f).unwrap();
        }
        assert_eq!(frame(&mut first), (b'A', b"8".to_vec()));
        assert_eq!(frame(&mut first).0, b'S');
        drop(first);
        recorder.wait_for("1 down");
        let mut second = hello(channel);
        recorder.wait_for("2 up");
        for f in [Frame::Applied(1, 9), Frame::Applied(2, 10)] {
            tx.send(f).unwrap();
        }
        assert_eq!(frame(&mut second), (b'A', b"10".to_vec()));
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
    }
}
