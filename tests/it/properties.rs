//! Property tests (the fuzzing CI can run on a stable toolchain): arbitrary and mutated
//! input to the PROXY header parser and the config loader must be refused cleanly,
//! never panic; the protobuf wire validator accepts exactly what prost-reflect decodes. `scripts/fuzz.sh` runs them with many more cases for a bounded time.

use fedport::listen::proxy_protocol::parse;
use proptest::prelude::*;
use std::net::SocketAddr;
use std::path::Path;

fn lb() -> SocketAddr {
    "10.0.9.1:5000".parse().unwrap()
}

const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const EXAMPLE: &str = include_str!("../../examples/fedport.toml");

fn all_type() -> prost_reflect::MessageDescriptor {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proto");
    let mut c = protox::Compiler::new([dir]).unwrap();
    c.open_file("all.proto").unwrap();
    c.descriptor_pool().get_message_by_name("all.All").unwrap()
}

/// Valid encodings of `all.All` with every kind of field set, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let json = [
        r#"{"i32": -5, "i64": "-9000000000", "u32": 7, "u64": "18000000000000000000", "s32": -3, "s64": "4",
            "flag": true, "e": "B", "f64": "1", "sf64": "-1", "d": 1.5, "f32": 9, "sf32": -9, "fl": 0.25,
            "s": "héllo", "b": "AAEC", "inner": {"s": "x", "nums": [1, -2, 300], "next": {"b": "/w=="}},
            "inners": [{"s": "a"}, {"nums": [5]}], "packed": ["1", "-1", "99999999999"], "fx": [1, 2],
            "m": {"k": {"s": "v"}, "": {}}, "g": {"a": 3}, "far": 12, "ds": [0.5, -2],
            "[all.note]": "ext", "[all.item]": {"s": "i", "next": {"b": "AA=="}}}"#,
        r#"{"s": "", "inner": {}, "m": {"z": {"next": {"next": {"s": "deep"}}}}}"#,
        r#"{}"#,
    ];
    let desc = all_type();
    json.iter()
        .map(|j| {
            let mut de = serde_json::Deserializer::from_str(j);
            let m = prost_reflect::DynamicMessage::deserialize(desc.clone(), &mut de)
                .unwrap_or_else(|e| panic!("{j}: {e}"));
            prost_reflect::prost::Message::encode_to_vec(&m)
        })
        .collect()
}

/// One change to a valid encoding: overwrite, insert or delete a byte, or truncate.
fn mutate(mut v: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(op, at, byte) in edits {
        let i = if v.is_empty() { 0 } else { at % v.len() };
        match op % 4 {
            0 if !v.is_empty() => v[i] = byte,
            1 => v.insert(i.min(v.len()), byte),
            2 if !v.is_empty() => {
                v.remove(i);
            }
            _ => v.truncate(i),
        }
    }
    v
}

#[test]
fn the_wire_validator_accepts_the_valid_seeds() {
    let wire = fedport::schema::wire::Compiled::new(&all_type());
    for s in seeds() {
        assert_eq!(wire.check(&s, true), Ok(()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000), ..ProptestConfig::default() })]

    #[test]
    fn proxy_parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse(&bytes, lb());
    }

    #[test]
    fn proxy_parser_never_panics_on_v1_like_text(s in "PROXY (TCP4|TCP6|UNKNOWN|[A-Z]{0,5})( [0-9a-f:.]{0,40}){0,5}(\r\n)?") {
        let _ = parse(s.as_bytes(), lb());
    }

    #[test]
    fn proxy_parser_never_panics_on_v2_like_bytes(
        ver_cmd in any::<u8>(), fam in any::<u8>(), len in 0u16..300,
        body in proptest::collection::vec(any::<u8>(), 0..300)
    ) {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[ver_cmd, fam]);
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(&body);
        let _ = parse(&h, lb());
    }

    #[test]
    fn v1_tcp4_headers_round_trip(a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), sp in 1u16.., dp in 1u16..) {
        let src = std::net::Ipv4Addr::from(a);
        let h = format!("PROXY TCP4 {src} {} {sp} {dp}\r\n", std::net::Ipv4Addr::from(b));
        prop_assert_eq!(parse(h.as_bytes(), lb()).unwrap(), SocketAddr::from((src, sp)));
    }

    #[test]
    fn config_loader_never_panics_on_mutations(pos in 0usize..EXAMPLE.len(), len in 0usize..40, junk in "[ -~\n\"\\[\\]=]{0,20}") {
        let mut s = EXAMPLE.to_owned();
        let start = (0..=pos).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        let end = (start + len).min(s.len());
        let end = (end..=s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
        s.replace_range(start..end, &junk);
        let _ = fedport::config::compile(Path::new("examples/fedport.toml"), &s);
    }

    #[test]
    fn config_loader_never_panics_on_arbitrary_text(s in "\\PC{0,400}") {
        let _ = fedport::config::compile(Path::new("x.toml"), &s);
    }

    #[test]
    fn wire_validator_agrees_with_prost_reflect(
        seed in 0usize..3,
        edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..4),
    ) {
        let desc = all_type();
        let wire = fedport::schema::wire::Compiled::new(&desc);
        let bytes = mutate(seeds()[seed].clone(), &edits);
        let ours = wire.check(&bytes, false);
        let theirs = prost_reflect::DynamicMessage::decode(desc, bytes.as_slice());
        // never more lenient; stricter only on a wire type that does not fit its field,
        // which prost-reflect's map decoding does not look at
        let stricter = ours.as_ref().is_err_and(|e| e.contains("wrong wire type"));
        prop_assert!(ours.is_ok() == theirs.is_ok() || (stricter && theirs.is_ok()),
            "ours {:?}, prost-reflect {:?}, bytes {:02x?}", ours, theirs.err(), bytes);
    }

    #[test]
    fn wire_validator_agrees_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let desc = all_type();
        let wire = fedport::schema::wire::Compiled::new(&desc);
        let ours = wire.check(&bytes, false);
        let theirs = prost_reflect::DynamicMessage::decode(desc, bytes.as_slice());
        prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "ours {:?}, prost-reflect {:?}", ours, theirs.err());
    }
}

/// Encodings where a hand-written walker and prost-reflect could part ways: extensions
/// (checked against their types, known in strict mode), keys past u32 inside an
/// unknown group, unknown groups nested past the depth limit, and map values whose
/// entries are no level of their own.
fn edge_cases_agree() {
    let desc = all_type();
    let wire = fedport::schema::wire::Compiled::new(&desc);
    let mut deep_groups = vec![0x9b_u8, 0x06]; // field 99 (unknown), group
    deep_groups = [deep_groups.repeat(101), [0x9c_u8, 0x06].repeat(101)].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "extension note, invalid UTF-8",
            vec![0xa2, 0x06, 0x02, 0xff, 0xfe],
        ),
        ("extension note, valid", vec![0xa2, 0x06, 0x02, b'h', b'i']),
        (
            "extension item, nested string broken",
            vec![0xaa, 0x06, 0x03, 0x0a, 0x01, 0xff],
        ),
        (
            "unknown group with a key past u32",
            vec![0x9b, 0x06, 0x80, 0x80, 0x80, 0x80, 0x10, 0x00, 0x9c, 0x06],
        ),
        ("unknown groups 101 deep", deep_groups),
    ];
    for (what, bytes) in cases {
        let ours = wire.check(&bytes, false);
        let theirs = prost_reflect::DynamicMessage::decode(desc.clone(), bytes.as_slice());
        assert_eq!(
            ours.is_ok(),
            theirs.is_ok(),
            "{what}: ours {ours:?}, prost-reflect {:?}",
            theirs.err()
        );
    }
    assert!(
        wire.check(&[0xa2, 0x06, 0x02, b'h', b'i'], true).is_ok(),
        "a declared extension is a known field in strict mode"
    );
}

#[test]
fn the_wire_validator_agrees_on_edge_cases() {
    edge_cases_agree();
}
