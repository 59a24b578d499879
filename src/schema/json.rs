//! JSON read once, the way no two parsers could read it differently: an object with a
//! key twice (`{"count": -5, "count": 1}`: serde_json keeps the last, many parsers the
//! first), or two keys that differ only in case (Go's `encoding/json` matches field
//! names in any case, and takes the last), is refused rather than validated as one
//! reading while the service acts on another (I-JSON, RFC 7493 2.3).

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Parses `body`; an error names the problem. Nesting past 128 levels is refused by
/// serde_json before it can exhaust the stack.
pub fn parse(body: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = Unique.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(v)
}

struct Unique;

impl<'de> DeserializeSeed<'de> for Unique {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = seq.next_element_seed(Unique)? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(fold(&key)) {
                let twice = if out.contains_key(&key) {
                    format!("the key {key:?} is given twice")
                } else {
                    format!("the key {key:?} differs from another only in case")
                };
                return Err(de::Error::custom(twice));
            }
            let value = map.next_value_seed(Unique)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// A key as case-insensitive decoders read it: each character upper-cased after
/// lower-casing (Go's `encoding/json` folding: `ſ` is `S`, `K` (Kelvin) is `K`, `ı` and
/// `İ` are `I`), so that no two keys a service could take for one pass as two.
fn fold(key: &str) -> String {
    if key.is_ascii() {
        return key.to_ascii_uppercase();
    }
    let one = |mut it: std::iter::Peekable<std::vec::IntoIter<char>>, c: char| match (
        it.next(),
        it.peek(),
    ) {
        (Some(x), None) => x,
        _ => c,
    };
    key.chars()
        .map(|c| {
            if c == '\u{130}' {
                return 'I';
            }
            let lower = one(
                c.to_lowercase().collect::<Vec<_>>().into_iter().peekable(),
                c,
            );
            one(
                lower
                    .to_uppercase()
                    .collect::<Vec<_>>()
                    .into_iter()
                    .peekable(),
                lower,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_one_unicode_fold_apart_are_one_key() {
        for (a, b) in [
            ("is_admin", "iſ_admin"),
            ("is_admin", "IS_ADMIN"),
            ("kind", "\u{212a}ind"),
            ("id", "\u{131}d"),
            ("id", "\u{130}d"),
        ] {
            assert_eq!(super::fold(a), super::fold(b), "{a} {b}");
        }
        assert_ne!(super::fold("is"), super::fold("iss"));
    }

    #[test]
    fn one_reading_or_none() {
        assert!(super::parse(br#"{"a": [1, {"b": null}], "c": "x", "d": 1.5}"#).is_ok());
        for bad in [
            r#"{"count": -5, "count": 1}"#,
            r#"{"count": 1, "COUNT": -5}"#,
            r#"{"a": {"x": 1, "x": 2}}"#,
            r#"[{"k": 1, "K": 2}]"#,
            r#"{"a": 1} trailing"#,
        ] {
            assert!(super::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(
            super::parse(br#"{"a": 1}"#).unwrap(),
            serde_json::json!({"a": 1})
        );
    }
}
