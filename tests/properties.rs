//! Property tests (the fuzzing CI can run on a stable toolchain): arbitrary and mutated
//! input to the PROXY header parser and the config loader must be refused cleanly,
//! never panic. `scripts/fuzz.sh` runs them with many more cases for a bounded time.

use fedport::listen::proxy_protocol::parse;
use proptest::prelude::*;
use std::net::SocketAddr;
use std::path::Path;

fn lb() -> SocketAddr {
    "10.0.9.1:5000".parse().unwrap()
}

const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const EXAMPLE: &str = include_str!("../examples/fedport.toml");

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
}
