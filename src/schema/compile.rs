//! Schemas compiled at load: a service's proto files (with protox) or descriptor set
//! into the per-method tables the wire validator walks, and its JSON Schema routes into
//! validators (with jsonschema). `config` calls these and reports what they refuse at
//! the config's own `file:line:col`; nothing here reads the config.

use prost_reflect::DescriptorPool;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a schema file does not compile; the message names its own `file:line:col`
/// where one is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{0}")]
    Proto(String),
    #[error("{0}")]
    DescriptorSet(String),
    #[error("JSON schema route {0:?} is not \"METHOD /path\"")]
    NotARoute(String),
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error("{file}:{line}:{col}: not JSON: {message}")]
    NotJson {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
    /// The schema does not compile at `pointer` (a JSON pointer into its text); `at`
    /// is the file, with the pointer's line and column where they can be found.
    #[error("{at}: schema does not compile at {pointer:?}: {message}")]
    Invalid {
        at: String,
        pointer: String,
        message: String,
    },
}

impl CompileError {
    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            CompileError::Proto(_) => {
                "the .proto file must compile (protoc would say the same); fix it or the path"
            }
            CompileError::DescriptorSet(_) => {
                "give a FileDescriptorSet (protoc --descriptor_set_out --include_imports)"
            }
            CompileError::NotARoute(_) => "write the route as \"POST /v1/orders/{id}\"",
            CompileError::Read(..) => {
                "fix the path; relative paths start at the config file's directory"
            }
            CompileError::NotJson { .. } => "a JSON Schema file must be a JSON document",
            CompileError::Invalid { .. } => {
                "the file must be a valid JSON Schema (draft-07 or 2020-12)"
            }
        }
    }
}

/// A proto file and its imports, compiled.
pub fn proto(file: &Path, includes: &[PathBuf]) -> Result<DescriptorPool, CompileError> {
    protox::Compiler::new(includes)
        .and_then(|mut c| {
            c.open_file(file)?;
            Ok(c.descriptor_pool())
        })
        .map_err(|e| CompileError::Proto(format!("{}: {e}", proto_position(&e, file, includes))))
}

/// A prebuilt FileDescriptorSet, read.
pub fn descriptor_set(file: &Path) -> Result<DescriptorPool, CompileError> {
    std::fs::read(file)
        .map_err(|e| e.to_string())
        .and_then(|b| DescriptorPool::decode(b.as_slice()).map_err(|e| e.to_string()))
        .map_err(|e| CompileError::DescriptorSet(format!("{}: {e}", file.display())))
}

/// Every method of the pools, compiled for checking on the wire.
pub fn methods(pools: &[DescriptorPool], strict: bool, validate_responses: bool) -> ProtoSchema {
    let mut methods = HashMap::new();
    for pool in pools {
        for svc in pool.services() {
            for m in svc.methods() {
                let name = format!("{}/{}", svc.full_name(), m.name());
                let schema = MethodSchema {
                    name: name.as_str().into(),
                    input: Arc::new(super::wire::Compiled::new(&m.input())),
                    output: Arc::new(super::wire::Compiled::new(&m.output())),
                };
                methods.insert(name, Arc::new(schema));
            }
        }
    }
    ProtoSchema {
        methods: Arc::new(methods),
        strict,
        validate_responses,
    }
}

/// One `"METHOD /path/{param}" = file` entry, compiled; `hash` tells the file's text
/// apart from another's.
pub fn json_route(
    key: &str,
    file: &Path,
    hash: impl FnOnce(&str) -> String,
) -> Result<JsonRoute, CompileError> {
    let Some((method, template)) = key.split_once(' ').filter(|(m, p)| {
        !m.is_empty() && m.chars().all(|c| c.is_ascii_uppercase()) && p.starts_with('/')
    }) else {
        return Err(CompileError::NotARoute(key.to_owned()));
    };
    let shown = file.display().to_string();
    let text = std::fs::read_to_string(file)
        .map_err(|e| CompileError::Read(shown.clone(), e.to_string()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CompileError::NotJson {
            file: shown.clone(),
            line: e.line(),
            col: e.column(),
            message: e.to_string(),
        })?;
    let validator = jsonschema::validator_for(&doc).map_err(|e| {
        let pointer = e.instance_path().to_string();
        CompileError::Invalid {
            at: match json_pointer_position(&text, &pointer) {
                Some((l, c)) => format!("{shown}:{l}:{c}"),
                None => shown,
            },
            pointer,
            message: e.to_string(),
        }
    })?;
    Ok(JsonRoute {
        method: method.to_owned(),
        template: template.split('/').map(Segment::parse).collect(),
        route: key.into(),
        validator: Arc::new(validator),
        hash: hash(&text),
    })
}

/// The message types of every method of a service's proto files.
#[derive(Debug, Clone)]
pub struct ProtoSchema {
    /// `pkg.Service/Method` → its message types.
    pub methods: Arc<HashMap<String, Arc<MethodSchema>>>,
    /// Unknown fields are refused too.
    pub strict: bool,
    /// Responses are validated against the output type as well.
    pub validate_responses: bool,
}

/// One gRPC method of a schema.
#[derive(Debug)]
pub struct MethodSchema {
    /// `pkg.Service/Method`: bounded, so it can be a metric label.
    pub name: Arc<str>,
    /// The request and response types, compiled for checking on the wire.
    pub input: Arc<super::wire::Compiled>,
    pub output: Arc<super::wire::Compiled>,
}

/// Where a protox error is: `path:line:col` of the file it names (the proto file or
/// one of its imports), or the proto file's path when the error has no position.
pub fn proto_position(e: &protox::Error, file: &Path, includes: &[PathBuf]) -> String {
    use miette::Diagnostic;
    let path = e
        .file()
        .and_then(|name| includes.iter().map(|i| i.join(name)).find(|p| p.is_file()))
        .unwrap_or_else(|| file.to_owned());
    let offset = e.labels().and_then(|mut l| l.next()).map(|l| l.offset());
    match (offset, std::fs::read_to_string(&path)) {
        (Some(at), Ok(text)) => {
            let before = &text[..at.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("{}:{line}:{col}", path.display())
        }
        _ => path.display().to_string(),
    }
}

/// One `"METHOD /path/{param}" = schema.json` entry, compiled.
#[derive(Clone)]
pub struct JsonRoute {
    pub method: String,
    pub template: Vec<Segment>,
    /// The route as written, for error messages.
    pub route: Arc<str>,
    pub validator: Arc<jsonschema::Validator>,
    /// Hash of the schema file's text, to tell when it changed.
    pub hash: String,
}

impl std::fmt::Debug for JsonRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.route)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{name}`: any one non-empty segment.
    Param,
}

impl Segment {
    pub fn parse(s: &str) -> Self {
        if s.starts_with('{') && s.ends_with('}') {
            Segment::Param
        } else {
            Segment::Literal(s.to_owned())
        }
    }
}

impl JsonRoute {
    /// Whether a request is for this route, with its path read the way servers route
    /// it: empty segments (`//`, a trailing `/`) are skipped, `;params` are dropped,
    /// percent-escapes decoded and letters compared in any case, so that `/v1/orders/`,
    /// `/v1/orders;x=1`, `/v1/%6Frders` and `/V1/Orders` are validated as `/v1/orders` is.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        if self.method != method {
            return false;
        }
        let mut segs = crate::request::segments(path).map(|s| s.name);
        let template = self
            .template
            .iter()
            .filter(|t| !matches!(t, Segment::Literal(l) if l.is_empty()));
        for t in template {
            match (t, segs.next()) {
                // in any case: Express and ASP.NET Core route `/v1/RESERVE` to the
                // handler of `/v1/reserve`, which must not get it unvalidated
                (Segment::Literal(l), Some(s)) if l.eq_ignore_ascii_case(&s) => {}
                (Segment::Param, Some(_)) => {}
                _ => return false,
            }
        }
        segs.next().is_none()
    }
}

/// The line and column (1-based) of the value a JSON pointer (`/properties/a/type`)
/// names in a JSON text, for pointing at a part of a schema that does not compile.
pub fn json_pointer_position(text: &str, pointer: &str) -> Option<(usize, usize)> {
    let b = text.as_bytes();
    let mut at = skip_ws(b, 0);
    for raw in pointer.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        match b.get(at)? {
            b'{' => {
                at = skip_ws(b, at + 1);
                loop {
                    let end = string_end(b, at)?;
                    let key: String = serde_json::from_str(&text[at..end]).ok()?;
                    at = skip_ws(b, end);
                    if b.get(at) != Some(&b':') {
                        return None;
                    }
                    at = skip_ws(b, at + 1);
                    if key == seg {
                        break;
                    }
                    at = skip_ws(b, value_end(b, at)?);
                    if b.get(at) != Some(&b',') {
                        return None;
                    }
                    at = skip_ws(b, at + 1);
                }
            }
            b'[' => {
                let index: usize = seg.parse().ok()?;
                at = skip_ws(b, at + 1);
                for _ in 0..index {
                    at = skip_ws(b, value_end(b, at)?);
                    if b.get(at) != Some(&b',') {
                        return None;
                    }
                    at = skip_ws(b, at + 1);
                }
            }
            _ => return None,
        }
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some((line, col))
}

fn skip_ws(b: &[u8], mut at: usize) -> usize {
    while b.get(at).is_some_and(|c| c.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

/// The end (exclusive) of the string starting at `at`.
fn string_end(b: &[u8], at: usize) -> Option<usize> {
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    while let Some(&c) = b.get(i) {
        match c {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end (exclusive) of the value starting at `at`.
fn value_end(b: &[u8], at: usize) -> Option<usize> {
    match b.get(at)? {
        b'"' => string_end(b, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while let Some(&c) = b.get(i) {
                match c {
                    b'"' => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let mut i = at;
            while b
                .get(i)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
            {
                i += 1;
            }
            Some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_pointers_find_their_value() {
        let t = "{\n  \"type\": \"object\",\n  \"properties\": {\n    \"a/b\": { \"type\": [1, {\"x\": \"}\"}, 5] }\n  }\n}";
        assert_eq!(json_pointer_position(t, ""), Some((1, 1)));
        assert_eq!(json_pointer_position(t, "/type"), Some((2, 11)));
        assert_eq!(
            json_pointer_position(t, "/properties/a~1b/type"),
            Some((4, 22))
        );
        assert_eq!(
            json_pointer_position(t, "/properties/a~1b/type/2"),
            Some((4, 38))
        );
        assert_eq!(json_pointer_position(t, "/properties/nope"), None);
    }

    fn route(key: &str) -> JsonRoute {
        let (method, template) = key.split_once(' ').unwrap();
        JsonRoute {
            method: method.into(),
            template: template.split('/').map(Segment::parse).collect(),
            route: key.into(),
            validator: Arc::new(jsonschema::validator_for(&serde_json::json!({})).unwrap()),
            hash: String::new(),
        }
    }

    #[test]
    fn json_routes_match_paths_as_servers_route_them() {
        let orders = route("POST /v1/orders");
        let one = route("POST /v1/orders/{id}");
        for p in [
            "/v1/orders",
            "/v1/orders/",
            "//v1//orders",
            "/v1/orders;x=1",
            "/v1/%6Frders",
        ] {
            assert!(orders.matches("POST", p), "{p}");
            assert!(!one.matches("POST", p), "{p}");
        }
        for p in ["/v1/orders/42", "/v1/orders/42/", "/v1/orders/4%32;v=2"] {
            assert!(one.matches("POST", p), "{p}");
            assert!(!orders.matches("POST", p), "{p}");
        }
        assert!(!orders.matches("PUT", "/v1/orders"));
        assert!(!orders.matches("POST", "/v1/orders/42/items"));
        assert!(!orders.matches("POST", "/v1/order"));
        assert!(!one.matches("POST", "/v1/orders/42/items"));
    }
}
