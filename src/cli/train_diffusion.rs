use anyhow::Context;
use clap::{ArgMatches, Args as ClapArgs};
use postforge::check::{self, Ranged};
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
    /// Smallest bucket side, ≥ 1 [default: 256].
    #[arg(long, value_parser = check::count_u32)]
    min_bucket_reso: Option<u32>,
    /// Largest bucket side, ≥ 1 [default: 1024].
    #[arg(long, value_parser = check::count_u32)]
    max_bucket_reso: Option<u32>,
    /// Bucket side step, ≥ 1 (a multiple of the model's size step) [default: 64].
    #[arg(long, value_parser = check::count_u32)]
    bucket_reso_steps: Option<u32>,
    #[arg(long)]
    bucket_no_upscale: bool,
    /// LoRA rank, ≥ 1 [default: 4].
    #[arg(long, value_parser = check::count)]
    network_dim: Option<usize>,
    /// LoRA alpha, > 0 (the scale is alpha/rank; kohya's 0 = "alpha = rank" is not taken: give
    /// the rank) [default: 1].
    #[arg(long, value_parser = check::positive)]
    network_alpha: Option<f64>,
    /// `key=value` network arguments: conv_dim (≥ 1), conv_alpha (> 0) (LoCon), dora_wd
    /// (true/false), LyCORIS's preset, kohya's block_dims, block_alphas (> 0), conv_block_dims,
    /// conv_block_alphas (> 0), down_lr_weight, mid_lr_weight, up_lr_weight (each ≥ 0),
    /// block_lr_zero_threshold (≥ 0).
    #[arg(long, num_args = 1..)]
    #[serde(skip)]
    network_args: Vec<String>,
    /// Dropout on the adapter input, in [0, 1) [default: 0].
    #[arg(long, value_parser = check::dropout)]
    network_dropout: Option<f64>,
    /// U-Net LoRA only (no text-encoder LoRA).
    #[arg(long)]
    network_train_unet_only: bool,
    /// Peak learning rate, > 0 [default: 1e-4].
    #[arg(long, value_parser = check::positive)]
    learning_rate: Option<f64>,
    /// Learning rate of the U-Net adapters, ≥ 0 (0 = frozen) [default: --learning_rate].
    #[arg(long, value_parser = check::non_negative)]
    unet_lr: Option<f64>,
    /// Learning rate of the text-encoder adapters, ≥ 0 (0 = frozen) [default: --learning_rate].
    #[arg(long, value_parser = check::non_negative)]
    text_encoder_lr: Option<f64>,
    /// constant, constant_with_warmup, linear, cosine [default: constant].
    #[arg(long)]
    lr_scheduler: Option<String>,
    /// Warmup steps [default: 0].
    #[arg(long)]
    lr_warmup_steps: Option<usize>,
    /// Optimizer steps, ≥ 1 [default: 1600].
    #[arg(long, value_parser = check::count)]
    max_train_steps: Option<usize>,
    /// Images per micro-batch, ≥ 1 [default: 1].
    #[arg(long, value_parser = check::count)]
    train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step, ≥ 1 [default: 1].
    #[arg(long, value_parser = check::count)]
    gradient_accumulation_steps: Option<usize>,
    /// Gradient clipping: the largest global gradient norm, ≥ 0 (0 = off) [default: 1].
    #[arg(long, value_parser = check::non_negative)]
    max_grad_norm: Option<f64>,
    /// Seed of everything random in the run [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// min-SNR-γ loss weighting, γ > 0 (5 is the usual choice) [default: off].
    #[arg(long, value_parser = check::positive)]
    min_snr_gamma: Option<f64>,
    /// Noise offset, ≥ 0 (kohya suggests about 0.1) [default: 0].
    #[arg(long, value_parser = check::non_negative)]
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
    /// Weight factor of the biased timesteps, > 0 [default: 1].
    #[arg(long, value_parser = check::positive)]
    timestep_bias_multiplier: Option<f64>,
    /// Share of timesteps biased by earlier / later, in [0, 1] [default: 0.25].
    #[arg(long, value_parser = check::unit)]
    timestep_bias_portion: Option<f64>,
    /// First timestep biased by `range` [default: 0].
    #[arg(long)]
    timestep_bias_begin: Option<usize>,
    /// One past the last timestep biased by `range` [default: 1000].
    #[arg(long)]
    timestep_bias_end: Option<usize>,
    /// Probability of training a sample with an empty caption, in [0, 1] [default: 0].
    #[arg(long, value_parser = check::unit)]
    caption_dropout_rate: Option<f64>,
    #[arg(long)]
    shuffle_caption: bool,
    /// Tags kept in front when shuffling [default: 0].
    #[arg(long)]
    keep_tokens: Option<usize>,
    #[arg(long)]
    flip_aug: bool,
    /// Multiply the loss by each image's mask (kohya's --masked_loss).
    #[arg(long)]
    masked_loss: bool,
    /// Folder of masks named like the images (white = learn).
    #[arg(long)]
    conditioning_data_dir: Option<PathBuf>,
    /// Take the masks from the images' alpha channel.
    #[arg(long)]
    alpha_mask: bool,
    /// Route the adapter to each image's mask while training (implies the masked loss).
    #[arg(long)]
    route_adapter_to_mask: bool,
    /// kohya or diffusers [default: kohya].
    #[arg(long)]
    lora_format: Option<String>,
    /// Checkpoint every N steps (0 = at the end only) [default: 0].
    #[arg(long)]
    save_every_n_steps: Option<usize>,
    /// Sample the prompts every N steps (0 = never) [default: 0].
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
    /// Weight of the regularisation (prior) loss, ≥ 0 [default: 1].
    #[arg(long, value_parser = check::non_negative)]
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
    /// diffusers: class images to use (and generate when missing), ≥ 1 [default: 100].
    #[arg(long, value_parser = check::count)]
    num_class_images: Option<usize>,
    /// diffusers: images per batch when generating class images, ≥ 1 [default: 4].
    #[arg(long, value_parser = check::count)]
    sample_batch_size: Option<usize>,
    /// Sampler steps of the class images, ≥ 1 [default: 25].
    #[arg(long, value_parser = check::count)]
    class_inference_steps: Option<usize>,
    /// Guidance scale of the class images, ≥ 0 [default: 7.5].
    #[arg(long, value_parser = check::non_negative)]
    class_guidance_scale: Option<f64>,
    /// guidance_rescale of the class images, in [0, 1] [default: 0].
    #[arg(long, value_parser = check::unit)]
    class_guidance_rescale: Option<f64>,
    /// Share of the images held out for the validation loss, in [0, 1).
    #[arg(long, value_parser = check::dropout)]
    validation_split: Option<f64>,
    /// Seed of the split and of the validation noise [default: --seed].
    #[arg(long)]
    validation_seed: Option<u64>,
    /// Validation loss every N steps, ≥ 1 [default: a tenth of the run], and at the end.
    #[arg(long, value_parser = check::count)]
    validate_every_n_steps: Option<usize>,
    /// At most this many validation batches per evaluation, ≥ 1 [default: all].
    #[arg(long, value_parser = check::count)]
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
        let bad = |e: String| anyhow::anyhow!("--network_args {k}={val}: {e}");
        let number = |range| check::parse_in(val, range).map_err(bad);
        match k {
            "conv_dim" => set(k, check::count(val).map_err(bad)?.into()),
            "conv_alpha" => set(k, number(check::POSITIVE)?.into()),
            "dora_wd" => set(
                k,
                match val.to_lowercase().as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad("not true, false, 1 or 0".into())),
                }
                .into(),
            ),
            "preset" | "block_dims" | "block_alphas" | "conv_block_dims" | "conv_block_alphas"
            | "down_lr_weight" | "up_lr_weight" => set(k, val.into()),
            "mid_lr_weight" | "block_lr_zero_threshold" => {
                set(k, number(check::NON_NEGATIVE)?.into())
            }
            _ => anyhow::bail!(
                "--network_args `{k}` is not supported (conv_dim, conv_alpha, dora_wd, preset, block_dims, block_alphas, conv_block_dims, conv_block_alphas, down_lr_weight, mid_lr_weight, up_lr_weight, block_lr_zero_threshold)"
            ),
        }
    }
    let cfg: LoraTrainConfig = super::overlay::deserialize(v, file, "training configuration")?;
    cfg.check()
        .with_context(|| super::overlay::context(file, "training configuration"))?;
    Ok(cfg)
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
