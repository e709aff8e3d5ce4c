//! AWS SDK configuration from an injected environment map (the standard
//! variables), so tests and the in-process mesh never touch the process
//! environment: `AWS_REGION`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
//! / `AWS_SESSION_TOKEN` (otherwise the standard provider chain),
//! `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_STS`. Every call has
//! timeouts (the SDK has none for an answer that never comes): connect
//! `TENANTMESH_AWS_CONNECT_TIMEOUT_MS` (2000), each attempt
//! `TENANTMESH_AWS_ATTEMPT_TIMEOUT_MS` (3000), the whole call with its
//! retries `TENANTMESH_AWS_TIMEOUT_MS` (8000); past them the call fails and
//! the caller sees UNAVAILABLE.

use std::collections::HashMap;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;

fn var<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// Shared SDK settings for the DynamoDB and STS clients.
#[derive(Clone, Debug)]
pub struct AwsSettings {
    pub sdk: SdkConfig,
    pub dynamodb_endpoint: Option<String>,
    pub sts_endpoint: Option<String>,
}

impl AwsSettings {
    /// Loads the SDK configuration (region default `us-east-1`).
    pub async fn from_env(env: &HashMap<String, String>) -> Self {
        let region =
            var(env, "AWS_REGION").or_else(|| var(env, "AWS_DEFAULT_REGION")).unwrap_or("us-east-1").to_owned();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region));
        if let (Some(id), Some(secret)) = (var(env, "AWS_ACCESS_KEY_ID"), var(env, "AWS_SECRET_ACCESS_KEY")) {
            let token = var(env, "AWS_SESSION_TOKEN").map(str::to_owned);
            loader = loader.credentials_provider(Credentials::new(id, secret, token, None, "tenantmesh-env"));
        }
        let ms = |name: &str, default: u64| {
            let value = var(env, name).map(|v| v.parse::<u64>());
            match value {
                Some(Ok(ms)) if ms > 0 => std::time::Duration::from_millis(ms),
                None => std::time::Duration::from_millis(default),
                Some(_) => {
                    tracing::warn!(
                        var = name,
                        default_ms = default,
                        "not a positive number of milliseconds; using the default"
                    );
                    std::time::Duration::from_millis(default)
                }
            }
        };
        loader = loader.timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(ms("TENANTMESH_AWS_CONNECT_TIMEOUT_MS", 2000))
                .operation_attempt_timeout(ms("TENANTMESH_AWS_ATTEMPT_TIMEOUT_MS", 3000))
                .operation_timeout(ms("TENANTMESH_AWS_TIMEOUT_MS", 8000))
                .build(),
        );
        let endpoint = |specific: &str| var(env, specific).or_else(|| var(env, "AWS_ENDPOINT_URL")).map(str::to_owned);
        Self {
            sdk: loader.load().await,
            dynamodb_endpoint: endpoint("AWS_ENDPOINT_URL_DYNAMODB"),
            sts_endpoint: endpoint("AWS_ENDPOINT_URL_STS"),
        }
    }

    pub fn region(&self) -> String {
        self.sdk.region().map(|r| r.to_string()).unwrap_or_else(|| "us-east-1".into())
    }

    /// A DynamoDB client builder on these settings (service credentials).
    pub fn dynamodb_config(&self) -> aws_sdk_dynamodb::config::Builder {
        let mut b = aws_sdk_dynamodb::config::Builder::from(&self.sdk);
        if let Some(url) = &self.dynamodb_endpoint {
            b = b.endpoint_url(url);
        }
        b
    }

    pub fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::from_conf(self.dynamodb_config().build())
    }

    pub fn sts(&self) -> aws_sdk_sts::Client {
        let mut b = aws_sdk_sts::config::Builder::from(&self.sdk);
        if let Some(url) = &self.sts_endpoint {
            b = b.endpoint_url(url);
        }
        aws_sdk_sts::Client::from_conf(b.build())
    }
}
