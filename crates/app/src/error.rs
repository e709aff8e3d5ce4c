//! Why a service could not start or stopped.

/// Why a service could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The service's name or a table's name is not usable.
    #[error("{0}")]
    Name(String),
    /// A setting in the environment is invalid.
    #[error(transparent)]
    Config(#[from] tenantmesh_service::config::ConfigError),
    /// The service's protos do not declare a policy for every RPC (each is
    /// named), or the descriptor set does not decode.
    #[error(transparent)]
    Policies(#[from] tenantmesh_tenant_context::access::PolicyError),
    /// A store could not be opened.
    #[error("storage: {0}")]
    Storage(String),
    /// A URL of another service is not usable.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] tenantmesh_service::runtime::ServeError),
}
