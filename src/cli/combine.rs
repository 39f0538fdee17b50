use clap::Args as ClapArgs;
use postforge::check;
use postforge::peft::combine::{combine, AdapterSet, Combination, CombineOptions, SignMethod};
use postforge::peft::formats::lora_file::LoraFormat;
use std::path::PathBuf;

/// PEFT's `add_weighted_adapter`, on adapters on disk: PEFT folders (text models) or single LoRA
/// files (kohya / diffusers, image models), e.g. a style and a subject LoRA.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Adapters: PEFT folders or LoRA files, all of one kind.
    #[arg(required = true, num_args = 1..)]
    adapters: Vec<PathBuf>,
    /// One finite weight per adapter, comma-separated; negative weights subtract an adapter
    /// (PEFT's task negation) [default: 1 each].
    #[arg(long, num_args = 1.., value_delimiter = ',', value_parser = check::finite)]
    weights: Vec<f64>,
    /// cat (exact), svd, linear, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd,
    /// dare_ties_svd, magnitude_prune, magnitude_prune_svd.
    #[arg(long, value_enum, default_value_t = Combination::Svd)]
    combination_type: Combination,
    /// Rank of the SVD variants, ≥ 1 (default: the largest input rank).
    #[arg(long, value_parser = check::count)]
    svd_rank: Option<usize>,
    /// Clamp SVD factors at this quantile of their entries, in (0.5, 1] (below the median the
    /// clamp bound would be negative).
    #[arg(long, value_parser = |s: &str| check::parse_in(s, SVD_CLAMP))]
    svd_clamp: Option<f64>,
    /// Share of entries kept by TIES, DARE and magnitude pruning, in (0, 1] (0 would keep nothing).
    #[arg(long, value_parser = check::fraction)]
    density: Option<f64>,
    /// TIES' majority sign: total or frequency.
    #[arg(long, value_enum, default_value_t = SignMethod::Total)]
    majority_sign_method: SignMethod,
    /// Seed of DARE's random masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output: a PEFT folder for PEFT inputs, else a LoRA file.
    #[arg(long)]
    out: PathBuf,
    /// Format of an output LoRA file (default: that of the first input).
    #[arg(long, value_enum)]
    to: Option<LoraFormat>,
}

/// `--svd-clamp`: a quantile above the median, so that the clamp bound is positive.
const SVD_CLAMP: check::Range = check::Range::open_closed(0.5, 1.0);

pub fn run(a: Args) -> anyhow::Result<()> {
    let weights = if a.weights.is_empty() {
        vec![1.0; a.adapters.len()]
    } else {
        a.weights.clone()
    };
    if weights.len() != a.adapters.len() {
        anyhow::bail!(
            "--weights: {} weights for {} adapters",
            weights.len(),
            a.adapters.len()
        );
    }
    let inputs = a
        .adapters
        .iter()
        .zip(&weights)
        .map(|(p, w)| Ok((AdapterSet::read(p)?, *w)))
        .collect::<postforge::Result<Vec<_>>>()?;
    let opts = CombineOptions {
        combination: a.combination_type,
        svd_rank: a.svd_rank,
        svd_clamp: a.svd_clamp,
        density: a.density,
        majority_sign_method: a.majority_sign_method,
        seed: a.seed,
    };
    let out = combine(&inputs, &opts)?;
    out.write(&a.out, a.to)?;
    let rank = out.modules.values().map(|m| m.rank()).max().unwrap_or(0);
    println!(
        "combined {} adapters ({:?}) over {} modules at rank {rank}: wrote {}",
        inputs.len(),
        a.combination_type,
        out.modules.len(),
        a.out.display()
    );
    Ok(())
}
