//! Generated gRPC code for the tenantmesh contracts in `proto/`, plus the
//! encoded descriptor set that the services serve through gRPC reflection.
#![allow(clippy::all, missing_docs)]

/// The method options every RPC declares its policy with (who may call it,
/// how admission charges it, what it meters): see
/// `proto/tenantmesh/options/v1/options.proto`.
pub mod options {
    pub mod v1 {
        tonic::include_proto!("tenantmesh.options.v1");
    }
}

pub mod auth {
    pub mod v1 {
        tonic::include_proto!("tenantmesh.auth.v1");
    }
}

pub mod registry {
    pub mod v1 {
        tonic::include_proto!("tenantmesh.registry.v1");
    }
}

pub mod onboarding {
    pub mod v1 {
        tonic::include_proto!("tenantmesh.onboarding.v1");
    }
}

pub mod data {
    pub mod v1 {
        tonic::include_proto!("tenantmesh.data.v1");
    }
}

pub mod metering {
    pub mod v1 {
        tonic::include_proto!("tenantmesh.metering.v1");
    }
}

/// What every application service serves for the lifecycle workflows.
pub mod lifecycle {
    pub mod v1 {
        tonic::include_proto!("tenantmesh.lifecycle.v1");
    }
}

pub mod audit {
    pub mod v1 {
        tonic::include_proto!("tenantmesh.audit.v1");
    }
}

pub mod backup {
    pub mod v1 {
        tonic::include_proto!("tenantmesh.backup.v1");
    }
}

pub mod names;

/// Encoded `FileDescriptorSet` of every tenantmesh contract, for
/// `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tenantmesh_descriptor");
