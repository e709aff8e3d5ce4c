//! `tenantmesh health`: one `grpc.health.v1.Health/Check` call
//! (`tenantmesh_service::health::check`), for container healthchecks and
//! Kubernetes exec probes; here, which address it asks by default.

/// The address to check when none is given: the service's own
/// `TENANTMESH_LISTEN_ADDR`, with an unspecified host (`0.0.0.0`, `[::]`)
/// replaced by loopback, so the image's HEALTHCHECK needs no argument.
pub fn default_addr(listen: Option<&str>) -> Result<String, String> {
    let listen = listen
        .filter(|l| !l.is_empty())
        .ok_or("no address given and TENANTMESH_LISTEN_ADDR is not set: `tenantmesh health HOST:PORT`".to_owned())?;
    let addr: std::net::SocketAddr =
        listen.parse().map_err(|e| format!("TENANTMESH_LISTEN_ADDR {listen:?} is not HOST:PORT: {e}"))?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    Ok(std::net::SocketAddr::new(ip, addr.port()).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listen_address_is_checked_on_loopback() {
        assert_eq!(default_addr(Some("0.0.0.0:50051")).unwrap(), "127.0.0.1:50051");
        assert_eq!(default_addr(Some("[::]:50054")).unwrap(), "[::1]:50054");
        assert_eq!(default_addr(Some("10.1.2.3:7")).unwrap(), "10.1.2.3:7");
        assert!(default_addr(None).unwrap_err().contains("TENANTMESH_LISTEN_ADDR"));
        assert!(default_addr(Some("data:50054")).unwrap_err().contains("HOST:PORT"));
    }
}
