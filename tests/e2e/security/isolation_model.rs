//! A randomized model check of tenant isolation through the real mesh: 50
//! tenants spread over pool, bridge and silo placements each run a seeded
//! random sequence of put (conditional or not), get, query and delete,
//! all at once, while three of them change tier (moving their items between
//! placements). Every answer is checked against a model of that tenant's
//! items: no answer ever holds another tenant's item (each value names its
//! tenant), every acknowledged write is read back exactly, with its
//! version (so versions never go backwards), deleted items stay deleted.
//! The seed is printed; `ISOLATION_SEED=<n>` replays a run.

use std::collections::BTreeMap;
use std::time::Duration;

use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::data::v1::*;
use tenantmesh_proto::onboarding::v1::{ChangeTierRequest, WorkflowStatus};
use tenantmesh_test_support::*;
use tonic::Code;

const TENANTS: usize = 50;
const OPS_PER_TENANT: usize = 40;
/// Ids a tenant works on: few, so ops meet existing items often.
const IDS: u64 = 12;

/// xorshift64*: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn value_of(item: &Item) -> String {
    match item.attributes.as_ref().and_then(|a| a.fields.get("v")).and_then(|v| v.kind.clone()) {
        Some(prost_types::value::Kind::StringValue(s)) => s,
        other => panic!("item {} without its value: {other:?}", item.id),
    }
}

/// Retries `call` while the tenant is moving (writes UNAVAILABLE during a
/// tier change); any other answer is returned.
async fn through_moves<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    for _ in 0..600 {
        match call().await {
            Err(s) if s.code() == Code::Unavailable => tokio::time::sleep(Duration::from_millis(20)).await,
            other => return other,
        }
    }
    panic!("still UNAVAILABLE after 12 s");
}

/// One tenant's random run against its model; returns the model.
async fn run(
    mut data: DataClient<tonic::transport::Channel>,
    t: TestTenant,
    seed: u64,
    ops: usize,
    pace: Duration,
) -> BTreeMap<String, (String, u64)> {
    let mut rng = Rng(seed | 1);
    let mut model: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let tenant = t.tenant_id.clone();
    let mine = |item: &Item| {
        let v = value_of(item);
        assert!(v.starts_with(&format!("{tenant}:")), "{tenant} was answered another tenant's item: {v}");
        v
    };
    for n in 0..ops {
        tokio::time::sleep(pace).await;
        let id = format!("k{}", rng.below(IDS));
        let token = t.token.clone();
        match rng.below(10) {
            0..=3 => {
                let value = format!("{tenant}:{n}");
                let expected = if rng.below(2) == 0 { model.get(&id).map(|(_, v)| *v) } else { None };
                let req = || PutItemRequest {
                    collection: "c".into(),
                    id: id.clone(),
                    attributes: Some(attrs(&[("v", &value)])),
                    expected_version: expected,
                };
                let item = through_moves(|| {
                    let mut data = data.clone();
                    let req = authed(req(), &token);
                    async move { data.put_item(req).await }
                })
                .await
                .unwrap_or_else(|s| panic!("{tenant} put {id}: {s:?}"))
                .into_inner()
                .item
                .unwrap();
                let before = model.get(&id).map_or(0, |(_, v)| *v);
                assert!(item.version > before, "{tenant}/{id}: version {} after {before}", item.version);
                assert_eq!(mine(&item), value);
                model.insert(id, (value, item.version));
            }
            4..=5 => {
                let got =
                    data.get_item(authed(GetItemRequest { collection: "c".into(), id: id.clone() }, &token)).await;
                match (got, model.get(&id)) {
                    (Ok(r), Some((value, version))) => {
                        let item = r.into_inner().item.unwrap();
                        assert_eq!((mine(&item), item.version), (value.clone(), *version), "{tenant}/{id}");
                    }
                    (Err(s), None) => assert_eq!(s.code(), Code::NotFound, "{tenant}/{id}: {s:?}"),
                    (got, want) => panic!("{tenant}/{id}: got {got:?}, the model has {want:?}"),
                }
            }
            6..=7 => {
                let mut seen = BTreeMap::new();
                let mut page_token = String::new();
                loop {
                    let req = QueryItemsRequest {
                        collection: "c".into(),
                        id_prefix: String::new(),
                        page_size: 1 + rng.below(5) as i32,
                        page_token,
                    };
                    let page = data.query_items(authed(req, &token)).await.unwrap().into_inner();
                    for item in &page.items {
                        assert!(
                            seen.insert(item.id.clone(), (mine(item), item.version)).is_none(),
                            "{} twice",
                            item.id
                        );
                    }
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    page_token = page.next_page_token;
                }
                assert_eq!(seen, model, "{tenant}: query differs from the model");
            }
            _ => {
                let req = || DeleteItemRequest { collection: "c".into(), id: id.clone(), expected_version: None };
                let deleted = through_moves(|| {
                    let mut data = data.clone();
                    let req = authed(req(), &token);
                    async move { data.delete_item(req).await }
                })
                .await;
                match (deleted, model.remove(&id)) {
                    (Ok(_), Some(_)) => {}
                    (Err(s), None) => assert_eq!(s.code(), Code::NotFound, "{tenant}/{id}: {s:?}"),
                    (got, had) => panic!("{tenant} delete {id}: got {got:?}, the model had {had:?}"),
                }
            }
        }
    }
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_never_see_each_other_under_random_operations_and_moves() {
    let seed: u64 = std::env::var("ISOLATION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("ISOLATION_SEED={seed}");
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let mut tenants = Vec::new();
    for (i, tier) in ["standard", "premium", "enterprise"].iter().cycle().take(TENANTS).enumerate() {
        tenants.push(mesh.onboard_on(&unique_tenant(&format!("iso{i}")), tier).await);
    }
    let runs: Vec<_> = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| {
            // The three that move keep going, paced, for the whole move.
            let (ops, pace) =
                if i < 3 { (OPS_PER_TENANT * 3, Duration::from_millis(10)) } else { (OPS_PER_TENANT, Duration::ZERO) };
            tokio::spawn(run(mesh.data(), t.clone(), seed.wrapping_add(i as u64 * 0x9e37_79b9), ops, pace))
        })
        .collect();
    // Three tenants change model while everyone runs.
    let mut moves = Vec::new();
    for (t, to) in [(&tenants[0], "premium"), (&tenants[1], "standard"), (&tenants[2], "premium")] {
        let req = authed(ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: to.into() }, &admin);
        moves.push(mesh.onboarding().change_tier(req).await.unwrap().into_inner().workflow_id);
    }
    let mut models = Vec::new();
    for r in runs {
        models.push(r.await.unwrap());
    }
    for id in moves {
        assert_eq!(mesh.wait_workflow(&id).await.status, WorkflowStatus::Succeeded as i32, "{id}");
    }
    // After every move: each tenant holds exactly its model.
    for (t, model) in tenants.iter().zip(models) {
        let mut seen = BTreeMap::new();
        let req = QueryItemsRequest {
            collection: "c".into(),
            id_prefix: String::new(),
            page_size: 100,
            page_token: String::new(),
        };
        for item in mesh.data().query_items(authed(req, &t.token)).await.unwrap().into_inner().items {
            seen.insert(item.id.clone(), (value_of(&item), item.version));
        }
        assert_eq!(seen, model, "{} after the run", t.tenant_id);
    }
    mesh.shutdown().await;
}
