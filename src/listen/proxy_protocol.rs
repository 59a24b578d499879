//! The PROXY protocol header (v1 text and v2 binary) a trusted L4 balancer puts before
//! the TLS bytes: read exactly the header, no more, within a deadline, and parse it with
//! the `ppp` crate. The address it carries becomes the connection's remote address.

use crate::reason::Reason;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// v2 addresses and TLVs past this are refused rather than read.
const V2_MAX_PAYLOAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("connection ended in the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

impl ProxyHeaderError {
    /// The metric reason for this failure.
    pub fn reason(&self) -> Reason {
        match self {
            ProxyHeaderError::Timeout(_) => Reason::ProxyTimeout,
            ProxyHeaderError::Malformed(_) => Reason::ProxyMalformed,
            ProxyHeaderError::Io(_) => Reason::ProxyIo,
        }
    }
}

/// Reads the header from `stream` and returns the client address it carries; a `LOCAL`
/// (v2) or `UNKNOWN` (v1) header — the balancer's own health check — yields `balancer`.
pub async fn read(
    stream: &mut TcpStream,
    balancer: SocketAddr,
    timeout: Duration,
) -> Result<SocketAddr, ProxyHeaderError> {
    tokio::time::timeout(timeout, read_inner(stream, balancer))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

async fn read_inner(
    stream: &mut TcpStream,
    balancer: SocketAddr,
) -> Result<SocketAddr, ProxyHeaderError> {
    let mut buf = vec![0u8; 12];
    stream.read_exact(&mut buf[..6]).await?;
    if &buf[..6] == b"PROXY " {
        buf.truncate(6);
        // byte by byte: nothing past the CRLF may be consumed, it is the TLS ClientHello
        let mut b = [0u8; 1];
        while !buf.ends_with(b"\r\n") {
            if buf.len() >= V1_MAX {
                return Err(ProxyHeaderError::Malformed(
                    "v1 header longer than 107 bytes".into(),
                ));
            }
            stream.read_exact(&mut b).await?;
            buf.push(b[0]);
        }
        return parse(&buf, balancer);
    }
    stream.read_exact(&mut buf[6..12]).await?;
    if buf.as_slice() != V2_SIGNATURE {
        return Err(ProxyHeaderError::Malformed(
            "neither a v1 nor a v2 signature".into(),
        ));
    }
    let mut rest = [0u8; 4];
    stream.read_exact(&mut rest).await?;
    let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
    if len > V2_MAX_PAYLOAD {
        return Err(ProxyHeaderError::Malformed(format!(
            "v2 payload of {len} bytes"
        )));
    }
    buf.extend_from_slice(&rest);
    let start = buf.len();
    buf.resize(start + len, 0);
    stream.read_exact(&mut buf[start..]).await?;
    parse(&buf, balancer)
}

/// Parses one complete header.
pub fn parse(bytes: &[u8], balancer: SocketAddr) -> Result<SocketAddr, ProxyHeaderError> {
    use ppp::{v1, v2};
    if bytes.starts_with(b"PROXY ") {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ProxyHeaderError::Malformed("v1 header is not ASCII".into()))?;
        let h = v1::Header::try_from(text)
            .map_err(|e| ProxyHeaderError::Malformed(format!("v1: {e}")))?;
        return Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => SocketAddr::from((a.source_address, a.source_port)),
            v1::Addresses::Tcp6(a) => SocketAddr::from((a.source_address, a.source_port)),
            v1::Addresses::Unknown => balancer,
        });
    }
    let h =
        v2::Header::try_from(bytes).map_err(|e| ProxyHeaderError::Malformed(format!("v2: {e}")))?;
    if h.command == v2::Command::Local {
        return Ok(balancer);
    }
    Ok(match h.addresses {
        v2::Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)),
        v2::Addresses::IPv6(a) => SocketAddr::from((a.source_address, a.source_port)),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => balancer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb() -> SocketAddr {
        "10.0.9.1:5000".parse().unwrap()
    }

    #[test]
    fn v1_headers() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.5 40000 7443\r\n";
        assert_eq!(parse(h, lb()).unwrap(), "192.0.2.7:40000".parse().unwrap());
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 7443\r\n";
        assert_eq!(
            parse(h, lb()).unwrap(),
            "[2001:db8::7]:40000".parse().unwrap()
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n", lb()).unwrap(), lb());
        assert!(parse(b"PROXY TCP4 999.0.2.7 10.0.0.5 1 2\r\n", lb()).is_err());
        assert!(parse(b"PROXY TCP4 192.0.2.7\r\n", lb()).is_err());
    }

    #[test]
    fn v2_headers() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 7, 10, 0, 0, 5, 0x9c, 0x40, 0x1d, 0x13,
        ]);
        assert_eq!(parse(&h, lb()).unwrap(), "192.0.2.7:40000".parse().unwrap());
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local, lb()).unwrap(), lb());
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0]);
        assert!(parse(&short, lb()).is_err());
    }
}
