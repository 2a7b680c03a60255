//! The kubemoe operator: turns `ModelDeployment`s into router and worker workloads.
//!
//! Layers, innermost first: [`deployment`] (the `ModelDeployment` custom resource), [`spec`]
//! (what a spec means for a model: its source, its expert layout through
//! `kubemoe_placement::layout`, the settings not built yet), [`desired`] (→ the owned objects,
//! pure), [`status`] (observations → status, pure), [`controller`] (the async reconcile loop
//! around them), [`rebalancer`] (next to the controller, the rebalance loop of
//! `kubemoe_placement::rebalance` for every deployment, recording in the apiserver), [`leader`]
//! (one active replica), [`http`] (metrics and health). [`render`] prints the same objects
//! offline.

pub mod controller;
pub mod deployment;
pub mod desired;
pub mod http;
pub mod leader;
pub mod loading;
pub mod rebalancer;
pub mod render;
pub mod schema;
pub mod spec;
pub mod status;

pub use deployment::{ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus};

use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The one server-side-apply field manager (and `app.kubernetes.io/managed-by` value).
pub const FIELD_MANAGER: &str = "kubemoe-operator";

/// The image router and worker pods run when neither the spec nor the operator names one.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/kubemoe/kubemoe:", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Placement(#[from] kubemoe_placement::Error),
    #[error("Kubernetes API: {action}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot encode {what}")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot parse YAML in {origin}")]
    Yaml {
        origin: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("cannot write YAML")]
    WriteYaml(#[source] serde_yaml::Error),
    #[error("{origin}: {message}")]
    Manifest { origin: String, message: String },
    #[error("ModelDeployment {name} cannot be served ({reason}): {message}")]
    Invalid { name: String, reason: String, message: String },
    #[error("cannot serve metrics and health on {addr}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the leader lease {lease}: another replica may be reconciling")]
    LeaseLost { lease: String },
    #[error("cannot listen for shutdown signals")]
    Signals(#[source] std::io::Error),
    /// The internal token of a deployment cannot be made or used.
    #[error("internal token {name}: {reason}")]
    Token { name: String, reason: String },
    /// The TLS Secret of a deployment (`spec.tls.secretName`) cannot be used.
    #[error("TLS Secret {name}: {reason}")]
    Tls { name: String, reason: String },
}

impl Error {
    /// The Kubernetes API refused a write made from an outdated read (409 Conflict).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube { source: kube::Error::Api(status), .. } if status.is_conflict())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The CustomResourceDefinitions the operator serves, as the YAML `crds/` holds.
pub fn crd_yaml() -> Result<String> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&deployment::ModelDeployment::crd()).map_err(Error::WriteYaml)
}

/// Settings of a running operator.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub http_addr: SocketAddr,
    /// Image of router and worker pods when a spec names none.
    pub image: String,
    /// The Lease that elects the active replica.
    pub lease: leader::LeaseConfig,
}

/// Runs the operator until SIGTERM or Ctrl-C: health and metrics at once, the controller and
/// the rebalancer while this replica holds the lease. Losing the lease is an error (the process exits and
/// restarts as a standby) because a replica that no longer leads must stop writing.
pub async fn run(options: RunOptions) -> Result<()> {
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signals(shutdown.clone()));
    let result = run_until(options, shutdown.clone()).await;
    shutdown.cancel();
    signals.abort();
    result
}

async fn cancel_on_signals(shutdown: CancellationToken) -> Result<()> {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(Error::Signals)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = shutdown.cancelled() => {}
    }
    shutdown.cancel();
    Ok(())
}

async fn run_until(options: RunOptions, shutdown: CancellationToken) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .map_err(|source| Error::Kube { action: "connecting (kubeconfig or in-cluster)".into(), source })?;
    let metrics = std::sync::Arc::new(http::Metrics::default());
    let server = http::serve(options.http_addr, metrics.clone(), shutdown.clone()).await?;

    let elector = leader::Elector::new(client.clone(), options.lease.clone());
    if !elector.acquire(&metrics, &shutdown).await? {
        return server.await.unwrap_or(Ok(()));
    }
    tracing::info!(identity = %options.lease.identity, "leading; starting the controller and the rebalancer");
    let controller = controller::controller(&client);
    let deployments = controller.store();
    // The lease lives in the operator's own namespace (its POD_NAMESPACE).
    let namespace = options.lease.namespace.clone();
    let context = controller::Context::new(client, options.image, namespace, metrics.clone());
    let work = async {
        tokio::join!(
            controller::run(controller, context.clone(), shutdown.clone()),
            rebalancer::run(context.clone(), deployments.clone(), shutdown.clone()),
            loading::run(context, deployments, shutdown.clone()),
        )
    };
    let result = tokio::select! {
        lost = elector.hold(&metrics, &shutdown) => lost,
        _ = work => Ok(()),
    };
    metrics.leader.set(0);
    shutdown.cancel();
    let served = tokio::time::timeout(Duration::from_secs(5), server).await;
    result?;
    match served {
        Ok(Ok(result)) => result,
        // The server task panicked or did not stop in time; the process is exiting anyway.
        Ok(Err(_)) | Err(_) => Ok(()),
    }
}
