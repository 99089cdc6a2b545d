//! The control protocol on the control connection (channel.rs): TAB-separated lines, a table applied
//! whole at its `end` line.
//!
//!     table   <version>
//!     model   <name>  <canary weight 0..100>  [<shadow share 0..100>]
//!     arm     stable|canary|shadow   <version>   <triton model>  <host:port>[,<host:port>...]
//!     capture <fraction 0..1>  <floor per second 0..10000>
//!     end
//!
//! `arm` and `capture` lines belong to the model line before them, in any order; a model has one arm of
//! each role at most and one capture line at most. A shadow arm gets a copy of `shadow share` of every 100
//! requests stable answered, after the client has its answer (shadow.rs); its answers go to nobody but the
//! paired sample. A capture line gives the model its own sampling in place of --sample-rate: every
//! inference request is sampled while fewer than `floor per second` of the model's have been this second,
//! past that each with probability `fraction` (routing::Capture).
//!
//! and, outside a table, `dropped <n>`: samples the control plane could not take (Redis behind), counted
//! with the data plane's own in gateway_samples_dropped_total; `stop`: the data plane exits (its control
//! plane is stopping; a control plane that merely goes leaves it serving).

/// The highest capture floor taken, as the control plane's routing.py: a guard against a slip, already far
/// above the samples a second the control plane writes to Redis.
pub const MAX_CAPTURE_FLOOR_PER_S: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmSpec {
    pub version: String,
    pub triton_model: String,
    pub nodes: Vec<String>,
}

/// A model's own sampling (a `capture` line).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaptureSpec {
    pub fraction: f64,
    pub floor_per_s: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub weight: u32,
    pub stable: Option<ArmSpec>,
    pub canary: Option<ArmSpec>,
    /// Percent of stable's requests mirrored to the shadow arm.
    pub shadow_share: u32,
    pub shadow: Option<ArmSpec>,
    /// None: the model is sampled at --sample-rate.
    pub capture: Option<CaptureSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TableSpec {
    pub version: u64,
    pub models: Vec<ModelSpec>,
}

#[derive(Debug, PartialEq)]
pub enum Event {
    None,
    Apply(TableSpec),
    /// A table that will not be applied (version when known, why).
    Reject(Option<u64>, String),
    SamplesDropped(u64),
    Stop,
}

#[derive(Default)]
pub struct ControlParser {
    /// The table being read, and the first problem found in it.
    cur: Option<(TableSpec, Option<String>)>,
    /// Whether the table line gave a readable version (for the rejection message).
    version_known: bool,
}

/// "host:port" as the Python control plane validates it: non-empty host, port 1..65535.
pub fn valid_node(n: &str) -> bool {
    match n.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !port.is_empty()
                && port.len() <= 5
                && port.bytes().all(|c| c.is_ascii_digit())
                && (1..65536).contains(&port.parse::<u32>().unwrap_or(0))
        }
        None => false,
    }
}

impl ControlParser {
    pub fn line(&mut self, raw: &str) -> Event {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.is_empty() {
            return Event::None;
        }
        let f: Vec<&str> = line.split('\t').collect();
        match f[0] {
            "table" => {
                let known = self.version_known;
                let previous = self.cur.take().map(|(t, _)| Some(t.version).filter(|_| known));
                let version = if f.len() == 2 { f[1].parse::<u64>().ok() } else { None };
                self.version_known = version.is_some();
                self.cur = Some((
                    TableSpec { version: version.unwrap_or(0), models: Vec::new() },
                    if version.is_none() { Some(format!("bad table line {line:?}")) } else { None },
                ));
                match previous {
                    Some(v) => Event::Reject(v, "no end line before the next table".into()),
                    None => Event::None,
                }
            }
            "end" => match self.cur.take() {
                None => Event::Reject(None, "end line outside a table".into()),
                Some((t, Some(why))) => Event::Reject(Some(t.version).filter(|_| self.version_known), why),
                Some((t, None)) => match t.models.iter().find(|m| m.stable.is_none()) {
                    Some(m) => Event::Reject(Some(t.version), format!("model {} has no stable arm", m.name)),
                    None => Event::Apply(t),
                },
            },
            "dropped" if self.cur.is_none() => match f.get(1).and_then(|n| n.parse::<u64>().ok()) {
                Some(n) if f.len() == 2 => Event::SamplesDropped(n),
                _ => Event::Reject(None, format!("bad dropped line {line:?}")),
            },
            "stop" if self.cur.is_none() && f.len() == 1 => Event::Stop,
            "model" | "arm" | "capture" => {
                let Some((table, err)) = self.cur.as_mut() else {
                    return Event::Reject(None, format!("{} line outside a table", f[0]));
                };
                if err.is_none() {
                    let read = match f[0] {
                        "model" => model_line(table, &f),
                        "arm" => arm_line(table, &f),
                        _ => capture_line(table, &f),
                    };
                    if let Err(why) = read {
                        *err = Some(why);
                    }
                }
                Event::None
            }
            other => {
                let why = format!("unknown line {other:?}");
                match self.cur.as_mut() {
                    Some((_, err)) => {
                        err.get_or_insert(why);
                        Event::None
                    }
                    None => Event::Reject(None, why),
                }
            }
        }
    }
}

fn model_line(t: &mut TableSpec, f: &[&str]) -> Result<(), String> {
    if f.len() != 3 && f.len() != 4 {
        return Err(format!("a model line has 3 or 4 fields, not {}", f.len()));
    }
    let name = f[1];
    if name.is_empty() || name.contains('/') {
        return Err(format!("bad model name {name:?}"));
    }
    if t.models.iter().any(|m| m.name == name) {
        return Err(format!("model {name} appears twice"));
    }
    let weight = f[2]
        .parse::<u32>()
        .ok()
        .filter(|w| *w <= 100)
        .ok_or_else(|| format!("{name}: weight must be 0..100, not {:?}", f[2]))?;
    let shadow_share = match f.get(3) {
        None => 0,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|w| *w <= 100)
            .ok_or_else(|| format!("{name}: shadow share must be 0..100, not {v:?}"))?,
    };
    t.models.push(ModelSpec {
        name: name.to_string(),
        weight,
        stable: None,
        canary: None,
        shadow_share,
        shadow: None,
        capture: None,
    });
    Ok(())
}

fn arm_line(t: &mut TableSpec, f: &[&str]) -> Result<(), String> {
    let Some(model) = t.models.last_mut() else {
        return Err("an arm line before any model line".into());
    };
    if f.len() != 5 {
        return Err(format!("{}: an arm line has 5 fields, not {}", model.name, f.len()));
    }
    let (role, version, triton_model) = (f[1], f[2], f[3]);
    if version.is_empty() {
        return Err(format!("{}.{role}: empty version", model.name));
    }
    if triton_model.is_empty() || triton_model.contains('/') || triton_model.contains(' ') {
        return Err(format!("{}.{role}: bad Triton model name {triton_model:?}", model.name));
    }
    let nodes: Vec<String> = f[4].split(',').map(str::to_string).collect();
    if let Some(bad) = nodes.iter().find(|n| !valid_node(n)) {
        return Err(format!("{}.{role}: a node is 'host:port', not {bad:?}", model.name));
    }
    let arm = Some(ArmSpec { version: version.to_string(), triton_model: triton_model.to_string(), nodes });
    let slot = match role {
        "stable" => &mut model.stable,
        "canary" => &mut model.canary,
        "shadow" => &mut model.shadow,
        _ => return Err(format!("{}: arm role must be stable, canary or shadow, not {role:?}", model.name)),
    };
    if slot.is_some() {
        return Err(format!("{}: two {role} arms", model.name));
    }
    *slot = arm;
    Ok(())
}

fn capture_line(t: &mut TableSpec, f: &[&str]) -> Result<(), String> {
    let Some(model) = t.models.last_mut() else {
        return Err("a capture line before any model line".into());
    };
    if f.len() != 3 {
        return Err(format!("{}: a capture line has 3 fields, not {}", model.name, f.len()));
    }
    if model.capture.is_some() {
        return Err(format!("{}: two capture lines", model.name));
    }
    // The range check also refuses NaN and the infinities, which parse.
    let fraction = f[1]
        .parse::<f64>()
        .ok()
        .filter(|x| (0.0..=1.0).contains(x))
        .ok_or_else(|| format!("{}: capture fraction must be a number 0..1, not {:?}", model.name, f[1]))?;
    let floor_per_s = f[2].parse::<u32>().ok().filter(|n| *n <= MAX_CAPTURE_FLOOR_PER_S).ok_or_else(|| {
        format!("{}: capture floor must be 0..{MAX_CAPTURE_FLOOR_PER_S} a second, not {:?}", model.name, f[2])
    })?;
    model.capture = Some(CaptureSpec { fraction, floor_per_s });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(p: &mut ControlParser, text: &str) -> Vec<Event> {
        text.lines().map(|l| p.line(l)).filter(|e| *e != Event::None).collect()
    }

    #[test]
    fn a_table_is_applied_at_its_end() {
        let mut p = ControlParser::default();
        let ev = feed(&mut p, "table\t7\nmodel\techo\t10\narm\tstable\t1\techo_v1\t127.0.0.1:8000,h:9\narm\tcanary\t2\techo_v2\t127.0.0.1:8000\nmodel\tother\t55\t30\narm\tstable\t3\tother_v3\th:1\narm\tshadow\t4\tother_v4\th:2\nend\n");
        let want = TableSpec {
            version: 7,
            models: vec![
                ModelSpec {
                    name: "echo".into(),
                    weight: 10,
                    stable: Some(ArmSpec {
                        version: "1".into(),
                        triton_model: "echo_v1".into(),
                        nodes: vec!["127.0.0.1:8000".into(), "h:9".into()],
                    }),
                    canary: Some(ArmSpec {
                        version: "2".into(),
                        triton_model: "echo_v2".into(),
                        nodes: vec!["127.0.0.1:8000".into()],
                    }),
                    shadow_share: 0,
                    shadow: None,
                    capture: None,
                },
                ModelSpec {
                    name: "other".into(),
                    weight: 55,
                    stable: Some(ArmSpec {
                        version: "3".into(),
                        triton_model: "other_v3".into(),
                        nodes: vec!["h:1".into()],
                    }),
                    canary: None,
                    shadow_share: 30,
                    shadow: Some(ArmSpec {
                        version: "4".into(),
                        triton_model: "other_v4".into(),
                        nodes: vec!["h:2".into()],
                    }),
                    capture: None,
                },
            ],
        };
        assert_eq!(ev, vec![Event::Apply(want)]);
        assert_eq!(feed(&mut p, "table\t8\nend\r\n"), vec![Event::Apply(TableSpec { version: 8, models: vec![] })]);
    }

    #[test]
    fn malformed_tables_are_rejected_whole() {
        let cases = [
            ("table\tx\nend", None),
            ("table\t3\nmodel\tm\t101\narm\tstable\t1\tm1\th:1\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\narm\tstable\t1\tm1\th:0\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\narm\tstable\t1\tm1\th\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\narm\tstable\t1\tm1\t:80\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\narm\tstable\t1\tm1\th:1\narm\tstable\t1\tm1\th:1\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\narm\tblue\t1\tm1\th:1\nend", Some(3)),
            ("table\t3\nmodel\ta/b\t5\nend", Some(3)),
            ("table\t3\narm\tstable\t1\tm1\th:1\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\narm\tstable\t\tm1\th:1\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\narm\tstable\t1\tm/1\th:1\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\nmodel\tm\t5\nend", Some(3)),
            ("table\t3\nbogus\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\t101\narm\tstable\t1\tm1\th:1\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\tx\narm\tstable\t1\tm1\th:1\nend", Some(3)),
            ("table\t3\nmodel\tm\t5\t1\t2\narm\tstable\t1\tm1\th:1\nend", Some(3)),
        ];
        for (text, version) in cases {
            let mut p = ControlParser::default();
            let ev = feed(&mut p, text);
            assert!(matches!(ev.as_slice(), [Event::Reject(v, _)] if *v == version), "{text:?}: {ev:?}");
        }
        let mut p = ControlParser::default();
        let ev = feed(&mut p, "table\t1\nmodel\tm\t0\ntable\t2\nmodel\tm\t0\narm\tstable\t1\tm1\th:1\nend");
        assert!(matches!(&ev[..], [Event::Reject(Some(1), _), Event::Apply(t)] if t.version == 2), "{ev:?}");
        assert!(matches!(&feed(&mut ControlParser::default(), "end")[..], [Event::Reject(None, _)]));
    }

    #[test]
    fn a_capture_line_sets_the_sampling_of_the_model_before_it() {
        let mut p = ControlParser::default();
        let ev = feed(&mut p, "table\t4\nmodel\ta\t0\ncapture\t0.05\t20\narm\tstable\t1\ta1\th:1\nmodel\tb\t10\narm\tstable\t1\tb1\th:1\ncapture\t1e-3\t0\narm\tcanary\t2\tb2\th:1\nmodel\tc\t0\narm\tstable\t1\tc1\th:1\nmodel\td\t0\narm\tstable\t1\td1\th:1\ncapture\t1\t10000\nend");
        let [Event::Apply(t)] = &ev[..] else { panic!("{ev:?}") };
        let captures: Vec<Option<CaptureSpec>> = t.models.iter().map(|m| m.capture).collect();
        assert_eq!(
            captures,
            [
                Some(CaptureSpec { fraction: 0.05, floor_per_s: 20 }),
                Some(CaptureSpec { fraction: 0.001, floor_per_s: 0 }),
                None,
                Some(CaptureSpec { fraction: 1.0, floor_per_s: 10_000 }),
            ]
        );
        assert!(t.models[1].canary.is_some()); // arm lines after a capture line still belong to its model
    }

    #[test]
    fn bad_capture_lines_reject_the_table_with_the_reason() {
        let cases = [
            ("capture\t0.1\t5\nmodel\tm\t0", "a capture line before any model line"),
            ("model\tm\t0\ncapture\t0.1", "m: a capture line has 3 fields, not 2"),
            ("model\tm\t0\ncapture\t0.1\t5\t6", "m: a capture line has 3 fields, not 4"),
            ("model\tm\t0\ncapture\t0.1\t5\ncapture\t0.2\t5", "m: two capture lines"),
            ("model\tm\t0\ncapture\t1.5\t5", "m: capture fraction must be a number 0..1, not \"1.5\""),
            ("model\tm\t0\ncapture\t-0.1\t5", "m: capture fraction must be a number 0..1, not \"-0.1\""),
            ("model\tm\t0\ncapture\tNaN\t5", "m: capture fraction must be a number 0..1, not \"NaN\""),
            ("model\tm\t0\ncapture\tinf\t5", "m: capture fraction must be a number 0..1, not \"inf\""),
            ("model\tm\t0\ncapture\t\t5", "m: capture fraction must be a number 0..1, not \"\""),
            ("model\tm\t0\ncapture\t0.1\t10001", "m: capture floor must be 0..10000 a second, not \"10001\""),
            ("model\tm\t0\ncapture\t0.1\t-1", "m: capture floor must be 0..10000 a second, not \"-1\""),
            ("model\tm\t0\ncapture\t0.1\t2.5", "m: capture floor must be 0..10000 a second, not \"2.5\""),
        ];
        for (lines, why) in cases {
            let text = format!("table\t5\n{lines}\narm\tstable\t1\tm1\th:1\nend");
            let ev = feed(&mut ControlParser::default(), &text);
            assert_eq!(ev, [Event::Reject(Some(5), why.to_string())], "{text:?}");
        }
        let ev = feed(&mut ControlParser::default(), "capture\t0.1\t5");
        assert_eq!(ev, [Event::Reject(None, "capture line outside a table".to_string())]);
    }

    #[test]
    fn dropped_samples_are_reported_between_tables_only() {
        assert_eq!(feed(&mut ControlParser::default(), "dropped\t3"), vec![Event::SamplesDropped(3)]);
        assert!(matches!(&feed(&mut ControlParser::default(), "dropped\tx")[..], [Event::Reject(None, _)]));
        let ev = feed(&mut ControlParser::default(), "table\t1\nmodel\tm\t0\ndropped\t1\narm\tstable\t1\tm1\th:1\nend");
        assert!(matches!(&ev[..], [Event::Reject(Some(1), _)]), "{ev:?}");
    }

    #[test]
    fn stop_is_a_line_of_its_own_between_tables() {
        assert_eq!(feed(&mut ControlParser::default(), "stop"), vec![Event::Stop]);
        assert!(matches!(&feed(&mut ControlParser::default(), "stop\tnow")[..], [Event::Reject(None, _)]));
        let ev = feed(&mut ControlParser::default(), "table\t1\nstop\nend");
        assert!(matches!(&ev[..], [Event::Reject(Some(1), _)]), "{ev:?}");
    }

    #[test]
    fn nodes_are_host_port() {
        for ok in ["127.0.0.1:8000", "triton-0.triton:8001", "[::1]:80", "h:65535"] {
            assert!(valid_node(ok), "{ok}");
        }
        for bad in ["h:65536", "h:", ":1", "h", "h:x", "h:-1", ""] {
            assert!(!valid_node(bad), "{bad}");
        }
    }
}
