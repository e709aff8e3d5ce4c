//! Resident memory per active tenant in the data service: a standalone
//! data-service process, then 1k, 10k and 100k distinct tenants each make a
//! request; the growth of its resident set, per tenant.
//!
//! So many tenants cannot be onboarded through the API within the
//! benchmark's time (each is a dozen durable steps): one tenant is
//! onboarded for real, and its registry record is the template of the
//! others, written into the registry's store while the mesh is stopped.
//! Their users' tokens are signed with the auth service's own key.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use serde_json::json;
use tenantmesh_proto::data::v1::GetItemRequest;
use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::registry::v1::Tenant;
use tenantmesh_storage::{Condition, Table as _, Write};
use tenantmesh_tenant_context::{Claims, Role};
use tokio::task::JoinSet;

use super::{Ctx, cheap_hashing, progress, unique};
use crate::client::{authed, lazy, onboard, platform_admin};
use crate::procs::{self, Proc};
use crate::report::{Figure, ScenarioResult, Target};

/// Signs a tenant user's access token with the auth service's key.
fn mint(kid: &str, key: &jsonwebtoken::EncodingKey, tenant: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        iss: tenantmesh_service::config::DEFAULT_ISSUER.into(),
        aud: tenantmesh_service::config::DEFAULT_AUDIENCE.into(),
        sub: format!("user-{tenant}"),
        tenant_id: tenant.into(),
        roles: vec![Role::TenantUser],
        exp: now + 7200,
        nbf: now - 1,
        iat: now,
        jti: uuid::Uuid::new_v4().simple().to_string(),
        scopes: Vec::new(),
        tenants: None,
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims, key).expect("sign")
}

/// Writes `ids` as copies of `template` into the stopped mesh's registry,
/// and returns the auth service's signing key.
async fn seed(
    mesh_dir: &std::path::Path,
    template_id: &str,
    ids: &[String],
) -> Result<(String, jsonwebtoken::EncodingKey), String> {
    let e = |e: tenantmesh_storage::StorageError| e.to_string();
    let registry = tenantmesh_storage::EmbeddedTable::open(mesh_dir.join("registry.redb")).map_err(e)?;
    let pk = tenantmesh_registry::TENANTS_PK;
    let raw = registry.get(pk, template_id).await.map_err(e)?.ok_or("template tenant not in the registry")?;
    let template = Tenant::decode(raw.data.as_slice()).map_err(|e| e.to_string())?;
    for chunk in ids.chunks(1000) {
        let writes = chunk
            .iter()
            .map(|id| {
                let mut t = template.clone();
                t.tenant_id = id.clone();
                t.name = format!("Memory tenant {id}");
                Write::Put { pk: pk.into(), sk: id.clone(), data: t.encode_to_vec(), condition: Condition::NotExists }
            })
            .collect();
        registry.transact_write(writes).await.map_err(e)?;
    }
    drop(registry);
    let auth = tenantmesh_storage::EmbeddedTable::open_shared(mesh_dir.join("auth.redb")).map_err(e)?;
    let keys = tenantmesh_auth::SigningKeys::load_or_create(&auth).await.map_err(|e| e.to_string())?;
    Ok(keys.signer())
}

/// One GetItem per token, `concurrency` at a time; counts by status code.
async fn touch(data: std::net::SocketAddr, tokens: &[String], concurrency: usize) -> HashMap<String, u64> {
    let channel = lazy(data);
    let mut codes: HashMap<String, u64> = HashMap::new();
    let mut tasks = JoinSet::new();
    let tokens = Arc::new(tokens.to_vec());
    for i in 0..tokens.len() {
        if tasks.len() >= concurrency
            && let Some(Ok(code)) = tasks.join_next().await
        {
            *codes.entry(format!("{code:?}")).or_default() += 1;
        }
        let (channel, tokens) = (channel.clone(), tokens.clone());
        tasks.spawn(async move {
            let req = GetItemRequest { collection: "notes".into(), id: "absent".into() };
            crate::client::code(DataClient::new(channel).get_item(authed(req, &tokens[i])).await)
        });
    }
    while let Some(Ok(code)) = tasks.join_next().await {
        *codes.entry(format!("{code:?}")).or_default() += 1;
    }
    codes
}

/// The standalone data-service binary, on a free port with its own data
/// dir under `dir`, verifying tokens against the mesh at `addrs`.
pub fn start_data(dir: &std::path::Path, addrs: &procs::MeshAddrs) -> Result<(Proc, std::net::SocketAddr), String> {
    let port = procs::free_port();
    let listen: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cmd = Command::new(procs::sibling("tenantmesh-data")?);
    cmd.env("TENANTMESH_LISTEN_ADDR", listen.to_string())
        .env("TENANTMESH_DATA_DIR", dir.join("data"))
        .env("TENANTMESH_REGISTRY_URL", format!("http://{}", addrs.registry))
        .env("TENANTMESH_AUTH_URL", format!("http://{}", addrs.auth));
    let (proc, ()) = procs::spawn_until("data service", cmd, dir.join("data.log"), Duration::from_secs(30), |line| {
        line.contains("\"message\":\"serving\"").then_some(())
    })?;
    Ok((proc, listen))
}

pub async fn memory_per_tenant(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let dir = ctx.dir("memory");
    let mesh_dir = dir.join("mesh");
    let (mesh, addrs) = procs::start_mesh(&mesh_dir, &cheap_hashing())?;
    let template = unique("template");
    onboard(&addrs, &platform_admin(addrs.auth).await?, &template, "standard").await?;
    mesh.stop(Duration::from_secs(15))?;

    let levels: Vec<usize> = ctx.pick(vec![1_000, 10_000, 100_000], vec![200, 1_000]);
    const WARM: usize = 100;
    let total = WARM + levels.last().copied().unwrap_or(0);
    let ids: Vec<String> = (0..total).map(|i| format!("mem-{i:06}")).collect();
    progress(format!("  seeding {total} tenants"));
    let (kid, key) = seed(&mesh_dir, &template, &ids).await?;
    let tokens: Vec<String> = ids.iter().map(|id| mint(&kid, &key, id)).collect();

    let (mesh, addrs) = procs::start_mesh(&mesh_dir, &cheap_hashing())?;
    let (data, data_addr) = start_data(&dir, &addrs)?;
    // Warm up: the runtime's threads, allocator arenas and connections exist
    // before the first reading.
    for _ in 0..5 {
        touch(data_addr, &tokens[..WARM], 64).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = data.rss();
    let mut r = ctx.result(
        "memory_per_tenant",
        "Memory per active tenant (data service)",
        format!(
            "A standalone `tenantmesh-data` process (release) in front of a `tenantmesh up` registry and auth; after a \
             warm-up by {WARM} tenants, each of {levels:?} distinct tenants makes a GetItem with its own user token \
             (cumulative). Figure: growth of the data service's resident set since the warm-up, divided by the \
             number of tenants that made requests. The caches hold 100,000 tenants by default \
             (`TENANTMESH_TENANT_CACHE_CAPACITY`), so every tenant here stays cached."
        ),
    );
    let mut done = 0;
    let mut details = Vec::new();
    for level in levels {
        let codes = touch(data_addr, &tokens[WARM + done..WARM + level], 64).await;
        done = level;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = data.rss();
        let per = rss.saturating_sub(rss0) as f64 / level as f64;
        progress(format!(
            "  {level} tenants: rss {:.1} MiB, {per:.0} bytes per tenant, calls {codes:?}",
            rss as f64 / 1048576.0
        ));
        if codes.keys().any(|c| c != "NotFound") {
            return Err(format!("unexpected answers at {level} tenants: {codes:?}"));
        }
        r.figures.push(
            Figure::new(format!("resident memory per tenant at {level} tenants"), "bytes", per)
                .target(Target::AtMost(2048.0)),
        );
        details.push(json!({"tenants": level, "rss_bytes": rss, "rss_after_warmup_bytes": rss0, "codes": codes}));
    }
    r.figures.push(Figure::new("data service resident memory after warm-up", "MiB", rss0 as f64 / 1048576.0));
    r.details = json!(details);
    data.stop(Duration::from_secs(15))?;
    mesh.stop(Duration::from_secs(15))?;
    Ok(r)
}
