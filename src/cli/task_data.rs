use clap::Args as ClapArgs;
use postforge::check;
use postforge::data::tasks::{corpus, TaskKind};
use postforge::text::tiny_chat::world;
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Comma-separated tasks: add, copy, sort, reverse, fact, max, subtract.
    #[arg(long, default_value = "add,copy,sort,reverse,fact")]
    tasks: String,
    /// Write preference pairs instead (right vs wrong, concise vs padded, refusal vs compliance),
    /// and with --chosen-only the chosen answers as prompt-completion SFT data.
    #[arg(long)]
    preferences: bool,
    /// With --preferences: a harder set on --tasks, the right answer over a near miss (a number off
    /// by one or ten, two neighbouring words swapped, another country's fact of the same kind).
    #[arg(long = "near-miss")]
    near_miss: bool,
    /// With --preferences: only the chosen completions, as SFT data.
    #[arg(long)]
    chosen_only: bool,
    /// Examples, ≥ 1.
    #[arg(long, default_value_t = 1000, value_parser = check::count)]
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
        .map(|t| {
            TaskKind::parse(t.trim()).ok_or_else(|| anyhow::anyhow!("--tasks: unknown task `{t}`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if a.preferences {
        let v = if a.near_miss {
            postforge::text::tiny_chat::near_miss_set(&kinds, a.n, a.seed)
        } else {
            postforge::text::tiny_chat::preference_set(a.n, a.seed)
        };
        let body: String = v
            .iter()
            .map(|x| {
                if a.chosen_only {
                    format!(
                        "{}\n",
                        serde_json::json!({"prompt": x["prompt"], "completion": x["chosen"]})
                    )
                } else {
                    format!("{x}\n")
                }
            })
            .collect();
        postforge::util::write_atomic(&a.out, body.as_bytes())?;
        println!(
            "wrote {} preference examples to {}",
            v.len(),
            a.out.display()
        );
        return Ok(());
    }
    let ex = corpus(&kinds, a.n, &world(), a.seed);
    let body: String = ex.iter().map(|e| format!("{}\n", e.to_json())).collect();
    postforge::util::write_atomic(&a.out, body.as_bytes())?;
    println!("wrote {} examples to {}", ex.len(), a.out.display());
    Ok(())
}
