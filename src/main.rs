//! The binary edge: parses the command line, sets up logging, runs the exporter or a one-off
//! command, and turns the outcome into an exit code (0 success, 1 failure, 2 usage error).
//!
//! Uses `settings` and `app`; `anyhow` is allowed here and in `app.rs` only.

use std::process::ExitCode;

use autotuner::settings::{
    CheckCommand, Cli, Command, Config, LogFormat, RunFlags, Settings, TestCommand,
};
use clap::Parser as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// mimalloc rather than glibc's malloc: a rule tick allocates many small, short-lived
/// buffers, and glibc's free-list upkeep was a fifth of a tick's time (see README,
/// "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check {
            what: CheckCommand::Config { files },
        }) => check_config(&files),
        Some(Command::Check {
            what: CheckCommand::Rules { config, files },
        }) => check_rules(config.as_deref(), &files),
        Some(Command::Test {
            what: TestCommand::Rules { files },
        }) => test_rules(&files),
        None => run(&cli.run),
    }
}

/// `autotuner check config FILE...`, in the promtool style: one line per file, every error.
fn check_config(files: &[std::path::PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        match Config::load(file) {
            Ok(_) => println!("{}: OK", file.display()),
            Err(err) => {
                failed = true;
                eprintln!("{err}");
                eprintln!("{}: FAILED", file.display());
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `autotuner check rules [--config.file FILE] FILE...`, in the promtool style: every error of
/// every file, then the warnings; exit 1 if there was any error. Given the configuration, a
/// knob action naming a knob it does not declare is an error, and so is a group naming a
/// source it does not declare.
fn check_rules(config: Option<&std::path::Path>, files: &[std::path::PathBuf]) -> ExitCode {
    let mut loaded = autotuner::rules::compile::load_files(files);
    if let Some(path) = config {
        match Config::load(path) {
            Ok(c) => {
                let declared = c.knobs.iter().map(|k| k.name.clone()).collect();
                loaded
                    .errors
                    .extend(autotuner::rules::compile::undeclared_knobs(
                        &loaded.rules,
                        &declared,
                    ));
                let sources = c.sources.iter().map(|s| s.name.clone()).collect();
                loaded
                    .errors
                    .extend(autotuner::rules::compile::undeclared_sources(
                        &loaded.rules,
                        &sources,
                    ));
            }
            Err(err) => {
                eprintln!("{err}");
                eprintln!("{}: FAILED (the configuration)", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    for file in files {
        println!("Checking {}", file.display());
        let errors: Vec<_> = loaded.errors.iter().filter(|p| &p.file == file).collect();
        if errors.is_empty() {
            let n = loaded.rules.iter().filter(|r| &r.source == file).count();
            println!("  SUCCESS: {n} rules found");
        } else {
            println!("  FAILED:");
            for e in errors {
                eprintln!("{e}");
            }
        }
        for w in loaded.warnings.iter().filter(|p| &p.file == file) {
            eprintln!("warning: {w}");
        }
    }
    if loaded.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `autotuner test rules FILE...`, in the promtool style.
fn test_rules(files: &[std::path::PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        println!("Unit Testing:  {}", file.display());
        let failures = autotuner::rules::unit::run_file(file);
        if failures.is_empty() {
            println!("  SUCCESS");
        } else {
            failed = true;
            println!("  FAILED:");
            for f in failures {
                println!("    {f}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run(flags: &RunFlags) -> ExitCode {
    init_logging(flags);
    let settings = match Settings::from_flags(flags) {
        Ok(s) => s,
        Err(err) => {
            // Every line of a multi-error message is kept: operators fix them all at once.
            for line in err.to_string().lines() {
                tracing::error!("{line}");
            }
            tracing::error!("invalid settings; not starting");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        // Two workers are plenty for scrapes and collectors, and keep our footprint small on
        // the database host we share.
        .worker_threads(2)
        .thread_name("autotuner")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!(error = %err, "starting the async runtime failed");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        revision = env!("AUTOTUNER_REVISION"),
        "starting autotuner"
    );
    let result = runtime.block_on(autotuner::app::run(settings));
    // Blocking work stuck in the kernel (statvfs on a dead mount) would otherwise hold the exit
    // forever: the grace period is over, so leave it behind.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "autotuner failed");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to standard error, so standard output stays clean for commands that print results.
fn init_logging(flags: &RunFlags) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(flags.log_level.as_filter()));
    let registry = tracing_subscriber::registry().with(filter);
    match flags.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Logfmt => registry
            .with(
                tracing_logfmt::builder()
                    .layer()
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}
