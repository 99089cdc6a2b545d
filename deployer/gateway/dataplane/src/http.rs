//! HTTP/1.x framing: request heads, response heads, chunked bodies, canned local responses.
//! Pure functions over byte slices, so the hot path allocates nothing here and the tests need no sockets.

use std::ops::Range;

/// Largest request head accepted (request line + headers + the blank line).
pub const MAX_HEAD: usize = 64 * 1024;

extern "C" {
    fn memchr(s: *const std::ffi::c_void, c: i32, n: usize) -> *mut std::ffi::c_void;
    fn memmem(
        hay: *const std::ffi::c_void,
        hay_len: usize,
        needle: *const std::ffi::c_void,
        needle_len: usize,
    ) -> *mut std::ffi::c_void;
}

/// Position of the first `c` in `hay`: libc's SIMD memchr, where a byte loop costs a microsecond per
/// request head on a cache-cold core (measured).
pub fn find_byte(hay: &[u8], c: u8) -> Option<usize> {
    // SAFETY: reads within `hay` only; the result points into it or is null.
    let p = unsafe { memchr(hay.as_ptr().cast(), i32::from(c), hay.len()) };
    if p.is_null() {
        None
    } else {
        Some(p as usize - hay.as_ptr() as usize)
    }
}

/// Position of the first `needle` (non-empty) in `hay`.
pub fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    // SAFETY: as above; both slices are valid for their lengths.
    let p = unsafe { memmem(hay.as_ptr().cast(), hay.len(), needle.as_ptr().cast(), needle.len()) };
    if p.is_null() {
        None
    } else {
        Some(p as usize - hay.as_ptr() as usize)
    }
}

/// Index just past the first CRLFCRLF of `buf`, searching from `from` (callers pass what they had
/// already searched, less 3, so a head that arrives in pieces is not scanned again from the start).
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let from = from.min(buf.len());
    find_bytes(&buf[from..], b"\r\n\r\n").map(|p| from + p + 4)
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum HeadError {
    BadRequestLine,
    BadHeader,
    MultipleContentLength,
    BadContentLength,
    BadTransferEncoding,
    LengthAndChunked,
    ChunkedHttp10,
}

impl HeadError {
    pub fn message(self) -> &'static str {
        match self {
            HeadError::BadRequestLine => "bad request line",
            HeadError::BadHeader => "bad header line",
            HeadError::MultipleContentLength => "more than one Content-Length",
            HeadError::BadContentLength => "bad Content-Length",
            HeadError::BadTransferEncoding => "unsupported Transfer-Encoding (only chunked)",
            HeadError::LengthAndChunked => "both Content-Length and Transfer-Encoding",
            HeadError::ChunkedHttp10 => "Transfer-Encoding in an HTTP/1.0 request",
        }
    }
}

/// A parsed request head; ranges index the head's bytes.
#[derive(Debug, Default, Clone)]
pub struct RequestHead {
    pub method: Range<usize>,
    pub url: Range<usize>,
    pub http11: bool,
    pub keep_alive: bool,
    pub content_length: Option<u64>,
    pub chunked: bool,
    pub expect_continue: bool,
    /// The x-request-key value, trimmed.
    pub key: Option<Range<usize>>,
    /// Where the first header line starts (just after the request line's CRLF).
    pub headers_start: usize,
    /// Length of the whole head, its final CRLFCRLF included.
    pub len: usize,
}

fn trim(b: &[u8], mut r: Range<usize>) -> Range<usize> {
    while r.start < r.end && (b[r.start] == b' ' || b[r.start] == b'\t') {
        r.start += 1;
    }
    while r.end > r.start && (b[r.end - 1] == b' ' || b[r.end - 1] == b'\t') {
        r.end -= 1;
    }
    r
}

/// A framing header's value (Content-Length, Transfer-Encoding) from its raw range: white space trimmed
/// before it, but only spaces after it, so that a trailing HTAB, which llhttp refuses there, makes the
/// value invalid here too.
fn framing_value(buf: &[u8], raw: Range<usize>) -> &[u8] {
    let v = &buf[raw];
    let start = v.iter().position(|&c| c != b' ' && c != b'\t').unwrap_or(v.len());
    let end = v.iter().rposition(|&c| c != b' ').map_or(start, |p| p + 1).max(start);
    &v[start..end]
}

/// RFC 9110 token characters, as a table: checked for every byte of every header name.
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
            );
        c += 1;
    }
    t
};

fn is_tchar(c: u8) -> bool {
    TCHAR[c as usize]
}

/// Bytes a header value (or a trailer's) may hold: anything but control characters, HTAB excepted
/// (obs-text, 0x80-0xFF, is allowed as llhttp allows it). A CR ends the line before it is looked at.
const FIELD_VALUE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = c == 9 || (c >= 0x20 && c != 0x7f);
        c += 1;
    }
    t
};

/// A request target the gateway reads: origin-form ("/path?query") in visible ASCII (non-ASCII must come
/// percent-encoded). The gateway is no proxy: the absolute, authority and asterisk forms are refused
/// (llhttp refuses the authority form outside CONNECT: reading on after one would frame what it does not).
fn valid_target(t: &[u8]) -> bool {
    t.first() == Some(&b'/') && t.iter().all(|c| (0x21..0x7f).contains(c))
}

/// Comma-separated tokens of a Connection header: (has "close", has "keep-alive").
fn connection_tokens(v: &[u8]) -> (bool, bool) {
    let (mut close, mut keep) = (false, false);
    for tok in v.split(|&c| c == b',') {
        let t = trim(tok, 0..tok.len());
        let t = &tok[t];
        if t.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if t.eq_ignore_ascii_case(b"keep-alive") {
            keep = true;
        }
    }
    (close, keep)
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// What a header name means to the gateway, matched case-insensitively (length first: most names
/// are none of these and are rejected on their length alone).
#[derive(PartialEq, Eq, Debug)]
enum Name {
    Other,
    Hop,
    Connection,
    ContentLength,
    TransferEncoding,
    RequestKey,
    Expect,
    Upgrade,
}

fn classify(name: &[u8]) -> Name {
    let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if is(b"te") => Name::Hop,
        6 if is(b"expect") => Name::Expect,
        7 if is(b"upgrade") => Name::Upgrade,
        7 if is(b"trailer") => Name::Hop,
        10 if is(b"connection") => Name::Connection,
        10 if is(b"keep-alive") => Name::Hop,
        13 if is(b"x-request-key") => Name::RequestKey,
        14 if is(b"content-length") => Name::ContentLength,
        16 if is(b"proxy-connection") => Name::Hop,
        17 if is(b"transfer-encoding") => Name::TransferEncoding,
        _ => Name::Other,
    }
}

/// Parses the request head at the start of `buf`: None while it is incomplete (no blank line yet).
/// One pass: the head's end is found by the line scan itself. Header lines not to forward are pushed
/// on `drop` as ranges of whole lines (CRLF included), in order; `drop` is cleared first.
pub fn parse_request_head(buf: &[u8], drop: &mut Vec<Range<usize>>) -> Result<Option<RequestHead>, HeadError> {
    drop.clear();
    let Some(line_end) = find_byte(buf, b'\r') else { return Ok(None) };
    match buf.get(line_end + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(HeadError::BadRequestLine),
    }
    let line = &buf[..line_end];
    let sp1 = line.iter().position(|&b| b == b' ').ok_or(HeadError::BadRequestLine)?;
    let sp2 = sp1 + 1 + line[sp1 + 1..].iter().position(|&b| b == b' ').ok_or(HeadError::BadRequestLine)?;
    let version = &line[sp2 + 1..];
    let http11 = version == b"HTTP/1.1";
    if sp1 == 0 || sp2 == sp1 + 1 || !(http11 || version == b"HTTP/1.0") {
        return Err(HeadError::BadRequestLine);
    }
    if !line[..sp1].iter().all(|&c| is_tchar(c)) || !valid_target(&line[sp1 + 1..sp2]) {
        return Err(HeadError::BadRequestLine);
    }
    let mut h =
        RequestHead { method: 0..sp1, url: sp1 + 1..sp2, http11, headers_start: line_end + 2, ..Default::default() };
    let (mut close, mut keep, mut upgrade) = (false, false, false);
    let mut te_seen = false;
    let mut pos = line_end + 2;
    loop {
        match buf.get(pos..pos + 2) {
            None => return Ok(None),
            Some(b"\r\n") => break,
            Some(_) => {}
        }
        let Some(p) = find_byte(&buf[pos..], b'\r') else { return Ok(None) };
        let eol = pos + p;
        match buf.get(eol + 1) {
            None => return Ok(None),
            Some(b'\n') => {}
            Some(_) => return Err(HeadError::BadHeader),
        }
        let colon = pos + find_byte(&buf[pos..eol], b':').ok_or(HeadError::BadHeader)?;
        let name = &buf[pos..colon];
        // A bare LF, a NUL or another control character inside a line would let a client hide a header
        // from the gateway that the upstream might still read as one (request smuggling): refused. So is
        // a line folded onto the one before (it starts with a space: not a token).
        if name.is_empty()
            || !name.iter().all(|&c| is_tchar(c))
            || !buf[colon + 1..eol].iter().all(|&c| FIELD_VALUE[c as usize])
        {
            return Err(HeadError::BadHeader);
        }
        let value = trim(buf, colon + 1..eol);
        let whole = pos..eol + 2;
        match classify(name) {
            Name::Other => {}
            Name::Hop => drop.push(whole),
            Name::Upgrade => {
                // Not served; and a parser that honours it (llhttp) reads what follows as another
                // protocol, so this connection takes no further request.
                upgrade = true;
                drop.push(whole);
            }
            Name::Connection => {
                let (c, k) = connection_tokens(&buf[value]);
                close |= c;
                keep |= k;
                drop.push(whole);
            }
            Name::RequestKey => {
                h.key.get_or_insert(value); // the first one, as the Python gateway read it
                drop.push(whole);
            }
            Name::Expect => {
                // Answered by the gateway itself (a "100 Continue" when the body is not there yet):
                // the upstream gets the whole request at once.
                if buf[value].eq_ignore_ascii_case(b"100-continue") {
                    h.expect_continue = true;
                    drop.push(whole);
                }
            }
            Name::ContentLength => {
                if h.content_length.is_some() {
                    return Err(HeadError::MultipleContentLength);
                }
                let v = framing_value(buf, colon + 1..eol);
                h.content_length = Some(parse_length(v).ok_or(HeadError::BadContentLength)?);
            }
            Name::TransferEncoding => {
                if te_seen || !framing_value(buf, colon + 1..eol).eq_ignore_ascii_case(b"chunked") {
                    return Err(HeadError::BadTransferEncoding);
                }
                te_seen = true;
                h.chunked = true;
                drop.push(whole);
            }
        }
        pos = eol + 2;
    }
    if h.chunked && h.content_length.is_some() {
        // Two framings: a request smuggling shape, refused rather than guessed at.
        return Err(HeadError::LengthAndChunked);
    }
    if h.chunked && !http11 {
        // RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
        return Err(HeadError::ChunkedHttp10);
    }
    h.len = pos + 2;
    h.keep_alive = !upgrade && if http11 { !close } else { keep };
    Ok(Some(h))
}

/// A parsed upstream response head.
#[derive(Debug, Default, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// The upstream will close after this response (Connection: close, or HTTP/1.0 without keep-alive).
    pub closes: bool,
    /// Index of the CRLF that ends the status line.
    pub status_line_end: usize,
    /// "\r\n<header line>" ranges of headers not relayed (connection, keep-alive), in order.
    pub strip: Vec<Range<usize>>,
    /// The same for the transfer-encoding lines: dropped where the gateway decodes the body.
    pub coding: Vec<Range<usize>>,
}

impl ResponseHead {
    /// The reason phrase of the status line (may be empty).
    pub fn reason<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        head.get(13..self.status_line_end).unwrap_or(b"")
    }
}

/// Parses the response head at the start of `buf`: None while incomplete; else the head and the index
/// just past its final CRLFCRLF (the head proper, as relayed and sampled, is `buf[..end - 4]`).
pub fn parse_response_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, ()> {
    let Some(line_end) = find_byte(buf, b'\r') else { return Ok(None) };
    let line = &buf[..line_end];
    if line.len() < 12
        || !line.starts_with(b"HTTP/1.")
        || line[8] != b' '
        || !line[9..12].iter().all(u8::is_ascii_digit)
    {
        return Err(());
    }
    if line.len() > 12 && line[12] != b' ' {
        return Err(());
    }
    let status = line[9..12].iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    let http11 = line[7] == b'1';
    let mut r = ResponseHead { status, status_line_end: line_end, ..Default::default() };
    let (mut close, mut keep, mut other_coding) = (false, false, false);
    // `pos` is at the CRLF that ends the previous line
    let mut pos = line_end;
    let end = loop {
        match buf.get(pos..pos + 2) {
            None => return Ok(None),
            Some(b"\r\n") => {}
            Some(_) => return Err(()),
        }
        let start = pos + 2;
        match buf.get(start..start + 2) {
            None => return Ok(None),
            Some(b"\r\n") => break start + 2,
            Some(_) => {}
        }
        let Some(p) = find_byte(&buf[start..], b'\r') else { return Ok(None) };
        let eol = start + p;
        let l = &buf[start..eol];
        if let Some(colon) = find_byte(l, b':') {
            let name = &l[..colon];
            let v = trim(l, colon + 1..l.len());
            let value = &l[v];
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_length(value).ok_or(())?;
                if r.content_length.is_some_and(|m| m != n) {
                    return Err(());
                }
                r.content_length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                let last = value.rsplit(|&c| c == b',').next().unwrap_or(b"");
                let t = trim(last, 0..last.len());
                r.chunked = last[t].eq_ignore_ascii_case(b"chunked");
                other_coding = !r.chunked; // some other coding: delimited by the close
                r.coding.push(pos..eol);
            } else if name.eq_ignore_ascii_case(b"connection") {
                let (c, k) = connection_tokens(value);
                close |= c;
                keep |= k;
                r.strip.push(pos..eol);
            } else if name.eq_ignore_ascii_case(b"keep-alive") {
                r.strip.push(pos..eol);
            }
        }
        pos = eol;
    };
    if r.chunked || other_coding {
        r.content_length = None;
    }
    r.closes = close || (!http11 && !keep);
    Ok(Some((r, end)))
}

/// Why a chunked body could not be read.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum ChunkError {
    /// Not chunked encoding as RFC 9112 writes it (or as llhttp reads it, where that is stricter).
    Bad,
    /// The data would pass the parser's limit.
    TooLarge,
}

/// Chunk extensions and trailer lines together may not pass this many bytes (they are read and
/// dropped, but should not let a client hold the connection with them).
pub const MAX_CHUNK_META: u32 = 16 * 1024;

/// Incremental chunked-body parser: finds where a chunked body ends and, when asked, collects the data.
/// Strict: chunk extensions are `;name[=token|"quoted"]` with no white space, trailer lines are header
/// lines (no bare LF, NUL or other control character, no folding, no Content-Length or
/// Transfer-Encoding), a chunk size has at most 15 hex digits.
#[derive(Debug, Clone)]
pub struct Chunked {
    state: CState,
    size: u64,
    digits: u8,
    /// Bytes in the current extension name or value, or trailer name (what is needed of them).
    run: u32,
    meta: u32,
    /// The data bytes announced so far, and how many may be.
    total: u64,
    limit: u64,
    /// The first bytes of the current trailer name, lowercased (to spot framing headers).
    name: [u8; 17],
}

impl Default for Chunked {
    fn default() -> Chunked {
        Chunked::with_limit(u64::MAX)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum CState {
    #[default]
    Size,
    ExtName,
    ExtValue,
    ExtToken,
    ExtQuoted,
    ExtEscape,
    ExtQuoteEnd,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    LastLf,
    Done,
}

impl Chunked {
    /// A parser that refuses (ChunkError::TooLarge) a body of more than `limit` data bytes, as soon
    /// as a chunk size says so (before its data arrives).
    pub fn with_limit(limit: u64) -> Chunked {
        Chunked { state: CState::Size, size: 0, digits: 0, run: 0, meta: 0, total: 0, limit, name: [0; 17] }
    }

    pub fn done(&self) -> bool {
        self.state == CState::Done
    }

    /// After an extension's name or value: another extension, or the end of the size line.
    fn ext_next(&mut self, c: u8) -> Result<(), ChunkError> {
        match c {
            b';' => self.state = CState::ExtName,
            b'\r' => self.state = CState::SizeLf,
            _ => return Err(ChunkError::Bad),
        }
        self.run = 0;
        Ok(())
    }

    /// Consumes bytes of `input` up to the end of the body; returns how many were part of the body
    /// (all of `input` unless the body ended inside it). Data bytes are appended to `out` if given.
    pub fn feed(&mut self, input: &[u8], mut out: Option<&mut Vec<u8>>) -> Result<usize, ChunkError> {
        use ChunkError::Bad;
        let mut i = 0;
        while i < input.len() {
            let c = input[i];
            if matches!(
                self.state,
                CState::ExtName
                    | CState::ExtValue
                    | CState::ExtToken
                    | CState::ExtQuoted
                    | CState::ExtEscape
                    | CState::ExtQuoteEnd
                    | CState::TrailerStart
                    | CState::TrailerName
                    | CState::TrailerValue
            ) {
                self.meta += 1;
                if self.meta > MAX_CHUNK_META {
                    return Err(Bad);
                }
            }
            match self.state {
                CState::Size => match c {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits >= 15 {
                            return Err(Bad);
                        }
                        self.size = self.size * 16 + u64::from((c as char).to_digit(16).unwrap_or(0));
                        self.digits += 1;
                    }
                    b';' | b'\r' if self.digits > 0 => self.ext_next(c)?,
                    _ => return Err(Bad),
                },
                CState::ExtName => match c {
                    b'=' if self.run > 0 => {
                        self.state = CState::ExtValue;
                        self.run = 0;
                    }
                    b';' | b'\r' if self.run > 0 => self.ext_next(c)?,
                    _ if is_tchar(c) => self.run += 1,
                    _ => return Err(Bad),
                },
                CState::ExtValue => match c {
                    b'"' => self.state = CState::ExtQuoted,
                    _ if is_tchar(c) => self.state = CState::ExtToken,
                    _ => return Err(Bad),
                },
                CState::ExtToken => {
                    if !is_tchar(c) {
                        self.ext_next(c)?;
                    }
                }
                CState::ExtQuoted => match c {
                    b'"' => self.state = CState::ExtQuoteEnd,
                    b'\\' => self.state = CState::ExtEscape,
                    b' ' | 0x21..=0x7e => {}
                    _ => return Err(Bad),
                },
                CState::ExtEscape => match c {
                    0x21..=0x7e => self.state = CState::ExtQuoted,
                    _ => return Err(Bad),
                },
                CState::ExtQuoteEnd => self.ext_next(c)?,
                CState::SizeLf => {
                    if c != b'\n' {
                        return Err(Bad);
                    }
                    if self.size == 0 {
                        self.state = CState::TrailerStart;
                    } else {
                        if self.size > self.limit - self.total {
                            return Err(ChunkError::TooLarge);
                        }
                        self.total += self.size;
                        self.state = CState::Data;
                    }
                }
                CState::Data => {
                    let take = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    if let Some(o) = out.as_deref_mut() {
                        o.extend_from_slice(&input[i..i + take]);
                    }
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = CState::DataCr;
                    }
                    continue;
                }
                CState::DataCr => {
                    if c != b'\r' {
                        return Err(Bad);
                    }
                    self.state = CState::DataLf;
                }
                CState::DataLf => {
                    if c != b'\n' {
                        return Err(Bad);
                    }
                    self.state = CState::Size;
                    self.digits = 0;
                }
                CState::TrailerStart => {
                    self.run = 0;
                    if c == b'\r' {
                        self.state = CState::LastLf;
                    } else {
                        self.state = CState::TrailerName;
                        self.trailer_name(c)?;
                    }
                }
                CState::TrailerName => self.trailer_name(c)?,
                CState::TrailerValue => match c {
                    b'\r' => self.state = CState::TrailerLf,
                    _ if FIELD_VALUE[c as usize] => {}
                    _ => return Err(Bad),
                },
                CState::TrailerLf => {
                    if c != b'\n' {
                        return Err(Bad);
                    }
                    self.state = CState::TrailerStart;
                }
                CState::LastLf => {
                    if c != b'\n' {
                        return Err(Bad);
                    }
                    self.state = CState::Done;
                    return Ok(i + 1);
                }
                CState::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    /// A byte of a trailer's name, or the colon after it.
    fn trailer_name(&mut self, c: u8) -> Result<(), ChunkError> {
        if c == b':' && self.run > 0 {
            let n = &self.name[..(self.run as usize).min(17)];
            if self.run <= 17 && (n == b"content-length" || n == b"transfer-encoding") {
                return Err(ChunkError::Bad); // framing in a trailer: what would a later reader make of it?
            }
            self.state = CState::TrailerValue;
            return Ok(());
        }
        if !is_tchar(c) {
            return Err(ChunkError::Bad);
        }
        if let Some(slot) = self.name.get_mut(self.run as usize) {
            *slot = c.to_ascii_lowercase();
        }
        self.run += 1;
        Ok(())
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// How a client asked to be answered: what any response to it must honour.
#[derive(Clone, Copy)]
pub struct Reply {
    pub keep_alive: bool,
    pub http11: bool,
    /// A HEAD request: the response has no body.
    pub head: bool,
}

impl Reply {
    /// Answer, then close: a refusal, or a connection whose request was never read.
    pub const CLOSE: Reply = Reply { keep_alive: false, http11: true, head: false };

    /// The Connection header (with its leading CRLF) of a response after which the connection stays
    /// open if `keep`: "close" if not, "keep-alive" for an HTTP/1.0 client, none for HTTP/1.1.
    pub fn connection(self, keep: bool) -> &'static [u8] {
        if !keep {
            b"\r\nconnection: close"
        } else if !self.http11 {
            b"\r\nconnection: keep-alive"
        } else {
            b""
        }
    }
}

/// A response the gateway makes itself, into `out` (cleared first): with a content-length, a
/// connection header as `to` needs it, no body for a HEAD request.
pub fn local_response(out: &mut Vec<u8>, to: Reply, status: u16, content_type: &str, body: &[u8]) {
    local_response_with(out, to, status, content_type, b"", body);
}

/// The same, with `extra` header lines (each "\r\nname: value") after the others.
pub fn local_response_with(out: &mut Vec<u8>, to: Reply, status: u16, content_type: &str, extra: &[u8], body: &[u8]) {
    use std::io::Write;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}",
        status,
        reason_phrase(status),
        content_type,
        body.len()
    );
    out.extend_from_slice(extra);
    out.extend_from_slice(to.connection(to.keep_alive));
    out.extend_from_slice(b"\r\n\r\n");
    if !to.head {
        out.extend_from_slice(body);
    }
}

/// {"error": "<message>"} as JSON.
pub fn error_body(message: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(message.len() + 16);
    b.extend_from_slice(b"{\"error\": ");
    crate::json::push_string(&mut b, message);
    b.push(b'}');
    b
}

/// Seconds as Python's "{:g}" prints them (6 significant digits, no trailing zeros, exponent outside
/// 1e-4..1e6): the read timeout in the 504 message reads as the Python gateway's did.
pub fn fmt_g(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let e = format!("{v:.5e}"); // "d.ddddde<exp>"
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        let m = mant.trim_end_matches('0').trim_end_matches('.');
        return format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let s = format!("{:.*}", (5 - exp) as usize, v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<(RequestHead, Vec<Range<usize>>), HeadError> {
        let mut d = Vec::new();
        parse_request_head(s.as_bytes(), &mut d).map(|h| (h.expect("a whole head"), d))
    }

    fn resp(s: &[u8]) -> Result<ResponseHead, ()> {
        let mut full = s.to_vec();
        full.extend_from_slice(b"\r\n\r\nbody");
        parse_response_head(&full).map(|r| {
            let (r, end) = r.expect("a whole head");
            assert_eq!(end, s.len() + 4);
            r
        })
    }

    #[test]
    fn head_end_is_found_across_the_buffer() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nrest", 0), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        assert_eq!(find_head_end(b"\r\r\n\r\n", 0), Some(5));
        assert_eq!(find_head_end(b"abc\r\n\r", 0), None);
        assert_eq!(find_head_end(b"abc\r\n\r\n", 2), Some(7));
    }

    #[test]
    fn request_heads_are_parsed() {
        let s = "POST /v2/models/m/infer?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-Request-Key:  user-1 \r\nConnection: keep-alive, Close\r\n\r\n";
        let (h, drop) = req(s).unwrap();
        assert_eq!(&s[h.method.clone()], "POST");
        assert_eq!(&s[h.url.clone()], "/v2/models/m/infer?x=1");
        assert!(h.http11 && !h.keep_alive && !h.chunked);
        assert_eq!(h.content_length, Some(12));
        assert_eq!(&s[h.key.clone().unwrap()], "user-1");
        let dropped: Vec<&str> = drop.iter().map(|r| &s[r.clone()]).collect();
        assert_eq!(dropped, ["X-Request-Key:  user-1 \r\n", "Connection: keep-alive, Close\r\n"]);
        assert_eq!(&s[h.headers_start..h.headers_start + 9], "Host: a\r\n");
    }

    #[test]
    fn keep_alive_defaults_follow_the_version() {
        assert!(req("GET / HTTP/1.1\r\n\r\n").unwrap().0.keep_alive);
        assert!(!req("GET / HTTP/1.0\r\n\r\n").unwrap().0.keep_alive);
        assert!(req("GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n").unwrap().0.keep_alive);
        assert!(!req("GET / HTTP/1.1\r\nconnection: close\r\n\r\n").unwrap().0.keep_alive);
    }

    #[test]
    fn bad_heads_are_refused() {
        assert_eq!(req("GET /\r\n\r\n").unwrap_err(), HeadError::BadRequestLine);
        assert_eq!(req("GET / HTTP/2.0\r\n\r\n").unwrap_err(), HeadError::BadRequestLine);
        assert_eq!(req("GET  / HTTP/1.1\r\n\r\n").unwrap_err(), HeadError::BadRequestLine);
        assert_eq!(req("GET / x HTTP/1.1\r\n\r\n").unwrap_err(), HeadError::BadRequestLine);
        assert_eq!(
            req("POST / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\n").unwrap_err(),
            HeadError::MultipleContentLength
        );
        for v in ["-1", "", "1x", "+3", "99999999999999999999"] {
            let s = format!("POST / HTTP/1.1\r\nContent-Length: {v}\r\n\r\n");
            assert_eq!(req(&s).unwrap_err(), HeadError::BadContentLength, "{v}");
        }
        assert_eq!(
            req("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").unwrap_err(),
            HeadError::BadTransferEncoding
        );
        assert_eq!(
            req("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n").unwrap_err(),
            HeadError::LengthAndChunked
        );
        assert_eq!(req("GET / HTTP/1.1\r\nno colon\r\n\r\n").unwrap_err(), HeadError::BadHeader);
        assert_eq!(req("GET / HTTP/1.1\r\nbad name: x\r\n\r\n").unwrap_err(), HeadError::BadHeader);
        assert_eq!(req("GET / HTTP/1.1\r\nA: b\nContent-Length: 5\r\n\r\n").unwrap_err(), HeadError::BadHeader);
        assert_eq!(req("GET / HTTP/1.1\r\nA: b\0c\r\n\r\n").unwrap_err(), HeadError::BadHeader);
    }

    #[test]
    fn hop_by_hop_request_headers_are_dropped() {
        let s = "POST / HTTP/1.1\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\nUpgrade: x\r\nkeep-alive: 5\r\nProxy-Connection: x\r\nTrailer: y\r\nExpect: 100-continue\r\nA: b\r\n\r\n";
        let (h, drop) = req(s).unwrap();
        assert!(h.chunked && h.expect_continue);
        assert_eq!(drop.len(), 7);
        assert!(drop.iter().all(|r| !s[r.clone()].starts_with("A:")));
    }

    #[test]
    fn chunked_bodies_are_decoded_in_pieces() {
        let raw = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for split in 0..raw.len() {
            let mut c = Chunked::default();
            let mut out = Vec::new();
            let a = c.feed(&raw[..split], Some(&mut out)).unwrap();
            assert_eq!(a, split.min(raw.len() - 4));
            let b = c.feed(&raw[split..], Some(&mut out)).unwrap();
            assert!(c.done());
            assert_eq!(a + b, raw.len() - 4);
            assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.");
        }
        let mut c = Chunked::default();
        assert_eq!(c.feed(b"0\r\n\r\n", None), Ok(5));
        assert!(c.done());
        for bad in [&b"x\r\n"[..], b"\r\n", b"3\r\nabcX", b"3\n", b"1234567890abcdef0\r\n"] {
            assert!(Chunked::default().feed(bad, None).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn smuggling_shapes_in_heads_are_refused() {
        for (bad, why) in [
            ("GET / HTTP/1.2\r\n\r\n", HeadError::BadRequestLine),
            ("GET / HTTP/1.10\r\n\r\n", HeadError::BadRequestLine),
            ("GET /\u{e9} HTTP/1.1\r\n\r\n", HeadError::BadRequestLine),
            ("GET /a\x7f HTTP/1.1\r\n\r\n", HeadError::BadRequestLine),
            ("GET /a\tb HTTP/1.1\r\n\r\n", HeadError::BadRequestLine),
            ("POST gw:443 HTTP/1.1\r\n\r\n", HeadError::BadRequestLine),
            ("GET http://gw/v2 HTTP/1.1\r\n\r\n", HeadError::BadRequestLine),
            ("OPTIONS * HTTP/1.1\r\n\r\n", HeadError::BadRequestLine),
            ("GET / HTTP/1.1\r\nA: \x01\r\n\r\n", HeadError::BadHeader),
            ("GET / HTTP/1.1\r\nA: b\x7f\r\n\r\n", HeadError::BadHeader),
            ("GET / HTTP/1.1\r\nA: b\x1bc\r\n\r\n", HeadError::BadHeader),
            // obs-fold: a continuation line is no header line
            ("GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", HeadError::BadHeader),
            ("GET / HTTP/1.1\r\nA: b\r\n\tTransfer-Encoding: chunked\r\n\r\n", HeadError::BadHeader),
            ("POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n", HeadError::BadHeader),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n", HeadError::BadTransferEncoding),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: identity, chunked\r\n\r\n", HeadError::BadTransferEncoding),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n", HeadError::BadTransferEncoding),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::BadTransferEncoding,
            ),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::ChunkedHttp10),
        ] {
            assert_eq!(req(bad).unwrap_err(), why, "{bad:?}");
        }
        // what llhttp takes too: tabs and obs-text in values, leading zeros in a length
        let (h, _) = req("POST / HTTP/1.1\r\nA:\tb\t\r\nB: \u{e9}\r\nContent-Length:\t007  \r\n\r\n").unwrap();
        assert_eq!(h.content_length, Some(7));
        assert!(req("POST / HTTP/1.1\r\nTransfer-Encoding: \tChunked \r\n\r\n").unwrap().0.chunked);
        // but not a tab after a framing header's value (llhttp refuses it)
        assert_eq!(req("POST / HTTP/1.1\r\nContent-Length: 7\t\r\n\r\n").unwrap_err(), HeadError::BadContentLength);
        assert_eq!(
            req("POST / HTTP/1.1\r\nTransfer-Encoding: chunked \t \r\n\r\n").unwrap_err(),
            HeadError::BadTransferEncoding
        );
    }

    #[test]
    fn an_upgrade_ends_the_connection_after_its_request() {
        let (h, drop) = req("GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n").unwrap();
        assert!(!h.keep_alive);
        assert_eq!(drop.len(), 2);
    }

    fn chunked(raw: &[u8], limit: u64) -> Result<Vec<u8>, ChunkError> {
        let mut c = Chunked::with_limit(limit);
        let mut out = Vec::new();
        let n = c.feed(raw, Some(&mut out))?;
        assert!(c.done() && n == raw.len(), "{raw:?}");
        Ok(out)
    }

    /// Each case, made into a body by `body`, is refused as bad chunked encoding.
    fn all_bad(cases: &[&str], body: impl Fn(&str) -> String) {
        for case in cases {
            assert_eq!(chunked(body(case).as_bytes(), u64::MAX), Err(ChunkError::Bad), "{case:?}");
        }
    }

    #[test]
    fn chunk_extensions_are_tokens_or_quoted_strings_on_one_line() {
        for ext in ["", ";a", ";a=b", ";a=b;c", ";a=\"x y\"", ";a=\"x\\\"y\";b=1", ";a-b.c=~!"] {
            let raw = format!("5{ext}\r\nhello\r\n0{ext}\r\n\r\n");
            assert_eq!(chunked(raw.as_bytes(), u64::MAX).unwrap(), b"hello", "{ext}");
        }
        let bad = [
            ";a=b\nx", // a bare LF would end the line for a lenient reader, not for a strict one
            ";a\n",
            "\n",
            ";a=\"b\nc\"",
            ";a=b\0",
            ";a=\"\0\"",
            ";a=\"\t\"",
            ";a=\u{80}",
            " ;a",
            "\t;a",
            "; a",
            ";a =b",
            ";a= b",
            ";a=b c",
            ";",
            ";a;",
            ";a=",
            ";a=\"b",
            ";a=\"b\"c",
        ];
        all_bad(&bad, |ext| format!("5{ext}\r\nhello\r\n0\r\n\r\n"));
        let long = format!("5;a={}\r\nhello\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_META as usize));
        assert_eq!(chunked(long.as_bytes(), u64::MAX), Err(ChunkError::Bad));
    }

    #[test]
    fn trailers_are_header_lines_without_framing() {
        for trailer in ["", "A: b\r\n", "A:b\r\nC-D: \u{e9}\t\r\n", "Content-Type: x\r\n"] {
            let raw = format!("5\r\nhello\r\n0\r\n{trailer}\r\n");
            assert_eq!(chunked(raw.as_bytes(), u64::MAX).unwrap(), b"hello", "{trailer:?}");
        }
        let bad = [
            "A: b\nc\r\n",
            "A: b\n\r\n",
            "A: b\0\r\n",
            "A: \x7f\r\n",
            "A\r\n",
            ": b\r\n",
            "A : b\r\n",
            " A: b\r\n",
            "A: b\r\n c\r\n",
            "A: b\rc\r\n",
            "Content-Length: 5\r\n",
            "transfer-encoding: chunked\r\n",
            "\n",
        ];
        all_bad(&bad, |trailer| format!("5\r\nhello\r\n0\r\n{trailer}\r\n"));
    }

    #[test]
    fn a_chunked_body_over_the_limit_is_refused_at_the_size_line() {
        assert_eq!(chunked(b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n", 10).unwrap(), b"helloworld");
        // refused when the second size line says so: its data need not arrive
        let mut c = Chunked::with_limit(9);
        assert_eq!(c.feed(b"5\r\nhello\r\n", None), Ok(10));
        assert_eq!(c.feed(b"5\r\n", None), Err(ChunkError::TooLarge));
        assert_eq!(Chunked::with_limit(u64::MAX).feed(b"fffffffffffffff\r\n", None), Ok(17));
        assert_eq!(Chunked::with_limit(u64::MAX).feed(b"1000000000000000\r\n", None), Err(ChunkError::Bad));
    }

    #[test]
    fn partial_heads_are_none_until_whole() {
        let r = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        let mut d = Vec::new();
        for n in 0..r.len() - 3 {
            assert!(parse_request_head(&r[..n], &mut d).unwrap().is_none(), "{n}");
        }
        assert_eq!(parse_request_head(&r[..r.len() - 3], &mut d).unwrap().unwrap().len, r.len() - 3);
        assert_eq!(parse_request_head(r, &mut d).unwrap().unwrap().len, r.len() - 3);
        let s = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        for n in 0..s.len() - 3 {
            assert!(parse_response_head(&s[..n]).unwrap().is_none(), "{n}");
        }
        assert_eq!(parse_response_head(s).unwrap().unwrap().1, s.len() - 3);
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\rX").is_err());
    }

    #[test]
    fn response_heads_are_parsed() {
        let h = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 42";
        let r = resp(h).unwrap();
        assert_eq!((r.status, r.content_length, r.chunked, r.closes), (200, Some(42), false, false));
        assert_eq!(r.status_line_end, 15);
        assert_eq!(r.reason(h), b"OK");
        let h = b"HTTP/1.1 500 Internal\r\ntransfer-encoding: chunked\r\nConnection: close";
        let r = resp(h).unwrap();
        assert!(r.chunked && r.closes && r.content_length.is_none());
        assert_eq!(r.strip.iter().map(|s| &h[s.clone()]).collect::<Vec<_>>(), [&b"\r\nConnection: close"[..]]);
        assert_eq!(
            r.coding.iter().map(|s| &h[s.clone()]).collect::<Vec<_>>(),
            [&b"\r\ntransfer-encoding: chunked"[..]]
        );
        let r = resp(b"HTTP/1.0 200 OK\r\nContent-Length: 1").unwrap();
        assert!(r.closes);
        let r = resp(b"HTTP/1.0 204 No Content\r\nConnection: keep-alive").unwrap();
        assert!(!r.closes && r.status == 204);
        assert!(resp(b"HTTP/1.1 2000 OK").is_err());
        assert!(resp(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2").is_err());
        assert!(resp(b"garbage").is_err());
        assert_eq!(resp(b"HTTP/1.1 404").unwrap().status, 404);
    }

    #[test]
    fn seconds_print_like_python_g() {
        assert_eq!(fmt_g(30.0), "30");
        assert_eq!(fmt_g(0.5), "0.5");
        assert_eq!(fmt_g(1.25), "1.25");
        assert_eq!(fmt_g(0.001), "0.001");
        assert_eq!(fmt_g(0.00001), "1e-05");
        assert_eq!(fmt_g(1_000_000.0), "1e+06");
        assert_eq!(fmt_g(123456.0), "123456");
        assert_eq!(fmt_g(2.0 / 3.0), "0.666667");
    }

    #[test]
    fn local_responses_have_length_and_close() {
        let mut out = Vec::new();
        local_response(&mut out, Reply::CLOSE, 404, "application/json", &error_body("nope"));
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 17\r\nconnection: close\r\n\r\n{\"error\": \"nope\"}"
        );
    }
}
