//! Just enough JSON for model metadata: validate a document and find the spans of its top-level
//! members, so "name" and "versions" can be replaced while every other byte is kept as Triton wrote it.

use std::ops::Range;

/// Nesting deeper than this is refused (the parser recurses; connection threads have small stacks).
const MAX_DEPTH: usize = 64;

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Result<(), ()> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(())
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), ()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(())
        }
    }

    fn string(&mut self) -> Result<Range<usize>, ()> {
        let start = self.i;
        self.eat(b'"')?;
        loop {
            let c = self.peek().ok_or(())?;
            self.i += 1;
            match c {
                b'"' => return Ok(start..self.i),
                b'\\' => {
                    let e = self.peek().ok_or(())?;
                    self.i += 1;
                    match e {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => {
                            let hex = self.b.get(self.i..self.i + 4).ok_or(())?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return Err(());
                            }
                            self.i += 4;
                        }
                        _ => return Err(()),
                    }
                }
                0..=0x1f => return Err(()),
                _ => {}
            }
        }
    }

    fn digits(&mut self) -> usize {
        let s = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - s
    }

    fn number(&mut self) -> Result<(), ()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(()),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(());
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(());
            }
        }
        Ok(())
    }

    /// The comma-separated items of an object or array, from its opening bracket to `close`; `item`
    /// parses one item (starting after any whitespace).
    fn items(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> Result<(), ()>) -> Result<(), ()> {
        self.i += 1;
        self.ws();
        if self.peek() == Some(close) {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            item(self)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(c) if c == close => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(()),
            }
        }
    }

    /// One value; at depth 0 an object's members are recorded in `members`.
    fn value(&mut self, depth: usize, members: &mut Vec<(Range<usize>, Range<usize>)>) -> Result<(), ()> {
        if depth > MAX_DEPTH {
            return Err(());
        }
        match self.peek().ok_or(())? {
            b'{' => self.items(b'}', |p| {
                let key = p.string()?;
                p.ws();
                p.eat(b':')?;
                p.ws();
                let start = p.i;
                p.value(depth + 1, &mut Vec::new())?;
                if depth == 0 {
                    members.push((key, start..p.i));
                }
                Ok(())
            }),
            b'[' => self.items(b']', |p| p.value(depth + 1, &mut Vec::new())),
            b'"' => self.string().map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }
}

/// A JSON string literal for `s`.
pub fn push_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &c in s.as_bytes() {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            _ => out.push(c),
        }
    }
    out.push(b'"');
}

/// Model metadata as the gateway answers it: the document's top-level "name" becomes the logical model
/// name and "versions" the routed version (members added at the end when missing). None when `body` is
/// not a JSON object (the caller relays it unchanged).
pub fn rewrite_metadata(body: &[u8], name: &str, version: &str) -> Option<Vec<u8>> {
    std::str::from_utf8(body).ok()?;
    let mut p = Parser { b: body, i: 0 };
    let mut members = Vec::new();
    p.ws();
    if p.peek() != Some(b'{') {
        return None;
    }
    p.value(0, &mut members).ok()?;
    let close = p.i - 1; // the object's closing brace
    p.ws();
    if p.i != body.len() {
        return None;
    }
    let mut name_v = Vec::new();
    push_string(&mut name_v, name);
    let mut versions_v = vec![b'['];
    push_string(&mut versions_v, version);
    versions_v.push(b']');

    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at = 0;
    let (mut has_name, mut has_versions) = (false, false);
    for (key, value) in &members {
        let k = &body[key.start + 1..key.end - 1];
        let new = if k == b"name" {
            has_name = true;
            &name_v
        } else if k == b"versions" {
            has_versions = true;
            &versions_v
        } else {
            continue;
        };
        out.extend_from_slice(&body[at..value.start]);
        out.extend_from_slice(new);
        at = value.end;
    }
    out.extend_from_slice(&body[at..close]);
    let mut any = !members.is_empty();
    for (present, key, value) in [(has_name, "name", &name_v), (has_versions, "versions", &versions_v)] {
        if !present {
            if any {
                out.extend_from_slice(b", ");
            }
            push_string(&mut out, key);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            any = true;
        }
    }
    out.extend_from_slice(&body[close..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(s: &str) -> Option<String> {
        rewrite_metadata(s.as_bytes(), "echo", "1").map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn top_level_name_and_versions_are_replaced_and_the_rest_kept() {
        let doc = r#"{"name":"echo_v1","versions":["1","2"],"platform":"python","inputs":[{"name":"x","datatype":"FP32","shape":[-1]}],"outputs":[{"name":"y","shape":[1.5e3,0,-0.25]}]}"#;
        let want = r#"{"name":"echo","versions":["1"],"platform":"python","inputs":[{"name":"x","datatype":"FP32","shape":[-1]}],"outputs":[{"name":"y","shape":[1.5e3,0,-0.25]}]}"#;
        assert_eq!(rw(doc).unwrap(), want);
    }

    #[test]
    fn missing_members_are_added() {
        assert_eq!(rw("{}").unwrap(), r#"{"name": "echo", "versions": ["1"]}"#);
        assert_eq!(rw(r#" {"a": null} "#).unwrap(), r#" {"a": null, "name": "echo", "versions": ["1"]} "#);
        assert_eq!(
            rw(r#"{"versions": [], "x": {"name": 1}}"#).unwrap(),
            r#"{"versions": ["1"], "x": {"name": 1}, "name": "echo"}"#
        );
    }

    #[test]
    fn strings_with_escapes_and_literals_are_scanned() {
        let doc = r#"{"s":"a\"b\\c\u00e9}","t":true,"f":false,"n":null,"name":"x"}"#;
        assert_eq!(
            rw(doc).unwrap(),
            r#"{"s":"a\"b\\c\u00e9}","t":true,"f":false,"n":null,"name":"echo", "versions": ["1"]}"#
        );
    }

    #[test]
    fn anything_but_a_json_object_is_left_alone() {
        for bad in [
            "",
            "[1]",
            "\"s\"",
            "{",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":01}",
            "{\"a\":1} x",
            "{\"a\":tru}",
            "{\"a\":\"\\x\"}",
            "{'a':1}",
            "{\"a\":1.}",
            "{\"a\":-}",
        ] {
            assert!(rw(bad).is_none(), "{bad}");
        }
        let deep = "[".repeat(1000);
        assert!(rw(&format!("{{\"a\":{deep}}}")).is_none());
    }

    #[test]
    fn new_values_are_escaped() {
        let mut v = Vec::new();
        push_string(&mut v, "a\"b\\c\nd\u{1}é");
        assert_eq!(v, "\"a\\\"b\\\\c\\nd\\u0001é\"".as_bytes());
    }
}
