//! Silo compute the GitOps way, as in the AWS EKS SaaS GitOps reference:
//! provisioning a silo tenant writes its data-service instance's Kubernetes
//! manifests into a directory of a git working tree and commits them; a
//! reconciler (Flux, Argo CD) pointed at that directory applies them.
//! Removing the tenant's instance (offboarding, a tier change away from
//! silo) removes the files in another commit.
//!
//! Every step is idempotent, like every workflow step: the files are
//! written only where they differ, and a commit is made only when the
//! tenant's directory has staged changes, so running a step twice (after a
//! crash between the write and the commit, or a retry) makes one commit's
//! worth of change. With a remote configured, each step first pulls
//! (rebasing, so the change is made to what the remote holds now, others'
//! commits included), and each change is pushed (rebasing once more when
//! the remote moved meanwhile); a step that finds nothing to commit still
//! pushes, so a crash between commit and push is healed by the retry.
//!
//! One provisioner writes to a working tree at a time (a lock here); the
//! onboarding service runs as one replica. A git index lock found at start
//! was left by a killed process and is removed.
//!
//! Settings (`TENANTMESH_SILO_GITOPS_*`, see [`GitOpsConfig::from_env`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tenantmesh_service::config::{ConfigError, var};
use tokio::sync::Mutex;

use crate::compute::SiloCompute;

/// The data-service port of a silo instance.
pub const SILO_PORT: u16 = 50054;

#[derive(Debug, Clone)]
pub struct GitOpsConfig {
    /// `TENANTMESH_SILO_GITOPS_REPO`: a git working tree (not bare).
    pub repo: PathBuf,
    /// `TENANTMESH_SILO_GITOPS_PATH` (default `tenants`): the directory of
    /// the working tree the reconciler watches; each tenant gets
    /// `<path>/<tenant id>/`.
    pub path: String,
    /// `TENANTMESH_SILO_GITOPS_REMOTE`: push each change to this remote
    /// (unset: commit only; the reconciler reads this working tree's repo).
    pub remote: Option<String>,
    /// `TENANTMESH_SILO_IMAGE`: the tenantmesh image the instance runs.
    pub image: String,
    /// `TENANTMESH_SILO_NAMESPACE` (default `tenantmesh`): where the mesh
    /// runs, and the instances with it.
    pub namespace: String,
    /// `TENANTMESH_SILO_ROLE_ARN`: the AWS role (IRSA) of the instances'
    /// service accounts, on the DynamoDB backend.
    pub role_arn: Option<String>,
    /// `TENANTMESH_SILO_ENDPOINT_TEMPLATE` (default
    /// `http://{name}.{namespace}.svc.cluster.local:50054`): the endpoint the
    /// registry records (`{tenant}`, `{name}`, `{namespace}` replaced).
    pub endpoint_template: String,
    /// `TENANTMESH_SILO_READY_TIMEOUT_SECS` (default 600): how long the
    /// step waits for the reconciler to run the instance (it answers
    /// grpc.health.v1 SERVING) before it fails, to be retried.
    pub ready_timeout: std::time::Duration,
}

impl GitOpsConfig {
    /// `None` when `TENANTMESH_SILO_GITOPS_REPO` is unset.
    pub fn from_env(env: &HashMap<String, String>) -> Result<Option<Self>, ConfigError> {
        let Some(repo) = var(env, "TENANTMESH_SILO_GITOPS_REPO") else { return Ok(None) };
        let path = var(env, "TENANTMESH_SILO_GITOPS_PATH").unwrap_or("tenants").to_owned();
        if path.starts_with('/') || path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(ConfigError {
                var: "TENANTMESH_SILO_GITOPS_PATH",
                message: "must be a relative path inside the working tree, without . or .. components".into(),
            });
        }
        let image = var(env, "TENANTMESH_SILO_IMAGE").ok_or(ConfigError {
            var: "TENANTMESH_SILO_IMAGE",
            message: "is required with TENANTMESH_SILO_GITOPS_REPO (the image silo instances run)".into(),
        })?;
        let namespace = var(env, "TENANTMESH_SILO_NAMESPACE").unwrap_or("tenantmesh").to_owned();
        if !is_dns_label(&namespace) {
            return Err(ConfigError {
                var: "TENANTMESH_SILO_NAMESPACE",
                message: "must be a DNS label (lowercase letters, digits, '-', at most 63)".into(),
            });
        }
        let endpoint_template = var(env, "TENANTMESH_SILO_ENDPOINT_TEMPLATE")
            .unwrap_or("http://{name}.{namespace}.svc.cluster.local:50054")
            .to_owned();
        let ready_timeout =
            match tenantmesh_service::config::parse_var(env, "TENANTMESH_SILO_READY_TIMEOUT_SECS", 600u64)? {
                0 => {
                    return Err(ConfigError {
                        var: "TENANTMESH_SILO_READY_TIMEOUT_SECS",
                        message: "must be at least 1".into(),
                    });
                }
                n => std::time::Duration::from_secs(n),
            };
        Ok(Some(Self {
            ready_timeout,
            repo: PathBuf::from(repo),
            path,
            remote: var(env, "TENANTMESH_SILO_GITOPS_REMOTE").map(str::to_owned),
            image: image.to_owned(),
            namespace,
            role_arn: var(env, "TENANTMESH_SILO_ROLE_ARN").map(str::to_owned),
            endpoint_template,
        }))
    }
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A label value: at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

/// The name of `tenant`'s instance objects: `data-<tenant>`, shortened
/// where that exceeds a DNS label's 63 characters to its first 41
/// characters and 64 bits of its SHA-256 (two tenants sharing a name would
/// take some 2^32 long ids, not a few thousand).
pub fn instance_name(tenant: &str) -> String {
    let name = format!("data-{tenant}");
    if name.len() <= 63 {
        return name;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, tenant.as_bytes());
    let hash: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    // Tenant ids are ASCII; a label ends alphanumeric (the hash does).
    format!("data-{}-{hash}", &tenant[..41])
}

/// The manifests of `tenant`'s instance: file name and YAML.
pub fn manifests(config: &GitOpsConfig, tenant: &str, tier: &str) -> Vec<(&'static str, String)> {
    let name = instance_name(tenant);
    let ns = &config.namespace;
    let labels = format!(
        "    app.kubernetes.io/name: tenantmesh\n    app.kubernetes.io/component: silo-data\n    \
         app.kubernetes.io/instance: {name}\n    app.kubernetes.io/managed-by: tenantmesh-onboarding\n    \
         tenantmesh.io/tenant: {tenant}\n    tenantmesh.io/tier: {tier}\n    tenantId: {tenant}\n    tier: {tier}\n"
    );
    let selector = format!("      app.kubernetes.io/component: silo-data\n      tenantmesh.io/tenant: {tenant}\n");
    let pod_labels = labels.replace("\n    ", "\n        ").replacen("    ", "        ", 1);
    let header = |kind: &str, api: &str| {
        format!(
            "# Generated by tenantmesh onboarding for tenant {tenant} (tier {tier}): do not edit;\n\
             # removed when the tenant leaves the silo model.\napiVersion: {api}\nkind: {kind}\nmetadata:\n  \
             name: {name}\n  namespace: {ns}\n  labels:\n{labels}"
        )
    };
    let role = config
        .role_arn
        .as_deref()
        .map(|arn| format!("  annotations:\n    eks.amazonaws.com/role-arn: {arn}\n"))
        .unwrap_or_default();
    let image = &config.image;
    vec![
        (
            "serviceaccount.yaml",
            format!("{}{role}automountServiceAccountToken: false\n", header("ServiceAccount", "v1")),
        ),
        (
            "deployment.yaml",
            format!(
                "{}spec:\n  replicas: 1\n  selector:\n    matchLabels:\n{selector}  template:\n    metadata:\n      \
                 labels:\n{pod_labels}    spec:\n      serviceAccountName: {name}\n      \
                 automountServiceAccountToken: false\n      securityContext:\n        runAsNonRoot: true\n        \
                 runAsUser: 10001\n        runAsGroup: 10001\n        fsGroup: 10001\n        seccompProfile:\n          \
                 type: RuntimeDefault\n      containers:\n        - name: data\n          image: {image}\n          \
                 command: [\"tenantmesh-data\"]\n          envFrom:\n            - configMapRef:\n                \
                 name: tenantmesh-config\n          env:\n            - name: TENANTMESH_LISTEN_ADDR\n              \
                 value: \"0.0.0.0:{SILO_PORT}\"\n            - name: TENANTMESH_SILO_TENANT\n              \
                 value: \"{tenant}\"\n          ports:\n            - name: grpc\n              \
                 containerPort: {SILO_PORT}\n          readinessProbe:\n            grpc:\n              \
                 port: {SILO_PORT}\n            periodSeconds: 5\n          livenessProbe:\n            grpc:\n              \
                 port: {SILO_PORT}\n            initialDelaySeconds: 10\n            periodSeconds: 10\n          \
                 resources:\n            requests:\n              cpu: 250m\n              memory: 128Mi\n            \
                 limits:\n              memory: 512Mi\n          securityContext:\n            \
                 allowPrivilegeEscalation: false\n            readOnlyRootFilesystem: true\n            \
                 capabilities:\n              drop: [\"ALL\"]\n          volumeMounts:\n            - name: data\n              \
                 mountPath: /var/lib/tenantmesh\n      volumes:\n        - name: data\n          emptyDir: {{}}\n",
                header("Deployment", "apps/v1")
            ),
        ),
        (
            "service.yaml",
            format!(
                "{}spec:\n  selector:\n{}  ports:\n    - name: grpc\n      port: {SILO_PORT}\n      \
                 targetPort: grpc\n      appProtocol: grpc\n",
                header("Service", "v1"),
                selector.replace("      ", "    ")
            ),
        ),
        (
            "networkpolicy.yaml",
            format!(
                "{}spec:\n  podSelector:\n    matchLabels:\n{selector}  policyTypes: [\"Ingress\", \"Egress\"]\n  \
                 # Only the shared data service (which forwards the tenant's calls) and\n  \
                 # onboarding (which provisions and removes its store) call it.\n  \
                 ingress:\n    - from:\n        - podSelector:\n            matchLabels:\n              \
                 app.kubernetes.io/component: data\n        - podSelector:\n            matchLabels:\n              \
                 app.kubernetes.io/component: onboarding\n      ports:\n        - port: {SILO_PORT}\n          \
                 protocol: TCP\n  # It calls auth (keys) and the registry (tenants), DNS, the collector\n  \
                 # and, on DynamoDB, the AWS APIs over HTTPS.\n  egress:\n    - to:\n        - podSelector:\n            \
                 matchLabels:\n              app.kubernetes.io/component: auth\n      ports:\n        - port: 50052\n          \
                 protocol: TCP\n    - to:\n        - podSelector:\n            matchLabels:\n              \
                 app.kubernetes.io/component: tenant-registry\n      ports:\n        - port: 50051\n          \
                 protocol: TCP\n    - to:\n        - namespaceSelector: {{}}\n          podSelector:\n            \
                 matchLabels:\n              k8s-app: kube-dns\n      ports:\n        - port: 53\n          \
                 protocol: UDP\n        - port: 53\n          protocol: TCP\n    - to:\n        - namespaceSelector: {{}}\n      \
                 ports:\n        - port: 4317\n          protocol: TCP\n    - ports:\n        - port: 443\n          protocol: TCP\n",
                header("NetworkPolicy", "networking.k8s.io/v1")
            ),
        ),
    ]
}

/// Writes silo tenants' manifests into a git working tree (see the module).
pub struct GitOps {
    config: GitOpsConfig,
    lock: Mutex<()>,
}

const AUTHOR: [&str; 4] = ["-c", "user.name=tenantmesh onboarding", "-c", "user.email=onboarding@tenantmesh.invalid"];

impl GitOps {
    /// Checks that `config.repo` is a git working tree.
    pub async fn open(config: GitOpsConfig) -> Result<Self, String> {
        let gitops = Self { config, lock: Mutex::new(()) };
        let inside = gitops.git(&["rev-parse", "--is-inside-work-tree"]).await?;
        if inside.trim() != "true" {
            return Err(format!("{} is not a git working tree", gitops.config.repo.display()));
        }
        // A git of ours killed with the process (kill -9 in the middle of a
        // commit) leaves its index lock, and every later git command would
        // fail on it. This process is the tree's one writer and runs no git
        // yet: a lock now is stale.
        let lock = gitops.git(&["rev-parse", "--git-path", "index.lock"]).await?;
        let lock = gitops.config.repo.join(lock.trim());
        if lock.exists() {
            std::fs::remove_file(&lock).map_err(|e| format!("{}: {e}", lock.display()))?;
            tracing::warn!(lock = %lock.display(), "removed a stale git index lock left by a killed process");
        }
        Ok(gitops)
    }

    /// `<path>/<tenant>` relative to the working tree.
    pub fn tenant_dir(&self, tenant: &str) -> String {
        format!("{}/{tenant}", self.config.path)
    }

    fn endpoint(&self, tenant: &str) -> String {
        self.config
            .endpoint_template
            .replace("{tenant}", tenant)
            .replace("{name}", &instance_name(tenant))
            .replace("{namespace}", &self.config.namespace)
    }

    async fn git(&self, args: &[&str]) -> Result<String, String> {
        let out = tokio::process::Command::new("git")
            .arg("-C")
            .arg(&self.config.repo)
            .args(AUTHOR)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("cannot run git: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "git {} in {}: {}",
                args.join(" "),
                self.config.repo.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Commits the staged changes under `dir` (if any) and pushes.
    async fn commit(&self, dir: &str, message: &str) -> Result<bool, String> {
        // `git add` refuses a path neither on disk nor in the index.
        let tracked = !self.git(&["ls-files", "--cached", "--", dir]).await?.trim().is_empty();
        if tracked || self.config.repo.join(dir).exists() {
            self.git(&["add", "--all", "--", dir]).await?;
        }
        let staged = !self.git(&["diff", "--cached", "--name-only", "--", dir]).await?.trim().is_empty();
        if staged {
            self.git(&["commit", "--quiet", "--no-verify", "-m", message, "--", dir]).await?;
        }
        if self.config.remote.is_some() && self.git_push().await.is_err() {
            // The remote moved since the pull: replay ours on top once, then push.
            self.pull().await?;
            self.git_push().await?;
        }
        Ok(staged)
    }

    /// Brings the working tree up to the remote's branch (keeping what a
    /// crashed step left uncommitted), so a change is made to the latest
    /// state; nothing without a remote.
    async fn pull(&self) -> Result<(), String> {
        let Some(remote) = &self.config.remote else { return Ok(()) };
        let branch = self.git(&["rev-parse", "--abbrev-ref", "HEAD"]).await?;
        self.git(&["pull", "--quiet", "--rebase", "--autostash", remote, branch.trim()]).await.map(drop)
    }

    async fn git_push(&self) -> Result<(), String> {
        let Some(remote) = &self.config.remote else { return Ok(()) };
        self.git(&["push", "--quiet", remote, "HEAD"]).await.map(drop)
    }
}

/// Waits until `endpoint` answers grpc.health.v1 SERVING: the reconciler
/// has applied the manifests and the instance is ready.
async fn wait_serving(endpoint: &str, timeout: std::time::Duration) -> Result<(), String> {
    use tenantmesh_service::health;
    let started = std::time::Instant::now();
    let every = std::time::Duration::from_millis(500);
    if health::check(endpoint, "", std::time::Duration::from_secs(2)).await.is_ok() {
        return Ok(());
    }
    tracing::info!(%endpoint, "waiting for the reconciler to run the silo instance");
    health::wait(endpoint, timeout.saturating_sub(started.elapsed()), every).await.map_err(|last| {
        format!(
            "silo instance at {endpoint} not serving after {timeout:?} ({last}): is the reconciler applying the fleet repository?"
        )
    })
}

fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[async_trait]
impl SiloCompute for GitOps {
    async fn provision(&self, tenant_id: &str, tier: &str) -> Result<String, String> {
        if !is_label_value(tenant_id) || !is_label_value(tier) {
            return Err(format!("tenant {tenant_id:?} or tier {tier:?} is not a valid Kubernetes label value"));
        }
        let _one = self.lock.lock().await;
        self.pull().await?;
        let dir = self.tenant_dir(tenant_id);
        let abs = self.config.repo.join(&dir);
        std::fs::create_dir_all(&abs).map_err(|e| format!("{}: {e}", abs.display()))?;
        let files = manifests(&self.config, tenant_id, tier);
        for (file, text) in &files {
            write_if_changed(&abs.join(file), text)?;
        }
        // Anything else there (an older layout, a stray file) goes.
        for entry in std::fs::read_dir(&abs).map_err(|e| format!("{}: {e}", abs.display()))?.flatten() {
            let name = entry.file_name();
            if !files.iter().any(|(f, _)| name.to_str() == Some(f)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let committed =
            self.commit(&dir, &format!("silo tenant {tenant_id}: data-service instance (tier {tier})")).await?;
        tracing::info!(silo_tenant = tenant_id, dir = %dir, committed, "silo instance manifests in git");
        drop(_one);
        let endpoint = self.endpoint(tenant_id);
        wait_serving(&endpoint, self.config.ready_timeout).await?;
        Ok(endpoint)
    }

    async fn deprovision(&self, tenant_id: &str) -> Result<(), String> {
        let _one = self.lock.lock().await;
        self.pull().await?;
        let dir = self.tenant_dir(tenant_id);
        let abs = self.config.repo.join(&dir);
        match std::fs::remove_dir_all(&abs) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", abs.display())),
        }
        let committed = self.commit(&dir, &format!("silo tenant {tenant_id}: remove data-service instance")).await?;
        tracing::info!(silo_tenant = tenant_id, dir = %dir, committed, "silo instance manifests removed from git");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
