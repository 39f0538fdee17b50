use anyhow::Context;
use clap::{Args as ClapArgs, ValueEnum};
use postforge::check;
use postforge::diffusion::objective::TimestepSampling;
use postforge::diffusion::pipeline::Pipeline;
use postforge::diffusion::tiny_sd::{self, PretrainTask};
use postforge::media::grid::{render, GridLabels};
use postforge::media::image::write_png;
use postforge::models::llama::LlamaForCausalLM;
use postforge::models::Weights;
use postforge::peft::{Adapted, AdapterPlan};
use postforge::text::sft::{MonitorConfig, SftTask};
use postforge::text::tiny_chat::{self as tc, accuracy, pretraining_data, rows, train_tokenizer};
use postforge::train::ema::EmaConfig;
use postforge::train::{ScheduleKind, TrainConfig, Trainer};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Which {
    /// Pixel-space 32x32 text-to-image pipeline on procedural shapes.
    TinySd,
    /// Llama-architecture chat model on procedural instruction tasks.
    TinyChat,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Which embedded model.
    #[arg(value_enum)]
    which: Which,
    /// Optimizer steps, ≥ 1 [tiny-sd: 1500, tiny-chat: 1200].
    #[arg(long = "max-steps", value_parser = check::count)]
    pub max_steps: Option<usize>,
    /// Images (tiny-sd) or packed rows (tiny-chat) per step, ≥ 1 [16].
    #[arg(long = "batch-size", value_parser = check::count)]
    pub batch_size: Option<usize>,
    /// Peak learning rate, > 0 [tiny-sd: 1e-3, tiny-chat: 2e-3].
    #[arg(long = "learning-rate", value_parser = check::positive)]
    pub learning_rate: Option<f64>,
    /// tiny-chat: training examples, ≥ 1.
    #[arg(long, default_value_t = 40000, value_parser = check::count)]
    pub examples: usize,
    /// tiny-chat: tokenizer vocabulary, ≥ 1 (at least the 256 bytes and the special tokens are
    /// always kept).
    #[arg(long = "vocab-size", default_value_t = 768, value_parser = check::count)]
    pub vocab_size: usize,
    /// tiny-chat: held-out questions for the accuracy figure, ≥ 1.
    #[arg(long = "eval-examples", default_value_t = 250, value_parser = check::count)]
    pub eval_examples: usize,
    /// Size of the procedural corpus, ≥ 1.
    #[arg(long, default_value_t = 4000, value_parser = check::count)]
    images: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the model folder goes [assets/models/<name>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Training run folder (checkpoints, metrics, loss curve) [runs/pretrain-<name>].
    #[arg(long = "output-dir")]
    pub output_dir: Option<PathBuf>,
    /// Continue from the latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Prompts sampled for the adherence figure, ≥ 1.
    #[arg(long = "eval-prompts", default_value_t = 100, value_parser = check::count)]
    eval_prompts: usize,
    /// Sampling steps for the evaluation, ≥ 1 (at most the training timesteps).
    #[arg(long = "sample-steps", default_value_t = 25, value_parser = check::count)]
    sample_steps: usize,
    /// Start from this tiny-sd pipeline folder instead of fresh weights (continued pretraining).
    #[arg(long = "init-from")]
    init_from: Option<PathBuf>,
    /// tiny-sd: min-SNR-γ loss weighting (off by default: with ε-prediction it gives the low-noise
    /// timesteps almost no weight, which leaves residual grain in samples of a model trained from scratch);
    /// γ > 0 (5 is the usual choice).
    #[arg(long = "min-snr-gamma", value_parser = check::positive)]
    min_snr_gamma: Option<f64>,
    /// tiny-sd: train v-prediction (written into the scheduler config) instead of ε.
    #[arg(long = "v-parameterization")]
    v_parameterization: bool,
    /// tiny-sd: rescale the betas to zero terminal SNR (with --v-parameterization; written into
    /// the scheduler config).
    #[arg(long = "zero-terminal-snr")]
    zero_terminal_snr: bool,
    /// tiny-sd: diffusers' timestep bias (none, earlier, later, range).
    #[arg(long = "timestep-bias-strategy", default_value = "none")]
    timestep_bias_strategy: String,
    /// tiny-sd: weight factor of the biased timesteps, > 0.
    #[arg(long = "timestep-bias-multiplier", default_value_t = 1.0, value_parser = check::positive)]
    timestep_bias_multiplier: f64,
    /// tiny-sd: share of the timesteps biased by earlier / later, in [0, 1].
    #[arg(long = "timestep-bias-portion", default_value_t = 0.25, value_parser = check::unit)]
    timestep_bias_portion: f64,
    /// tiny-sd: first timestep biased by `range`.
    #[arg(long = "timestep-bias-begin", default_value_t = 0)]
    timestep_bias_begin: usize,
    /// tiny-sd: one past the last timestep biased by `range`.
    #[arg(long = "timestep-bias-end", default_value_t = 1000)]
    timestep_bias_end: usize,
    /// tiny-sd: keep an exponential moving average of the weights and write the pipeline with it
    /// (diffusers' `--use_ema`).
    #[arg(long = "use-ema")]
    use_ema: bool,
    /// tiny-sd: largest EMA decay, in [0, 1] (diffusers' default 0.9999; the decay warms up as
    /// (1+k)/(10+k)).
    #[arg(long = "ema-decay", default_value_t = 0.9999, value_parser = check::unit)]
    ema_decay: f64,
    /// tiny-sd: only evaluate the pipeline in --out (adherence, samples.png), no training.
    #[arg(long = "eval-only")]
    eval_only: bool,
    /// Classifier-free guidance for the evaluation, ≥ 0 (1 = no guidance).
    #[arg(long, default_value_t = 3.0, value_parser = check::non_negative)]
    guidance: f64,
    /// diffusers' guidance_rescale φ for the evaluation, in [0, 1] (0 = off).
    #[arg(long = "guidance-rescale", default_value_t = 0.0, value_parser = check::unit)]
    guidance_rescale: f64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if let Which::TinyChat = a.which {
        return run_tiny_chat(&a);
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("assets/models/tiny-sd"));
    let output_dir = a
        .output_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/pretrain-tiny-sd"));
    let max_steps = a.max_steps.unwrap_or(1500);
    let batch_size = a.batch_size.unwrap_or(16);
    let learning_rate = a.learning_rate.unwrap_or(1e-3);
    if a.eval_only {
        let mut p = Pipeline::load(&out, AdapterPlan::none(), AdapterPlan::none())
            .with_context(|| format!("loading {}", out.display()))?;
        p.guidance_rescale = a.guidance_rescale;
        evaluate(&a, &p, &out)?;
        return Ok(());
    }
    let mut task = PretrainTask::with_init(a.images, batch_size, a.seed, a.init_from.as_deref())?
        .with_min_snr_gamma(a.min_snr_gamma)
        .with_v_prediction(a.v_parameterization)
        .with_zero_terminal_snr(a.zero_terminal_snr)?
        .with_timestep_sampling(&TimestepSampling {
            bias_strategy: a.timestep_bias_strategy.clone(),
            bias_multiplier: a.timestep_bias_multiplier,
            bias_portion: a.timestep_bias_portion,
            bias_begin: a.timestep_bias_begin,
            bias_end: a.timestep_bias_end,
            ..Default::default()
        })?
        .with_ema(a.use_ema.then(|| EmaConfig {
            decay: a.ema_decay,
            ..Default::default()
        }))?;
    let trainer = Trainer::new(TrainConfig {
        learning_rate,
        lr_scheduler: ScheduleKind::Cosine,
        warmup_steps: (max_steps / 50).max(1),
        max_steps,
        max_grad_norm: Some(1.0),
        save_steps: 250,
        seed: a.seed,
        output_dir,
        overwrite_output_dir: !a.resume,
        ..Default::default()
    })?;
    let s = trainer.train(&mut task, a.resume)?;
    println!(
        "trained {} steps in {:.0}s: loss {:.4} -> {:.4}",
        s.steps, s.seconds, s.first_loss, s.last_loss
    );
    task.write_pipeline(&out)?;
    let mut p = Pipeline::load(&out, AdapterPlan::none(), AdapterPlan::none())
        .with_context(|| format!("reloading {}", out.display()))?;
    p.guidance_rescale = a.guidance_rescale;
    let (ok, pct) = evaluate(&a, &p, &out)?;
    let card = format!(
        "# tiny-sd\n\nA pixel-space (32x32 RGB) text-to-image pipeline in the diffusers folder layout (unet/, text_encoder/, tokenizer/, scheduler/, model_index.json), trained from scratch by postforge on procedurally generated captioned shapes (3 shapes x 6 colours x 5 positions x 3 backgrounds).\n\n- Command: `postforge pretrain tiny-sd --max-steps {} --batch-size {} --learning-rate {} --images {} --seed {}{}`\n- Steps: {} (loss {:.4} -> {:.4}, {:.0} s on this machine)\n- Prompt adherence: {ok}/{} = {pct:.1}% of sampled images show the prompted shape, colour and position (procedural detector, DDIM {} steps, CFG {})\n- Samples: samples.png\n",
        max_steps, batch_size, learning_rate, a.images, a.seed,
        a.init_from.as_ref().map(|p| format!(" --init-from {}", p.display())).unwrap_or_default()
            + &a.min_snr_gamma.map(|g| format!(" --min-snr-gamma {g}")).unwrap_or_default()
            + if a.v_parameterization { " --v-parameterization" } else { "" }
            + if a.zero_terminal_snr { " --zero-terminal-snr" } else { "" }
            + &if a.use_ema { format!(" --use-ema --ema-decay {}", a.ema_decay) } else { String::new() }
            + &if a.timestep_bias_strategy != "none" { format!(" --timestep-bias-strategy {} --timestep-bias-multiplier {} --timestep-bias-portion {} --timestep-bias-begin {} --timestep-bias-end {}", a.timestep_bias_strategy, a.timestep_bias_multiplier, a.timestep_bias_portion, a.timestep_bias_begin, a.timestep_bias_end) } else { String::new() }, s.steps, s.first_loss, s.last_loss, s.seconds, a.eval_prompts, a.sample_steps, a.guidance
    );
    postforge::util::write_atomic(&out.join("MODEL_CARD.md"), card.as_bytes())?;
    println!("wrote {} (MODEL_CARD.md, samples.png)", out.display());
    Ok(())
}

/// Samples the adherence prompts, prints the figures and writes `samples.png` into `out`.
fn evaluate(a: &Args, p: &Pipeline, out: &std::path::Path) -> anyhow::Result<(usize, f64)> {
    let (ok, hits, samples) = tiny_sd::adherence(
        p,
        a.eval_prompts,
        a.seed.wrapping_add(1000),
        a.sample_steps,
        a.guidance,
    )?;
    let pct = 100.0 * ok as f64 / a.eval_prompts.max(1) as f64;
    println!(
        "prompt adherence (shape, colour and position detected as prompted): {ok}/{} = {pct:.1}%",
        a.eval_prompts
    );
    println!(
        "  by attribute: shape {}, colour {}, position {}, background {} of {}",
        hits.shape, hits.color, hits.position, hits.background, a.eval_prompts
    );
    let shown: Vec<_> = samples.into_iter().take(16).collect();
    let cells: Vec<Vec<image::RgbImage>> = shown
        .chunks(4)
        .map(|c| c.iter().map(|(i, _)| i.clone()).collect())
        .collect();
    if cells.len() == 4 {
        let labels = GridLabels {
            title: Some(format!("tiny-sd samples ({pct:.0}% adherence)")),
            columns: (1..=4).map(|i| format!("sample {i}")).collect(),
            rows: shown
                .chunks(4)
                .map(|c| {
                    c.iter()
                        .map(|(_, p)| p.split(',').next().unwrap_or_default().to_string())
                        .collect::<Vec<_>>()
                        .join(" | ")
                })
                .collect(),
        };
        write_png(&out.join("samples.png"), &render(&cells, &labels, 64)?)?;
    }
    Ok((ok, pct))
}

/// `pretrain tiny-chat`: trains the chat model and its tokenizer, publishes the model folder with a
/// model card, and reports held-out task accuracy.
fn run_tiny_chat(a: &Args) -> anyhow::Result<()> {
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("assets/models/tiny-chat"));
    let output_dir = a
        .output_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/pretrain-tiny-chat"));
    let max_steps = a.max_steps.unwrap_or(1200);
    let batch_size = a.batch_size.unwrap_or(16);
    let learning_rate = a.learning_rate.unwrap_or(2e-3);
    let (train, held) = pretraining_data(a.examples, a.eval_examples, a.seed);
    let tok = train_tokenizer(&train, a.vocab_size)?;
    let cfg = tc::config(tok.vocab_size());
    let plan = AdapterPlan {
        full_training: true,
        ..AdapterPlan::none()
    };
    let model = LlamaForCausalLM::new(&cfg, &Weights::fresh(a.seed, plan))?;
    let params: usize = model.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    let train_rows = rows(&train, &tok, true)?;
    println!(
        "tiny-chat: {params} parameters, vocabulary {}, {} examples packed into {} rows of {}",
        tok.vocab_size(),
        train.len(),
        train_rows.len(),
        tc::MAX_LEN
    );
    // The tokenizer files travel with every saved model folder.
    let tmp = tempfile_dir(&output_dir)?;
    tc::write_tokenizer(&tmp, &tok)?;
    let files: Vec<(String, Vec<u8>)> = [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ]
    .iter()
    .map(|f| Ok((f.to_string(), std::fs::read(tmp.join(f))?)))
    .collect::<std::io::Result<_>>()?;
    let held_rows = rows(&held, &tok, false)?;
    let mut task = SftTask::new(
        model,
        Default::default(),
        train_rows,
        batch_size,
        tok.pad_id,
        a.seed,
    )?
    .save_full_model(files)
    .with_monitor(
        held_rows,
        vec![],
        MonitorConfig {
            eval_steps: 200,
            max_forgetting: None,
            stop_on_forgetting: false,
        },
    );
    let trainer = Trainer::new(TrainConfig {
        learning_rate,
        lr_scheduler: ScheduleKind::Cosine,
        warmup_steps: (max_steps / 20).max(1),
        max_steps,
        max_grad_norm: Some(1.0),
        weight_decay: 0.01,
        save_steps: 200,
        seed: a.seed,
        output_dir: output_dir.clone(),
        overwrite_output_dir: !a.resume,
        ..Default::default()
    })?;
    let s = trainer.train(&mut task, a.resume)?;
    println!(
        "trained {} steps in {:.0}s: loss {:.4} -> {:.4}",
        s.steps, s.seconds, s.first_loss, s.last_loss
    );
    // The trainer wrote the model folder as its final "adapter": publish it.
    std::fs::create_dir_all(&out)?;
    for e in std::fs::read_dir(&s.adapter_dir)? {
        let e = e?;
        let bytes = std::fs::read(e.path())?;
        postforge::util::write_atomic(&out.join(e.file_name()), &bytes)?;
    }
    let back = LlamaForCausalLM::load(&out, AdapterPlan::none())?;
    let tok = postforge::data::text::TextTokenizer::load(&out)?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(held.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let acc = accuracy(&back, &tok, &held, &bar)?;
    bar.finish_and_clear();
    let per: Vec<String> = acc
        .per_task
        .iter()
        .map(|(k, (c, n))| format!("{k} {c}/{n}"))
        .collect();
    println!(
        "held-out task accuracy: {}/{} = {:.1}% ({})",
        acc.correct,
        acc.total,
        100.0 * acc.rate(),
        per.join(", ")
    );
    let card = format!(
        "# tiny-chat\n\nA Llama-architecture chat model ({params} parameters: hidden {}, {} layers, {} heads, {} key/value heads, context {}) with its own byte-level BPE tokenizer ({} tokens) and a ChatML template, in the Hugging Face folder layout. Trained from scratch by postforge on procedural instruction tasks with checkable answers (addition, copying, sorting, word reversal, facts about a generated world of {} countries).\n\n- Command: `postforge pretrain tiny-chat --max-steps {max_steps} --batch-size {batch_size} --learning-rate {learning_rate} --examples {} --vocab-size {} --seed {}`\n- Steps: {} (loss {:.4} -> {:.4}, {:.0} s on this machine)\n- Held-out task accuracy (greedy, exact answer): {}/{} = {:.1}% ({})\n",
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.kv_heads(), tc::MAX_LEN,
        tok.vocab_size(), tc::COUNTRIES, a.examples, a.vocab_size, a.seed, s.steps, s.first_loss,
        s.last_loss, s.seconds, acc.correct, acc.total, 100.0 * acc.rate(), per.join(", ")
    );
    postforge::util::write_atomic(&out.join("MODEL_CARD.md"), card.as_bytes())?;
    println!("wrote {} (MODEL_CARD.md)", out.display());
    Ok(())
}

fn tempfile_dir(base: &std::path::Path) -> anyhow::Result<PathBuf> {
    let d = base.join(".tokenizer");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
