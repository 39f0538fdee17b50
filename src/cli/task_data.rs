use clap::Args as ClapArgs;
use postforge::align::tiny_chat::world;
use postforge::data::tasks::{corpus, TaskKind};
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Comma-separated tasks: add, copy, sort, reverse, fact, max, subtract.
    #[arg(long)]
    tasks: String,
    /// Examples.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output JSONL (TRL conversational prompt-completion).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let kinds = a
        .tasks
        .split(',')
        .map(|t| TaskKind::parse(t.trim()).ok_or_else(|| anyhow::anyhow!("unknown task `{t}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ex = corpus(&kinds, a.n, &world(), a.seed);
    let body: String = ex.iter().map(|e| format!("{}\n", e.to_json())).collect();
    postforge::util::write_atomic(&a.out, body.as_bytes())?;
    println!("wrote {} examples to {}", ex.len(), a.out.display());
    Ok(())
}
