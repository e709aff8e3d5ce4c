//! The auth service: users of every tenant with argon2id password hashes,
//! persisted Ed25519 signing keys published as a JWKS, login, service
//! tokens for platform services, and the bootstrap platform admin.

pub mod anonymous;
mod error;
pub mod expiry;
pub mod keys;
pub mod lockout;
use tenantmesh_credentials::{
    HashParams, HashPool, PoolSettings, check_email, check_password, normalize_email, password,
};
mod refresh;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_proto::auth::v1::auth_server::{Auth, AuthServer};
use tenantmesh_proto::auth::v1::*;
use tenantmesh_service::config::{AUTH_PORT, CommonConfig, ConfigError, parse_var, var};
use tenantmesh_service::errors::Violations;
use tenantmesh_service::paging;
use tenantmesh_storage::{Condition, DynTable};
use tenantmesh_tenant_context::directory::{RemoteDirectory, TenantDirectory};
use tenantmesh_tenant_context::server::{self, Authenticator};
use tenantmesh_tenant_context::verify::TokenVerifier;
use tenantmesh_tenant_context::{Claims, PLATFORM_TENANT, Role, TenantContext};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

pub use error::AuthError;
pub use keys::SigningKeys;

/// Default bootstrap admin email.
pub const DEFAULT_BOOTSTRAP_EMAIL: &str = "admin@platform.local";
/// File (in the data dir) holding a generated bootstrap password.
pub const BOOTSTRAP_PASSWORD_FILE: &str = "bootstrap-password";
const MIN_SECRET_LEN: usize = 16;
/// Longest client secret accepted by `IssueServiceToken`.
const MAX_CLIENT_SECRET_LEN: usize = 1024;

/// Auth settings.
#[derive(Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub storage: StorageConfig,
    /// `TENANTMESH_BOOTSTRAP_EMAIL`.
    pub bootstrap_email: String,
    /// `TENANTMESH_BOOTSTRAP_PASSWORD`; generated when unset.
    pub bootstrap_password: Option<String>,
    /// `TENANTMESH_SERVICE_CLIENTS`: `id:secret[:scope+scope[@tenant+tenant]],...`.
    pub service_clients: HashMap<String, ServiceClient>,
    /// `TENANTMESH_ACCESS_TOKEN_TTL_SECS` (default 900).
    pub access_token_ttl: Duration,
    /// `TENANTMESH_ARGON2_M_KIB`, `_T`, `_P`.
    pub hash_params: HashParams,
    /// `TENANTMESH_HASH_THREADS`, `TENANTMESH_HASH_QUEUE`: the password
    /// hashing pool.
    pub hash_pool: PoolSettings,
    /// Rates of the calls made without a token.
    pub anonymous: anonymous::AnonymousLimits,
    /// `TENANTMESH_LOGIN_FREE_ATTEMPTS`, `TENANTMESH_LOGIN_ACCOUNT_FREE_ATTEMPTS`,
    /// `TENANTMESH_LOGIN_MAX_LOCKOUT_SECS`.
    pub lockout: lockout::LockoutPolicy,
    /// `TENANTMESH_KEY_PUBLISH_DELAY_SECS` (default 10): how long a rotated
    /// key is published before it signs; more than validators' JWKS refresh
    /// interval.
    pub key_publish_delay: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("common", &self.common)
            .field("bootstrap_email", &self.bootstrap_email)
            .field("service_clients", &self.service_clients.keys().collect::<Vec<_>>())
            .field("access_token_ttl", &self.access_token_ttl)
            .field("hash_params", &self.hash_params)
            .finish_non_exhaustive()
    }
}

/// A service identity that may call `IssueServiceToken`: its secret, and
/// what its tokens grant.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceClient {
    pub secret: String,
    pub grant: tenantmesh_tenant_context::Grant,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient").field("grant", &self.grant).finish_non_exhaustive()
    }
}

/// Longest service client id.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// Whether `id` is a well-formed service client id: 1-64 of a-z, 0-9 and `_.-`.
pub fn valid_client_id(id: &str) -> bool {
    (1..=MAX_CLIENT_ID_LEN).contains(&id.len())
        && id.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c))
}

/// One entry of `TENANTMESH_SERVICE_CLIENTS`: `id:secret`, optionally
/// `:scope+scope`, optionally `@tenant+tenant` after the scopes.
fn parse_service_client(env: &HashMap<String, String>, entry: &str) -> Result<(String, ServiceClient), ConfigError> {
    let bad = |message: String| ConfigError { var: "TENANTMESH_SERVICE_CLIENTS", message };
    let mut parts = entry.splitn(3, ':');
    let (Some(id), Some(secret)) = (parts.next(), parts.next()) else {
        return Err(bad("entries must be id:secret[:scope+scope[@tenant+tenant]]".into()));
    };
    if !valid_client_id(id) {
        return Err(bad(format!("client id {id:?} must be 1-{MAX_CLIENT_ID_LEN} of a-z, 0-9 and _.-")));
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(bad(format!("client {id:?} needs a secret of at least {MIN_SECRET_LEN} characters")));
    }
    tenantmesh_service::config::refuse_placeholder(env, "TENANTMESH_SERVICE_CLIENTS", secret)?;
    let mut grant = tenantmesh_tenant_context::Grant::default();
    if let Some(spec) = parts.next() {
        let (scopes, tenants) = match spec.split_once('@') {
            Some((scopes, tenants)) => (scopes, Some(tenants)),
            None => (spec, None),
        };
        for name in scopes.split('+').filter(|n| !n.is_empty()) {
            let scope = tenantmesh_tenant_context::Scope::parse(name).ok_or_else(|| {
                let known: Vec<&str> = tenantmesh_tenant_context::Scope::ALL.iter().map(|s| s.as_str()).collect();
                bad(format!("client {id:?}: unknown scope {name:?} (known: {})", known.join(", ")))
            })?;
            if !grant.scopes.contains(&scope) {
                grant.scopes.push(scope);
            }
        }
        if let Some(tenants) = tenants {
            let list: Vec<String> = tenants.split('+').filter(|t| !t.is_empty()).map(str::to_owned).collect();
            if list.is_empty() {
                return Err(bad(format!("client {id:?}: name at least one tenant after '@'")));
            }
            if let Some(t) = list.iter().find(|t| tenantmesh_service::validate_tenant_id(t).is_err()) {
                return Err(bad(format!("client {id:?}: {t:?} is not a tenant id")));
            }
            grant.tenants = Some(list);
        }
    }
    Ok((id.to_owned(), ServiceClient { secret: secret.to_owned(), grant }))
}

impl tenantmesh_isolation::backend::ServiceConfig for Config {
    const STORE: &'static str = "auth";
    fn common(&self) -> &CommonConfig {
        &self.common
    }
    fn storage(&self) -> &StorageConfig {
        &self.storage
    }
}

impl Config {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut service_clients = HashMap::new();
        if let Some(list) = var(env, "TENANTMESH_SERVICE_CLIENTS") {
            for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let (id, client) = parse_service_client(env, entry)?;
                if service_clients.insert(id.clone(), client).is_some() {
                    return Err(ConfigError {
                        var: "TENANTMESH_SERVICE_CLIENTS",
                        message: format!("client {id:?} is declared twice"),
                    });
                }
            }
        }
        let ttl: u64 = parse_var(env, "TENANTMESH_ACCESS_TOKEN_TTL_SECS", 900)?;
        if !(60..=86_400).contains(&ttl) {
            return Err(ConfigError { var: "TENANTMESH_ACCESS_TOKEN_TTL_SECS", message: "must be 60..=86400".into() });
        }
        let hash_params = HashParams::from_env(env)?;
        let bootstrap_password = var(env, "TENANTMESH_BOOTSTRAP_PASSWORD").map(str::to_owned);
        if let Some(p) = &bootstrap_password {
            tenantmesh_service::config::refuse_placeholder(env, "TENANTMESH_BOOTSTRAP_PASSWORD", p)?;
        }
        if let Some(p) = &bootstrap_password
            && p.chars().count() < password::MIN_PASSWORD_LEN
        {
            return Err(ConfigError {
                var: "TENANTMESH_BOOTSTRAP_PASSWORD",
                message: format!("must be at least {} characters", password::MIN_PASSWORD_LEN),
            });
        }
        Ok(Self {
            common: CommonConfig::from_env(env, AUTH_PORT)?,
            storage: StorageConfig::from_env(env)?,
            bootstrap_email: normalize_email(var(env, "TENANTMESH_BOOTSTRAP_EMAIL").unwrap_or(DEFAULT_BOOTSTRAP_EMAIL)),
            bootstrap_password,
            service_clients,
            access_token_ttl: Duration::from_secs(ttl),
            hash_params,
            hash_pool: PoolSettings::from_env(env)?,
            anonymous: anonymous::AnonymousLimits::from_env(env)?,
            key_publish_delay: Duration::from_secs(parse_var(env, "TENANTMESH_KEY_PUBLISH_DELAY_SECS", 10)?),
            lockout: lockout::LockoutPolicy {
                free_attempts: parse_var(env, "TENANTMESH_LOGIN_FREE_ATTEMPTS", 5)?,
                account_free_attempts: parse_var(env, "TENANTMESH_LOGIN_ACCOUNT_FREE_ATTEMPTS", 100)?,
                max_lockout: Duration::from_secs(parse_var(env, "TENANTMESH_LOGIN_MAX_LOCKOUT_SECS", 900)?),
            },
        })
    }
}

/// GetJwks calls served by this process (validators refreshing keys).
static JWKS_REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// GetJwks calls served by this process so far.
pub fn jwks_requests() -> u64 {
    JWKS_REQUESTS.load(std::sync::atomic::Ordering::Relaxed)
}

pub(crate) use tenantmesh_service::clock::now_secs;

/// `bytes` random bytes, base64url.
pub(crate) fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).expect("system randomness");
    URL_SAFE_NO_PAD.encode(buf)
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Serialize, Deserialize, Clone)]
struct UserRecord {
    user_id: String,
    tenant_id: String,
    email: String,
    password_hash: String,
    roles: Vec<Role>,
    disabled: bool,
    create_time: i64,
}

fn user_sk(email: &str) -> String {
    format!("user#{email}")
}

impl UserRecord {
    fn to_proto(&self) -> User {
        User {
            user_id: self.user_id.clone(),
            tenant_id: self.tenant_id.clone(),
            email: self.email.clone(),
            roles: self.roles.iter().map(|r| role_to_proto(*r) as i32).collect(),
            create_time: self.create_time,
            disabled: self.disabled,
        }
    }
}

fn role_to_proto(r: Role) -> tenantmesh_proto::auth::v1::Role {
    use tenantmesh_proto::auth::v1::Role as P;
    match r {
        Role::PlatformAdmin => P::PlatformAdmin,
        Role::TenantAdmin => P::TenantAdmin,
        Role::TenantUser => P::TenantUser,
        Role::Service => P::Service,
    }
}

/// The auth service's state.
#[derive(Clone)]
pub struct AuthService {
    inner: Arc<Inner>,
}

struct Inner {
    store: DynTable,
    keys: Arc<SigningKeys>,
    config: Config,
    directory: Arc<dyn TenantDirectory>,
    /// A real hash to verify against when the user does not exist, so an
    /// unknown user costs the same time as a wrong password.
    dummy_hash: String,
    /// Password hashing, bounded: never on the stores' blocking pool.
    hashing: HashPool,
    anonymous: anonymous::Anonymous,
}

impl AuthService {
    pub async fn new(config: Config, store: DynTable, directory: Arc<dyn TenantDirectory>) -> Result<Self, AuthError> {
        let keys = Arc::new(SigningKeys::load_or_create(&store).await?);
        let hashing = HashPool::new(config.hash_pool);
        let dummy_hash = hashing.hash(random_token(16), config.hash_params).await?;
        let anonymous = anonymous::Anonymous::new(config.anonymous);
        Ok(Self { inner: Arc::new(Inner { store, keys, config, directory, dummy_hash, hashing, anonymous }) })
    }

    pub fn keys(&self) -> Arc<SigningKeys> {
        self.inner.keys.clone()
    }

    fn sign(&self, sub: String, tenant_id: String, roles: Vec<Role>) -> Result<(String, i64), AuthError> {
        self.sign_granted(sub, tenant_id, roles, tenantmesh_tenant_context::Grant::default())
    }

    /// A token; a service identity's carries its grant.
    fn sign_granted(
        &self,
        sub: String,
        tenant_id: String,
        roles: Vec<Role>,
        grant: tenantmesh_tenant_context::Grant,
    ) -> Result<(String, i64), AuthError> {
        let ttl = self.inner.config.access_token_ttl.as_secs();
        let now = now_secs().max(0) as u64;
        let claims = Claims {
            iss: self.inner.config.common.issuer.clone(),
            aud: self.inner.config.common.audience.clone(),
            sub,
            tenant_id,
            roles,
            exp: now + ttl,
            nbf: now,
            iat: now,
            jti: random_token(12),
            scopes: grant.scopes,
            tenants: grant.tenants,
        };
        let (kid, key) = self.inner.keys.signer();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(kid);
        let token = jsonwebtoken::encode(&header, &claims, &key).map_err(|e| AuthError::Internal(e.to_string()))?;
        Ok((token, ttl as i64))
    }

    async fn hash_password(&self, password: String) -> Result<String, AuthError> {
        Ok(self.inner.hashing.hash(password, self.inner.config.hash_params).await?)
    }

    async fn get_user(&self, tenant_id: &str, email: &str) -> Result<Option<UserRecord>, AuthError> {
        match self.inner.store.get(tenant_id, &user_sk(email)).await? {
            Some(item) => Ok(Some(serde_json::from_slice(&item.data).map_err(|e| AuthError::Corrupt(e.to_string()))?)),
            None => Ok(None),
        }
    }

    async fn insert_user(&self, user: &UserRecord) -> Result<(), AuthError> {
        let data = serde_json::to_vec(user).map_err(|e| AuthError::Internal(e.to_string()))?;
        match self.inner.store.put(&user.tenant_id, &user_sk(&user.email), data, Condition::NotExists).await {
            Ok(_) => Ok(()),
            Err(tenantmesh_storage::StorageError::ConditionFailed { .. }) => {
                Err(AuthError::UserExists(user.email.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the platform admin on first start. Returns the password when
    /// it was generated (it is also written, mode 0600, to the data dir).
    pub async fn bootstrap_admin(&self) -> Result<Option<String>, AuthError> {
        let email = self.inner.config.bootstrap_email.clone();
        if self.get_user(PLATFORM_TENANT, &email).await?.is_some() {
            return Ok(None);
        }
        let (password, generated) = match &self.inner.config.bootstrap_password {
            Some(p) => (p.clone(), false),
            None => (random_token(18), true),
        };
        if generated {
            write_private_file(&self.bootstrap_password_path(), &password)
                .map_err(|e| AuthError::Internal(format!("cannot write bootstrap password: {e}")))?;
        }
        let user = UserRecord {
            user_id: uuid::Uuid::new_v4().to_string(),
            tenant_id: PLATFORM_TENANT.into(),
            email: email.clone(),
            password_hash: self.hash_password(password.clone()).await?,
            roles: vec![Role::PlatformAdmin],
            disabled: false,
            create_time: now_secs(),
        };
        match self.insert_user(&user).await {
            Ok(()) => {
                tracing::info!(email = %email, generated_password = generated, "bootstrap: created the platform admin");
                Ok(generated.then_some(password))
            }
            // Another replica won the race; its password stands.
            Err(AuthError::UserExists(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Validates a (tenant, email) naming a user the caller may manage, and
    /// that is not the caller itself.
    async fn managed_user(
        &self,
        ctx: &TenantContext,
        tenant_id: &str,
        email: &str,
    ) -> Result<(String, u64, UserRecord), Status> {
        let mut v = Violations::new();
        v.tenant_id("tenant_id", tenant_id);
        let email = normalize_email(email);
        check_email(&mut v, "email", &email);
        v.check()?;
        ctx.authorize_tenant(tenant_id)?;
        let item = self
            .inner
            .store
            .get(tenant_id, &user_sk(&email))
            .await
            .map_err(AuthError::from)?
            .ok_or_else(|| AuthError::UserNotFound(email.clone()))?;
        let user: UserRecord = serde_json::from_slice(&item.data).map_err(|e| AuthError::Corrupt(e.to_string()))?;
        if *user.user_id == *ctx.subject {
            return Err(AuthError::OwnAccount.into());
        }
        Ok((email, item.version, user))
    }

    /// Where a generated bootstrap password is written.
    pub fn bootstrap_password_path(&self) -> PathBuf {
        self.inner.config.common.data_dir.join(BOOTSTRAP_PASSWORD_FILE)
    }
}

fn write_private_file(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    tenantmesh_storage::files::write_private(path, format!("{contents}\n").as_bytes())
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    // Compare digests so neither length nor content leaks through timing.
    let (da, db) = (sha256_hex(a.as_bytes()), sha256_hex(b.as_bytes()));
    da.bytes().zip(db.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.require("email", &req.email).require("password", &req.password);
        if req.email.len() > tenantmesh_credentials::MAX_EMAIL_LEN {
            v.add("email", format!("must be at most {} characters", tenantmesh_credentials::MAX_EMAIL_LEN));
        }
        if req.password.len() > password::MAX_PASSWORD_LEN {
            v.add("password", "is too long");
        }
        v.check()?;
        tracing::Span::current().record("tenant.id", req.tenant_id.as_str());
        self.inner.anonymous.admit(anonymous::Call::Credentials, peer)?;
        self.inner.anonymous.admit_sign_in(peer, &req.tenant_id)?;
        let email = normalize_email(&req.email);
        // The peer's address: behind a proxy, the proxy's (put the limits
        // in front of it, or keep the proxy's clients apart upstream).
        let client = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        lockout::reserve(&self.inner.store, self.inner.config.lockout, &req.tenant_id, &email, &client).await?;
        let user = self.get_user(&req.tenant_id, &email).await?;
        let hash = match &user {
            Some(u) if !u.disabled => u.password_hash.clone(),
            _ => self.inner.dummy_hash.clone(),
        };
        let matches = self.inner.hashing.verify(req.password, hash).await.map_err(AuthError::from)?;
        let user = match user {
            Some(u) if matches && !u.disabled => u,
            _ => {
                // Already counted by the reservation; spends the tenant's
                // budget of failures, against this address.
                self.inner.anonymous.failed_sign_in(peer, &req.tenant_id);
                // Not the email itself: logs are read more widely than the user table.
                let email_hash = &sha256_hex(format!("{}/{email}", req.tenant_id).as_bytes())[..16];
                tracing::info!(security_event = "login_failed", email_hash, "login refused");
                return Err(AuthError::InvalidCredentials.into());
            }
        };
        lockout::clear(&self.inner.store, &user.tenant_id, &email, &client).await?;
        let (access_token, expires_in) = self.sign(user.user_id.clone(), user.tenant_id.clone(), user.roles.clone())?;
        let refresh_token =
            refresh::start_family(&self.inner.store, &user.tenant_id, &user.user_id, &user.email).await?;
        tracing::info!(user_id = %user.user_id, "login succeeded");
        Ok(Response::new(LoginResponse { access_token, refresh_token, expires_in, token_type: "Bearer".into() }))
    }

    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<CreateUserResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        let email = normalize_email(&req.email);
        check_email(&mut v, "email", &email);
        match (req.password.is_empty(), req.password_hash.is_empty()) {
            (false, true) => check_password(&mut v, "password", &req.password),
            (true, false) => {
                if !password::is_argon2id_phc(&req.password_hash) {
                    v.add("password_hash", "must be an argon2id PHC string");
                }
            }
            (true, true) => {
                v.add("password", "is required");
            }
            (false, false) => {
                v.add("password_hash", "must not be set together with password");
            }
        }
        let mut roles = Vec::new();
        for (i, r) in req.roles.iter().enumerate() {
            use tenantmesh_proto::auth::v1::Role as P;
            match P::try_from(*r) {
                Ok(P::TenantAdmin) => roles.push(Role::TenantAdmin),
                Ok(P::TenantUser) => roles.push(Role::TenantUser),
                _ => {
                    v.add(&format!("roles[{i}]"), "must be ROLE_TENANT_ADMIN or ROLE_TENANT_USER");
                }
            }
        }
        v.check()?;
        if !req.password_hash.is_empty() && !ctx.has_scope(tenantmesh_tenant_context::Scope::Lifecycle) {
            return Err(AuthError::HashNotAllowed.into());
        }
        ctx.authorize_tenant(&req.tenant_id)?;
        if *ctx.tenant_id != *req.tenant_id {
            // Platform callers: the target tenant must exist.
            match self.inner.directory.lookup(&req.tenant_id, &ctx.token, None).await? {
                None => return Err(AuthError::TenantNotFound(req.tenant_id).into()),
                Some(info) if info.status == tenantmesh_proto::registry::v1::TenantStatus::Deleted => {
                    return Err(AuthError::TenantDeleted(req.tenant_id).into());
                }
                Some(_) => {}
            }
        }
        roles.sort_by_key(|r| *r as u8);
        roles.dedup();
        if roles.is_empty() {
            roles.push(Role::TenantUser);
        }
        let password_hash =
            if req.password_hash.is_empty() { self.hash_password(req.password).await? } else { req.password_hash };
        let user = UserRecord {
            user_id: uuid::Uuid::new_v4().to_string(),
            tenant_id: req.tenant_id,
            email,
            password_hash,
            roles,
            disabled: false,
            create_time: now_secs(),
        };
        self.insert_user(&user).await?;
        tracing::info!(user_id = %user.user_id, target_tenant = %user.tenant_id, "user created");
        Ok(Response::new(CreateUserResponse { user: Some(user.to_proto()) }))
    }

    async fn refresh(&self, request: Request<RefreshRequest>) -> Result<Response<RefreshResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let req = request.into_inner();
        let mut v = Violations::new();
        v.require("refresh_token", &req.refresh_token);
        v.check()?;
        // Held to the caller's address alone: the token is checked (a read
        // by its hash, no password check) before anything about the tenant
        // it names is trusted, so made-up tokens naming a tenant spend
        // nothing of that tenant's.
        self.inner.anonymous.admit(anonymous::Call::Credentials, peer)?;
        let live = refresh::live(&self.inner.store, &req.refresh_token).await?;
        tracing::Span::current().record("tenant.id", live.tenant.as_str());
        // Disabling or deleting a user stops refresh at once; a user deleted
        // and re-created under the same email is somebody else.
        let user = match self.get_user(&live.tenant, &live.record.email).await? {
            Some(u) if !u.disabled && u.user_id == live.record.user_id => u,
            _ => {
                tracing::info!(security_event = "refresh_refused", user_id = %live.record.user_id, "user disabled or deleted");
                refresh::revoke_record(&self.inner.store, &live.tenant, &live.record).await?;
                return Err(AuthError::InvalidCredentials.into());
            }
        };
        let next = refresh::rotate(&self.inner.store, &req.refresh_token, live).await?;
        let (access_token, expires_in) = self.sign(user.user_id.clone(), user.tenant_id.clone(), user.roles.clone())?;
        Ok(Response::new(RefreshResponse {
            access_token,
            refresh_token: next,
            expires_in,
            token_type: "Bearer".into(),
        }))
    }

    async fn revoke(&self, request: Request<RevokeRequest>) -> Result<Response<RevokeResponse>, Status> {
        let req = request.into_inner();
        refresh::revoke(&self.inner.store, &req.refresh_token).await?;
        Ok(Response::new(RevokeResponse {}))
    }

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        let limit = paging::page_size(&mut v, req.page_size);
        let start_after = paging::decode_token(&mut v, &req.page_token, "user#");
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let page = self
            .inner
            .store
            .query(tenantmesh_storage::Query { pk: req.tenant_id, sk_prefix: "user#".into(), start_after, limit })
            .await
            .map_err(AuthError::from)?;
        let mut users = Vec::with_capacity(page.items.len());
        for item in &page.items {
            let u: UserRecord = serde_json::from_slice(&item.data).map_err(|e| AuthError::Corrupt(e.to_string()))?;
            users.push(u.to_proto());
        }
        let next_page_token = page.last_evaluated.as_deref().map(paging::encode_token).unwrap_or_default();
        Ok(Response::new(ListUsersResponse { users, next_page_token }))
    }

    async fn disable_user(
        &self,
        request: Request<DisableUserRequest>,
    ) -> Result<Response<DisableUserResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let (email, version, mut user) = self.managed_user(&ctx, &req.tenant_id, &req.email).await?;
        user.disabled = true;
        let data = serde_json::to_vec(&user).map_err(|e| AuthError::Internal(e.to_string()))?;
        match self.inner.store.put(&req.tenant_id, &user_sk(&email), data, Condition::Version(version)).await {
            Ok(_) => {}
            Err(tenantmesh_storage::StorageError::ConditionFailed { .. }) => {
                return Err(AuthError::ConcurrentChange.into());
            }
            Err(e) => return Err(AuthError::from(e).into()),
        }
        tracing::info!(user_id = %user.user_id, target_tenant = %req.tenant_id, "user disabled");
        Ok(Response::new(DisableUserResponse { user: Some(user.to_proto()) }))
    }

    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Result<Response<DeleteUserResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let (email, version, user) = self.managed_user(&ctx, &req.tenant_id, &req.email).await?;
        match self.inner.store.delete(&req.tenant_id, &user_sk(&email), Condition::Version(version)).await {
            Ok(_) => {}
            Err(tenantmesh_storage::StorageError::ConditionFailed { .. }) => {
                return Err(AuthError::ConcurrentChange.into());
            }
            Err(e) => return Err(AuthError::from(e).into()),
        }
        tracing::info!(user_id = %user.user_id, target_tenant = %req.tenant_id, "user deleted");
        Ok(Response::new(DeleteUserResponse {}))
    }

    async fn rotate_signing_key(
        &self,
        _request: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<RotateSigningKeyResponse>, Status> {
        let (kid, active_time) = self
            .inner
            .keys
            .rotate(&self.inner.store, self.inner.config.key_publish_delay, self.inner.config.access_token_ttl)
            .await?;
        Ok(Response::new(RotateSigningKeyResponse { kid, active_time, published_kids: self.inner.keys.kids() }))
    }

    async fn get_jwks(&self, request: Request<GetJwksRequest>) -> Result<Response<GetJwksResponse>, Status> {
        self.inner.anonymous.admit(anonymous::Call::GetJwks, request.remote_addr().map(|a| a.ip()))?;
        JWKS_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let keys = self.inner.keys.jwks();
        let doc = serde_json::json!({
            "keys": keys.iter().map(|k| serde_json::json!({
                "kty": k.kty, "crv": k.crv, "x": k.x, "kid": k.kid, "alg": k.alg, "use": k.r#use,
            })).collect::<Vec<_>>()
        });
        Ok(Response::new(GetJwksResponse { keys, jwks_json: doc.to_string() }))
    }

    async fn issue_service_token(
        &self,
        request: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<IssueServiceTokenResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let req = request.into_inner();
        let mut v = Violations::new();
        v.require("client_id", &req.client_id).require("client_secret", &req.client_secret);
        if !req.client_id.is_empty() && !valid_client_id(&req.client_id) {
            v.add("client_id", format!("must be 1-{MAX_CLIENT_ID_LEN} of a-z, 0-9 and _.-"));
        }
        if req.client_secret.len() > MAX_CLIENT_SECRET_LEN {
            v.add("client_secret", format!("must be at most {MAX_CLIENT_SECRET_LEN} characters"));
        }
        v.check()?;
        tracing::Span::current().record("tenant.id", PLATFORM_TENANT);
        self.inner.anonymous.admit(anonymous::Call::Credentials, peer)?;
        let known = self.inner.config.service_clients.get(&req.client_id);
        let ok = match known {
            Some(client) => constant_time_eq(&client.secret, &req.client_secret),
            None => {
                constant_time_eq(&req.client_secret, &self.inner.dummy_hash);
                false
            }
        };
        let Some(client) = known.filter(|_| ok) else {
            tracing::warn!(security_event = "service_login_failed", client_id = %req.client_id, "bad client credentials");
            return Err(AuthError::InvalidCredentials.into());
        };
        let (access_token, expires_in) = self.sign_granted(
            format!("service:{}", req.client_id),
            PLATFORM_TENANT.into(),
            vec![Role::Service],
            client.grant.clone(),
        )?;
        Ok(Response::new(IssueServiceTokenResponse { access_token, expires_in }))
    }
}

/// Runs the auth service on `listener` until `shutdown` completes.
pub async fn serve(
    config: Config,
    store: DynTable,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut clients: Vec<_> = config.service_clients.iter().collect();
    clients.sort_by_key(|(id, _)| id.as_str());
    for (id, client) in clients {
        let scopes: Vec<&str> = client.grant.scopes.iter().map(|s| s.as_str()).collect();
        if scopes.is_empty() {
            tracing::warn!(
                client_id = %id,
                "service client declared without scopes: its tokens open no RPC that needs a service identity \
                 (declare them as id:secret:scope+scope in TENANTMESH_SERVICE_CLIENTS)"
            );
        } else {
            tracing::info!(client_id = %id, scopes = %scopes.join("+"), tenants = ?client.grant.tenants, "service client");
        }
    }
    let backup = tenantmesh_service::backup::server(
        config.common.data_dir.clone(),
        config.storage.backend == tenantmesh_isolation::backend::Backend::Embedded,
    );
    let registry = tenantmesh_tenant_context::client::channel(&config.common.registry_url)?;
    let remote =
        Arc::new(RemoteDirectory::new(registry, config.common.tenant_cache_ttl, config.common.tenant_cache_capacity));
    tenantmesh_tenant_context::directory::watch_changes(&remote, &config.common)?;
    let directory: Arc<dyn TenantDirectory> = remote;
    let (issuer, audience, grace, tokens, common) = (
        config.common.issuer.clone(),
        config.common.audience.clone(),
        config.common.shutdown_grace,
        config.common.token_cache_capacity,
        config.common.clone(),
    );
    let (sweep_store, window) = (store.clone(), config.lockout.window());
    let service = AuthService::new(config, store, directory.clone()).await?;
    if let Some(password) = service.bootstrap_admin().await? {
        // Printed once, on the terminal only: never into the JSON logs.
        eprintln!(
            "tenantmesh: generated the platform admin password: {password}\n\
             tenantmesh: (also written to {}; set TENANTMESH_BOOTSTRAP_PASSWORD to choose it)",
            service.bootstrap_password_path().display()
        );
    }
    // Another replica may rotate: pick up its keys.
    let (keys, key_store) = (service.keys(), service.inner.store.clone());
    let reloader = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = keys.reload(&key_store).await {
                tracing::warn!(error = %e, "signing key reload failed");
            }
        }
    });
    let sweeper = expiry::start(sweep_store, window);
    let verifier = TokenVerifier::new(service.keys(), &issuer, &audience).with_cache_capacity(tokens);
    let authn = Authenticator::new(Arc::new(verifier), directory).with_admission(&common);
    let served = tenantmesh_service::runtime::serve(
        listener,
        tenantmesh_service::sized!(AuthServer::new(service)),
        Some(backup),
        server::stack(authn, None)?,
        grace,
        shutdown,
    )
    .await;
    // The reloader and the sweeper hold the store: they end with the service.
    for task in [reloader, sweeper] {
        task.abort();
        let _ = task.await;
    }
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantmesh_tenant_context::{Grant, Scope};

    fn clients(value: &str) -> Result<HashMap<String, ServiceClient>, ConfigError> {
        let env: HashMap<String, String> = [("TENANTMESH_SERVICE_CLIENTS".to_owned(), value.to_owned())].into();
        Config::from_env(&env).map(|c| c.service_clients)
    }

    /// An identity gets exactly the scopes (and tenants) its declaration
    /// names: none when it names none.
    #[test]
    fn service_clients_carry_the_scopes_they_declare() {
        let c = clients(
            "app:0123456789abcdef,onboarding:0123456789abcdef:lifecycle,billing:0123456789abcdef:metering_writer+usage_reader@acme+globex",
        )
        .unwrap();
        assert_eq!(c["app"].grant, Grant::default());
        assert_eq!(c["onboarding"].grant, Grant { scopes: vec![Scope::Lifecycle], tenants: None });
        assert_eq!(
            c["billing"].grant,
            Grant {
                scopes: vec![Scope::MeteringWriter, Scope::UsageReader],
                tenants: Some(vec!["acme".into(), "globex".into()])
            }
        );
        assert!(format!("{:?}", c["app"]).find("0123456789abcdef").is_none(), "the secret is never printed");
        for (bad, says) in [
            ("app", "entries must be"),
            ("app:short", "at least 16"),
            ("APP:0123456789abcdef", "client id"),
            ("app:0123456789abcdef:admin", "unknown scope \"admin\""),
            ("app:0123456789abcdef:lifecycle@", "at least one tenant"),
            ("app:0123456789abcdef:lifecycle@Acme!", "not a tenant id"),
            ("app:0123456789abcdef,app:0123456789abcdef", "declared twice"),
        ] {
            let e = clients(bad).unwrap_err();
            assert_eq!(e.var, "TENANTMESH_SERVICE_CLIENTS");
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
    }
}
