//! The service catalog: the application services that joined the mesh
//! (`RegisterService`, `ListServices`, `DeregisterService`), one item each
//! under [`SERVICES_PK`], keyed by name.

use prost::Message as _;
use tenantmesh_proto::registry::v1::*;
use tenantmesh_service::audit::{AppendError, Caller};
use tenantmesh_service::errors::Violations;
use tenantmesh_service::ids::{MAX_SERVICE_NAME_LEN, valid_service_name};
use tenantmesh_storage::{Condition, Pages, Write};
use tenantmesh_tenant_context::{PLATFORM_TENANT, Role, TenantContext};
use tonic::Status;

use crate::error::RegistryError;
use crate::registry::Registry;

/// The partition of the catalog.
pub const SERVICES_PK: &str = "_services";

const MAX_ENDPOINT_LEN: usize = 512;
const MAX_LISTED: usize = 64;
const MAX_IMAGE_LEN: usize = 255;

fn check(service: &ApplicationService) -> Result<(), Status> {
    let mut v = Violations::new();
    if !valid_service_name(&service.name) {
        v.add("service.name", format!("must be 1-{MAX_SERVICE_NAME_LEN} of a-z, 0-9 and -, starting with a letter"));
    }
    let scheme_ok = service.endpoint.starts_with("http://") || service.endpoint.starts_with("https://");
    if !scheme_ok || service.endpoint.len() > MAX_ENDPOINT_LEN || service.endpoint.contains(char::is_whitespace) {
        v.add(
            "service.endpoint",
            format!("must be an http:// or https:// URL of at most {MAX_ENDPOINT_LEN} characters"),
        );
    }
    if service.grpc_services.is_empty() || service.grpc_services.len() > MAX_LISTED {
        v.add("service.grpc_services", format!("must name 1-{MAX_LISTED} gRPC services"));
    }
    for (i, s) in service.grpc_services.iter().enumerate() {
        let ok = !s.is_empty() && s.len() <= 200 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._".contains(&b));
        if !ok {
            v.add(&format!("service.grpc_services[{i}]"), "must be a full gRPC service name");
        }
    }
    if service.tables.len() > MAX_LISTED {
        v.add("service.tables", format!("at most {MAX_LISTED}"));
    }
    for (i, t) in service.tables.iter().enumerate() {
        if !valid_service_name(t) {
            v.add(&format!("service.tables[{i}]"), format!("must be 1-{MAX_SERVICE_NAME_LEN} of a-z, 0-9 and -"));
        }
    }
    if !service.silo_tenant.is_empty() {
        v.tenant_id("service.silo_tenant", &service.silo_tenant);
    }
    // An image reference: registry/name[:tag][@digest], no spaces.
    let image_ok = service.image.len() <= MAX_IMAGE_LEN
        && service.image.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:@+".contains(&b));
    if !image_ok {
        v.add("service.image", format!("must be a container image reference of at most {MAX_IMAGE_LEN} characters"));
    }
    if service.image.is_empty() && !service.command.is_empty() {
        v.add("service.command", "is the command in service.image: set the image too");
    }
    if service.command.len() > MAX_LISTED {
        v.add("service.command", format!("at most {MAX_LISTED} words"));
    }
    for (i, word) in service.command.iter().enumerate() {
        if word.is_empty() || word.len() > MAX_ENDPOINT_LEN || word.chars().any(char::is_control) {
            v.add(&format!("service.command[{i}]"), format!("must be 1-{MAX_ENDPOINT_LEN} printable characters"));
        }
    }
    v.check()
}

/// The catalog key of a service's entry: its name, or `<name>@<tenant>`
/// for the instance of one silo tenant.
fn key(name: &str, silo_tenant: &str) -> String {
    if silo_tenant.is_empty() { name.to_owned() } else { format!("{name}@{silo_tenant}") }
}

/// The audit chain of a catalog change: the silo tenant's, for its own
/// instance; the platform's otherwise.
fn chain_of(silo_tenant: &str) -> &str {
    if silo_tenant.is_empty() { PLATFORM_TENANT } else { silo_tenant }
}

/// A registration in summary, for its audit event.
fn summary(s: &ApplicationService) -> String {
    let image = if s.image.is_empty() { String::new() } else { format!(", image {}", s.image) };
    format!("endpoint {}, services {}, tables {}{image}", s.endpoint, s.grpc_services.join(" "), s.tables.join(" "))
}

/// Whether two registrations say the same (what the registry sets aside).
fn same(a: &ApplicationService, b: &ApplicationService) -> bool {
    (&a.name, &a.endpoint, &a.grpc_services, &a.tables, a.silo_instances, &a.silo_tenant, &a.image, &a.command)
        == (&b.name, &b.endpoint, &b.grpc_services, &b.tables, b.silo_instances, &b.silo_tenant, &b.image, &b.command)
}

fn decode(item: tenantmesh_storage::Item) -> Result<ApplicationService, RegistryError> {
    let mut s = ApplicationService::decode(item.data.as_slice()).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
    s.version = item.version;
    Ok(s)
}

impl Registry {
    /// `RegisterService` (see the proto): idempotent, a change is a new
    /// version.
    pub(crate) async fn catalog_register(
        &self,
        ctx: &TenantContext,
        caller: &Caller,
        req: RegisterServiceRequest,
    ) -> Result<RegisterServiceResponse, Status> {
        let service = req.service.ok_or_else(|| tenantmesh_service::errors::invalid_field("service", "is required"))?;
        check(&service)?;
        let chain = chain_of(&service.silo_tenant).to_owned();
        let target = format!("service/{}", key(&service.name, &service.silo_tenant));
        self.auditor
            .audited(
                caller,
                &chain,
                "service.register",
                target.clone(),
                self.register_checked(ctx, caller, service, target),
            )
            .await
    }

    async fn register_checked(
        &self,
        ctx: &TenantContext,
        caller: &Caller,
        mut service: ApplicationService,
        target: String,
    ) -> Result<RegisterServiceResponse, Status> {
        // A service identity registers itself only: the name its client id gives.
        if !ctx.has_role(Role::PlatformAdmin) && ctx.subject.strip_prefix("service:") != Some(service.name.as_str()) {
            tracing::warn!(
                security_event = "catalog_refused",
                subject = %ctx.subject,
                service = %service.name,
                "a service identity tried to register another service"
            );
            return Err(Status::permission_denied("a service identity registers only the service its client id names"));
        }
        service.registered_by = ctx.subject.to_string();
        service.registered_at = tenantmesh_service::clock::now_ms();
        let at = key(&service.name, &service.silo_tenant);
        // Two tries: a concurrent registration of the same name wins once.
        for _ in 0..2 {
            let current = self.store.get(SERVICES_PK, &at).await.map_err(RegistryError::from)?;
            let (expected, before) = match current {
                Some(item) => {
                    let existing = decode(item)?;
                    if same(&existing, &service) {
                        return Ok(RegisterServiceResponse { service: Some(existing), changed: false });
                    }
                    (existing.version, summary(&existing))
                }
                None => (0, String::new()),
            };
            service.version = 0;
            let write = Write::Put {
                pk: SERVICES_PK.into(),
                sk: at.clone(),
                data: service.encode_to_vec(),
                condition: Condition::Version(expected),
            };
            let mut event = caller.event(chain_of(&service.silo_tenant), "service.register", target.clone());
            event.before = before;
            event.after = summary(&service);
            match self.auditor.log.commit(vec![write], event).await {
                Ok(_) => {
                    service.version = expected + 1;
                    tracing::info!(
                        service = %service.name,
                        endpoint = %service.endpoint,
                        silo_tenant = %service.silo_tenant,
                        version = service.version,
                        registered_by = %service.registered_by,
                        "application service registered"
                    );
                    return Ok(RegisterServiceResponse { service: Some(service), changed: true });
                }
                Err(AppendError::Change { .. }) => continue,
                Err(AppendError::Store(e)) => return Err(RegistryError::from(e).into()),
            }
        }
        Err(Status::aborted("the service was registered concurrently; retry"))
    }

    /// `DeregisterService` (see the proto): idempotent.
    pub(crate) async fn catalog_deregister(
        &self,
        ctx: &TenantContext,
        caller: &Caller,
        req: DeregisterServiceRequest,
    ) -> Result<DeregisterServiceResponse, Status> {
        let mut v = Violations::new();
        if !valid_service_name(&req.name) {
            v.add("name", format!("must be 1-{MAX_SERVICE_NAME_LEN} of a-z, 0-9 and -, starting with a letter"));
        }
        if !req.silo_tenant.is_empty() {
            v.tenant_id("silo_tenant", &req.silo_tenant);
        }
        v.check()?;
        let at = key(&req.name, &req.silo_tenant);
        let chain = chain_of(&req.silo_tenant);
        let target = format!("service/{at}");
        let removed = self
            .auditor
            .audited(caller, chain, "service.deregister", target.clone(), async {
                ctx.authorize_all_tenants()?;
                // Two tries: a registration racing this one wins once.
                for _ in 0..2 {
                    let Some(item) = self.store.get(SERVICES_PK, &at).await.map_err(RegistryError::from)? else {
                        // Nothing there: nothing changes, and no event.
                        return Ok(false);
                    };
                    let version = item.version;
                    let mut event = caller.event(chain, "service.deregister", target.clone());
                    event.before = summary(&decode(item)?);
                    let write = Write::Delete {
                        pk: SERVICES_PK.into(),
                        sk: at.clone(),
                        condition: Condition::Version(version),
                    };
                    match self.auditor.log.commit(vec![write], event).await {
                        Ok(_) => return Ok(true),
                        Err(AppendError::Change { .. }) => continue,
                        Err(AppendError::Store(e)) => return Err(Status::from(RegistryError::from(e))),
                    }
                }
                Err(Status::aborted("the service was registered concurrently; retry"))
            })
            .await?;
        tracing::info!(service = %req.name, silo_tenant = %req.silo_tenant, removed, by = %ctx.subject, "application service deregistered");
        Ok(DeregisterServiceResponse { removed })
    }

    /// `ListServices`: the whole catalog, by name.
    pub(crate) async fn catalog_list(&self) -> Result<ListServicesResponse, Status> {
        let mut services = Vec::new();
        let mut pages = Pages::new(self.store.as_ref(), SERVICES_PK, "", 100);
        while let Some(items) = pages.next().await.map_err(RegistryError::from)? {
            for item in items {
                services.push(decode(item)?);
            }
        }
        Ok(ListServicesResponse { services })
    }
}
