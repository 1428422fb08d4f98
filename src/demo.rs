//! `lifeguard demo` (written once the simulator lands).

use std::process::ExitCode;

use crate::config::{DemoArgs, RunArgs};

pub async fn run(_args: RunArgs, _demo: DemoArgs) -> ExitCode {
    eprintln!("demo: not yet");
    ExitCode::from(1)
}
