//! Authorization cost: ns per decision with 1 and 1,000 rules, cold (first sight of an
//! identity: every rule matched) and warm (cached grants: a lookup). `cargo bench --bench policy`.

use fedport::policy::{Call, Policy};
use std::hint::black_box;
use std::time::Instant;

fn config(rules: usize) -> fedport::config::Config {
    let mut text = String::from("[node]\nname = \"n\"\nregion = \"r\"\n");
    for s in 0..50 {
        text.push_str(&format!(
            "[[service]]\nname = \"svc{s}\"\nprotocol = \"http\"\nendpoints = [\"http://127.0.0.1:{}\"]\n",
            1000 + s
        ));
    }
    for r in 0..rules.saturating_sub(1) {
        text.push_str(&format!(
            "[[allow]]\nfrom = \"spiffe://fed.example/team{r}/*\"\nto = \"svc{}\"\nmethods = [\"GET /v1/{r}/\", \"pkg.S{r}/*\"]\n",
            r % 50
        ));
    }
    text.push_str("[[allow]]\nfrom = \"spiffe://fed.example/node/*\"\nto = \"svc7\"\nmethods = [\"GET /v1/items\"]\n");
    fedport::config::compile(std::path::Path::new("bench.toml"), &text)
        .expect("bench config compiles")
        .0
}

fn main() {
    for rules in [1usize, 1000] {
        let cfg = config(rules);
        let n = 200_000;
        // warm: the connection's grants are already known, as on every request
        let policy = Policy::new(&cfg);
        let grants = policy.grants("spiffe://fed.example/node/a");
        let t = Instant::now();
        let mut ok = 0;
        for i in 0..n {
            ok += black_box(&grants)
                .allows(black_box(7 + (i & 1)), Call::Http("GET", "/v1/items/42"))
                as usize;
        }
        let warm = t.elapsed().as_nanos() as f64 / n as f64;
        assert_eq!(ok, n / 2);
        // cold: a new identity is matched against every rule (once per identity)
        let m = if rules > 100 { 2_000 } else { 200_000 };
        let t = Instant::now();
        for i in 0..m {
            let p = Policy::new(&cfg);
            let _ = black_box(i);
            black_box(p.grants("spiffe://fed.example/node/a"));
        }
        let cold_total = t.elapsed().as_nanos() as f64 / m as f64;
        let t = Instant::now();
        for _ in 0..m {
            black_box(Policy::new(&cfg));
        }
        let build = t.elapsed().as_nanos() as f64 / m as f64;
        println!(
            "rules={rules:5}  per request (cached grants): {warm:6.1} ns   first sight of an identity: {:9.0} ns",
            cold_total - build
        );
    }
}
