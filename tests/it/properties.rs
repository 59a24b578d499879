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
        // which prost-reflect's map decoding does not look at, and on an end-group tag
        // that ends no group, where prost-reflect stops decoding and leaves the rest
        // unread (a service would see a message the bytes after it never reached)
        let stricter = ours
            .as_ref()
            .is_err_and(|e| e.contains("wrong wire type") || e.contains("unexpected end-group"));
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

/// A stream of HTTP/2 frames (after the preface) built from arbitrary parts: types,
/// flags, stream ids and lengths, with payloads of that length.
fn frames(parts: &[(u8, u8, u32, u16)]) -> Vec<u8> {
    let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    for &(kind, flags, stream, len) in parts {
        let len = (len % 2048) as usize;
        b.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        b.extend_from_slice(&[kind % 12, flags]);
        b.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        b.extend(std::iter::repeat_n(0u8, len));
    }
    b
}

/// Cuts `b` at the given points (as reads would).
fn cut<'a>(b: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (b.len() + 1)).collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in at.into_iter().chain(std::iter::once(b.len())) {
        out.push(&b[prev..c]);
        prev = c;
    }
    out
}

/// The gRPC framer over `test.Msg`, gzip allowed, with a small limit.
fn framer() -> fedport::schema::Framer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proto");
    let mut c = protox::Compiler::new([dir]).unwrap();
    c.open_file("test.proto").unwrap();
    let msg = c.descriptor_pool().get_message_by_name("test.Msg").unwrap();
    let check = fedport::schema::ProtoCheck {
        message: std::sync::Arc::new(fedport::schema::wire::Compiled::new(&msg)),
        strict: true,
    };
    fedport::schema::Framer::new(check, 4096, true)
}

/// Feeds a framer chunk by chunk (resuming until it has nothing left to do): what it
/// passed on, and whether it refused.
fn frame_all(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
    use fedport::schema::More;
    let mut f = framer();
    let mut out = Vec::new();
    for c in chunks {
        let mut step = f.push(bytes::Bytes::copy_from_slice(c));
        loop {
            out.extend(step.out.take().unwrap_or_default());
            if step.refusal.is_some() {
                return (out, true);
            }
            match step.more {
                More::No => break,
                More::Now | More::At(_) => step = f.resume(),
            }
        }
    }
    (out, false)
}

/// A gRPC stream built from arbitrary messages: flags, declared lengths near the true
/// ones, and payloads (some valid `test.Msg`s, some gzipped).
fn grpc_stream(parts: &[(u8, u8, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (flag, skew, body) in parts {
        let body = match flag % 4 {
            // a valid message: field 1, a string of the bytes made ASCII
            0 | 1 => {
                let s: Vec<u8> = body.iter().map(|c| b'a' + c % 26).collect();
                let mut m = vec![0x0a, s.len() as u8];
                m.extend(s);
                if flag % 4 == 1 {
                    use std::io::Write;
                    let mut e =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    e.write_all(&m).unwrap();
                    e.finish().unwrap()
                } else {
                    m
                }
            }
            _ => body.clone(),
        };
        let compressed = u8::from(flag % 4 == 1 || flag % 4 == 3);
        let len = (body.len() as i64 + i64::from(*skew as i8 % 3)).max(0) as u32;
        b.push(compressed);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&body);
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(500), ..ProptestConfig::default() })]

    /// The HTTP/2 frame guard never panics, never passes more than it is given, and
    /// decides the same however the reads cut the frames.
    #[test]
    fn the_frame_guard_decides_the_same_however_reads_cut_the_bytes(
        parts in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u32>(), any::<u16>()), 0..60),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        let b = frames(&parts);
        let (_, whole) = fedport::listen::h2guard::inspect_chunks(true, &[&b]);
        let chunks = cut(&b, &cuts);
        let (kept, pieces) = fedport::listen::h2guard::inspect_chunks(true, &chunks);
        prop_assert_eq!(whole, pieces);
        for (k, c) in kept.iter().zip(&chunks) {
            prop_assert!(*k <= c.len());
        }
    }

    /// Arbitrary bytes, HTTP/2 by ALPN or not: the guard never panics.
    #[test]
    fn the_frame_guard_never_panics_on_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
        alpn in any::<bool>(),
    ) {
        let _ = fedport::listen::h2guard::inspect_chunks(alpn, &cut(&bytes, &cuts));
    }

    /// The gRPC framer never panics, passes on a prefix of what it was given made of
    /// whole messages, and passes the same however the stream is cut; what it does not
    /// refuse it passes whole.
    #[test]
    fn the_grpc_framer_passes_the_same_however_the_stream_is_cut(
        parts in proptest::collection::vec((any::<u8>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..12),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let stream = grpc_stream(&parts);
        let (whole, refused) = frame_all(&[&stream]);
        let (pieces, refused2) = frame_all(&cut(&stream, &cuts));
        prop_assert_eq!(&whole, &pieces);
        prop_assert_eq!(refused, refused2);
        prop_assert!(stream.starts_with(&whole));
        // not refused: every whole message was passed on, and what is left is the
        // start of one still incomplete
        if !refused {
            let rest = &stream[whole.len()..];
            if rest.len() >= 5 {
                let declared = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                prop_assert!(rest.len() < 5 + declared, "a whole message of {} held back", declared);
            }
        }
    }

    /// Arbitrary bytes: the framer never panics.
    #[test]
    fn the_grpc_framer_never_panics_on_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let _ = frame_all(&cut(&bytes, &cuts));
    }
}

/// A gzip message that inflates to nothing (a megabyte of empty deflate blocks) is
/// inflated a bounded slice of its input at a time: the worker is given back between
/// turns even though no turn produces anything. Without the input bound the whole
/// message went in one turn.
#[test]
fn a_message_that_inflates_to_nothing_is_read_a_slice_at_a_time() {
    use fedport::schema::More;
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for _ in 0..200_000 {
        enc.flush().unwrap(); // an empty stored block each: 5 bytes
    }
    let gz = enc.finish().unwrap();
    assert!(gz.len() > 900_000, "{}", gz.len());
    let mut msg = vec![1u8];
    msg.extend((gz.len() as u32).to_be_bytes());
    msg.extend(&gz);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proto");
    let mut c = protox::Compiler::new([dir]).unwrap();
    c.open_file("test.proto").unwrap();
    let m = c.descriptor_pool().get_message_by_name("test.Msg").unwrap();
    let check = fedport::schema::ProtoCheck {
        message: std::sync::Arc::new(fedport::schema::wire::Compiled::new(&m)),
        strict: true,
    };
    let mut f = fedport::schema::Framer::new(check, 8 << 20, true);
    let mut step = f.push(bytes::Bytes::from(msg.clone()));
    let mut turns = 1;
    let mut out = Vec::new();
    loop {
        out.extend(step.out.take().unwrap_or_default());
        assert!(step.refusal.is_none(), "{:?}", step.refusal);
        match step.more {
            More::No => break,
            More::Now | More::At(_) => {
                step = f.resume();
                turns += 1;
            }
        }
    }
    assert_eq!(out, msg, "an empty message, passed on whole");
    assert!(
        turns > 10,
        "the input was read a slice at a time: {turns} turns"
    );
}
