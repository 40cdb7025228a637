//! Records the git revision and the compiler version for `autotuner_build_info`.

use std::process::Command;

fn main() {
    let revision = output("git", &["rev-parse", "--short=12", "HEAD"]);
    println!("cargo:rustc-env=AUTOTUNER_REVISION={revision}");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version = output(&rustc, &["--version"]);
    // `rustc 1.95.0 (59807616e 2026-04-14)` → `1.95.0`
    let version = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("unknown")
        .to_owned();
    println!("cargo:rustc-env=AUTOTUNER_RUSTC_VERSION={version}");
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
