//! `tenantmesh health`: one `grpc.health.v1.Health/Check` call, for
//! container healthchecks and Kubernetes exec probes.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

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

/// Asks `addr` (`host:port` or a URL) whether `service` (empty: the whole
/// server) is SERVING, within `timeout`. The error says what was seen.
pub async fn check(addr: &str, service: &str, timeout: Duration) -> Result<(), String> {
    let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| format!("cannot connect: {e}"))?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest { service: service.to_owned() })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        match ServingStatus::try_from(answer.get_ref().status) {
            Ok(ServingStatus::Serving) => Ok(()),
            Ok(status) => Err(format!("status {}", status.as_str_name())),
            Err(_) => Err(format!("unknown status {}", answer.get_ref().status)),
        }
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| format!("no answer within {timeout:?}"))?
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

    #[tokio::test]
    async fn nothing_listening_is_unhealthy_and_says_so() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = check(&format!("127.0.0.1:{port}"), "", Duration::from_millis(500)).await.unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }
}
