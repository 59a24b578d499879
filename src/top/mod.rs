//! `fedport top`: a live terminal view of a running node, from its admin port's
//! `/metrics` — per service and per peer, rate, error %, p50/p99, and traffic spikes
//! highlighted. The model (scrape, parse, rates between two scrapes) is plain data;
//! the view draws it with ratatui.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("cannot read http://{0}{1}: {2}")]
    Scrape(SocketAddr, &'static str, std::io::Error),
    #[error("terminal: {0}")]
    Terminal(std::io::Error),
}

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (as fedport's admin port serves it).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut rest = s;
    while let Some((k, r)) = rest.split_once("=\"") {
        let mut v = String::new();
        let mut chars = r.char_indices();
        let mut end = r.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        v.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => v.push(c),
            }
        }
        m.insert(k.trim_start_matches(',').to_owned(), v);
        rest = &r[end..];
    }
    m
}

/// Fetches `/metrics` from an admin port.
pub fn scrape(admin: SocketAddr) -> Result<String, TopError> {
    fetch(admin, "/metrics")
}

/// Fetches one admin path's body.
pub fn fetch(admin: SocketAddr, path: &'static str) -> Result<String, TopError> {
    let err = |e| TopError::Scrape(admin, path, e);
    let mut s =
        std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: fedport\r\n\r\n").as_bytes())
        .map_err(err)?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(err)?;
    Ok(body
        .split_once("\r\n\r\n")
        .map_or(body.clone(), |(_, b)| b.to_owned()))
}

/// Cumulative counts of one service at one scrape.
#[derive(Debug, Default, Clone)]
struct ServiceCounts {
    requests: f64,
    errors: f64,
    /// Cumulative duration buckets: upper bound → count.
    buckets: Vec<(f64, f64)>,
}

/// Cumulative counts of one peer at one scrape.
#[derive(Debug, Default, Clone)]
struct PeerCounts {
    /// `None`: the node does not probe it (it offers none of this node's services).
    up: Option<bool>,
    rtt: Option<f64>,
    out: f64,
    inbound: f64,
}

/// What one scrape says.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    node: String,
    services: BTreeMap<String, ServiceCounts>,
    peers: BTreeMap<String, PeerCounts>,
    /// (service, peer, kind) of spikes in progress.
    spikes: Vec<(String, String, String)>,
}

fn is_error(code: &str) -> bool {
    code.starts_with('5')
        || matches!(
            code,
            "UNKNOWN"
                | "DEADLINE_EXCEEDED"
                | "RESOURCE_EXHAUSTED"
                | "INTERNAL"
                | "UNAVAILABLE"
                | "DATA_LOSS"
        )
}

impl Snapshot {
    pub fn from_samples(samples: &[Sample]) -> Self {
        let mut s = Snapshot::default();
        let label = |x: &Sample, k: &str| x.labels.get(k).cloned().unwrap_or_default();
        for x in samples {
            match x.name.as_str() {
                "fedport_config_info" => s.node = label(x, "node"),
                "fedport_requests_total" => {
                    let svc = label(x, "service");
                    if svc == "-" {
                        continue;
                    }
                    let c = s.services.entry(svc).or_default();
                    c.requests += x.value;
                    if is_error(&label(x, "code")) {
                        c.errors += x.value;
                    }
                }
                "fedport_request_duration_seconds_bucket" => {
                    let svc = label(x, "service");
                    if svc == "-" {
                        continue;
                    }
                    let le = match label(x, "le").as_str() {
                        "+Inf" => f64::INFINITY,
                        v => v.parse().unwrap_or(f64::INFINITY),
                    };
                    let c = s.services.entry(svc).or_default();
                    match c.buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some(b) => b.1 += x.value,
                        None => c.buckets.push((le, x.value)),
                    }
                }
                // a TCP service: its connections as its calls, how long they lasted
                "fedport_tcp_connections_total" => {
                    let c = s
                        .services
                        .entry(format!("{} (tcp)", label(x, "service")))
                        .or_default();
                    c.requests += x.value;
                }
                "fedport_tcp_connection_duration_seconds_bucket" => {
                    let le = match label(x, "le").as_str() {
                        "+Inf" => f64::INFINITY,
                        v => v.parse().unwrap_or(f64::INFINITY),
                    };
                    let c = s
                        .services
                        .entry(format!("{} (tcp)", label(x, "service")))
                        .or_default();
                    match c.buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some(b) => b.1 += x.value,
                        None => c.buckets.push((le, x.value)),
                    }
                }
                "fedport_peer_up" => {
                    s.peers.entry(label(x, "peer")).or_default().up = Some(x.value == 1.0)
                }
                "fedport_peer_rtt_seconds" if x.value > 0.0 => {
                    s.peers.entry(label(x, "peer")).or_default().rtt = Some(x.value)
                }
                "fedport_forwarded_total" => {
                    let t = label(x, "target");
                    if t != "local" {
                        s.peers.entry(t).or_default().out += x.value;
                    }
                }
                "fedport_peer_inbound_requests_total" => {
                    s.peers.entry(label(x, "peer")).or_default().inbound += x.value
                }
                "fedport_traffic_spike" if x.value == 1.0 => {
                    s.spikes
                        .push((label(x, "service"), label(x, "peer"), label(x, "kind")))
                }
                _ => {}
            }
        }
        for c in s.services.values_mut() {
            c.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        s
    }
}

/// One row of the services table.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRow {
    pub name: String,
    pub rate: f64,
    pub error_pct: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub spike: Option<String>,
}

/// One row of the peers table.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRow {
    pub name: String,
    /// `None`: not probed, so neither up nor down.
    pub up: Option<bool>,
    pub rtt: Option<f64>,
    pub out_rate: f64,
    pub in_rate: f64,
    pub spike: Option<String>,
}

/// The quantile `q` of the requests between two cumulative histograms (upper bound of
/// the bucket it falls in).
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let old = before.iter().find(|(b, _)| b == le).map_or(0.0, |x| x.1);
            (*le, n - old)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
}

/// The rows between two snapshots `dt` apart.
pub fn rows(before: &Snapshot, after: &Snapshot, dt: f64) -> (Vec<ServiceRow>, Vec<PeerRow>) {
    let spike = |service: &str, peer: &str| {
        after
            .spikes
            .iter()
            .filter(|(s, p, _)| s == service && p == peer)
            .map(|(_, _, k)| k.clone())
            .reduce(|a, b| format!("{a}+{b}"))
    };
    let services = after
        .services
        .iter()
        .map(|(name, now)| {
            let old = before.services.get(name).cloned().unwrap_or_default();
            let n = (now.requests - old.requests).max(0.0);
            let e = (now.errors - old.errors).max(0.0);
            ServiceRow {
                name: name.clone(),
                rate: n / dt,
                error_pct: if n > 0.0 { 100.0 * e / n } else { 0.0 },
                p50: quantile(&old.buckets, &now.buckets, 0.5),
                p99: quantile(&old.buckets, &now.buckets, 0.99),
                spike: spike(name, ""),
            }
        })
        .collect();
    let peers = after
        .peers
        .iter()
        .map(|(name, now)| {
            let old = before.peers.get(name).cloned().unwrap_or_default();
            PeerRow {
                name: name.clone(),
                up: now.up,
                rtt: now.rtt,
                out_rate: (now.out - old.out).max(0.0) / dt,
                in_rate: (now.inbound - old.inbound).max(0.0) / dt,
                spike: spike("", name),
            }
        })
        .collect();
    (services, peers)
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_infinite() => "> 52 s".into(),
        Some(x) if x < 0.001 => format!("≤{:.0}µs", x * 1e6),
        Some(x) => format!("≤{:.1}ms", x * 1e3),
        None => "-".into(),
    }
}

/// Runs the view until `q` (or Esc, or Ctrl-C).
pub fn run(admin: SocketAddr, every: Duration) -> Result<(), TopError> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Color, Modifier, Style};
    use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};

    let mut before = Snapshot::from_samples(&parse(&scrape(admin)?));
    let mut at = Instant::now();
    let mut taken = at;
    let mut shown: (Vec<ServiceRow>, Vec<PeerRow>, String) =
        (Vec::new(), Vec::new(), String::new());
    let mut terminal = ratatui::init();
    let result = (|| -> Result<(), TopError> {
        loop {
            if at.elapsed() >= every {
                match scrape(admin) {
                    Ok(text) => {
                        let now = Snapshot::from_samples(&parse(&text));
                        // over the time since the snapshot they are compared with, even
                        // when scrapes failed in between
                        let (s, p) = rows(&before, &now, taken.elapsed().as_secs_f64());
                        shown = (s, p, String::new());
                        before = now;
                        taken = Instant::now();
                    }
                    Err(e) => shown.2 = e.to_string(),
                }
                at = Instant::now();
            }
            let (services, peers, problem) = &shown;
            let node = before.node.clone();
            terminal
                .draw(|f| {
                    let [head, top, bottom] = Layout::vertical([
                        Constraint::Length(1),
                        Constraint::Percentage(60),
                        Constraint::Fill(1),
                    ])
                    .areas(f.area());
                    let title = if problem.is_empty() {
                        format!(
                            "fedport top — node {node} — {admin} — every {:?} — q quits",
                            every
                        )
                    } else {
                        format!("fedport top — {problem}")
                    };
                    f.render_widget(Paragraph::new(title), head);
                    let hot = Style::default().fg(Color::Red).add_modifier(Modifier::BOLD);
                    let srows = services.iter().map(|r| {
                        let row = Row::new(vec![
                            r.name.clone(),
                            format!("{:.1}", r.rate),
                            format!("{:.1}%", r.error_pct),
                            ms(r.p50),
                            ms(r.p99),
                            r.spike
                                .clone()
                                .map_or(String::new(), |k| format!("SPIKE {k}")),
                        ]);
                        if r.spike.is_some() {
                            row.style(hot)
                        } else {
                            row
                        }
                    });
                    let widths = [
                        Constraint::Length(24),
                        Constraint::Length(10),
                        Constraint::Length(8),
                        Constraint::Length(10),
                        Constraint::Length(10),
                        Constraint::Fill(1),
                    ];
                    let header = Row::new(["SERVICE", "REQ/S", "ERR", "P50", "P99", ""])
                        .style(Style::default().add_modifier(Modifier::BOLD));
                    f.render_widget(
                        Table::new(srows, widths)
                            .header(header)
                            .block(Block::default().borders(Borders::ALL).title("services")),
                        top,
                    );
                    let prows = peers.iter().map(|r| {
                        let row = Row::new(vec![
                            r.name.clone(),
                            match r.up {
                                Some(true) => "up".into(),
                                Some(false) => "DOWN".into(),
                                None => "-".into(),
                            },
                            r.rtt.map_or("-".into(), |x| format!("{:.1}ms", x * 1e3)),
                            format!("{:.1}", r.out_rate),
                            format!("{:.1}", r.in_rate),
                            r.spike
                                .clone()
                                .map_or(String::new(), |k| format!("SPIKE {k}")),
                        ]);
                        if r.spike.is_some() || r.up == Some(false) {
                            row.style(hot)
                        } else {
                            row
                        }
                    });
                    let header = Row::new(["PEER", "STATE", "RTT", "OUT/S", "IN/S", ""])
                        .style(Style::default().add_modifier(Modifier::BOLD));
                    f.render_widget(
                        Table::new(prows, widths)
                            .header(header)
                            .block(Block::default().borders(Borders::ALL).title("peers")),
                        bottom,
                    );
                })
                .map_err(TopError::Terminal)?;
            if event::poll(Duration::from_millis(200)).map_err(TopError::Terminal)? {
                if let Event::Key(k) = event::read().map_err(TopError::Terminal)? {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# TYPE fedport_requests_total counter
fedport_requests_total{listener="internal",service="orders",method="other",code="200"} 100
fedport_requests_total{listener="internal",service="orders",method="other",code="503"} 0
fedport_request_duration_seconds_bucket{le="0.001",listener="internal",service="orders"} 50
fedport_request_duration_seconds_bucket{le="0.01",listener="internal",service="orders"} 100
fedport_request_duration_seconds_bucket{le="+Inf",listener="internal",service="orders"} 100
fedport_peer_up{peer="b"} 1
fedport_config_info{node="a",hash="x"} 1
"#;

    const AFTER: &str = r#"fedport_requests_total{listener="internal",service="orders",method="other",code="200"} 280
fedport_requests_total{listener="internal",service="orders",method="other",code="503"} 20
fedport_request_duration_seconds_bucket{le="0.001",listener="internal",service="orders"} 150
fedport_request_duration_seconds_bucket{le="0.01",listener="internal",service="orders"} 298
fedport_request_duration_seconds_bucket{le="+Inf",listener="internal",service="orders"} 300
fedport_peer_up{peer="b"} 0
fedport_peer_rtt_seconds{peer="b"} 0.08
fedport_forwarded_total{service="orders",target="b"} 10
fedport_forwarded_total{service="orders",target="c"} 0
fedport_traffic_spike{service="orders",peer="",kind="rate"} 1
"#;

    #[test]
    fn rates_errors_and_quantiles_between_two_scrapes() {
        let b = Snapshot::from_samples(&parse(BEFORE));
        assert_eq!(b.node, "a");
        let a = Snapshot::from_samples(&parse(AFTER));
        let (s, p) = rows(&b, &a, 2.0);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].rate, 100.0);
        assert_eq!(s[0].error_pct, 10.0);
        assert_eq!(s[0].p50, Some(0.001), "100 of 200 new requests under 1 ms");
        assert_eq!(s[0].p99, Some(0.01));
        assert_eq!(s[0].spike.as_deref(), Some("rate"));
        assert_eq!(p[0].name, "b");
        assert_eq!(p[0].up, Some(false));
        assert_eq!(p[0].rtt, Some(0.08));
        assert_eq!(p[0].out_rate, 5.0);
        // c has traffic counters but no peer_up series (it is not probed): not DOWN
        assert_eq!(p[1].name, "c");
        assert_eq!(p[1].up, None);
    }

    #[test]
    fn tcp_services_show_their_connections() {
        let b = Snapshot::from_samples(&parse(
            r#"fedport_tcp_connections_total{listener="cache",service="cache"} 10
fedport_tcp_connection_duration_seconds_bucket{le="0.016",listener="cache",service="cache"} 10
fedport_tcp_connection_duration_seconds_bucket{le="+Inf",listener="cache",service="cache"} 10
"#,
        ));
        let a = Snapshot::from_samples(&parse(
            r#"fedport_tcp_connections_total{listener="cache",service="cache"} 30
fedport_tcp_connection_duration_seconds_bucket{le="0.016",listener="cache",service="cache"} 20
fedport_tcp_connection_duration_seconds_bucket{le="+Inf",listener="cache",service="cache"} 30
"#,
        ));
        let (s, _) = rows(&b, &a, 2.0);
        assert_eq!(s[0].name, "cache (tcp)");
        assert_eq!(s[0].rate, 10.0, "connections a second");
        assert_eq!(s[0].p50, Some(0.016));
        assert_eq!(s[0].p99, Some(f64::INFINITY));
    }

    #[test]
    fn labels_with_escapes_parse() {
        let s = parse(r#"x{a="1",b="say \"hi\"",c="p/q"} 3"#);
        assert_eq!(s[0].labels["b"], "say \"hi\"");
        assert_eq!(s[0].labels["c"], "p/q");
        assert_eq!(s[0].value, 3.0);
    }
}
