//! Steady state makes no STS call per request: credentials are vended once
//! per tenant (single-flight under concurrency) and reused. Needs a process
//! of its own (nextest gives one per test): it reads the process-wide
//! AssumeRole counter.

use std::time::Instant;

use tenantmesh_isolation::vend::assume_role_calls;
use tenantmesh_proto::data::v1::{GetItemRequest, PutItemRequest};
use tenantmesh_test_support::*;

const TENANTS: usize = 100;
const REQUESTS: usize = 100;

/// 50 concurrent first requests of one tenant make one AssumeRole call;
/// then 100 tenants x 100 requests against the data service (a PutItem,
/// then 99 GetItems) make exactly one call per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_calls_per_tenant_not_per_request() {
    // Tenant status cached as in production (the suites' default is 100 ms):
    // the emulator is slow, and this test measures STS, not the registry.
    // No stored-bytes sample in the run: at each interval's boundary (an
    // hour by default) the sampler reads every tenant's partition, or with
    // metering off trims its history, vending their credentials; a run
    // that spans a boundary (CI saw one) would count those instead of the
    // requests'. Ten years apart, and metering off (nothing to flush).
    let settings = [
        ("TENANTMESH_TENANT_CACHE_TTL_MS", "5000"),
        ("TENANTMESH_METERING", "off"),
        ("TENANTMESH_STORAGE_SAMPLE_SECS", "315360000"),
        // The emulator copies a table for each transaction, so its
        // transactions slow down as the run adds tenants: past the SDK's
        // attempt timeout (3 s) it retries one that is still being applied,
        // and the retry fails the first one's conditions (the emulator
        // ignores the idempotency token that DynamoDB honours).
        ("TENANTMESH_AWS_ATTEMPT_TIMEOUT_MS", "20000"),
        ("TENANTMESH_AWS_TIMEOUT_MS", "60000"),
    ];
    let mesh = TestMesh::start_with_env(TestBackend::DynamoDb, &settings).await;

    let first = mesh.onboard(&unique_tenant("burst")).await;
    let before = assume_role_calls();
    let burst: Vec<_> = (0..50)
        .map(|i| {
            let (mut data, token) = (mesh.data(), first.token.clone());
            tokio::spawn(async move {
                let get = GetItemRequest { collection: "c".into(), id: format!("{i}") };
                data.get_item(authed(get, &token)).await
            })
        })
        .collect();
    for r in burst {
        let status = r.await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }
    assert_eq!(assume_role_calls() - before, 1, "concurrent first requests must share one STS call");

    let mut tenants = Vec::new();
    for i in 0..TENANTS {
        tenants.push(mesh.onboard(&format!("{}-{i}", unique_tenant("sts"))).await);
    }
    let before = assume_role_calls();
    let started = Instant::now();
    // Each tenant writes its item first, one tenant at a time: a write is
    // a transaction (the write fence), and the emulator deep-copies the
    // whole table for each one, so a burst of writes measures the emulator.
    for t in &tenants {
        let put = PutItemRequest { collection: "c".into(), id: "0".into(), attributes: None, expected_version: None };
        mesh.data().put_item(authed(put, &t.token)).await.unwrap();
    }
    // Then every tenant reads at once.
    let tasks: Vec<_> = tenants
        .into_iter()
        .map(|t| {
            let mut data = mesh.data();
            tokio::spawn(async move {
                for _ in 1..REQUESTS {
                    let get = GetItemRequest { collection: "c".into(), id: "0".into() };
                    data.get_item(authed(get, &t.token)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let calls = assume_role_calls() - before;
    eprintln!(
        "{} requests from {TENANTS} tenants in {:?}: {calls} AssumeRole calls ({:.4} per request)",
        TENANTS * REQUESTS,
        started.elapsed(),
        calls as f64 / (TENANTS * REQUESTS) as f64
    );
    assert_eq!(calls, TENANTS as u64, "one STS call per tenant, none per request");
    mesh.shutdown().await;
}
