//! Restoring one tenant to an instant (`RestoreTenant` in place) among
//! many: how long a restore of a tenant with many changed items takes, how
//! long that tenant's writes pause, and what another tenant's calls see
//! while restores run back to back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::onboarding::v1::{GetWorkflowRequest, RestoreTarget, RestoreTenantRequest, WorkflowStatus};

use super::{Ctx, cheap_hashing, median, open_run, progress, unique};
use crate::client::{Op, authed, lazy, onboard, platform_admin, put, sample_item, seed, url};
use crate::procs;
use crate::report::{Figure, ScenarioResult};

fn now() -> prost_types::Timestamp {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    prost_types::Timestamp { seconds: t.as_secs() as i64, nanos: t.subsec_micros() as i32 * 1000 }
}

/// Writes `n` items of collection `bulk` (about 200 bytes each), `tag` in
/// their body, 8 at a time.
async fn write_bulk(data: tonic::transport::Channel, token: &str, n: usize, tag: &str) -> Result<(), String> {
    let mut writers = Vec::new();
    for w in 0..8 {
        let (data, token, tag) = (data.clone(), token.to_owned(), tag.to_owned());
        writers.push(tokio::spawn(async move {
            for i in (w..n).step_by(8) {
                let mut item = sample_item(&format!("i{i:06}"));
                item.collection = "bulk".into();
                if let Some(a) = item.attributes.as_mut() {
                    a.fields.insert(
                        "tag".into(),
                        prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(tag.clone())) },
                    );
                }
                put(data.clone(), &token, item).await?;
            }
            Ok::<(), String>(())
        }));
    }
    for w in writers {
        w.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Restores `tenant` in place to `at` and waits for it: how long it took.
async fn restore(
    onboarding: &mut OnboardingClient<tonic::transport::Channel>,
    admin: &str,
    tenant: &str,
    at: prost_types::Timestamp,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let req = RestoreTenantRequest {
        tenant_id: tenant.into(),
        point_in_time: Some(at),
        target: RestoreTarget::InPlace as i32,
    };
    let id = onboarding.restore_tenant(authed(req, admin)).await.map_err(|s| format!("restore: {s:?}"))?;
    let id = id.into_inner().workflow_id;
    loop {
        let req = GetWorkflowRequest { workflow_id: id.clone() };
        let wf = onboarding.get_workflow(authed(req, admin)).await.map_err(|s| format!("{s:?}"))?;
        let wf = wf.into_inner().workflow.unwrap_or_default();
        match WorkflowStatus::try_from(wf.status) {
            Ok(WorkflowStatus::Succeeded) => return Ok(t0.elapsed()),
            Ok(WorkflowStatus::Running) => tokio::time::sleep(Duration::from_millis(5)).await,
            _ => return Err(format!("restore {id} ended {:?}: {}", wf.status, wf.error)),
        }
    }
}

pub async fn tenant_restore(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let dir = ctx.dir("tenant_restore");
    let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &cheap_hashing())?;
    let admin = platform_admin(addrs.auth).await?;
    let (tenants_n, items) = ctx.pick((100, 10_000), (5, 300));
    let mut tokens = Vec::with_capacity(tenants_n);
    let mut ids = Vec::with_capacity(tenants_n);
    for i in 0..tenants_n {
        let id = unique(&format!("rs{i}"));
        let token = onboard(&addrs, &admin, &id, "standard").await?;
        seed(lazy(addrs.data), &token).await?;
        tokens.push(token);
        ids.push(id);
    }
    // The restored tenant: `items` items, then every one changed and a
    // tenth as many created after the instant it goes back to.
    let (big, big_id) = (tokens[0].clone(), ids[0].clone());
    write_bulk(lazy(addrs.data), &big, items, "then").await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let then = now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    write_bulk(lazy(addrs.data), &big, items + items / 10, "later").await?;
    let changes = items + items / 10;
    progress(format!("  {tenants_n} tenants; one with {items} items, {changes} changes after the instant"));

    // Restores one after another (half a second apart): to the instant,
    // then to just before that restore (undoing it), each rewinding every
    // change.
    let onboarding = OnboardingClient::new(lazy(addrs.onboarding));
    let mut spare = onboarding.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let restoring = {
        let (stop, admin, big_id, mut onboarding) = (stop.clone(), admin.clone(), big_id.clone(), onboarding);
        tokio::spawn(async move {
            let mut took = Vec::new();
            while !stop.load(Ordering::Relaxed) || took.len() < 2 {
                let before = now();
                took.push(restore(&mut onboarding, &admin, &big_id, then).await?);
                // Apart, so that the restored tenant's pauses are each one restore's.
                tokio::time::sleep(Duration::from_millis(500)).await;
                took.push(restore(&mut onboarding, &admin, &big_id, before).await?);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok::<Vec<Duration>, String>(took)
        })
    };
    // The restored tenant keeps writing: the longest it waits for a write
    // to be taken is the pause it sees.
    let pause = {
        let (stop, big, data) = (stop.clone(), big.clone(), lazy(addrs.data));
        tokio::spawn(async move {
            let (mut longest, mut last, mut n) = (Duration::ZERO, Instant::now(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                let mut item = sample_item(&format!("w{}", n % 100));
                item.collection = "live".into();
                if put(data.clone(), &big, item).await.is_ok() {
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                    n += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (longest, n)
        })
    };

    // Another tenant's writes and reads while restores run (the idle
    // figures come after, once they stop).
    let other = tokens[1].clone();
    let rate = ctx.pick(200.0, 100.0);
    let data_url = url(addrs.data);
    let mut during = Vec::new();
    for op in [Op::PutItem, Op::GetItem] {
        during.push((op, open_run(ctx, &data_url, &mesh, 2, rate, op.call(&other)).await?));
    }
    stop.store(true, Ordering::Relaxed);
    let took = restoring.await.map_err(|e| e.to_string())??;
    let (longest_pause, writes) = pause.await.map_err(|e| e.to_string())?;
    let mut runs = Vec::new();
    for (op, during) in during {
        let idle = open_run(ctx, &data_url, &mesh, 2, rate, op.call(&other)).await?;
        progress(format!(
            "  {} p99 idle {:.2} ms, during restores {:.2} ms",
            op.name(),
            idle.summary.p99_ms,
            during.summary.p99_ms
        ));
        runs.push((op, idle, during));
    }
    // The last restore undid the one before it: every item created after the instant is there again.
    let held = super::backup::count_items(addrs.data, &big).await?;
    if held != changes {
        return Err(format!("after the restores the tenant holds {held} items, not {changes}"));
    }
    // The same restore of a bridge and of a silo tenant (alone).
    let mut models = Vec::new();
    for (tier, model) in [("premium", "bridge"), ("enterprise", "silo")] {
        let id = unique(&format!("rs-{model}"));
        let token = onboard(&addrs, &admin, &id, tier).await?;
        write_bulk(lazy(addrs.data), &token, items, "then").await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let then = now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        write_bulk(lazy(addrs.data), &token, changes, "later").await?;
        let took = restore(&mut spare, &admin, &id, then).await?;
        let held = super::backup::count_items(addrs.data, &token).await?;
        if held != items {
            return Err(format!("the restored {model} tenant holds {held} items, not {items}"));
        }
        progress(format!("  {model} tenant: restore {took:?}"));
        models.push((model, took));
    }
    mesh.stop(Duration::from_secs(15))?;

    let secs: Vec<f64> = took.iter().map(Duration::as_secs_f64).collect();
    let restore_s = median(secs.clone());
    progress(format!("  {} restores, median {restore_s:.2} s; longest write pause {longest_pause:?}", took.len()));
    let mut r = ctx.result(
        "tenant_restore",
        "Restore of one tenant to an instant",
        format!(
            "`tenantmesh up` (release, embedded store) with {tenants_n} pool tenants. One holds {items} items of \
             about 200 bytes; after an instant every one is changed and {} more are created ({changes} changes). \
             RestoreTenant in place (the real workflow: pause writes, rewind, resume) runs again and again, half a \
             second apart: to the instant, then to just before that restore (undoing it), each rewinding {changes} changes; time from \
             the call to SUCCEEDED. Meanwhile the restored tenant writes in a loop (retrying refused writes: the \
             longest wait for a write to be taken is its pause) and another tenant sends PutItem and GetItem in \
             an open loop at {rate} calls/s (baseline: the same once the restores stopped). RPO: 0 (every \
             acknowledged write is in the history, any microsecond within the tier's days can be restored); RTO: \
             the restore time. Then the same restore of a premium (bridge) and an enterprise (silo) tenant, \
             alone.",
            items / 10
        ),
    );
    r.figures.push(Figure::new(
        format!("restore of {changes} changed items (median of {})", took.len()),
        "s",
        restore_s,
    ));
    r.figures.push(Figure::new("items rewound per second", "items/s", changes as f64 / restore_s.max(1e-9)));
    for (model, took) in &models {
        r.figures.push(Figure::new(
            format!("restore of {changes} changed items, a {model} tenant (alone)"),
            "s",
            took.as_secs_f64(),
        ));
    }
    r.figures.push(Figure::new(
        "longest write pause of the restored tenant (restore + until every service sees it ACTIVE)",
        "s",
        longest_pause.as_secs_f64(),
    ));
    for (op, idle, during) in &runs {
        r.figures.push(
            Figure::new(format!("{} p99 of another tenant during restores", op.name()), "ms", during.summary.p99_ms)
                .vs(idle.summary.p99_ms),
        );
    }
    r.details = json!({
        "tenants": tenants_n,
        "items": items,
        "changes": changes,
        "restores_s": secs,
        "restored_tenant_writes": writes,
        "runs": runs.iter().map(|(op, idle, during)| json!({
            "op": op.name(), "idle": idle.summary, "during": during.summary
        })).collect::<Vec<_>>(),
    });
    Ok(r)
}
