//! Which store the services run on, from the environment:
//! `TENANTMESH_STORAGE` (`embedded`, the default, or `dynamodb`),
//! `TENANTMESH_TABLE_PREFIX` (default `tenantmesh-`),
//! `TENANTMESH_CREATE_TABLES` (default `true`: create absent tables),
//! `TENANTMESH_TENANT_ROLE_ARN` (the role tenant credentials are vended
//! from; default `arn:aws:iam::<account>:role/tenantmesh-tenant-access`),
//! and the standard AWS variables (see [`crate::aws`]).

use std::collections::HashMap;
use std::sync::Arc;

use tenantmesh_service::config::{CommonConfig, ConfigError, parse_var, var};
use tenantmesh_storage::{DynTable, DynamoTable, EmbeddedTable};

use crate::aws::AwsSettings;
use crate::policy::Placement;
use crate::stores::{DynamoStores, EmbeddedStores, TenantStores};
use crate::vend::CredentialVendor;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    DynamoDb,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "embedded" => Ok(Backend::Embedded),
            "dynamodb" => Ok(Backend::DynamoDb),
            other => Err(format!("{other:?} is not a storage backend (embedded, dynamodb)")),
        }
    }
}

/// Storage settings of a service.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub backend: Backend,
    pub table_prefix: String,
    pub create_tables: bool,
    pub tenant_role_arn: Option<String>,
    /// The AWS variables, read when the backend is DynamoDB.
    env: HashMap<String, String>,
}

impl StorageConfig {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let table_prefix = var(env, "TENANTMESH_TABLE_PREFIX").unwrap_or("tenantmesh-").to_owned();
        if !table_prefix.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
            || table_prefix.len() > 200
        {
            return Err(ConfigError {
                var: "TENANTMESH_TABLE_PREFIX",
                message: "may contain only letters, digits, _ - .".into(),
            });
        }
        Ok(Self {
            backend: parse_var(env, "TENANTMESH_STORAGE", Backend::Embedded)?,
            table_prefix,
            create_tables: parse_var(env, "TENANTMESH_CREATE_TABLES", true)?,
            tenant_role_arn: var(env, "TENANTMESH_TENANT_ROLE_ARN").map(str::to_owned),
            env: env
                .iter()
                .filter(|(k, _)| k.starts_with("AWS_") || k.starts_with("TENANTMESH_AWS_"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    pub async fn aws(&self) -> AwsSettings {
        AwsSettings::from_env(&self.env).await
    }

    /// The DynamoDB table name of `name`.
    pub fn table_name(&self, name: &str) -> String {
        format!("{}{name}", self.table_prefix)
    }

    /// A service's own table: `<data dir>/<name>.redb`, or the DynamoDB
    /// table `<prefix><name>` (created if absent and allowed).
    pub async fn open_table(&self, common: &CommonConfig, name: &str) -> Result<DynTable, BoxError> {
        match self.backend {
            Backend::Embedded => Ok(EmbeddedTable::open_shared(common.store_path(name)?)?),
            Backend::DynamoDb => {
                let client = self.aws().await.dynamodb();
                let table = self.table_name(name);
                if self.create_tables {
                    DynamoTable::ensure_table(&client, &table).await?;
                }
                Ok(Arc::new(DynamoTable::new(client, table)))
            }
        }
    }

    /// The data service's per-tenant stores over its pooled table `name`.
    pub async fn tenant_stores(&self, common: &CommonConfig, name: &str) -> Result<Arc<dyn TenantStores>, BoxError> {
        match self.backend {
            Backend::Embedded => Ok(Arc::new(EmbeddedStores::new(
                // Process-shared: a silo instance in the same process opens it too.
                EmbeddedTable::open_process_shared(common.store_path(name)?)?,
                &self.table_name(name),
                common.data_dir.join("tables"),
                common.tenant_cache_capacity,
            ))),
            Backend::DynamoDb => {
                let aws = self.aws().await;
                let table = self.table_name(name);
                if self.create_tables {
                    DynamoTable::ensure_table(&aws.dynamodb(), &table).await?;
                }
                // One STS call at start-up, to put the right account in policies.
                let identity =
                    aws.sts().get_caller_identity().send().await.map_err(|e| {
                        format!("sts get-caller-identity: {}", aws_sdk_sts::error::DisplayErrorContext(&e))
                    })?;
                let account = identity.account().ok_or("sts returned no account")?.to_owned();
                let role = self
                    .tenant_role_arn
                    .clone()
                    .unwrap_or_else(|| format!("arn:aws:iam::{account}:role/tenantmesh-tenant-access"));
                let placement = Placement::new(&aws.region(), &account, &table);
                let capacity = common.tenant_cache_capacity;
                let vendor = Arc::new(CredentialVendor::new(aws.sts(), role, capacity));
                Ok(Arc::new(DynamoStores::new(aws, vendor, placement, capacity)))
            }
        }
    }
}

/// A service's settings, which name its own table.
pub trait ServiceConfig {
    /// The table: `<data dir>/<STORE>.redb`, or `<prefix><STORE>` on DynamoDB.
    const STORE: &'static str;
    fn common(&self) -> &CommonConfig;
    fn storage(&self) -> &StorageConfig;
}

/// Opens a service's own table on its configured backend.
pub async fn open_store<C: ServiceConfig>(config: &C) -> Result<DynTable, BoxError> {
    config.storage().open_table(config.common(), C::STORE).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_errors_name_the_variable() {
        let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let c = StorageConfig::from_env(&env(&[])).unwrap();
        assert_eq!(
            (c.backend, c.table_name("data").as_str(), c.create_tables),
            (Backend::Embedded, "tenantmesh-data", true)
        );
        let c =
            StorageConfig::from_env(&env(&[("TENANTMESH_STORAGE", "dynamodb"), ("TENANTMESH_TABLE_PREFIX", "t1-")]))
                .unwrap();
        assert_eq!((c.backend, c.table_name("auth").as_str()), (Backend::DynamoDb, "t1-auth"));
        assert_eq!(
            StorageConfig::from_env(&env(&[("TENANTMESH_STORAGE", "s3")])).unwrap_err().var,
            "TENANTMESH_STORAGE"
        );
        assert_eq!(
            StorageConfig::from_env(&env(&[("TENANTMESH_TABLE_PREFIX", "a*")])).unwrap_err().var,
            "TENANTMESH_TABLE_PREFIX"
        );
        assert_eq!(
            StorageConfig::from_env(&env(&[("TENANTMESH_CREATE_TABLES", "maybe")])).unwrap_err().var,
            "TENANTMESH_CREATE_TABLES"
        );
    }
}
