//! Every RPC's policy, read from its proto: who may call it (user roles,
//! service scopes, or anyone), how admission charges it and what it
//! meters. Each RPC declares them with the `tenantmesh.options.v1.policy`
//! method option (`proto/tenantmesh/options/v1/options.proto`); the layers
//! build their tables from the service's compiled descriptor set when it
//! starts. An RPC that declares no policy, or leaves its charge or meter
//! unspecified, is an error naming it ([`Policies::from_descriptor_sets`]),
//! so a service with one does not start; and a path that is not in the
//! table is refused (fail closed).
//!
//! A service's own unit tests hold its descriptor set to this with
//! [`assert_declared`].

use std::collections::HashMap;

use tenantmesh_proto::options::v1 as options;

use crate::identity::{Role, Scope};

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed (health, reflection, login, JWKS, service login).
    Public,
    /// A verified token of a user with one of `roles`, or of a service
    /// identity granted one of `scopes`.
    Callers { roles: Set<Role>, scopes: Set<Scope> },
}

/// A set of roles or scopes, one bit each: checked without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Set<T>(u8, std::marker::PhantomData<T>);

/// Roles and scopes as bits of a [`Set`].
pub trait Member: Copy {
    fn bit(self) -> u8;
}

impl Member for Role {
    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl Member for Scope {
    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl<T> Set<T> {
    pub const EMPTY: Self = Set(0, std::marker::PhantomData);
}

impl<T: Member> Set<T> {
    pub fn of(members: &[T]) -> Self {
        Set(members.iter().fold(0, |bits, m| bits | m.bit()), std::marker::PhantomData)
    }

    pub fn contains(&self, member: T) -> bool {
        self.0 & member.bit() != 0
    }

    /// Whether any of `members` is in the set.
    pub fn any(&self, members: &[T]) -> bool {
        members.iter().any(|m| self.contains(*m))
    }
}

impl<T> std::fmt::Debug for Set<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#07b}", self.0)
    }
}

/// How admission charges a call (the RPC's `charge` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// One token, whatever the call does.
    OneToken,
    /// One token at admission, then what the handler reports (its
    /// [`Handled`](tenantmesh_service::handled::Handled) cost).
    Units,
}

/// What the server layers need of an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub access: Access,
    /// Whether it answers with a stream (its caller's slot among its
    /// tenant's requests in flight is then held, by the stream, for as long
    /// as the stream is open).
    pub streams: bool,
    pub charge: Charge,
    /// Its index among the metered RPCs ([`Policies::metered`]); `None`:
    /// not metered.
    pub meter: Option<u16>,
}

/// Infrastructure services reachable without a token.
const PUBLIC_PREFIXES: &[&str] =
    &["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

const INFRASTRUCTURE: Rule = Rule { access: Access::Public, streams: false, charge: Charge::OneToken, meter: None };

/// Every RPC's rule by gRPC path: one lookup per request.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    rules: HashMap<Box<str>, Rule>,
    /// The metered RPCs' method names, by their [`Rule::meter`] index.
    metered: Vec<Box<str>>,
}

/// RPCs whose policy is missing or incomplete, each with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("RPCs without a complete policy option (tenantmesh.options.v1.policy): {}", .0.join("; "))]
pub struct PolicyError(pub Vec<String>);

/// Just what is read of a `FileDescriptorSet`: prost's own descriptor types
/// drop the extension fields the policy is declared in.
mod descriptor {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FileSet {
        #[prost(message, repeated, tag = "1")]
        pub file: Vec<File>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct File {
        #[prost(string, optional, tag = "2")]
        pub package: Option<String>,
        #[prost(message, repeated, tag = "6")]
        pub service: Vec<Service>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Service {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(message, repeated, tag = "2")]
        pub method: Vec<Method>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Method {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(message, optional, tag = "4")]
        pub options: Option<MethodOptions>,
        #[prost(bool, optional, tag = "6")]
        pub server_streaming: Option<bool>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MethodOptions {
        /// `tenantmesh.options.v1.policy`.
        #[prost(message, optional, tag = "51000")]
        pub policy: Option<tenantmesh_proto::options::v1::Policy>,
    }
}

/// The rule one declaration makes, or what is wrong with it.
fn rule(policy: Option<&options::Policy>, streams: bool) -> Result<(Access, Charge, bool), String> {
    let p = policy.ok_or("no policy option")?;
    let roles = p
        .roles()
        .map(|r| match r {
            options::Role::PlatformAdmin => Ok(Role::PlatformAdmin),
            options::Role::TenantAdmin => Ok(Role::TenantAdmin),
            options::Role::TenantUser => Ok(Role::TenantUser),
            options::Role::Unspecified => Err("a role is ROLE_UNSPECIFIED"),
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Unknown enum numbers (a newer options proto) read as unspecified.
    if p.roles.len() != roles.len() {
        return Err("a role is not one this version knows".into());
    }
    let scopes = p
        .scopes()
        .map(|s| match s {
            options::Scope::Directory => Ok(Scope::Directory),
            options::Scope::Lifecycle => Ok(Scope::Lifecycle),
            options::Scope::DataPlane => Ok(Scope::DataPlane),
            options::Scope::MeteringWriter => Ok(Scope::MeteringWriter),
            options::Scope::UsageReader => Ok(Scope::UsageReader),
            options::Scope::Catalog => Ok(Scope::Catalog),
            options::Scope::Unspecified => Err("a scope is SCOPE_UNSPECIFIED"),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if p.scopes.len() != scopes.len() {
        return Err("a scope is not one this version knows".into());
    }
    let access = match (p.public, roles.is_empty() && scopes.is_empty()) {
        (true, true) => Access::Public,
        (true, false) => return Err("public, yet it names roles or scopes".into()),
        (false, true) => return Err("neither public nor callable by any role or scope".into()),
        (false, false) => Access::Callers { roles: Set::of(&roles), scopes: Set::of(&scopes) },
    };
    let charge = match options::Charge::try_from(p.charge) {
        Ok(options::Charge::OneToken) => Charge::OneToken,
        Ok(options::Charge::Units) => Charge::Units,
        _ => return Err("charge is unspecified (CHARGE_ONE_TOKEN or CHARGE_UNITS)".into()),
    };
    let metered = match options::Meter::try_from(p.meter) {
        Ok(options::Meter::None) => false,
        Ok(options::Meter::Usage) => true,
        _ => return Err("meter is unspecified (METER_NONE or METER_USAGE)".into()),
    };
    if streams && charge == Charge::Units {
        return Err("a streaming RPC cannot be charged by units (its cost is not known when it answers)".into());
    }
    Ok((access, charge, metered))
}

impl Policies {
    /// The policies of every RPC of every service in `sets` (encoded
    /// `FileDescriptorSet`s, as `tonic::include_file_descriptor_set!`
    /// gives them), or every RPC whose declaration is missing or
    /// incomplete.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<Self, PolicyError> {
        use prost::Message as _;
        let mut policies = Policies::default();
        let mut wrong = Vec::new();
        let mut metered = Vec::new();
        for set in sets {
            let set = descriptor::FileSet::decode(*set)
                .map_err(|e| PolicyError(vec![format!("the descriptor set does not decode: {e}")]))?;
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        let path = format!(
                            "/{}.{}/{}",
                            file.package.as_deref().unwrap_or_default(),
                            service.name.as_deref().unwrap_or_default(),
                            method.name.as_deref().unwrap_or_default()
                        );
                        let streams = method.server_streaming.unwrap_or_default();
                        let policy = method.options.as_ref().and_then(|o| o.policy.as_ref());
                        match rule(policy, streams) {
                            Ok((access, charge, meters)) => {
                                if meters {
                                    metered.push((path.clone(), method.name.clone().unwrap_or_default()));
                                }
                                policies.rules.insert(path.into(), Rule { access, streams, charge, meter: None });
                            }
                            Err(why) => wrong.push(format!("{path}: {why}")),
                        }
                    }
                }
            }
        }
        if !wrong.is_empty() {
            wrong.sort();
            wrong.dedup();
            return Err(PolicyError(wrong));
        }
        metered.sort();
        metered.dedup();
        for (i, (path, name)) in metered.into_iter().enumerate() {
            if let Some(rule) = policies.rules.get_mut(path.as_str()) {
                rule.meter = Some(i as u16);
            }
            policies.metered.push(name.into());
        }
        Ok(policies)
    }

    /// The policies of the mesh's own services (the descriptor set of
    /// `proto/`), or why they are incomplete: every service calls this
    /// before it serves, and does not start on an error.
    pub fn mesh() -> Result<&'static Policies, &'static PolicyError> {
        static MESH: std::sync::OnceLock<Result<Policies, PolicyError>> = std::sync::OnceLock::new();
        MESH.get_or_init(|| Policies::from_descriptor_sets(&[tenantmesh_proto::FILE_DESCRIPTOR_SET])).as_ref()
    }

    /// The rule for a gRPC path; `None` for paths that declare none.
    pub fn rule(&self, path: &str) -> Option<Rule> {
        if let Some(rule) = self.rules.get(path) {
            return Some(*rule);
        }
        PUBLIC_PREFIXES.iter().any(|p| path.starts_with(p)).then_some(INFRASTRUCTURE)
    }

    /// Whether no RPC declares a policy.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The metered RPCs' method names, by [`Rule::meter`] index.
    pub fn metered(&self) -> &[Box<str>] {
        &self.metered
    }

    /// Every declared RPC's path and rule, in path order.
    pub fn rules(&self) -> Vec<(&str, Rule)> {
        let mut all: Vec<(&str, Rule)> = self.rules.iter().map(|(p, r)| (&**p, *r)).collect();
        all.sort_by_key(|(p, _)| *p);
        all
    }
}

/// Asserts that every RPC in `descriptor_set` declares a complete policy,
/// naming those that do not: for a service's unit tests.
///
/// ```
/// tenantmesh_tenant_context::access::assert_declared(tenantmesh_proto::FILE_DESCRIPTOR_SET);
/// ```
pub fn assert_declared(descriptor_set: &[u8]) {
    if let Err(e) = Policies::from_descriptor_sets(&[descriptor_set]) {
        panic!("{e}");
    }
}

impl Access {
    /// Whether a caller holding `roles` (and, for a service identity,
    /// granted `scopes`) may call an RPC with this rule. A service identity
    /// is judged by its scopes alone.
    pub fn allows(&self, roles: &[Role], scopes: &[Scope]) -> bool {
        match self {
            Access::Public => true,
            Access::Callers { roles: allowed, scopes: opened } => {
                if roles.contains(&Role::Service) {
                    opened.any(scopes)
                } else {
                    allowed.any(roles)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> &'static Policies {
        Policies::mesh().unwrap()
    }

    fn access_for(path: &str) -> Option<Access> {
        mesh().rule(path).map(|r| r.access)
    }

    fn streams(path: &str) -> bool {
        mesh().rule(path).is_some_and(|r| r.streams)
    }

    fn allows(path: &str, roles: &[Role], scopes: &[Scope]) -> bool {
        access_for(path).is_some_and(|a| a.allows(roles, scopes))
    }

    fn paths(prefix: &str) -> Vec<&'static str> {
        mesh().rules().into_iter().map(|(p, _)| p).filter(|p| p.starts_with(prefix)).collect()
    }

    /// Every RPC of the mesh's protos declares its policy.
    #[test]
    fn every_rpc_of_the_mesh_declares_its_policy() {
        assert_declared(tenantmesh_proto::FILE_DESCRIPTOR_SET);
        assert_eq!(
            paths("/tenantmesh.").len(),
            63,
            "the four services, DataAdmin, Metering, Backup, Audit and the lifecycle service of applications"
        );
    }

    /// A descriptor set with an RPC that declares nothing, and one whose
    /// charge is unspecified: the error names both.
    #[test]
    fn a_missing_or_incomplete_declaration_is_an_error_naming_the_rpc() {
        use descriptor::*;
        use prost::Message as _;
        let method = |name: &str, policy: Option<options::Policy>| Method {
            name: Some(name.into()),
            options: policy.map(|p| MethodOptions { policy: Some(p) }),
            server_streaming: None,
        };
        let complete = options::Policy {
            roles: vec![options::Role::TenantUser as i32],
            charge: options::Charge::OneToken as i32,
            meter: options::Meter::Usage as i32,
            ..Default::default()
        };
        let no_charge = options::Policy { charge: 0, ..complete.clone() };
        let set = FileSet {
            file: vec![File {
                package: Some("acme.orders.v1".into()),
                service: vec![Service {
                    name: Some("Orders".into()),
                    method: vec![
                        method("PlaceOrder", Some(complete.clone())),
                        method("CancelOrder", None),
                        method("ListOrders", Some(no_charge)),
                    ],
                }],
            }],
        }
        .encode_to_vec();
        let err = Policies::from_descriptor_sets(&[&set]).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.0[0].starts_with("/acme.orders.v1.Orders/CancelOrder: no policy option"), "{err}");
        assert!(err.0[1].starts_with("/acme.orders.v1.Orders/ListOrders: charge is unspecified"), "{err}");
        // Public with roles, and callable by nobody, are both wrong too.
        let public_with_roles = options::Policy { public: true, ..complete.clone() };
        assert!(rule(Some(&public_with_roles), false).unwrap_err().contains("public, yet"));
        let nobody = options::Policy { roles: vec![], ..complete.clone() };
        assert!(rule(Some(&nobody), false).unwrap_err().contains("neither public"));
        let unknown_role = options::Policy { roles: vec![9], ..complete };
        assert!(rule(Some(&unknown_role), false).is_err());
    }

    #[test]
    fn the_data_rpcs_are_metered_and_charged_by_units_and_nothing_else_is() {
        let metered: Vec<&str> = mesh().metered().iter().map(|m| &**m).collect();
        assert_eq!(metered, ["DeleteItem", "GetItem", "PutItem", "QueryItems"]);
        for (path, rule) in mesh().rules() {
            let data = path.starts_with("/tenantmesh.data.v1.Data/");
            assert_eq!(rule.meter.is_some(), data, "{path}");
            assert_eq!(rule.charge == Charge::Units, data, "{path}");
            if let Some(i) = rule.meter {
                assert!(path.ends_with(&*mesh().metered()[i as usize]), "{path}");
            }
        }
    }

    #[test]
    fn streaming_rpcs_are_known_from_the_protos() {
        assert!(streams("/tenantmesh.metering.v1.Metering/ExportUsage"));
        assert!(streams("/tenantmesh.data.v1.DataAdmin/ExportItems"));
        assert!(!streams("/tenantmesh.data.v1.Data/GetItem"));
        assert!(!streams("/nope/Nope"));
    }

    #[test]
    fn unknown_paths_fail_closed_and_infrastructure_is_public() {
        assert_eq!(access_for("/tenantmesh.data.v1.Data/Scan"), None);
        assert!(!allows("/tenantmesh.data.v1.Data/Scan", &Role::ALL, &Scope::ALL));
        assert_eq!(access_for("/grpc.health.v1.Health/Check"), Some(Access::Public));
        assert!(allows("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", &[], &[]));
    }

    #[test]
    fn only_lifecycle_services_move_items_in_bulk() {
        let admin = paths("/tenantmesh.data.v1.DataAdmin/");
        assert_eq!(admin.len(), 8);
        for path in admin {
            assert!(allows(path, &[Role::Service], &[Scope::Lifecycle]), "{path}");
            assert!(!allows(path, &[Role::PlatformAdmin, Role::TenantAdmin, Role::TenantUser], &[]), "{path}");
            for scope in [Scope::Directory, Scope::MeteringWriter, Scope::UsageReader] {
                assert!(!allows(path, &[Role::Service], &[scope]), "{scope:?} may not call {path}");
            }
        }
    }

    #[test]
    fn services_never_read_tenant_items() {
        for path in paths("/tenantmesh.data.v1.Data/") {
            assert!(!allows(path, &[Role::Service], &Scope::ALL), "{path}");
            assert!(allows(path, &[Role::TenantUser], &[]), "{path}");
        }
    }

    /// A service identity is judged by its scopes only: without one it may
    /// call nothing but the public RPCs, and a metering writer may record
    /// usage and nothing else.
    #[test]
    fn services_get_what_their_scopes_open_and_nothing_else() {
        for (path, rule) in mesh().rules() {
            if rule.access != Access::Public {
                assert!(!allows(path, &[Role::Service], &[]), "a service without scopes reached {path}");
            }
        }
        let writer: Vec<&str> = mesh()
            .rules()
            .into_iter()
            .filter(|(_, r)| r.access != Access::Public && r.access.allows(&[Role::Service], &[Scope::MeteringWriter]))
            .map(|(p, _)| p)
            .collect();
        assert_eq!(writer, ["/tenantmesh.metering.v1.Metering/RecordUsage"]);
        // Scopes never widen a user's rights.
        assert!(!allows("/tenantmesh.data.v1.DataAdmin/PurgeItems", &[Role::TenantAdmin], &Scope::ALL));
    }
}
