//! Live reconfiguration (config file changes, SIGHUP). Filled in by the config issue.

use std::sync::Arc;

use crate::config::RunArgs;
use crate::server::Shared;

/// Watches for configuration changes until stopped.
pub struct Reloader {
    _shared: Arc<Shared>,
}

impl Reloader {
    pub fn start(shared: &Arc<Shared>, _args: RunArgs) -> Reloader {
        Reloader {
            _shared: shared.clone(),
        }
    }

    pub async fn stop(self) {}
}
