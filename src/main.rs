//! The `postforge` command line: parses arguments and hands over to `cli`.

mod cli;

use clap::FromArgMatches;

fn main() {
    postforge::util::runtime::init();
    // Quiet unless asked: RUST_LOG=postforge=debug shows where a fused path was not taken.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // kohya writes flags with underscores (`--network_dim`); accept them beside `--network-dim`.
    let argv = std::env::args_os().map(|a| match a.to_str() {
        Some(s) if s.starts_with("--") => {
            let (flag, rest) = s.split_once('=').map_or((s, None), |(f, r)| (f, Some(r)));
            let flag = flag.replace('_', "-");
            std::ffi::OsString::from(match rest {
                Some(r) => format!("{flag}={r}"),
                None => flag,
            })
        }
        _ => a,
    });
    let matches = cli::command().get_matches_from(argv);
    let args = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The command runs on a worker of the CPU thread pool (see `run_on_pool`).
    let result = postforge::util::runtime::run_on_pool(|| cli::run(args, &matches));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
