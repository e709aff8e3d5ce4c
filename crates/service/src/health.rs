//! Asking a server whether it serves (`grpc.health.v1` Health/Check): the
//! `tenantmesh health` command, the mesh waiting for its services to come
//! up, and onboarding waiting for a silo instance a reconciler starts.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// How long one check of [`wait`] may take.
const ATTEMPT: Duration = Duration::from_secs(2);

/// Asks `addr` (`host:port` or a URL) whether `service` (empty: the whole
/// server) is SERVING, within `timeout`. The error says what was seen.
pub async fn check(addr: &str, service: &str, timeout: Duration) -> Result<(), String> {
    let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let endpoint = tonic::transport::Endpoint::from_shared(url)
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

/// [`check`]s the whole server at `addr` every `every` until it is SERVING;
/// once `within` has passed, the last check's answer is the error.
pub async fn wait(addr: &str, within: Duration, every: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match check(addr, "", ATTEMPT).await {
            Ok(()) => return Ok(()),
            Err(last) if tokio::time::Instant::now() >= deadline => return Err(last),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nothing_listening_is_unhealthy_and_says_so() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let err = check(&addr, "", Duration::from_millis(500)).await.unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
        let err = wait(&addr, Duration::from_millis(200), Duration::from_millis(50)).await.unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }
}
