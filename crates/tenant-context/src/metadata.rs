//! Metadata keys used on the wire.

pub const AUTHORIZATION: &str = "authorization";
pub const TENANT_ID: &str = "x-tenant-id";
pub const TRACEPARENT: &str = "traceparent";
pub const GRPC_TIMEOUT: &str = "grpc-timeout";
/// Marks a call the server layer makes for itself (a tenant lookup):
/// left out of the caller's tenant's request count.
pub const LOOKUP: &str = "x-tenantmesh-lookup";
