use clap::Args as ClapArgs;
use postforge::check;
use postforge::data::tasks::TaskKind;
use postforge::data::text::TextTokenizer;
use postforge::text::eval::{evaluate_run, sets, table};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The base model folder the runs started from.
    #[arg(long, default_value = "assets/models/tiny-chat")]
    model: PathBuf,
    /// Training run folders (each with adapter/ and run_report.json).
    #[arg(long, num_args = 1.., required = true)]
    runs: Vec<PathBuf>,
    /// Held-out preference pairs.
    #[arg(long, default_value = "assets/data/chat/prefs-eval.jsonl")]
    pairs: PathBuf,
    /// Tasks asked for the generation accuracy.
    #[arg(long, default_value = "add,copy,sort,reverse,fact")]
    tasks: String,
    /// Questions per task, ≥ 1.
    #[arg(long, default_value_t = 20, value_parser = check::count)]
    per_task: usize,
    /// General reference text for perplexity.
    #[arg(long, default_value = "assets/data/chat/general.jsonl")]
    reference: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the table here (Markdown).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let tok = TextTokenizer::load(&a.model)?;
    let kinds = a
        .tasks
        .split(',')
        .map(|t| {
            TaskKind::parse(t.trim()).ok_or_else(|| anyhow::anyhow!("--tasks: unknown task `{t}`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let s = sets(
        &tok,
        &a.pairs,
        &kinds,
        a.per_task,
        Some(&a.reference),
        a.seed,
    )?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new((2 * a.runs.len() * s.questions.len()) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut rows = vec![];
    for r in &a.runs {
        rows.push(evaluate_run(r, &a.model, &s, &bar)?);
    }
    bar.finish_and_clear();
    let t = table(&rows);
    print!("{t}");
    if let Some(o) = &a.out {
        postforge::util::write_atomic(o, t.as_bytes())?;
    }
    Ok(())
}
