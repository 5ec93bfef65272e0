//! `tributary-proxy --bootstrap FILE`: reads the bootstrap, builds the runtime it asks
//! for (one worker: a current-thread runtime), starts the proxy, runs until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tributary_proxy::bootstrap::Bootstrap;

#[derive(Debug, Parser)]
#[command(
    name = "tributary-proxy",
    about = "The Tributary proxy: a data plane driven by the hub's xDS"
)]
struct Args {
    /// The bootstrap file (YAML; see docs/proxy.md).
    #[arg(long)]
    bootstrap: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let b = Bootstrap::load(&args.bootstrap)?;
    tracing::info!(node = %b.node.id, environment = %b.node.environment, xds = %b.xds.address, protocol = ?b.xds.protocol, mtls = b.tls.is_some(), workers = b.workers, "starting");
    let runtime = if b.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(b.workers)
            .enable_all()
            .build()?
    };
    runtime.block_on(async move {
        let admin = b.admin.address;
        let proxy = tributary_proxy::Proxy::start(b)
            .await
            .with_context(|| format!("binding the admin endpoint {admin}"))?;
        tracing::info!(admin = %proxy.admin_addr, "admin endpoint listening");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        Ok(())
    })
}
