//! The steps of application services: each registered service's
//! `TenantLifecycle` (served by the `tenantmesh-app` crate), called as a
//! durable step of the workflow with the onboarding service's identity.
//! Every call is idempotent, so a step run again after a crash does
//! nothing twice; a failure names the service (the step's label).

use tenantmesh_proto::lifecycle::v1::tenant_lifecycle_client::TenantLifecycleClient;
use tenantmesh_proto::lifecycle::v1::*;
use tenantmesh_proto::registry::v1::{ListServicesRequest, Placement};
use tenantmesh_tenant_context::client::PropagatedChannel;
use tonic::Code;

use crate::engine::StepError;
use crate::resources;
use crate::steps::{Steps, ledger_error};
use crate::workflow::{Kind, Spot, Step, Workflow};

/// An application service's export line: `{"table", "key", "version",
/// "data"}` (the item's bytes in base64: they are the service's own encoding).
pub fn line(item: &TableItem) -> String {
    use base64::Engine as _;
    serde_json::json!({
        "table": item.table,
        "key": item.key,
        "version": item.version,
        "data": base64::engine::general_purpose::STANDARD.encode(&item.data),
    })
    .to_string()
}

/// Where a service keeps a tenant placed at `spot`: the service's
/// placement is the model alone (its tables' names derive from it), and
/// it is served by the service's shared instance.
fn placement(spot: &Spot) -> Option<Placement> {
    Some(Placement { model: spot.model as i32, table: String::new(), endpoint: String::new() })
}

impl Steps {
    /// The lifecycle client of the workflow's service `name`, where the
    /// catalog says it serves now (it may have moved since the workflow
    /// started); `None` when the operator has deregistered it since.
    async fn lifecycle(
        &self,
        wf: &Workflow,
        name: &str,
    ) -> Result<Option<TenantLifecycleClient<PropagatedChannel>>, StepError> {
        if wf.hook(name).is_none() {
            return Err(StepError::permanent(format!("service {name} is not in this workflow")));
        }
        let listed = self.registry.clone().list_services(ListServicesRequest {}).await?.into_inner().services;
        let Some(endpoint) = listed.into_iter().find(|s| s.name == name).map(|s| s.endpoint) else {
            return Ok(None);
        };
        let channel = self
            .data_clients
            .get(&endpoint)
            .map_err(|e| StepError::permanent(format!("service endpoint {endpoint}: {e}")))?;
        Ok(Some(tenantmesh_service::sized!(TenantLifecycleClient::new(channel))))
    }

    /// Step `at` of `wf`, one of an application service.
    pub(crate) async fn run_hook(&self, at: usize, wf: &mut Workflow) -> Result<(), StepError> {
        let (step, service) = (wf.steps[at].name, wf.steps[at].service.clone());
        let tenant = wf.params.tenant_id.clone();
        let Some(mut client) = self.lifecycle(wf, &service).await? else {
            tracing::warn!(%service, step = %step, "the service is no longer in the catalog: its step is skipped");
            wf.steps[at].detail = format!("skipped: {service} is no longer in the service catalog");
            return Ok(());
        };
        let detail = match step {
            Step::ProvisionService => {
                let req = ProvisionTenantRequest {
                    tenant_id: tenant.clone(),
                    tier: wf.params.tier.clone(),
                    placement: placement(&wf.to),
                };
                let done = client.provision_tenant(req).await?.into_inner();
                if wf.to.dedicated() {
                    for table in &done.tables {
                        self.resources
                            .add(&tenant, resources::TABLE, table, &wf.params.tier)
                            .await
                            .map_err(ledger_error)?;
                    }
                }
                tracing::info!(%service, tables = ?done.tables, created = done.created, "service provisioned the tenant");
                done.detail
            }
            Step::FenceService => self.fence(&mut client, &tenant, &wf.from, true).await?,
            // A tier change's new place, or a restore's own (`to` is `from`).
            Step::UnfenceService => self.fence(&mut client, &tenant, &wf.to, false).await?,
            Step::CopyService => self.copy(&mut client, wf).await?,
            Step::ExportService => self.export_service(&mut client, wf, &service).await?,
            Step::RewindService => {
                let req = RewindTenantRequest {
                    tenant_id: tenant.clone(),
                    placement: placement(&wf.from),
                    point_in_time_us: wf.point_in_time_us,
                };
                match client.rewind_tenant(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        format!("{} items put back, {} deleted", r.restored, r.deleted)
                    }
                    Err(s) if s.code() == Code::FailedPrecondition => return Err(StepError::permanent(s.message())),
                    Err(s) => return Err(s.into()),
                }
            }
            Step::PurgeService => self.purge(&mut client, &tenant, &wf.from).await?,
            other => return Err(StepError::permanent(format!("{other} is not a step of an application service"))),
        };
        wf.steps[at].detail = detail;
        Ok(())
    }

    async fn fence(
        &self,
        client: &mut TenantLifecycleClient<PropagatedChannel>,
        tenant: &str,
        spot: &Spot,
        raised: bool,
    ) -> Result<String, StepError> {
        let req = FenceTenantRequest { tenant_id: tenant.to_owned(), placement: placement(spot), raised };
        let changed = client.fence_tenant(req).await?.into_inner().changed;
        Ok(format!("fence {} in {changed} tables", if raised { "raised" } else { "lowered" }))
    }

    async fn purge(
        &self,
        client: &mut TenantLifecycleClient<PropagatedChannel>,
        tenant: &str,
        spot: &Spot,
    ) -> Result<String, StepError> {
        let req = PurgeTenantRequest { tenant_id: tenant.to_owned(), placement: placement(spot) };
        let done = client.purge_tenant(req).await?.into_inner();
        for table in &done.tables {
            self.resources.remove(tenant, resources::TABLE, table).await.map_err(ledger_error)?;
        }
        Ok(format!("{} items deleted, {} tables dropped", done.deleted, done.dropped))
    }

    /// Copies the tenant's items and their history from `from` to `to`,
    /// page by page, in bounded batches.
    async fn copy(
        &self,
        client: &mut TenantLifecycleClient<PropagatedChannel>,
        wf: &Workflow,
    ) -> Result<String, StepError> {
        let tenant = &wf.params.tenant_id;
        let req = ExportTenantRequest {
            tenant_id: tenant.clone(),
            placement: placement(&wf.from),
            include_history: true,
            as_of_us: None,
        };
        let mut pages = client.export_tenant(req).await?.into_inner();
        let mut target = client.clone();
        let mut copied = 0usize;
        while let Some(page) = pages.message().await? {
            let size = |i: &TableItem| i.data.len() + i.key.len() + i.table.len() + 16;
            for items in crate::steps::import_batches(page.items, size) {
                copied += items.len();
                let req = ImportTenantRequest { tenant_id: tenant.clone(), placement: placement(&wf.to), items };
                target.import_tenant(req).await?;
            }
        }
        Ok(format!("{copied} items and history entries copied"))
    }

    /// Writes the service's items of the tenant to its own JSONL export
    /// (`<tenant>.<service>.jsonl`, beside the items'): as they are
    /// (offboarding), or as they were at the restore's instant.
    async fn export_service(
        &self,
        client: &mut TenantLifecycleClient<PropagatedChannel>,
        wf: &Workflow,
        service: &str,
    ) -> Result<String, StepError> {
        let as_of = (wf.kind == Kind::Restore).then_some(wf.point_in_time_us);
        let req = ExportTenantRequest {
            tenant_id: wf.params.tenant_id.clone(),
            placement: placement(&wf.from),
            include_history: false,
            as_of_us: as_of,
        };
        // Asked first: an export that cannot be made leaves no file behind.
        let mut pages = match client.export_tenant(req).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::FailedPrecondition => return Err(StepError::permanent(s.message())),
            Err(s) => return Err(s.into()),
        };
        let mut file = self.export_file(wf, &format!("{service}.jsonl")).await?;
        while let Some(page) = pages.message().await? {
            file.append(page.items.iter().map(line).collect()).await?;
        }
        let (path, exported) = self.finish_export(wf, file).await?;
        tracing::info!(%service, items = exported, path = %path, as_of_us = ?as_of, "service items exported");
        Ok(format!("{exported} items exported to {path}"))
    }

    /// Undoes a tier change's service steps before its switch: the new
    /// copy removed, the old place's fence lowered. Idempotent.
    pub(crate) async fn roll_back_hooks(&self, wf: &Workflow) -> Result<(), StepError> {
        for hook in services_with_steps(wf) {
            // Deregistered since: nothing of it to undo.
            let Some(mut client) = self.lifecycle(wf, &hook).await? else { continue };
            let tenant = &wf.params.tenant_id;
            if wf.kind == Kind::Restore {
                // Back to when writes paused, then writes again.
                if let Some(paused_at) = wf.outputs.get(crate::steps::PAUSED_AT).and_then(|t| t.parse().ok()) {
                    let req = RewindTenantRequest {
                        tenant_id: tenant.clone(),
                        placement: placement(&wf.from),
                        point_in_time_us: paused_at,
                    };
                    match client.rewind_tenant(req).await {
                        Ok(_) => {}
                        Err(s) if s.code() == Code::FailedPrecondition => {}
                        Err(s) => return Err(s.into()),
                    }
                }
            } else {
                self.purge(&mut client, tenant, &wf.to).await?;
            }
            self.fence(&mut client, tenant, &wf.from, false).await?;
        }
        Ok(())
    }
}

/// The services that have steps in `wf`.
fn services_with_steps(wf: &Workflow) -> Vec<String> {
    let mut names: Vec<String> = wf.steps.iter().filter(|s| !s.service.is_empty()).map(|s| s.service.clone()).collect();
    names.dedup();
    names.sort();
    names.dedup();
    names
}
