//! Calls to other services of the mesh, made on behalf of the caller.

use tenantmesh_tenant_context::client::{self, Identity};

pub use tenantmesh_tenant_context::client::PropagatedChannel;

/// A channel to the service at `url` (e.g. `http://127.0.0.1:50054`),
/// connecting on first use, whose every call carries the current caller's
/// token, tenant, trace context and remaining deadline. A call made outside
/// a request (no caller) is refused before it leaves: a service never
/// calls another on nobody's behalf by accident.
///
/// ```
/// # fn f() -> Result<(), tonic::transport::Error> {
/// let data = tenantmesh_app::client::connect("http://127.0.0.1:50054")?;
/// // tenantmesh_app::sized!(DataClient::new(data)) in a handler
/// # Ok(()) }
/// ```
pub fn connect(url: &str) -> Result<PropagatedChannel, tonic::transport::Error> {
    Ok(client::wrap(client::channel(url)?, Identity::Caller))
}
