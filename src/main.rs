//! `lifeguard`: parse the command line, start tracing, run the library.

use std::process::ExitCode;

use clap::Parser;
use lifeguard::config::{Cli, Command, RunArgs, Settings, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_USAGE as u8),
            };
        }
    };
    match cli.command {
        Some(Command::CheckConfig) => check_config(&cli.run),
        Some(Command::Health(h)) => lifeguard::cli::health(&cli.run, &h),
        Some(Command::Status(st)) => lifeguard::cli::status(&cli.run, &st),
        Some(Command::Demo(d)) => {
            let _log = lifeguard::cli::init_tracing(cli.run.log_format.unwrap_or_default());
            runtime().block_on(lifeguard::demo::run(cli.run, d))
        }
        None => {
            let (settings, source) = match Settings::load_with_source(&cli.run) {
                Ok(s) => s,
                Err(e) => {
                    for p in e.problems() {
                        eprintln!("lifeguard: {p}");
                    }
                    return ExitCode::from(EXIT_USAGE as u8);
                }
            };
            let _log = lifeguard::cli::init_tracing(settings.log_format);
            runtime().block_on(lifeguard::app::serve(
                cli.run,
                settings,
                source,
                release_memory(),
            ))
        }
    }
}

fn check_config(args: &RunArgs) -> ExitCode {
    match Settings::load(args) {
        Ok(s) => {
            print!("{}", s.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            // One line per problem.
            for p in e.problems() {
                eprintln!("lifeguard: {p}");
            }
            ExitCode::from(EXIT_USAGE as u8)
        }
    }
}

/// glibc keeps freed heap mapped; `malloc_trim` returns it (other allocators: nothing).
fn release_memory() -> Option<fn()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        fn trim() {
            // SAFETY: malloc_trim takes no pointers and is thread-safe.
            unsafe {
                libc::malloc_trim(0);
            }
        }
        Some(trim)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lifeguard: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}
