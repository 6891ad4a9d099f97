//! The engine's `tracing` events on stderr when `SMOL_LOG` (or `RUST_LOG`) is set, e.g.
//! `SMOL_LOG=smolmachines=debug node app.js`. Installed when the addon loads; nothing is logged
//! (and nothing costs) without it.

/// Installs the stderr subscriber if `SMOL_LOG` / `RUST_LOG` asks for one.
pub(crate) fn init_from_env() {
    use tracing_subscriber::EnvFilter;
    let Some(spec) = smolmachines::log_filter_from_env() else {
        return;
    };
    let filter = match EnvFilter::try_new(&spec) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "smolmachines: SMOL_LOG={spec:?} is not a log filter ({e}); logging warnings"
            );
            EnvFilter::new("warn")
        }
    };
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    if let Err(e) = installed {
        eprintln!("smolmachines: SMOL_LOG is set but another log subscriber is installed: {e}");
    }
}

#[napi_derive::module_init]
fn init() {
    init_from_env();
}
