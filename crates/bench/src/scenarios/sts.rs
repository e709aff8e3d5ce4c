//! STS calls per data request on DynamoDB: `tenantmesh up --storage
//! dynamodb` against the moto emulator, 100 tenants making 100 requests
//! each, twice; AssumeRole calls counted from the data service's own log
//! line for each one it makes.

use std::time::Duration;

use serde_json::json;
use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::data::v1::{GetItemRequest, PutItemRequest};
use tokio::task::JoinSet;

use super::{Ctx, cheap_hashing, progress, unique};
use crate::client::{authed, lazy, onboard, platform_admin};
use crate::procs;
use crate::report::{Figure, ScenarioResult, Target};

const VENDED: &str = "vended tenant-scoped credentials";

fn assume_role_calls(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log).map(|t| t.lines().filter(|l| l.contains(VENDED)).count()).unwrap_or(0)
}

/// `per_tenant` requests (put/get alternating) by every tenant, all tenants at once.
async fn pass(data: std::net::SocketAddr, tokens: &[String], per_tenant: usize) -> Result<usize, String> {
    let mut tasks = JoinSet::new();
    for token in tokens {
        let (token, mut client) = (token.clone(), DataClient::new(lazy(data)));
        tasks.spawn(async move {
            for r in 0..per_tenant {
                let id = format!("{}", (r / 2) % 10);
                if r % 2 == 0 {
                    let put = PutItemRequest { collection: "c".into(), id, attributes: None, expected_version: None };
                    client.put_item(authed(put, &token)).await.map_err(|s| format!("put: {s:?}"))?;
                } else {
                    let get = GetItemRequest { collection: "c".into(), id };
                    client.get_item(authed(get, &token)).await.map_err(|s| format!("get: {s:?}"))?;
                }
            }
            Ok::<usize, String>(per_tenant)
        });
    }
    let mut n = 0;
    while let Some(r) = tasks.join_next().await {
        n += r.map_err(|e| e.to_string())??;
    }
    Ok(n)
}

pub async fn sts_calls(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let dir = ctx.dir("sts");
    let (moto, endpoint) = procs::start_moto(&ctx.root, &dir)?;
    let mut env = cheap_hashing();
    for (k, v) in [
        ("TENANTMESH_STORAGE", "dynamodb"),
        ("AWS_ENDPOINT_URL_DYNAMODB", endpoint.as_str()),
        ("AWS_ENDPOINT_URL_STS", &endpoint),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("RUST_LOG", "info,tenantmesh_isolation::vend=debug"),
    ] {
        env.insert(k.into(), v.into());
    }
    let mesh_dir = dir.join("mesh");
    let (mesh, addrs) = procs::start_mesh(&mesh_dir, &env)?;
    let log = mesh.log.clone();
    let admin = platform_admin(addrs.auth).await?;
    let (tenants, per_tenant) = ctx.pick((100, 100), (10, 10));
    let mut tokens = Vec::new();
    let mut onboarding = JoinSet::new();
    for _ in 0..tenants {
        let (admin, addrs) = (admin.clone(), addrs);
        onboarding.spawn(async move { onboard(&addrs, &admin, &unique("sts"), "standard").await });
        if onboarding.len() >= 10
            && let Some(r) = onboarding.join_next().await
        {
            tokens.push(r.map_err(|e| e.to_string())??);
        }
    }
    while let Some(r) = onboarding.join_next().await {
        tokens.push(r.map_err(|e| e.to_string())??);
    }
    progress(format!("  {tenants} tenants onboarded on the emulator"));
    let before = assume_role_calls(&log);
    let first = pass(addrs.data, &tokens, per_tenant).await?;
    let first_calls = assume_role_calls(&log) - before;
    let second = pass(addrs.data, &tokens, per_tenant).await?;
    let second_calls = assume_role_calls(&log) - before - first_calls;
    progress(format!("  first pass {first} requests: {first_calls} AssumeRole; second pass {second}: {second_calls}"));
    let per_10k = |calls: usize, n: usize| calls as f64 * 10_000.0 / n.max(1) as f64;
    let mut r = ctx.result(
        "sts_calls",
        "STS calls per data request (DynamoDB)",
        format!(
            "`tenantmesh up --storage dynamodb` on the moto emulator; {tenants} tenants each make {per_tenant} requests \
             (PutItem/GetItem alternating), all tenants at once, twice. AssumeRole calls are counted from the data \
             service's debug line for each call it makes. The first pass includes each tenant's first request."
        ),
    );
    r.figures.push(
        Figure::new("AssumeRole calls per 10,000 requests, first pass", "calls", per_10k(first_calls, first))
            .note(format!("{first_calls} calls for {tenants} tenants"))
            .target(Target::AtMost(per_10k(tenants, first))),
    );
    r.figures.push(
        Figure::new("AssumeRole calls per 10,000 requests, steady state", "calls", per_10k(second_calls, second))
            .target(Target::AtMost(0.0)),
    );
    r.details = json!({"tenants": tenants, "first": {"requests": first, "calls": first_calls}, "second": {"requests": second, "calls": second_calls}});
    mesh.stop(Duration::from_secs(15))?;
    drop(moto);
    Ok(r)
}
