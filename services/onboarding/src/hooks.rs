//! The steps of application services: each registered service's
//! `TenantLifecycle` (served by the `tenantmesh-app` crate), called as a
//! durable step of the workflow with the onboarding service's identity.
//! Every call is idempotent, so a step run again after a crash does
//! nothing twice; a failure names the service (the step's label).

use tenantmesh_proto::lifecycle::v1::tenant_lifecycle_client::TenantLifecycleClient;
use tenantmesh_proto::lifecycle::v1::*;
use tenantmesh_proto::registry::v1::{ApplicationService, DeregisterServiceRequest, ListServicesRequest};
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

/// A service's entries in the catalog for one tenant: its shared
/// instance's (`None` when the operator has deregistered the service) and
/// the tenant's own instance's, if it has one.
struct Entries {
    shared: Option<ApplicationService>,
    own: Option<ApplicationService>,
}

impl Entries {
    /// Where the tenant's items at `spot` are served: its own instance
    /// (a silo tenant that has one), else the shared one; `None` when the
    /// service is deregistered.
    fn endpoint(&self, spot: &Spot) -> Option<&str> {
        let shared = self.shared.as_ref()?;
        Some(self.own.as_ref().filter(|_| spot.silo()).unwrap_or(shared).endpoint.as_str())
    }
}

impl Steps {
    /// The catalog's entries of the service `name` for `tenant`, now (the
    /// service may have moved, or left, since the workflow started).
    async fn entries(&self, tenant: &str, name: &str) -> Result<Entries, StepError> {
        let listed = self.registry.clone().list_services(ListServicesRequest {}).await?.into_inner().services;
        let (mut shared, mut own) = (None, None);
        for s in listed.into_iter().filter(|s| s.name == name) {
            if s.silo_tenant.is_empty() {
                shared = Some(s);
            } else if s.silo_tenant == tenant {
                own = Some(s);
            }
        }
        Ok(Entries { shared, own })
    }

    /// A lifecycle client of the instance at `endpoint`.
    fn client(&self, endpoint: &str) -> Result<TenantLifecycleClient<PropagatedChannel>, StepError> {
        let channel = self
            .data_clients
            .get(endpoint)
            .map_err(|e| StepError::permanent(format!("service endpoint {endpoint}: {e}")))?;
        Ok(tenantmesh_service::sized!(TenantLifecycleClient::new(channel)))
    }

    /// For a silo tenant of a service whose deployment starts instances:
    /// its own instance, started (or found) and listed in the catalog.
    async fn own_instance(&self, wf: &Workflow, service: &str, found: &Entries) -> Result<Option<String>, StepError> {
        let Some(shared) = found.shared.as_ref().filter(|s| wf.to.silo() && s.silo_instances) else {
            return Ok(None);
        };
        let tenant = &wf.params.tenant_id;
        let Some(endpoint) =
            self.compute.provision_service(shared, tenant, &wf.params.tier).await.map_err(StepError::transient)?
        else {
            return Ok(None);
        };
        self.resources
            .add(tenant, resources::SILO_INSTANCE, &format!("{service} {endpoint}"), &wf.params.tier)
            .await
            .map_err(ledger_error)?;
        // Listed once it registers itself (a few seconds at most); the step
        // is retried if it takes longer.
        for _ in 0..50 {
            if self.entries(tenant, service).await?.own.is_some_and(|own| own.endpoint == endpoint) {
                return Ok(Some(endpoint));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Err(StepError::transient(format!("{service}'s instance at {endpoint} is not in the catalog yet")))
    }

    /// Removes `service`'s instance of the tenant (`own`, its catalog
    /// entry, if it has one); whether there was one.
    async fn remove_instance(
        &self,
        wf: &Workflow,
        service: &str,
        own: Option<&ApplicationService>,
    ) -> Result<bool, StepError> {
        let tenant = &wf.params.tenant_id;
        self.compute.deprovision_service(service, tenant).await.map_err(StepError::transient)?;
        let Some(own) = own else { return Ok(false) };
        let req = DeregisterServiceRequest { name: service.to_owned(), silo_tenant: tenant.clone() };
        self.registry.clone().deregister_service(req).await?;
        let name = format!("{service} {}", own.endpoint);
        self.resources.remove(tenant, resources::SILO_INSTANCE, &name).await.map_err(ledger_error)?;
        tracing::info!(%service, "the tenant's own instance of the service removed");
        Ok(true)
    }

    /// Step `at` of `wf`, one of an application service.
    pub(crate) async fn run_hook(&self, at: usize, wf: &mut Workflow) -> Result<(), StepError> {
        let (step, service) = (wf.steps[at].name, wf.steps[at].service.clone());
        let tenant = wf.params.tenant_id.clone();
        // The instance that keeps the tenant's items where this step acts.
        let spot = match step {
            Step::ProvisionService | Step::UnfenceService => wf.to.clone(),
            _ => wf.from.clone(),
        };
        let found = self.entries(&tenant, &service).await?;
        let Some(endpoint) = found.endpoint(&spot) else {
            tracing::warn!(%service, step = %step, "the service is no longer in the catalog: its step is skipped");
            wf.steps[at].detail = format!("skipped: {service} is no longer in the service catalog");
            return Ok(());
        };
        let mut client = self.client(endpoint)?;
        let detail = match step {
            Step::ProvisionService => {
                let own = self.own_instance(wf, &service, &found).await?;
                if let Some(endpoint) = &own {
                    client = self.client(endpoint)?;
                }
                let req = ProvisionTenantRequest {
                    tenant_id: tenant.clone(),
                    tier: wf.params.tier.clone(),
                    placement: Some(wf.to.placement()),
                };
                let mut done = client.provision_tenant(req).await?.into_inner();
                if own.is_some() {
                    done.detail = format!("a silo tenant: served by its own instance of {service}");
                }
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
            Step::CopyService => {
                let to = found.endpoint(&wf.to).expect("listed: the step is not skipped");
                self.copy(&mut client, &mut self.client(to)?, wf).await?
            }
            Step::ExportService => self.export_service(&mut client, wf, &service).await?,
            Step::RewindService => {
                let req = RewindTenantRequest {
                    tenant_id: tenant.clone(),
                    placement: Some(wf.from.placement()),
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
            Step::PurgeService => {
                let purged = self.purge(&mut client, &tenant, &wf.from).await?;
                if wf.from.silo() && self.remove_instance(wf, &service, found.own.as_ref()).await? {
                    format!("{purged}; its own instance removed")
                } else {
                    purged
                }
            }
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
        let req = FenceTenantRequest { tenant_id: tenant.to_owned(), placement: Some(spot.placement()), raised };
        let changed = client.fence_tenant(req).await?.into_inner().changed;
        Ok(format!("fence {} in {changed} tables", if raised { "raised" } else { "lowered" }))
    }

    async fn purge(
        &self,
        client: &mut TenantLifecycleClient<PropagatedChannel>,
        tenant: &str,
        spot: &Spot,
    ) -> Result<String, StepError> {
        let req = PurgeTenantRequest { tenant_id: tenant.to_owned(), placement: Some(spot.placement()) };
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
        target: &mut TenantLifecycleClient<PropagatedChannel>,
        wf: &Workflow,
    ) -> Result<String, StepError> {
        let tenant = &wf.params.tenant_id;
        let req = ExportTenantRequest {
            tenant_id: tenant.clone(),
            placement: Some(wf.from.placement()),
            include_history: true,
            as_of_us: None,
        };
        let mut pages = client.export_tenant(req).await?.into_inner();
        let mut copied = 0usize;
        while let Some(page) = pages.message().await? {
            let size = |i: &TableItem| i.data.len() + i.key.len() + i.table.len() + 16;
            for items in crate::steps::import_batches(page.items, size) {
                copied += items.len();
                let req = ImportTenantRequest { tenant_id: tenant.clone(), placement: Some(wf.to.placement()), items };
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
            placement: Some(wf.from.placement()),
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
            let tenant = &wf.params.tenant_id;
            let found = self.entries(tenant, &hook).await?;
            // Deregistered since: nothing of it to undo.
            let (Some(from), Some(to)) = (found.endpoint(&wf.from), found.endpoint(&wf.to)) else { continue };
            let mut from = self.client(from)?;
            if wf.kind == Kind::Restore {
                // Back to when writes paused, then writes again.
                if let Some(paused_at) = wf.outputs.get(crate::steps::PAUSED_AT).and_then(|t| t.parse().ok()) {
                    let req = RewindTenantRequest {
                        tenant_id: tenant.clone(),
                        placement: Some(wf.from.placement()),
                        point_in_time_us: paused_at,
                    };
                    match from.rewind_tenant(req).await {
                        Ok(_) => {}
                        Err(s) if s.code() == Code::FailedPrecondition => {}
                        Err(s) => return Err(s.into()),
                    }
                }
            } else {
                // The new copy, and (into a silo) the instance made for it.
                self.purge(&mut self.client(to)?, tenant, &wf.to).await?;
                if wf.to.silo() && !wf.from.silo() {
                    self.remove_instance(wf, &hook, found.own.as_ref()).await?;
                }
            }
            self.fence(&mut from, tenant, &wf.from, false).await?;
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
