//! The data service's settings.

use std::collections::HashMap;
use std::sync::Arc;

use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_service::config::{CommonConfig, ConfigError, DATA_PORT};

/// Data service settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub storage: StorageConfig,
    /// `TENANTMESH_SILO_TENANT`: this instance is that silo tenant's
    /// dedicated data service and serves no other tenant.
    pub silo_tenant: Option<String>,
    /// `TENANTMESH_QUOTA_RESCAN_MS` (default 10000): how often, at most, a
    /// tenant at its storage quota has its stored bytes counted again.
    pub quota_rescan: std::time::Duration,
    /// `TENANTMESH_DATA_FAULTS=stall-writes:<ms>`, for tests only: a
    /// PutItem whose id starts with `stall-` waits this long between its
    /// checks and its write, as a write delayed in flight would.
    pub stall_writes: Option<std::time::Duration>,
    /// `TENANTMESH_METERING` (`on`, the default, or `off`: for a
    /// benchmark's control run, as `TENANTMESH_LIMITS`): whether usage is
    /// metered at all.
    pub metering: bool,
    /// `TENANTMESH_METERING_FLUSH_MS` (default 10000): how often usage is
    /// written to the usage table; a process killed with -9 loses at most
    /// the usage of one interval.
    pub metering_flush: std::time::Duration,
    /// `TENANTMESH_USAGE_GRACE_SECS` (default 3600): how old an
    /// application's usage event may be when it is recorded.
    pub usage_grace: std::time::Duration,
    /// `TENANTMESH_PRICING_FILE`: unit prices, dedicated resources' hourly
    /// costs and tier prices (default: the built-in example).
    pub pricing: Arc<tenantmesh_metering::pricing::Pricing>,
    /// `TENANTMESH_STORAGE_SAMPLE_SECS` (default 3600): how often every
    /// tenant's stored bytes are measured for `storage_byte_hours`.
    pub storage_sample: std::time::Duration,
    /// `TENANTMESH_ONBOARDING_URL` (default `http://127.0.0.1:50053`): the
    /// onboarding service, whose resource ledger says which dedicated
    /// resources a tenant held when (for its cost).
    pub onboarding_url: String,
    /// `TENANTMESH_STREAM_STALL_MS` (default 30000): how long an export
    /// stream (ExportUsage, ExportItems) waits for its client to read
    /// before it ends with DEADLINE_EXCEEDED.
    pub stream_stall: std::time::Duration,
    /// `TENANTMESH_USAGE_RETENTION_DAYS` (default 400): usage older than
    /// this is deleted (by the hourly stored-bytes sampler).
    pub usage_retention_days: u32,
    /// `TENANTMESH_USAGE_CHECK_MS` (default 30000): how often this month's
    /// usage is read for the tenants with hard monthly limits or usage
    /// alerts (see [`crate::monthly`]).
    pub usage_check: std::time::Duration,
    /// `TENANTMESH_ALERT_WEBHOOK_URL` with `TENANTMESH_ALERT_WEBHOOK_SECRET`
    /// (or `_SECRET_FILE`, at least 16 bytes): where usage alerts are
    /// posted, signed (none: only the lifecycle event).
    pub alert_webhook: Option<tenantmesh_tenant_context::webhook::Webhook>,
}

/// The usage alerts' webhook, if one is set.
fn alert_webhook(
    env: &HashMap<String, String>,
) -> Result<Option<tenantmesh_tenant_context::webhook::Webhook>, ConfigError> {
    use tenantmesh_service::config::var;
    const URL: &str = "TENANTMESH_ALERT_WEBHOOK_URL";
    let Some(url) = var(env, URL) else { return Ok(None) };
    let secret = match (var(env, "TENANTMESH_ALERT_WEBHOOK_SECRET"), var(env, "TENANTMESH_ALERT_WEBHOOK_SECRET_FILE")) {
        (Some(s), None) => s.as_bytes().to_vec(),
        (None, Some(path)) => std::fs::read(path).map(|b| b.trim_ascii().to_vec()).map_err(|e| ConfigError {
            var: "TENANTMESH_ALERT_WEBHOOK_SECRET_FILE",
            message: format!("{path}: {e}"),
        })?,
        (Some(_), Some(_)) => {
            return Err(ConfigError {
                var: "TENANTMESH_ALERT_WEBHOOK_SECRET",
                message: "set it or TENANTMESH_ALERT_WEBHOOK_SECRET_FILE, not both".into(),
            });
        }
        (None, None) => {
            return Err(ConfigError {
                var: "TENANTMESH_ALERT_WEBHOOK_SECRET",
                message: format!(
                    "is required with {URL} (or TENANTMESH_ALERT_WEBHOOK_SECRET_FILE): the webhooks' signing key"
                ),
            });
        }
    };
    tenantmesh_tenant_context::webhook::Webhook::new(url, &secret).map(Some).map_err(|message| {
        let var = if message.contains("secret") { "TENANTMESH_ALERT_WEBHOOK_SECRET" } else { URL };
        ConfigError { var, message }
    })
}

fn parse_data_faults(spec: &str) -> Result<Option<std::time::Duration>, ConfigError> {
    let bad = || ConfigError { var: "TENANTMESH_DATA_FAULTS", message: format!("{spec:?} is not stall-writes:<ms>") };
    match spec.trim() {
        "" => Ok(None),
        s => {
            let ms = s.strip_prefix("stall-writes:").ok_or_else(bad)?.parse().map_err(|_| bad())?;
            Ok(Some(std::time::Duration::from_millis(ms)))
        }
    }
}

impl Config {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let silo_tenant = tenantmesh_service::config::var(env, "TENANTMESH_SILO_TENANT").map(str::to_owned);
        if let Some(t) = &silo_tenant
            && let Err(e) = tenantmesh_service::validate_tenant_id(t)
        {
            return Err(ConfigError { var: "TENANTMESH_SILO_TENANT", message: e.into() });
        }
        Ok(Self {
            common: CommonConfig::from_env(env, DATA_PORT)?,
            storage: StorageConfig::from_env(env)?,
            silo_tenant,
            quota_rescan: std::time::Duration::from_millis(tenantmesh_service::config::parse_var(
                env,
                "TENANTMESH_QUOTA_RESCAN_MS",
                10_000,
            )?),
            stall_writes: parse_data_faults(
                tenantmesh_service::config::var(env, "TENANTMESH_DATA_FAULTS").unwrap_or_default(),
            )?,
            metering: match tenantmesh_service::config::var(env, "TENANTMESH_METERING") {
                None | Some("on") => true,
                Some("off") => false,
                Some(other) => {
                    return Err(ConfigError {
                        var: "TENANTMESH_METERING",
                        message: format!("{other:?}: use on or off"),
                    });
                }
            },
            metering_flush: tenantmesh_service::config::metering_flush(env)?,
            usage_grace: std::time::Duration::from_secs(tenantmesh_service::config::parse_var(
                env,
                "TENANTMESH_USAGE_GRACE_SECS",
                3600,
            )?),
            onboarding_url: tenantmesh_service::config::url_var(
                env,
                "TENANTMESH_ONBOARDING_URL",
                tenantmesh_service::config::ONBOARDING_PORT,
            )?,
            storage_sample: tenantmesh_service::config::storage_sample(env)?,
            stream_stall: std::time::Duration::from_millis(
                tenantmesh_service::config::parse_var(env, "TENANTMESH_STREAM_STALL_MS", 30_000u64)?.max(1),
            ),
            usage_retention_days: match tenantmesh_service::config::parse_var(
                env,
                "TENANTMESH_USAGE_RETENTION_DAYS",
                400u32,
            )? {
                0 => {
                    return Err(ConfigError {
                        var: "TENANTMESH_USAGE_RETENTION_DAYS",
                        message: "must be at least 1".into(),
                    });
                }
                n => n,
            },
            usage_check: std::time::Duration::from_millis(
                tenantmesh_service::config::parse_var(env, "TENANTMESH_USAGE_CHECK_MS", 30_000u64)?.max(10),
            ),
            alert_webhook: alert_webhook(env)?,
            pricing: Arc::new(match tenantmesh_service::config::var(env, "TENANTMESH_PRICING_FILE") {
                Some(path) => tenantmesh_metering::pricing::Pricing::load(std::path::Path::new(path))
                    .map_err(|e| ConfigError { var: "TENANTMESH_PRICING_FILE", message: e.to_string() })?,
                None => tenantmesh_metering::pricing::Pricing::default(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metering_settings_name_their_variable() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let c = Config::from_env(&env(&[])).unwrap();
        assert!(c.metering);
        assert_eq!(c.metering_flush, std::time::Duration::from_secs(10));
        assert!(!Config::from_env(&env(&[("TENANTMESH_METERING", "off")])).unwrap().metering);
        for (var, value) in [
            ("TENANTMESH_METERING", "maybe"),
            ("TENANTMESH_METERING_FLUSH_MS", "soon"),
            ("TENANTMESH_PRICING_FILE", "/no/such/pricing.toml"),
            ("TENANTMESH_ONBOARDING_URL", "ftp://x"),
            ("TENANTMESH_USAGE_CHECK_MS", "often"),
            ("TENANTMESH_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/hook"),
        ] {
            let e = Config::from_env(&env(&[(var, value)])).unwrap_err();
            let want = if var == "TENANTMESH_ALERT_WEBHOOK_URL" { "TENANTMESH_ALERT_WEBHOOK_SECRET" } else { var };
            assert_eq!(e.var, want, "{e:?}");
        }
        let hook = |url: &str, secret: &str| {
            Config::from_env(&env(&[
                ("TENANTMESH_ALERT_WEBHOOK_URL", url),
                ("TENANTMESH_ALERT_WEBHOOK_SECRET", secret),
            ]))
        };
        assert_eq!(hook("http://127.0.0.1:9/hook", "short").unwrap_err().var, "TENANTMESH_ALERT_WEBHOOK_SECRET");
        assert_eq!(hook("gopher://x", "0123456789abcdef").unwrap_err().var, "TENANTMESH_ALERT_WEBHOOK_URL");
        assert!(hook("http://127.0.0.1:9/hook", "0123456789abcdef").unwrap().alert_webhook.is_some());
    }
}
