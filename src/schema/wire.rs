//! Protobuf validation on the wire: a message type is compiled once (at config load)
//! into flat tables, and a message is checked by walking its bytes against them —
//! wire types, lengths, UTF-8, nesting, proto2 `required`, declared extensions,
//! unknown fields when strict — without building a decoded message. It accepts what prost-reflect's
//! decoder accepts and nothing more (a property test holds the two together), save a
//! map field sent with a wire type that does not fit it, which prost-reflect lets
//! through; at a fraction of the cost: nothing is allocated unless a message is refused.

use prost_reflect::{Cardinality, Kind, MessageDescriptor};
use std::collections::HashMap;

/// How a field's value is encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// int32, int64, uint32, uint64, sint32, sint64, bool, enum
    Varint,
    /// fixed64, sfixed64, double
    Fixed64,
    /// fixed32, sfixed32, float
    Fixed32,
    String,
    Bytes,
    /// A nested message (or map entry), by index into the compiled types.
    Message(usize),
    /// A proto2 group, by index into the compiled types.
    Group(usize),
}

#[derive(Debug)]
struct Field {
    name: Box<str>,
    shape: Shape,
    repeated: bool,
    /// Bit in the message's required mask, for proto2 `required` fields.
    required: Option<u8>,
}

#[derive(Debug)]
struct Type {
    name: Box<str>,
    /// Fields by number, for numbers below 256; the rest in `far`.
    near: Vec<Option<Field>>,
    far: std::collections::BTreeMap<u32, Field>,
    /// Field numbers of the required fields, by their bit.
    required: Vec<u32>,
    map_entry: bool,
}

impl Type {
    fn field(&self, n: u32) -> Option<&Field> {
        match self.near.get(n as usize) {
            Some(f) => f.as_ref(),
            None => self.far.get(&n),
        }
    }
}

/// A message type and every type it contains, ready to check messages against.
#[derive(Debug)]
pub struct Compiled {
    types: Vec<Type>,
}

const NEAR: u32 = 256;
/// Nesting deeper than this is refused (prost-reflect's own limit).
const MAX_DEPTH: u32 = 100;

impl Compiled {
    pub fn new(root: &MessageDescriptor) -> Self {
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut order = vec![root.clone()];
        index.insert(root.full_name().to_owned(), 0);
        let mut types = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let m = order[i].clone();
            let mut t = Type {
                name: m.full_name().into(),
                near: Vec::new(),
                far: std::collections::BTreeMap::new(),
                required: Vec::new(),
                map_entry: m.is_map_entry(),
            };
            // its fields, and the extensions of it the files declare (prost-reflect
            // decodes those against their types too): number, name, kind, group,
            // repeated, cardinality
            let fields = m
                .fields()
                .map(|f| {
                    let repeated = f.is_list() || f.is_map();
                    let name: Box<str> = f.name().into();
                    (
                        f.number(),
                        name,
                        f.kind(),
                        f.is_group(),
                        repeated,
                        f.cardinality(),
                    )
                })
                .chain(m.extensions().map(|x| {
                    let repeated = x.is_list() || x.is_map();
                    let name: Box<str> = format!("[{}]", x.full_name()).into();
                    (
                        x.number(),
                        name,
                        x.kind(),
                        x.is_group(),
                        repeated,
                        x.cardinality(),
                    )
                }))
                .collect::<Vec<_>>();
            for (number, name, kind, group, repeated, cardinality) in fields {
                let mut nested = |d: MessageDescriptor| {
                    *index.entry(d.full_name().to_owned()).or_insert_with(|| {
                        order.push(d);
                        order.len() - 1
                    })
                };
                let shape = match kind {
                    Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => Shape::Fixed64,
                    Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => Shape::Fixed32,
                    Kind::String => Shape::String,
                    Kind::Bytes => Shape::Bytes,
                    Kind::Message(d) if group => Shape::Group(nested(d)),
                    Kind::Message(d) => Shape::Message(nested(d)),
                    _ => Shape::Varint,
                };
                let required = (cardinality == Cardinality::Required && t.required.len() < 64)
                    .then(|| {
                        t.required.push(number);
                        (t.required.len() - 1) as u8
                    });
                let field = Field {
                    name,
                    shape,
                    repeated,
                    required,
                };
                if number < NEAR {
                    let n = number as usize;
                    if t.near.len() <= n {
                        t.near.resize_with(n + 1, || None);
                    }
                    t.near[n] = Some(field);
                } else {
                    t.far.insert(number, field);
                }
            }
            types.push(t);
            i += 1;
        }
        Self { types }
    }

    /// The full name of the root type.
    pub fn name(&self) -> &str {
        &self.types[0].name
    }

    /// Checks one message; the problem, naming the field by its path
    /// (`shop.Order.items[2].sku (field 1): invalid UTF-8`).
    pub fn check(&self, msg: &[u8], strict: bool) -> Result<(), String> {
        let w = Walk {
            types: &self.types,
            strict,
        };
        match w.message(msg, 0, None, 0) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.describe(&self.types[0].name)),
        }
    }
}

/// A refusal on its way up: the innermost problem and the path to it.
struct Error {
    /// Outermost last: `.items[2]`, `.sku (field 1)`…
    path: Vec<String>,
    problem: String,
}

impl Error {
    fn new(problem: impl Into<String>) -> Self {
        Self {
            path: Vec::new(),
            problem: problem.into(),
        }
    }

    fn describe(mut self, root: &str) -> String {
        self.path.reverse();
        format!("{root}{}: {}", self.path.concat(), self.problem)
    }
}

struct Walk<'a> {
    types: &'a [Type],
    strict: bool,
}

fn varint(b: &[u8], at: &mut usize) -> Result<u64, Error> {
    let mut v = 0u64;
    for i in 0..10 {
        let Some(&byte) = b.get(*at + i) else {
            return Err(Error::new("truncated varint"));
        };
        if i == 9 && byte > 1 {
            return Err(Error::new("varint longer than 64 bits"));
        }
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *at += i + 1;
            return Ok(v);
        }
    }
    Err(Error::new("varint longer than 64 bits"))
}

fn wire_name(w: u8) -> &'static str {
    match w {
        0 => "varint",
        1 => "fixed64",
        2 => "length-delimited",
        3 => "start-group",
        4 => "end-group",
        5 => "fixed32",
        _ => "invalid",
    }
}

fn shape_name(s: Shape) -> &'static str {
    match s {
        Shape::Varint => "a varint",
        Shape::Fixed64 => "a 64-bit fixed",
        Shape::Fixed32 => "a 32-bit fixed",
        Shape::String => "a string",
        Shape::Bytes => "bytes",
        Shape::Message(_) => "a message",
        Shape::Group(_) => "a group",
    }
}

impl Walk<'_> {
    /// Walks one message (or a group's body, up to its end tag `group`); returns the
    /// bytes it took.
    fn message(&self, b: &[u8], ty: usize, group: Option<u32>, depth: u32) -> Result<usize, Error> {
        if depth > MAX_DEPTH {
            return Err(Error::new("nested too deeply"));
        }
        let t = &self.types[ty];
        let mut seen: u64 = 0;
        let mut at = 0;
        loop {
            if at == b.len() {
                if group.is_some() {
                    return Err(Error::new("group is not closed (truncated)"));
                }
                break;
            }
            let start = at;
            let key = varint(b, &mut at)?;
            let number = key >> 3;
            let wire = (key & 7) as u8;
            if number == 0 || number > u64::from(u32::MAX >> 3) {
                return Err(Error::new(format!("invalid field number {number}")));
            }
            let number = number as u32;
            if wire == 4 {
                if group == Some(number) {
                    self.required(t, seen)?;
                    return Ok(at);
                }
                return Err(Error::new(format!(
                    "unexpected end-group tag for field {number}"
                )));
            }
            let named = |e: Error, f: &Field| -> Error {
                if t.map_entry && !e.path.is_empty() {
                    // inside a map's value: the entry is named by its key already
                    return e;
                }
                self.at_field(e, f, number, b, start)
            };
            match t.field(number) {
                Some(f) => {
                    self.value(b, &mut at, f, (number, wire), depth)
                        .map_err(|e| named(e, f))?;
                    if let Some(bit) = f.required {
                        seen |= 1 << bit;
                    }
                }
                None if self.strict && !t.map_entry => {
                    return Err(Error::new(format!(
                        "unknown field number {number} (strict schema)"
                    )));
                }
                None => self.skip(b, &mut at, wire, number, depth)?,
            }
        }
        self.required(t, seen)?;
        Ok(at)
    }

    fn required(&self, t: &Type, seen: u64) -> Result<(), Error> {
        for (bit, n) in t.required.iter().enumerate() {
            if seen & (1 << bit) == 0 {
                let name = t.field(*n).map_or("?", |f| &f.name);
                let mut e = Error::new("required field is missing");
                e.path.push(format!(".{name} (field {n})"));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Adds the field (and, for a repeated message, which one) to an error's path.
    fn at_field(&self, mut e: Error, f: &Field, n: u32, b: &[u8], start: usize) -> Error {
        let nested = matches!(f.shape, Shape::Message(_) | Shape::Group(_));
        if !nested || e.path.is_empty() {
            // the problem is this field's own value
            e.path.push(format!(".{} (field {n})", f.name));
            return e;
        }
        let which = match f.shape {
            Shape::Message(i) if self.types[i].map_entry => map_key(b, start, &self.types[i]),
            _ if f.repeated => Some(occurrence(b, n, start).to_string()),
            _ => None,
        };
        match which {
            Some(w) => e.path.push(format!(".{}[{w}]", f.name)),
            None => e.path.push(format!(".{}", f.name)),
        }
        e
    }

    fn value(
        &self,
        b: &[u8],
        at: &mut usize,
        f: &Field,
        (number, wire): (u32, u8),
        depth: u32,
    ) -> Result<(), Error> {
        let packable =
            f.repeated && matches!(f.shape, Shape::Varint | Shape::Fixed32 | Shape::Fixed64);
        match (f.shape, wire) {
            (Shape::Varint, 0) => varint(b, at).map(drop),
            (Shape::Fixed64, 1) => take(b, at, 8).map(drop),
            (Shape::Fixed32, 5) => take(b, at, 4).map(drop),
            (Shape::String, 2) => {
                let s = delimited(b, at)?;
                std::str::from_utf8(s)
                    .map(drop)
                    .map_err(|_| Error::new("invalid UTF-8 in a string"))
            }
            (Shape::Bytes, 2) => delimited(b, at).map(drop),
            (Shape::Message(i), 2) => {
                let m = delimited(b, at)?;
                // a map entry is no level of its own to prost-reflect: its value is
                let level = if self.types[i].map_entry {
                    depth
                } else {
                    depth + 1
                };
                self.message(m, i, None, level).map(drop)
            }
            (Shape::Group(i), 3) => {
                let n = self.message(&b[*at..], i, Some(number), depth + 1)?;
                *at += n;
                Ok(())
            }
            (shape, 2) if packable => {
                let p = delimited(b, at)?;
                match shape {
                    Shape::Fixed64 if p.len() % 8 == 0 => Ok(()),
                    Shape::Fixed32 if p.len() % 4 == 0 => Ok(()),
                    Shape::Varint => {
                        let mut i = 0;
                        while i < p.len() {
                            varint(p, &mut i)?;
                        }
                        Ok(())
                    }
                    _ => Err(Error::new("packed values do not fill their length")),
                }
            }
            (shape, w) => Err(Error::new(format!(
                "wrong wire type {w} ({}) for {}",
                wire_name(w),
                shape_name(shape)
            ))),
        }
    }

    /// Skips an unknown field, checking only that it is well formed.
    fn skip(
        &self,
        b: &[u8],
        at: &mut usize,
        wire: u8,
        number: u32,
        depth: u32,
    ) -> Result<(), Error> {
        let r = match wire {
            0 => varint(b, at).map(drop),
            1 => take(b, at, 8).map(drop),
            2 => delimited(b, at).map(drop),
            5 => take(b, at, 4).map(drop),
            3 => {
                // a level of nesting, as a known group is
                if depth + 1 > MAX_DEPTH {
                    return Err(Error::new("nested too deeply"));
                }
                // an unknown group: walk to its end tag
                loop {
                    let key = varint(b, at)?;
                    if key > u64::from(u32::MAX) {
                        break Err(Error::new("invalid key value"));
                    }
                    let (n, w) = ((key >> 3) as u32, (key & 7) as u8);
                    if w == 4 {
                        if n == number {
                            break Ok(());
                        }
                        break Err(Error::new("mismatched end-group tag"));
                    }
                    if n == 0 {
                        break Err(Error::new("invalid field number 0"));
                    }
                    self.skip(b, at, w, n, depth + 1)?;
                }
            }
            w => Err(Error::new(format!("invalid wire type {w}"))),
        };
        r.map_err(|mut e| {
            e.path.push(format!(" field {number}"));
            e
        })
    }
}

fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8], Error> {
    let end = at
        .checked_add(n)
        .filter(|e| *e <= b.len())
        .ok_or_else(|| Error::new("truncated value"))?;
    let s = &b[*at..end];
    *at = end;
    Ok(s)
}

fn delimited<'a>(b: &'a [u8], at: &mut usize) -> Result<&'a [u8], Error> {
    let len = varint(b, at)?;
    let len = usize::try_from(len).map_err(|_| Error::new("length out of range"))?;
    take(b, at, len).map_err(|_| Error::new("truncated: length runs past the end"))
}

/// How many times field `n` occurs in `b` before byte `upto` (the index of a repeated
/// value); only on the error path.
fn occurrence(b: &[u8], n: u32, upto: usize) -> usize {
    let mut at = 0;
    let mut count = 0;
    while at < upto {
        let Ok(key) = varint(b, &mut at) else { break };
        if (key >> 3) as u32 == n {
            count += 1;
        }
        let ok = match key & 7 {
            0 => varint(b, &mut at).is_ok(),
            1 => take(b, &mut at, 8).is_ok(),
            2 => delimited(b, &mut at).is_ok(),
            5 => take(b, &mut at, 4).is_ok(),
            _ => false,
        };
        if !ok {
            break;
        }
    }
    count
}

/// The key of the map entry that starts at `start` (tag included), for naming it.
fn map_key(b: &[u8], start: usize, entry: &Type) -> Option<String> {
    let mut at = start;
    varint(b, &mut at).ok()?;
    let e = delimited(b, &mut at).ok()?;
    let mut i = 0;
    while i < e.len() {
        let key = varint(e, &mut i).ok()?;
        if key >> 3 == 1 {
            let shape = entry.field(1)?.shape;
            return match (shape, key & 7) {
                (Shape::String, 2) => {
                    let s = delimited(e, &mut i).ok()?;
                    Some(format!("{:?}", String::from_utf8_lossy(s)))
                }
                (Shape::Varint, 0) => varint(e, &mut i).ok().map(|v| v.to_string()),
                _ => None,
            };
        }
        match key & 7 {
            0 => drop(varint(e, &mut i).ok()?),
            1 => drop(take(e, &mut i, 8).ok()?),
            2 => drop(delimited(e, &mut i).ok()?),
            5 => drop(take(e, &mut i, 4).ok()?),
            _ => return None,
        }
    }
    None
}
