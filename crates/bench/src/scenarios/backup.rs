//! Backups of the embedded mesh (`tenantmesh backup` / `restore`): how long
//! one takes with many tenants and items, what another tenant's calls see
//! while backups run back to back (writes are never paused: each store is
//! copied from a read snapshot), and the recovery time: restore plus the
//! start of the restored mesh, checked to hold every item.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tenantmesh_proto::data::v1::QueryItemsRequest;
use tenantmesh_proto::data::v1::data_client::DataClient;

use super::{Ctx, cheap_hashing, open_run, progress, unique};
use crate::client::{Op, authed, lazy, onboard, platform_admin, put, sample_item, seed, url};
use crate::procs;
use crate::report::{Figure, ScenarioResult};

async fn tenantmesh(args: &[&str]) -> Result<std::process::Output, String> {
    let out = tokio::process::Command::new(procs::sibling("tenantmesh")?)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .map_err(|e| format!("tenantmesh {}: {e}", args[0]))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!("tenantmesh {}: {}", args[0], String::from_utf8_lossy(&out.stderr)))
    }
}

async fn backup(addr: &str, token: &str, out: &std::path::Path) -> Result<Duration, String> {
    let _ = std::fs::remove_dir_all(out);
    let t0 = Instant::now();
    tenantmesh(&["backup", "--addr", addr, "--token", token, "--out", &out.display().to_string()]).await?;
    Ok(t0.elapsed())
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().map_or(0, |m| m.len()) })
                .sum()
        })
        .unwrap_or(0)
}

/// How many items of collection `bulk` the caller holds.
pub(super) async fn count_items(data: std::net::SocketAddr, token: &str) -> Result<usize, String> {
    let mut client = DataClient::new(lazy(data));
    let (mut n, mut page_token) = (0, String::new());
    loop {
        let req =
            QueryItemsRequest { collection: "bulk".into(), id_prefix: String::new(), page_size: 1000, page_token };
        let page = client.query_items(authed(req, token)).await.map_err(|s| format!("query: {s:?}"))?.into_inner();
        n += page.items.len();
        if page.next_page_token.is_empty() {
            return Ok(n);
        }
        page_token = page.next_page_token;
    }
}

pub async fn backup_restore(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let dir = ctx.dir("backup_restore");
    let mesh_dir = dir.join("mesh");
    let (mesh, addrs) = procs::start_mesh(&mesh_dir, &cheap_hashing())?;
    let admin = platform_admin(addrs.auth).await?;
    let (tenants_n, items) = ctx.pick((100, 10_000), (5, 300));
    let mut tokens = Vec::with_capacity(tenants_n);
    for i in 0..tenants_n {
        let token = onboard(&addrs, &admin, &unique(&format!("bk{i}")), "standard").await?;
        seed(lazy(addrs.data), &token).await?;
        tokens.push(token);
    }
    // One tenant with `items` items (about 200 bytes each), written 8 at a time.
    let big = tokens[0].clone();
    let mut writers = Vec::new();
    for w in 0..8 {
        let (big, data) = (big.clone(), lazy(addrs.data));
        writers.push(tokio::spawn(async move {
            for i in (w..items).step_by(8) {
                let mut item = sample_item(&format!("i{i:06}"));
                item.collection = "bulk".into();
                put(data.clone(), &big, item).await?;
            }
            Ok::<(), String>(())
        }));
    }
    for w in writers {
        w.await.map_err(|e| e.to_string())??;
    }
    progress(format!("  {tenants_n} tenants, one with {items} items"));

    let data_addr = addrs.data.to_string();
    let out = dir.join("backup");
    let took = backup(&data_addr, &admin, &out).await?;
    let bytes = dir_bytes(&out);

    // Another tenant's writes and reads, idle and while backups run back to back.
    let other = tokens[1].clone();
    let rate = ctx.pick(200.0, 100.0);
    let data_url = url(addrs.data);
    let mut runs = Vec::new();
    for op in [Op::PutItem, Op::GetItem] {
        let idle = open_run(ctx, &data_url, &mesh, 2, rate, op.call(&other)).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let looping = {
            let (stop, addr, admin, out) = (stop.clone(), data_addr.clone(), admin.clone(), dir.join("loop"));
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    backup(&addr, &admin, &out).await?;
                    n += 1;
                }
                Ok::<usize, String>(n)
            })
        };
        let during = open_run(ctx, &data_url, &mesh, 2, rate, op.call(&other)).await?;
        stop.store(true, Ordering::Relaxed);
        let backups = looping.await.map_err(|e| e.to_string())??;
        progress(format!(
            "  {} p99 idle {:.2} ms, during {backups} backups {:.2} ms",
            op.name(),
            idle.summary.p99_ms,
            during.summary.p99_ms
        ));
        runs.push((op, idle, during, backups));
    }

    // Recovery: stop, restore, start, and every item is there.
    mesh.stop(Duration::from_secs(15))?;
    let t0 = Instant::now();
    tenantmesh(&["restore", &out.display().to_string(), "--data-dir", &mesh_dir.display().to_string(), "--replace"])
        .await?;
    let restore = t0.elapsed();
    let t1 = Instant::now();
    let (mesh, addrs) = procs::start_mesh(&mesh_dir, &cheap_hashing())?;
    let start = t1.elapsed();
    // The restored auth store has the same signing keys: the token still holds.
    let restored = count_items(addrs.data, &big).await?;
    if restored != items {
        return Err(format!("the restored mesh holds {restored} of the {items} items"));
    }
    mesh.stop(Duration::from_secs(15))?;

    let mut r = ctx.result(
        "backup_restore",
        "Backup and restore of the embedded mesh",
        format!(
            "`tenantmesh up` (release, embedded store) with {tenants_n} pool tenants, one holding {items} items of \
             about 200 bytes. `tenantmesh backup` (the real command) of the running mesh; then another tenant's \
             PutItem and GetItem in an open loop at {rate} calls/s, idle and while backups run back to back \
             (baseline = idle); then the mesh stopped, `tenantmesh restore --replace` and `tenantmesh up` again, \
             and every item checked to be there. RPO is the time since the last backup (schedule it); RTO is \
             restore plus start."
        ),
    );
    r.figures.push(Figure::new("backup of the running mesh", "s", took.as_secs_f64()));
    r.figures.push(Figure::new("backup size", "MB", bytes as f64 / 1e6));
    for (op, idle, during, _) in &runs {
        r.figures.push(
            Figure::new(format!("{} p99 of another tenant during backups", op.name()), "ms", during.summary.p99_ms)
                .vs(idle.summary.p99_ms),
        );
    }
    r.figures.push(Figure::new("restore (stopped mesh)", "s", restore.as_secs_f64()));
    r.figures.push(Figure::new("start of the restored mesh", "s", start.as_secs_f64()));
    r.figures.push(Figure::new("RTO: restore + start", "s", (restore + start).as_secs_f64()));
    r.details = json!({
        "tenants": tenants_n,
        "items": items,
        "runs": runs.iter().map(|(op, idle, during, n)| json!({
            "op": op.name(), "idle": idle.summary, "during": during.summary, "backups_during": n
        })).collect::<Vec<_>>(),
    });
    Ok(r)
}
