//! Which requests the gateway serves: the KServe v2 routes an inference client needs (server and model
//! health, metadata, inference) and the gateway's own /metrics. Everything else Triton offers over HTTP
//! (model repository control, statistics, trace and log settings, shared memory, model configuration)
//! is answered by the gateway itself with a 404, never forwarded: it is the platform's to drive, not a
//! client's (a POST to /v2/trace/setting turns tracing on for every request).

/// A route the gateway answers itself.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Local {
    ServerMetadata,
    Live,
    Ready,
    Metrics,
}

/// What a model route asks of the model.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Call {
    Metadata,
    Ready,
    Infer,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Route<'a> {
    Local(Local),
    /// `/v2/models/{name}[/versions/{v}][/ready|/infer]`: `tail` is what follows the name and its slash
    /// ("", "ready", "versions/3/infer", ...), forwarded as it came.
    Model {
        name: &'a [u8],
        tail: &'a [u8],
        call: Call,
    },
    NotFound,
}

impl Route<'_> {
    /// The methods the route takes, as an Allow header's value.
    pub fn allow(&self) -> &'static str {
        match self {
            Route::Model { call: Call::Infer, .. } => "POST",
            _ => "GET, HEAD",
        }
    }

    pub fn allows(&self, method: &[u8]) -> bool {
        match self {
            Route::Model { call: Call::Infer, .. } => method == b"POST",
            _ => method == b"GET" || method == b"HEAD",
        }
    }
}

/// The methods the gateway serves at all: after any other, the connection is closed (a parser that
/// knows the method, as llhttp knows CONNECT, may read what follows it as no request at all).
pub fn served_method(method: &[u8]) -> bool {
    matches!(method, b"GET" | b"HEAD" | b"POST")
}

/// The route of a request's path (its query already cut off).
pub fn route(path: &[u8]) -> Route<'_> {
    match path {
        b"/v2" => return Route::Local(Local::ServerMetadata),
        b"/v2/health/live" => return Route::Local(Local::Live),
        b"/v2/health/ready" => return Route::Local(Local::Ready),
        b"/metrics" => return Route::Local(Local::Metrics),
        _ => {}
    }
    let Some(rest) = path.strip_prefix(b"/v2/models/") else { return Route::NotFound };
    let (name, tail) = match rest.iter().position(|&c| c == b'/') {
        Some(p) if p + 1 < rest.len() => (&rest[..p], &rest[p + 1..]),
        Some(_) => return Route::NotFound, // a trailing slash
        None => (rest, &b""[..]),
    };
    if name.is_empty() {
        return Route::NotFound;
    }
    let mut parts = (!tail.is_empty()).then(|| tail.split(|&c| c == b'/')).into_iter().flatten();
    let mut first = parts.next();
    if first == Some(b"versions") {
        let version = parts.next().unwrap_or(b"");
        if version.is_empty() || version.len() > 18 || !version.iter().all(u8::is_ascii_digit) {
            return Route::NotFound;
        }
        first = parts.next();
        if first == Some(b"") {
            return Route::NotFound; // a trailing slash
        }
    }
    let call = match first {
        None => Call::Metadata,
        Some(b"ready") => Call::Ready,
        Some(b"infer") => Call::Infer,
        Some(_) => return Route::NotFound,
    };
    if parts.next().is_some() {
        return Route::NotFound;
    }
    Route::Model { name, tail, call }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(path: &str) -> Option<(&str, &str, Call)> {
        match route(path.as_bytes()) {
            Route::Model { name, tail, call } => {
                Some((std::str::from_utf8(name).unwrap(), std::str::from_utf8(tail).unwrap(), call))
            }
            _ => None,
        }
    }

    #[test]
    fn the_kserve_routes_a_client_needs_are_served() {
        assert_eq!(route(b"/v2"), Route::Local(Local::ServerMetadata));
        assert_eq!(route(b"/v2/health/live"), Route::Local(Local::Live));
        assert_eq!(route(b"/v2/health/ready"), Route::Local(Local::Ready));
        assert_eq!(route(b"/metrics"), Route::Local(Local::Metrics));
        assert_eq!(call("/v2/models/echo"), Some(("echo", "", Call::Metadata)));
        assert_eq!(call("/v2/models/echo/ready"), Some(("echo", "ready", Call::Ready)));
        assert_eq!(call("/v2/models/echo/infer"), Some(("echo", "infer", Call::Infer)));
        assert_eq!(call("/v2/models/echo/versions/3"), Some(("echo", "versions/3", Call::Metadata)));
        assert_eq!(call("/v2/models/echo/versions/3/ready"), Some(("echo", "versions/3/ready", Call::Ready)));
        assert_eq!(call("/v2/models/echo/versions/12/infer"), Some(("echo", "versions/12/infer", Call::Infer)));
    }

    #[test]
    fn tritons_other_endpoints_are_not_found() {
        for path in [
            "/",
            "/v2/",
            "/v2/health",
            "/v2/health/ready/",
            "/v2/models",
            "/v2/models/",
            "/v2/models//infer",
            "/v2/models/echo/",
            "/v2/models/echo/stats",
            "/v2/models/echo/versions/1/stats",
            "/v2/models/echo/config",
            "/v2/models/echo/trace/setting",
            "/v2/models/echo/generate",
            "/v2/models/echo/infer/",
            "/v2/models/echo/ready/infer",
            "/v2/models/echo/versions",
            "/v2/models/echo/versions/",
            "/v2/models/echo/versions/x/infer",
            "/v2/models/echo/versions/-1",
            "/v2/models/echo/versions/1/",
            "/v2/models/echo/versions/1/infer/x",
            "/v2/models/echo/../stats",
            "/v2/repository/index",
            "/v2/repository/models/echo/load",
            "/v2/repository/models/echo/unload",
            "/v2/trace/setting",
            "/v2/logging",
            "/v2/systemsharedmemory/status",
            "/v2/systemsharedmemory/region/r/register",
            "/v2/cudasharedmemory/status",
            "/metrics/",
            "*",
            "http://gateway/v2/health/ready",
        ] {
            assert_eq!(route(path.as_bytes()), Route::NotFound, "{path}");
        }
        // Triton's statistics of every model: here a model named "stats", which only the table can have
        assert_eq!(call("/v2/models/stats"), Some(("stats", "", Call::Metadata)));
    }

    #[test]
    fn each_route_takes_its_methods() {
        let infer = route(b"/v2/models/echo/infer");
        assert!(infer.allows(b"POST") && !infer.allows(b"GET") && !infer.allows(b"PUT"));
        assert_eq!(infer.allow(), "POST");
        for path in ["/v2", "/v2/health/ready", "/metrics", "/v2/models/echo", "/v2/models/echo/versions/1/ready"] {
            let r = route(path.as_bytes());
            assert!(r.allows(b"GET") && r.allows(b"HEAD") && !r.allows(b"POST") && !r.allows(b"get"), "{path}");
            assert_eq!(r.allow(), "GET, HEAD");
        }
        assert!(served_method(b"POST") && !served_method(b"DELETE") && !served_method(b"CONNECT"));
    }
}
