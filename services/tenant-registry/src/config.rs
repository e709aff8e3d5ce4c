//! The registry's settings.

use std::collections::HashMap;

use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_service::config::{CommonConfig, ConfigError, REGISTRY_PORT};

/// Registry settings (see [`CommonConfig`]).
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub storage: StorageConfig,
}

impl tenantmesh_isolation::backend::ServiceConfig for Config {
    const STORE: &'static str = "registry";
    fn common(&self) -> &CommonConfig {
        &self.common
    }
    fn storage(&self) -> &StorageConfig {
        &self.storage
    }
}

impl Config {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Ok(Self { common: CommonConfig::from_env(env, REGISTRY_PORT)?, storage: StorageConfig::from_env(env)? })
    }
}
