use anyhow::Context;
use clap::{ArgMatches, Args as ClapArgs};
use postforge::diffusion::train::{train_lora, LoraTrainConfig};
use serde::Serialize;
use std::path::PathBuf;

/// Flags mirror kohya's `train_network.py` (`--network_dim` and `--network-dim` both work). Flags
/// given on the command line override the `--config-file` TOML; unset ones take kohya's defaults.
#[derive(ClapArgs, Debug, Default, Serialize)]
pub struct Args {
    /// TOML file with the same keys (kohya's `--config_file`).
    #[arg(long)]
    #[serde(skip)]
    config_file: Option<PathBuf>,
    /// Pipeline folder (diffusers layout).
    #[arg(long)]
    pretrained_model_name_or_path: Option<PathBuf>,
    /// Image folder (`<repeats>_<name>/` subfolders with caption files, or metadata.jsonl).
    #[arg(long)]
    train_data_dir: Option<PathBuf>,
    /// Run folder.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// LoRA file name (without extension).
    #[arg(long)]
    output_name: Option<String>,
    /// Caption file extension [default: .txt].
    #[arg(long)]
    caption_extension: Option<String>,
    /// `W,H` or one side [default: 512].
    #[arg(long)]
    resolution: Option<String>,
    /// Aspect-ratio buckets.
    #[arg(long)]
    enable_bucket: bool,
    #[arg(long)]
    min_bucket_reso: Option<u32>,
    #[arg(long)]
    max_bucket_reso: Option<u32>,
    #[arg(long)]
    bucket_reso_steps: Option<u32>,
    #[arg(long)]
    bucket_no_upscale: bool,
    /// LoRA rank [default: 4].
    #[arg(long)]
    network_dim: Option<usize>,
    /// LoRA alpha [default: 1].
    #[arg(long)]
    network_alpha: Option<f64>,
    /// `key=value` network arguments: conv_dim, conv_alpha (LoCon), dora_wd, LyCORIS's preset,
    /// kohya's block_dims, block_alphas, conv_block_dims, conv_block_alphas, down_lr_weight,
    /// mid_lr_weight, up_lr_weight, block_lr_zero_threshold.
    #[arg(long, num_args = 1..)]
    #[serde(skip)]
    network_args: Vec<String>,
    #[arg(long)]
    network_dropout: Option<f64>,
    /// U-Net LoRA only (no text-encoder LoRA).
    #[arg(long)]
    network_train_unet_only: bool,
    /// [default: 1e-4]
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Learning rate of the U-Net adapters [default: --learning_rate].
    #[arg(long)]
    unet_lr: Option<f64>,
    /// Learning rate of the text-encoder adapters [default: --learning_rate].
    #[arg(long)]
    text_encoder_lr: Option<f64>,
    /// constant, constant_with_warmup, linear, cosine [default: constant].
    #[arg(long)]
    lr_scheduler: Option<String>,
    #[arg(long)]
    lr_warmup_steps: Option<usize>,
    /// [default: 1600]
    #[arg(long)]
    max_train_steps: Option<usize>,
    /// [default: 1]
    #[arg(long)]
    train_batch_size: Option<usize>,
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    min_snr_gamma: Option<f64>,
    #[arg(long)]
    noise_offset: Option<f64>,
    #[arg(long)]
    v_parameterization: bool,
    /// Rescale the training betas to zero terminal SNR (with --v_parameterization).
    #[arg(long)]
    zero_terminal_snr: bool,
    /// Smallest training timestep [default: 0].
    #[arg(long)]
    min_timestep: Option<usize>,
    /// One past the largest training timestep [default: T].
    #[arg(long)]
    max_timestep: Option<usize>,
    /// diffusers' timestep bias: none, earlier, later, range [default: none].
    #[arg(long)]
    timestep_bias_strategy: Option<String>,
    /// Weight factor of the biased timesteps [default: 1].
    #[arg(long)]
    timestep_bias_multiplier: Option<f64>,
    /// Share of timesteps biased by earlier / later [default: 0.25].
    #[arg(long)]
    timestep_bias_portion: Option<f64>,
    #[arg(long)]
    timestep_bias_begin: Option<usize>,
    #[arg(long)]
    timestep_bias_end: Option<usize>,
    #[arg(long)]
    caption_dropout_rate: Option<f64>,
    #[arg(long)]
    shuffle_caption: bool,
    #[arg(long)]
    keep_tokens: Option<usize>,
    #[arg(long)]
    flip_aug: bool,
    /// kohya or diffusers [default: kohya].
    #[arg(long)]
    lora_format: Option<String>,
    #[arg(long)]
    save_every_n_steps: Option<usize>,
    #[arg(long)]
    sample_every_n_steps: Option<usize>,
    #[arg(long)]
    sample_at_first: bool,
    /// kohya prompt file (`prompt --n neg --w --h --d seed --s steps --l cfg`).
    #[arg(long)]
    sample_prompts: Option<PathBuf>,
    /// ddim, euler, euler_a [default: ddim].
    #[arg(long)]
    sample_sampler: Option<String>,
    /// kohya: regularisation images (`<repeats>_<class>` folders).
    #[arg(long)]
    reg_data_dir: Option<PathBuf>,
    /// Weight of the regularisation (prior) loss [default: 1].
    #[arg(long)]
    prior_loss_weight: Option<f64>,
    /// diffusers DreamBooth: prior preservation with class images (generated when missing).
    #[arg(long)]
    with_prior_preservation: bool,
    /// diffusers: the class-image folder.
    #[arg(long)]
    class_data_dir: Option<PathBuf>,
    /// diffusers: the caption of the class images.
    #[arg(long)]
    class_prompt: Option<String>,
    /// diffusers: class images to use (and generate when missing) [default: 100].
    #[arg(long)]
    num_class_images: Option<usize>,
    /// diffusers: images per batch when generating class images [default: 4].
    #[arg(long)]
    sample_batch_size: Option<usize>,
    /// Sampler steps of the class images [default: 25].
    #[arg(long)]
    class_inference_steps: Option<usize>,
    /// Guidance scale of the class images [default: 7.5].
    #[arg(long)]
    class_guidance_scale: Option<f64>,
    /// guidance_rescale of the class images [default: 0].
    #[arg(long)]
    class_guidance_rescale: Option<f64>,
    /// Share of the images held out for the validation loss, in [0, 1).
    #[arg(long)]
    validation_split: Option<f64>,
    /// Seed of the split and of the validation noise [default: --seed].
    #[arg(long)]
    validation_seed: Option<u64>,
    /// Validation loss every N steps [default: a tenth of the run] and at the end.
    #[arg(long)]
    validate_every_n_steps: Option<usize>,
    /// At most this many validation batches per evaluation.
    #[arg(long)]
    max_validation_steps: Option<usize>,
    /// Continue from the newest checkpoint in the output folder.
    #[arg(long)]
    #[serde(skip)]
    resume: bool,
    /// Start afresh even if the output folder holds checkpoints.
    #[arg(long)]
    #[serde(skip)]
    overwrite: bool,
}

/// The configuration: the TOML file (if any), then the flags that were given.
pub fn config(a: &Args, given: &ArgMatches) -> anyhow::Result<LoraTrainConfig> {
    let file = a.config_file.as_deref();
    let mut v = super::overlay::settings(
        file,
        a,
        given,
        &[],
        &[
            "pretrained_model_name_or_path",
            "train_data_dir",
            "output_dir",
        ],
    )?;
    let o = v.as_object_mut().context("settings are a table")?;
    let mut set = |k: &str, x: serde_json::Value| {
        o.insert(k.to_string(), x);
    };
    for kv in &a.network_args {
        let (k, val) = kv
            .split_once('=')
            .with_context(|| format!("--network_args `{kv}` is not key=value"))?;
        let (k, val) = (k.trim(), val.trim());
        match k {
            "conv_dim" => set("conv_dim", val.parse::<usize>().context("conv_dim")?.into()),
            "conv_alpha" => set(
                "conv_alpha",
                val.parse::<f64>().context("conv_alpha")?.into(),
            ),
            "dora_wd" => set(
                "dora_wd",
                matches!(val.to_lowercase().as_str(), "true" | "1").into(),
            ),
            "preset" | "block_dims" | "block_alphas" | "conv_block_dims" | "conv_block_alphas"
            | "down_lr_weight" | "up_lr_weight" => set(k, val.into()),
            "mid_lr_weight" | "block_lr_zero_threshold" => set(
                k,
                val.parse::<f64>()
                    .with_context(|| format!("--network_args {k}={val}: not a number"))?
                    .into(),
            ),
            _ => anyhow::bail!(
                "--network_args `{k}` is not supported (conv_dim, conv_alpha, dora_wd, preset, block_dims, block_alphas, conv_block_dims, conv_block_alphas, down_lr_weight, mid_lr_weight, up_lr_weight, block_lr_zero_threshold)"
            ),
        }
    }
    serde_json::from_value(v)
        .with_context(|| super::overlay::context(file, "training configuration"))
}
pub fn run(a: Args, given: &ArgMatches) -> anyhow::Result<()> {
    let cfg = config(&a, given)?;
    let (s, file, task) = train_lora(&cfg, a.resume, a.overwrite)?;
    println!(
        "trained {} steps ({} images, {} regularisation images, {} micro-batches per epoch) in {:.0}s: loss {:.4} -> {:.4}",
        s.steps,
        task.num_images(),
        task.num_reg_images(),
        task.batches_per_epoch(),
        s.seconds,
        s.first_loss,
        s.last_loss
    );
    if let Some(line) = task.validation_summary(&cfg.output_dir)? {
        println!("{line}");
    }
    println!(
        "wrote {} (metrics.jsonl, loss_curve.png in {})",
        file.display(),
        cfg.output_dir.display()
    );
    Ok(())
}
