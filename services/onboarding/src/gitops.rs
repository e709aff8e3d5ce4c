//! Silo compute the GitOps way, as in the AWS EKS SaaS GitOps reference:
//! provisioning a silo tenant writes its data-service instance's Kubernetes
//! manifests into a directory of a git working tree and commits them; a
//! reconciler (Flux, Argo CD) pointed at that directory applies them.
//! Removing the tenant's instance (offboarding, a tier change away from
//! silo) removes the files in another commit.
//!
//! Each registered application service whose shared instance says it has
//! silo instances (`silo_instances`) and names an image gets the same for
//! the tenant, in `<path>/<tenant>/<service>/`: its instance runs the image
//! and command it registered, with its settings from the ConfigMaps
//! `tenantmesh-config` and `<service>-config`, its identity's secret from
//! the key `<service>-client-secret` of `tenantmesh-secrets`, and a
//! NetworkPolicy that lets only its shared instance and onboarding call
//! it. A service that registered no image gets no instance: its shared
//! instance serves the tenant, on the tenant's own tables.
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
use tenantmesh_proto::registry::v1::ApplicationService;
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
    /// `TENANTMESH_SILO_SERVICE_ENDPOINT_TEMPLATE` (default
    /// `http://{name}.{namespace}.svc.cluster.local:{port}`): where an
    /// application service's instance is reached (`{service}`, `{tenant}`,
    /// `{name}`, `{namespace}`, `{port}` replaced); the instance registers
    /// there.
    pub service_endpoint_template: String,
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
        let service_endpoint_template = var(env, "TENANTMESH_SILO_SERVICE_ENDPOINT_TEMPLATE")
            .unwrap_or("http://{name}.{namespace}.svc.cluster.local:{port}")
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
            service_endpoint_template,
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
    // Tenant ids are ASCII; a label ends alphanumeric (the hash does).
    format!("data-{}-{}", &tenant[..41], hash16(tenant))
}

/// The name of the objects of `service`'s instance of `tenant`:
/// `<service>-<tenant>-<16 hex digits of SHA-256 of both>`, the readable
/// part cut to fit a DNS label. The digest keeps two pairs apart that read
/// alike (service `orders` of tenant `x-acme`, `orders-x` of `acme`).
pub fn service_instance_name(service: &str, tenant: &str) -> String {
    let readable = format!("{service}-{tenant}");
    let cut = &readable[..readable.len().min(63 - 17)];
    format!("{cut}-{}", hash16(&format!("{service}@{tenant}")))
}

fn hash16(text: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A variable of an instance's container: a value, or a key of the
/// `tenantmesh-secrets` Secret.
enum Env {
    Value(String),
    Secret(String),
}

/// One silo instance as Kubernetes objects: what differs between the data
/// service's and an application service's.
struct Workload<'a> {
    name: String,
    /// `app.kubernetes.io/component` of the instance (`silo-data`,
    /// `silo-<service>`), its selector with the tenant label.
    component: String,
    container: &'a str,
    image: &'a str,
    command: &'a [String],
    port: u16,
    /// ConfigMaps its environment comes from (name, optional).
    config_maps: Vec<(String, bool)>,
    env: Vec<(&'static str, Env)>,
    /// The components whose pods may call it.
    callers: Vec<String>,
    /// The mesh's components (and ports) it calls.
    calls: &'static [(&'static str, u16)],
    what: String,
}

fn yaml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn render(config: &GitOpsConfig, w: &Workload<'_>, tenant: &str, tier: &str) -> Vec<(&'static str, String)> {
    let Workload { name, component, port, .. } = w;
    let ns = &config.namespace;
    let labels = format!(
        "    app.kubernetes.io/name: tenantmesh\n    app.kubernetes.io/component: {component}\n    \
         app.kubernetes.io/instance: {name}\n    app.kubernetes.io/managed-by: tenantmesh-onboarding\n    \
         tenantmesh.io/role: silo-instance\n    tenantmesh.io/tenant: {tenant}\n    tenantmesh.io/tier: {tier}\n    tenantId: {tenant}\n    tier: {tier}\n"
    );
    let selector = format!("      app.kubernetes.io/component: {component}\n      tenantmesh.io/tenant: {tenant}\n");
    let pod_labels = labels.replace("\n    ", "\n        ").replacen("    ", "        ", 1);
    let what = &w.what;
    let header = |kind: &str, api: &str| {
        format!(
            "# Generated by tenantmesh onboarding for tenant {tenant} (tier {tier}): {what}; do not edit;\n\
             # removed when the tenant leaves the silo model.\napiVersion: {api}\nkind: {kind}\nmetadata:\n  \
             name: {name}\n  namespace: {ns}\n  labels:\n{labels}"
        )
    };
    let role = config
        .role_arn
        .as_deref()
        .map(|arn| format!("  annotations:\n    eks.amazonaws.com/role-arn: {arn}\n"))
        .unwrap_or_default();
    let image = w.image;
    let container = w.container;
    let command = if w.command.is_empty() {
        String::new()
    } else {
        let words: Vec<String> = w.command.iter().map(|c| yaml_string(c)).collect();
        format!("          command: [{}]\n", words.join(", "))
    };
    let env_from: String = w
        .config_maps
        .iter()
        .map(|(map, optional)| {
            let optional = if *optional { "\n                optional: true" } else { "" };
            format!("            - configMapRef:\n                name: {map}{optional}\n")
        })
        .collect();
    let env: String = w
        .env
        .iter()
        .map(|(var, value)| match value {
            Env::Value(v) => format!("            - name: {var}\n              value: {}\n", yaml_string(v)),
            Env::Secret(key) => format!(
                "            - name: {var}\n              valueFrom:\n                secretKeyRef:\n                  \
                 name: tenantmesh-secrets\n                  key: {key}\n"
            ),
        })
        .collect();
    let callers: String = w
        .callers
        .iter()
        .map(|c| {
            format!(
                "        - podSelector:\n            matchLabels:\n              app.kubernetes.io/component: {c}\n"
            )
        })
        .collect();
    let calls: String = w
        .calls
        .iter()
        .map(|(c, p)| {
            format!(
                "    - to:\n        - podSelector:\n            matchLabels:\n              \
                 app.kubernetes.io/component: {c}\n      ports:\n        - port: {p}\n          protocol: TCP\n"
            )
        })
        .collect();
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
                 type: RuntimeDefault\n      containers:\n        - name: {container}\n          image: {image}\n\
                 {command}          envFrom:\n{env_from}          env:\n{env}          ports:\n            - name: grpc\n              \
                 containerPort: {port}\n          readinessProbe:\n            grpc:\n              \
                 port: {port}\n            periodSeconds: 5\n          livenessProbe:\n            grpc:\n              \
                 port: {port}\n            initialDelaySeconds: 10\n            periodSeconds: 10\n          \
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
                "{}spec:\n  selector:\n{}  ports:\n    - name: grpc\n      port: {port}\n      \
                 targetPort: grpc\n      appProtocol: grpc\n",
                header("Service", "v1"),
                selector.replace("      ", "    ")
            ),
        ),
        (
            "networkpolicy.yaml",
            format!(
                "{}spec:\n  podSelector:\n    matchLabels:\n{selector}  policyTypes: [\"Ingress\", \"Egress\"]\n  \
                 # Only the shared instance (which forwards the tenant's calls) and\n  \
                 # onboarding (which runs the tenant's lifecycle there) call it.\n  \
                 ingress:\n    - from:\n{callers}      ports:\n        - port: {port}\n          \
                 protocol: TCP\n  # It calls the mesh's services it needs, DNS, the collector\n  \
                 # and, on DynamoDB, the AWS APIs over HTTPS.\n  egress:\n{calls}    - to:\n        \
                 - namespaceSelector: {{}}\n          podSelector:\n            \
                 matchLabels:\n              k8s-app: kube-dns\n      ports:\n        - port: 53\n          \
                 protocol: UDP\n        - port: 53\n          protocol: TCP\n    - to:\n        - namespaceSelector: {{}}\n      \
                 ports:\n        - port: 4317\n          protocol: TCP\n    - ports:\n        - port: 443\n          protocol: TCP\n",
                header("NetworkPolicy", "networking.k8s.io/v1")
            ),
        ),
    ]
}

/// The manifests of `tenant`'s data-service instance: file name and YAML.
pub fn manifests(config: &GitOpsConfig, tenant: &str, tier: &str) -> Vec<(&'static str, String)> {
    let workload = Workload {
        name: instance_name(tenant),
        component: "silo-data".into(),
        container: "data",
        image: &config.image,
        command: &["tenantmesh-data".to_owned()],
        port: SILO_PORT,
        config_maps: vec![("tenantmesh-config".into(), false)],
        env: vec![
            ("TENANTMESH_LISTEN_ADDR", Env::Value(format!("0.0.0.0:{SILO_PORT}"))),
            ("TENANTMESH_SILO_TENANT", Env::Value(tenant.to_owned())),
        ],
        callers: vec!["data".into(), "onboarding".into()],
        calls: &[("auth", 50052), ("tenant-registry", 50051)],
        what: "its data-service instance".into(),
    };
    render(config, &workload, tenant, tier)
}

/// The port of an application service's instances: its shared instance's
/// (from the endpoint it registered), else [`DEFAULT_SERVICE_PORT`].
fn service_port(endpoint: &str) -> u16 {
    endpoint.parse::<tonic::codegen::http::Uri>().ok().and_then(|u| u.port_u16()).unwrap_or(DEFAULT_SERVICE_PORT)
}

/// The port of an application service whose endpoint names none.
pub const DEFAULT_SERVICE_PORT: u16 = 50060;

/// The manifests of `service`'s instance of `tenant` (from the image and
/// command it registered): its settings from the ConfigMaps
/// `tenantmesh-config` and `<service>-config` (optional), its identity's
/// secret from the key `<service>-client-secret` of `tenantmesh-secrets`,
/// called by the shared instance's pods (component `<service>`) and
/// onboarding.
pub fn service_manifests(
    config: &GitOpsConfig,
    service: &ApplicationService,
    tenant: &str,
    tier: &str,
) -> Vec<(&'static str, String)> {
    let name = service_instance_name(&service.name, tenant);
    let port = service_port(&service.endpoint);
    let workload = Workload {
        component: format!("silo-{}", service.name),
        container: &service.name,
        image: &service.image,
        command: &service.command,
        port,
        config_maps: vec![("tenantmesh-config".into(), false), (format!("{}-config", service.name), true)],
        env: vec![
            ("TENANTMESH_LISTEN_ADDR", Env::Value(format!("0.0.0.0:{port}"))),
            ("TENANTMESH_ADVERTISE_URL", Env::Value(service_endpoint(config, &service.name, tenant, port))),
            ("TENANTMESH_SILO_TENANT", Env::Value(tenant.to_owned())),
            ("TENANTMESH_SILO_INSTANCES", Env::Value("false".into())),
            ("TENANTMESH_SERVICE_CLIENT_ID", Env::Value(service.name.clone())),
            ("TENANTMESH_SERVICE_CLIENT_SECRET", Env::Secret(format!("{}-client-secret", service.name))),
        ],
        callers: vec![service.name.clone(), "onboarding".into()],
        calls: &[("auth", 50052), ("tenant-registry", 50051), ("data", 50054)],
        what: format!("its instance of {}", service.name),
        name,
    };
    render(config, &workload, tenant, tier)
}

/// Where `service`'s instance of `tenant` is reached.
fn service_endpoint(config: &GitOpsConfig, service: &str, tenant: &str, port: u16) -> String {
    config
        .service_endpoint_template
        .replace("{tenant}", tenant)
        .replace("{service}", service)
        .replace("{name}", &service_instance_name(service, tenant))
        .replace("{namespace}", &config.namespace)
        .replace("{port}", &port.to_string())
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

    /// `<path>/<tenant>/<service>` relative to the working tree: a
    /// service's instance beside the tenant's data-service instance.
    pub fn service_dir(&self, service: &str, tenant: &str) -> String {
        format!("{}/{tenant}/{service}", self.config.path)
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

/// Writes `files` into `abs` (only those that differ) and removes any
/// other file there (an older layout, a stray file); subdirectories stay.
fn write_files(abs: &Path, files: &[(&'static str, String)]) -> Result<(), String> {
    std::fs::create_dir_all(abs).map_err(|e| format!("{}: {e}", abs.display()))?;
    for (file, text) in files {
        write_if_changed(&abs.join(file), text)?;
    }
    for entry in std::fs::read_dir(abs).map_err(|e| format!("{}: {e}", abs.display()))?.flatten() {
        let name = entry.file_name();
        if entry.file_type().is_ok_and(|t| t.is_file()) && !files.iter().any(|(f, _)| name.to_str() == Some(f)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Removes `abs` and everything in it, if it is there.
fn remove_dir(abs: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(abs) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", abs.display())),
    }
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
        write_files(&self.config.repo.join(&dir), &manifests(&self.config, tenant_id, tier))?;
        let committed =
            self.commit(&dir, &format!("silo tenant {tenant_id}: data-service instance (tier {tier})")).await?;
        tracing::info!(silo_tenant = tenant_id, dir = %dir, committed, "silo instance manifests in git");
        drop(_one);
        let endpoint = self.endpoint(tenant_id);
        wait_serving(&endpoint, self.config.ready_timeout).await?;
        Ok(endpoint)
    }

    /// The data-service instance's files go; the tenant's instances of
    /// application services (subdirectories) are their own steps' to remove.
    async fn deprovision(&self, tenant_id: &str) -> Result<(), String> {
        let _one = self.lock.lock().await;
        self.pull().await?;
        let dir = self.tenant_dir(tenant_id);
        let abs = self.config.repo.join(&dir);
        if let Ok(entries) = std::fs::read_dir(&abs) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    std::fs::remove_file(entry.path()).map_err(|e| format!("{}: {e}", entry.path().display()))?;
                }
            }
            // Empty now (no application service's instance left): gone.
            let _ = std::fs::remove_dir(&abs);
        }
        let committed = self.commit(&dir, &format!("silo tenant {tenant_id}: remove data-service instance")).await?;
        tracing::info!(silo_tenant = tenant_id, dir = %dir, committed, "silo instance manifests removed from git");
        Ok(())
    }

    /// From the image and command the service registered; `None` (the
    /// shared instance serves the tenant) when it registered no image.
    async fn provision_service(
        &self,
        service: &ApplicationService,
        tenant_id: &str,
        tier: &str,
    ) -> Result<Option<String>, String> {
        if service.image.is_empty() {
            tracing::info!(
                service = %service.name,
                silo_tenant = tenant_id,
                "the service registered no image (TENANTMESH_SERVICE_IMAGE): no instance of its own is started"
            );
            return Ok(None);
        }
        if !is_label_value(tenant_id) || !is_label_value(tier) {
            return Err(format!("tenant {tenant_id:?} or tier {tier:?} is not a valid Kubernetes label value"));
        }
        let _one = self.lock.lock().await;
        self.pull().await?;
        let dir = self.service_dir(&service.name, tenant_id);
        write_files(&self.config.repo.join(&dir), &service_manifests(&self.config, service, tenant_id, tier))?;
        let message = format!("silo tenant {tenant_id}: {} instance (tier {tier}, {})", service.name, service.image);
        let committed = self.commit(&dir, &message).await?;
        tracing::info!(service = %service.name, silo_tenant = tenant_id, dir = %dir, committed, "silo instance manifests in git");
        drop(_one);
        let endpoint = service_endpoint(&self.config, &service.name, tenant_id, service_port(&service.endpoint));
        wait_serving(&endpoint, self.config.ready_timeout).await?;
        Ok(Some(endpoint))
    }

    async fn deprovision_service(&self, service: &str, tenant_id: &str) -> Result<(), String> {
        let _one = self.lock.lock().await;
        self.pull().await?;
        let dir = self.service_dir(service, tenant_id);
        remove_dir(&self.config.repo.join(&dir))?;
        let committed = self.commit(&dir, &format!("silo tenant {tenant_id}: remove {service} instance")).await?;
        // The tenant's directory goes with its last instance.
        let _ = std::fs::remove_dir(self.config.repo.join(self.tenant_dir(tenant_id)));
        tracing::info!(%service, silo_tenant = tenant_id, dir = %dir, committed, "silo instance manifests removed from git");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
