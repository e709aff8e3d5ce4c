//! The `Auth` RPCs: users, login, tokens, the key set.

use std::path::PathBuf;
use std::sync::Arc;
use tenantmesh_credentials::{HashPool, check_email, check_password, normalize_email, password};
use tenantmesh_proto::audit::v1::AuditEvent;
use tenantmesh_proto::metering::v1::metering_client::MeteringClient;
use tenantmesh_service::audit::{AppendError, AuditLog, Caller};
use tenantmesh_service::entitlements::MeteredFeature;
use tenantmesh_storage::Write;
use tenantmesh_tenant_context::audit::Auditor;
use tenantmesh_tenant_context::client::PropagatedChannel;

use crate::config::{BOOTSTRAP_PASSWORD_FILE, Config, MAX_CLIENT_ID_LEN, MAX_CLIENT_SECRET_LEN, valid_client_id};
use crate::error::AuthError;
use crate::keys::SigningKeys;
use crate::secrets::{constant_time_eq, random_token, sha256_hex, write_private_file};
use crate::{anonymous, lockout, refresh};
use serde::{Deserialize, Serialize};
use tenantmesh_proto::auth::v1::auth_server::Auth;
use tenantmesh_proto::auth::v1::*;
use tenantmesh_service::clock::now_secs;
use tenantmesh_service::errors::Violations;
use tenantmesh_service::paging;
use tenantmesh_storage::{Condition, DynTable};
use tenantmesh_tenant_context::directory::TenantDirectory;
use tenantmesh_tenant_context::{Claims, PLATFORM_TENANT, Role, TenantContext};
use tonic::{Request, Response, Status};

/// GetJwks calls served by this process (validators refreshing keys).
static JWKS_REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// GetJwks calls served by this process so far.
pub fn jwks_requests() -> u64 {
    JWKS_REQUESTS.load(std::sync::atomic::Ordering::Relaxed)
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
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: DynTable,
    keys: Arc<SigningKeys>,
    config: Config,
    directory: Arc<dyn TenantDirectory>,
    /// A real hash to verify against when the user does not exist, so an
    /// unknown user costs the same time as a wrong password.
    dummy_hash: String,
    /// Password hashing, bounded: never on the stores' blocking pool.
    hashing: HashPool,
    anonymous: anonymous::Anonymous,
    /// The audit log, in the same table: each change and its event are
    /// one transaction.
    auditor: Auditor,
    /// The data service's Metering, as auth itself (`usage_reader`): a
    /// tenant's use of its monthly quantities. None without an identity.
    metering: Option<MeteringClient<PropagatedChannel>>,
}

/// How long GetEntitlements waits for the month's usage from Metering.
const METERING_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The auth RPCs that change something, by path: their audit actions.
const AUDITED: [(&str, &str); 4] = [
    ("/tenantmesh.auth.v1.Auth/CreateUser", "user.create"),
    ("/tenantmesh.auth.v1.Auth/DisableUser", "user.disable"),
    ("/tenantmesh.auth.v1.Auth/DeleteUser", "user.delete"),
    ("/tenantmesh.auth.v1.Auth/RotateSigningKey", "key.rotate"),
];

/// The auth service's audit log, in its table `store`.
pub(crate) fn audit_log(store: &DynTable) -> AuditLog {
    AuditLog::new(store.clone(), "auth")
}

/// A user as an audit event names it.
fn user_target(email: &str) -> String {
    format!("user/{email}")
}

/// A user in summary, for its audit events (never its password hash).
fn user_summary(user: &UserRecord) -> String {
    let roles: Vec<&str> = user.roles.iter().map(|r| r.as_str()).collect();
    let state = if user.disabled { "disabled" } else { "enabled" };
    format!("id {}, roles {}, {state}", user.user_id, roles.join(" "))
}

impl AuthService {
    /// `own_tokens`: the service's own identity (from its tenant watch),
    /// with which it reads tenants' monthly usage for GetEntitlements.
    pub async fn new(
        config: Config,
        store: DynTable,
        directory: Arc<dyn TenantDirectory>,
        own_tokens: Option<Arc<tenantmesh_tenant_context::client::ServiceTokenSource>>,
    ) -> Result<Self, AuthError> {
        let keys = Arc::new(SigningKeys::load_or_create(&store).await?);
        let hashing = HashPool::new(config.hash_pool);
        let dummy_hash = hashing.hash(random_token(16), config.hash_params).await?;
        let anonymous = anonymous::Anonymous::new(config.anonymous);
        let auditor = Auditor::new(audit_log(&store));
        let metering = match own_tokens {
            Some(tokens) => {
                use tenantmesh_tenant_context::client;
                let data = client::channel(&config.data_url).map_err(|e| AuthError::Internal(e.to_string()))?;
                Some(MeteringClient::new(client::wrap(data, client::Identity::Service(tokens))))
            }
            None => None,
        };
        let inner = Inner { store, keys, config, directory, dummy_hash, hashing, anonymous, auditor, metering };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// `tenant`'s use this month of each metered feature, as the data
    /// service's Metering reads it; a feature it could not read is left
    /// out (its `used` unset), never an error of the caller's call.
    async fn monthly_usage(&self, tenant: &str) -> Vec<(MeteredFeature, u64)> {
        use tenantmesh_proto::metering::v1::{GetUsageRequest, Window};
        let Some(metering) = &self.inner.metering else { return Vec::new() };
        let now = now_secs();
        let (start, _) = tenantmesh_service::alerts::period(now);
        let reads = MeteredFeature::ALL.map(|feature| {
            let req = GetUsageRequest {
                tenant_id: tenant.to_owned(),
                meter: feature.as_str().to_owned(),
                from: start,
                to: now + 60,
                window: Window::Day as i32,
                group_by: Vec::new(),
            };
            let mut metering = metering.clone();
            async move { (feature, metering.get_usage(req).await) }
        });
        // GetEntitlements answers without this month's use rather than wait
        // on a slow data service.
        let Ok(answers) = tokio::time::timeout(METERING_WAIT, futures_util::future::join_all(reads)).await else {
            tracing::warn!(
                target_tenant = tenant,
                wait_ms = METERING_WAIT.as_millis() as u64,
                "this month's usage was not read in time for GetEntitlements"
            );
            return Vec::new();
        };
        let mut used = Vec::new();
        for (feature, answer) in answers {
            match answer {
                Ok(r) => used.push((feature, r.into_inner().rows.iter().map(|r| r.value.max(0) as u64).sum())),
                Err(status) => {
                    tracing::warn!(target_tenant = tenant, feature = feature.as_str(), code = ?status.code(), error = %status.message(), "could not read this month's usage for GetEntitlements");
                }
            }
        }
        used
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

    /// Creates `user`; with `caller`, its audit event in the same transaction.
    async fn insert_user(&self, user: &UserRecord, caller: Option<&Caller>) -> Result<(), AuthError> {
        let data = serde_json::to_vec(user).map_err(|e| AuthError::Internal(e.to_string()))?;
        let Some(caller) = caller else {
            return match self.inner.store.put(&user.tenant_id, &user_sk(&user.email), data, Condition::NotExists).await
            {
                Ok(_) => Ok(()),
                Err(tenantmesh_storage::StorageError::ConditionFailed { .. }) => {
                    Err(AuthError::UserExists(user.email.clone()))
                }
                Err(e) => Err(e.into()),
            };
        };
        let mut event = caller.event(&user.tenant_id, "user.create", user_target(&user.email));
        event.after = user_summary(user);
        let write =
            Write::Put { pk: user.tenant_id.clone(), sk: user_sk(&user.email), data, condition: Condition::NotExists };
        self.commit_audited(write, event, AuthError::UserExists(user.email.clone())).await
    }

    /// Writes `write` (a change of a user) and `event` in one transaction;
    /// `conflict` when the write's condition fails (the user exists
    /// already, or changed meanwhile).
    async fn commit_audited(&self, write: Write, event: AuditEvent, conflict: AuthError) -> Result<(), AuthError> {
        match self.inner.auditor.log.commit(vec![write], event).await {
            Ok(_) => Ok(()),
            Err(AppendError::Change { .. }) => Err(conflict),
            Err(AppendError::Store(e)) => Err(e.into()),
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
        match self.insert_user(&user, None).await {
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

    /// The refusals of the auth RPCs that change something, for its audit log.
    pub fn refusals(&self) -> tenantmesh_tenant_context::authorize::OnRefusal {
        self.inner.auditor.refusals(&AUDITED)
    }

    /// Purges, every `every`, each tenant's audit events past its tier's
    /// `audit_retention_days`: the tenant's tier is asked of the registry
    /// with a token the auth service signs for itself (scope `directory`;
    /// the platform's chain, and a tenant no longer known, keep the longest
    /// of any tier).
    pub fn sweep_audit(&self, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let tier_of: tenantmesh_tenant_context::audit::TierOf = Arc::new(move |tenant: String| {
            let this = this.clone();
            Box::pin(async move {
                let grant = tenantmesh_tenant_context::Grant {
                    scopes: vec![tenantmesh_tenant_context::Scope::Directory],
                    tenants: None,
                };
                let signed =
                    this.sign_granted("service:auth".into(), PLATFORM_TENANT.into(), vec![Role::Service], grant);
                let (token, _) = signed.ok()?;
                let info = this.inner.directory.lookup(&tenant, &token, None).await.ok()??;
                Some(info.tier.to_string())
            })
        });
        self.inner.auditor.sweep(self.inner.config.common.tiers.clone(), tier_of, every)
    }

    /// The auth service's audit log (its `Audit` and `Backup` services).
    pub fn auditor(&self) -> &Auditor {
        &self.inner.auditor
    }

    /// The record of `tenant_id` as the caller's layer holds it (the
    /// caller's own tenant) or as the registry has it (a platform caller's
    /// target: it must exist).
    async fn target_tenant(
        &self,
        ctx: &TenantContext,
        tenant_id: &str,
    ) -> Result<Arc<tenantmesh_tenant_context::directory::TenantInfo>, Status> {
        if *ctx.tenant_id == *tenant_id {
            return Ok(ctx.tenant.clone());
        }
        self.inner
            .directory
            .lookup(tenant_id, &ctx.token, None)
            .await?
            .ok_or_else(|| AuthError::TenantNotFound(tenant_id.to_owned()).into())
    }

    /// How many users `tenant_id` has, counted page by page up to
    /// `at_most` (a page stops at a byte bound too, so one query would
    /// undercount a large tenant).
    async fn users_counted(&self, tenant_id: &str, at_most: u64) -> Result<u64, Status> {
        let mut pages = tenantmesh_storage::Pages::new(self.inner.store.as_ref(), tenant_id, "user#", 1000);
        let mut users = 0u64;
        while users < at_most
            && let Some(page) = pages.next().await.map_err(AuthError::from)?
        {
            users += page.len() as u64;
        }
        Ok(users.min(at_most))
    }

    /// Where a generated bootstrap password is written.
    pub fn bootstrap_password_path(&self) -> PathBuf {
        self.inner.config.common.data_dir.join(BOOTSTRAP_PASSWORD_FILE)
    }
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
        tenantmesh_telemetry::record_claimed_tenant(&req.tenant_id);
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
        tenantmesh_telemetry::record_proven_tenant(&user.tenant_id);
        lockout::clear(&self.inner.store, &user.tenant_id, &email, &client).await?;
        let (access_token, expires_in) = self.sign(user.user_id.clone(), user.tenant_id.clone(), user.roles.clone())?;
        let refresh_token =
            refresh::start_family(&self.inner.store, &user.tenant_id, &user.user_id, &user.email).await?;
        tracing::info!(user_id = %user.user_id, "login succeeded");
        Ok(Response::new(LoginResponse { access_token, refresh_token, expires_in, token_type: "Bearer".into() }))
    }

    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<CreateUserResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
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
        let (tenant_id, target) = (req.tenant_id.clone(), user_target(&email));
        let auditor = &self.inner.auditor;
        let user = auditor
            .audited(&caller, &tenant_id, "user.create", target, async {
                if !req.password_hash.is_empty() && !ctx.has_scope(tenantmesh_tenant_context::Scope::Lifecycle) {
                    return Err(AuthError::HashNotAllowed.into());
                }
                ctx.authorize_tenant(&req.tenant_id)?;
                let tenant = self.target_tenant(&ctx, &req.tenant_id).await?;
                if tenant.status == tenantmesh_proto::registry::v1::TenantStatus::Deleted {
                    return Err(AuthError::TenantDeleted(req.tenant_id).into());
                }
                // What the tier's plan includes: at most max_users users.
                if let Some(tier) = self.inner.config.common.tiers.get(&tenant.tier) {
                    let plan = tier.entitlements.with(&tenant.entitlement_overrides);
                    if let Some(max) = plan.max_users {
                        let users = self.users_counted(&req.tenant_id, max).await?;
                        plan.check_users(&req.tenant_id, &tenant.tier, users)?;
                    }
                }
                roles.sort_by_key(|r| *r as u8);
                roles.dedup();
                if roles.is_empty() {
                    roles.push(Role::TenantUser);
                }
                let password_hash = if req.password_hash.is_empty() {
                    self.hash_password(req.password).await?
                } else {
                    req.password_hash
                };
                let user = UserRecord {
                    user_id: uuid::Uuid::new_v4().to_string(),
                    tenant_id: req.tenant_id,
                    email,
                    password_hash,
                    roles,
                    disabled: false,
                    create_time: now_secs(),
                };
                self.insert_user(&user, Some(&caller)).await?;
                Ok(user)
            })
            .await?;
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
        if let Some((tenant, _)) = req.refresh_token.split_once('.')
            && tenantmesh_service::validate_tenant_id(tenant).is_ok()
        {
            tenantmesh_telemetry::record_claimed_tenant(tenant);
        }
        self.inner.anonymous.admit(anonymous::Call::Credentials, peer)?;
        let live = refresh::live(&self.inner.store, &req.refresh_token).await?;
        tenantmesh_telemetry::record_proven_tenant(&live.tenant);
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

    async fn get_entitlements(
        &self,
        request: Request<GetEntitlementsRequest>,
    ) -> Result<Response<GetEntitlementsResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        if req.tenant_id == PLATFORM_TENANT {
            return Err(Status::failed_precondition("the platform tenant has no plan"));
        }
        let tenant = self.target_tenant(&ctx, &req.tenant_id).await?;
        let tier = self
            .inner
            .config
            .common
            .tiers
            .get(&tenant.tier)
            .ok_or_else(|| AuthError::Internal(format!("tier {} is not in the tiers file", tenant.tier)))?;
        let plan = tier.entitlements.with(&tenant.entitlement_overrides);
        let users = self.users_counted(&req.tenant_id, plan.max_users.unwrap_or(10_000)).await?;
        let monthly = self.monthly_usage(&req.tenant_id).await;
        let entitlements =
            tenantmesh_service::entitlements::listed(tier, &tenant.entitlement_overrides, Some(users), &monthly);
        Ok(Response::new(GetEntitlementsResponse { entitlements }))
    }

    async fn disable_user(
        &self,
        request: Request<DisableUserRequest>,
    ) -> Result<Response<DisableUserResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let target = user_target(&normalize_email(&req.email));
        let user = self
            .inner
            .auditor
            .audited(&caller, &req.tenant_id, "user.disable", target.clone(), async {
                let (email, version, mut user) = self.managed_user(&ctx, &req.tenant_id, &req.email).await?;
                let mut event = caller.event(&req.tenant_id, "user.disable", target.clone());
                event.before = user_summary(&user);
                user.disabled = true;
                event.after = user_summary(&user);
                let data = serde_json::to_vec(&user).map_err(|e| AuthError::Internal(e.to_string()))?;
                let write = Write::Put {
                    pk: req.tenant_id.clone(),
                    sk: user_sk(&email),
                    data,
                    condition: Condition::Version(version),
                };
                self.commit_audited(write, event, AuthError::ConcurrentChange).await?;
                Ok(user)
            })
            .await?;
        tracing::info!(user_id = %user.user_id, target_tenant = %req.tenant_id, "user disabled");
        Ok(Response::new(DisableUserResponse { user: Some(user.to_proto()) }))
    }

    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Result<Response<DeleteUserResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let target = user_target(&normalize_email(&req.email));
        let user = self
            .inner
            .auditor
            .audited(&caller, &req.tenant_id, "user.delete", target.clone(), async {
                let (email, version, user) = self.managed_user(&ctx, &req.tenant_id, &req.email).await?;
                let mut event = caller.event(&req.tenant_id, "user.delete", target.clone());
                event.before = user_summary(&user);
                let write = Write::Delete {
                    pk: req.tenant_id.clone(),
                    sk: user_sk(&email),
                    condition: Condition::Version(version),
                };
                self.commit_audited(write, event, AuthError::ConcurrentChange).await?;
                Ok(user)
            })
            .await?;
        tracing::info!(user_id = %user.user_id, target_tenant = %req.tenant_id, "user deleted");
        Ok(Response::new(DeleteUserResponse {}))
    }

    async fn rotate_signing_key(
        &self,
        request: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<RotateSigningKeyResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let auditor = &self.inner.auditor;
        let (kid, active_time) = auditor
            .audited(&caller, PLATFORM_TENANT, "key.rotate", "signing-key".into(), async {
                let event = caller.event(PLATFORM_TENANT, "key.rotate", "signing-key".into());
                let (publish, ttl) = (self.inner.config.key_publish_delay, self.inner.config.access_token_ttl);
                Ok(self.inner.keys.rotate(&self.inner.store, publish, ttl, Some((&auditor.log, event))).await?)
            })
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
        tenantmesh_telemetry::record_claimed_tenant(PLATFORM_TENANT);
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
        tenantmesh_telemetry::record_proven_tenant(PLATFORM_TENANT);
        let (access_token, expires_in) = self.sign_granted(
            format!("service:{}", req.client_id),
            PLATFORM_TENANT.into(),
            vec![Role::Service],
            client.grant.clone(),
        )?;
        Ok(Response::new(IssueServiceTokenResponse { access_token, expires_in }))
    }
}
