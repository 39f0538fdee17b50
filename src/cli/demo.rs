use anyhow::Context;
use candle_core::Tensor;
use clap::Args as ClapArgs;
use postforge::check;
use postforge::models::mlp::{Mlp, MlpConfig};
use postforge::peft::args::AdapterArgs;
use postforge::peft::formats::peft::{self as peft_files, SaveOptions};
use postforge::peft::{Adapted, AdaptedLayer, AdapterConfig, AdapterPlan, ForwardCtx};
use postforge::train::{ScheduleKind, Task, TrainConfig, Trainer};
use std::path::{Path, PathBuf};

/// PEFT's adapter flags (as `sft` and `align` take them), with this model's defaults: alpha 16 on
/// fc1 and fc2.
#[derive(ClapArgs, Debug)]
#[command(
    mut_arg("lora_alpha", |a| a.default_value("16")),
    mut_arg("target_modules", |a| a.default_value("fc1,fc2"))
)]
pub struct Args {
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Save PiSSA/OLoRA adapters as plain LoRA against the original base.
    #[arg(long = "export-plain-lora")]
    export_plain_lora: bool,
    /// Optimizer steps, ≥ 1.
    #[arg(long = "max-steps", default_value_t = 1000, value_parser = check::count)]
    max_steps: usize,
    /// Peak learning rate, > 0.
    #[arg(long = "learning-rate", default_value_t = 1e-2, value_parser = check::positive)]
    learning_rate: f64,
    /// Learning-rate schedule.
    #[arg(long = "lr-scheduler", value_enum, default_value_t = ScheduleKind::Cosine)]
    lr_scheduler: ScheduleKind,
    /// Warmup steps.
    #[arg(long = "warmup-steps", default_value_t = 20)]
    warmup_steps: usize,
    /// Micro-batches per step, ≥ 1.
    #[arg(long = "gradient-accumulation-steps", default_value_t = 1, value_parser = check::count)]
    gradient_accumulation_steps: usize,
    /// Gradient clipping: the largest global gradient norm, ≥ 0 (0 = off).
    #[arg(long = "max-grad-norm", default_value_t = 1.0, value_parser = check::non_negative)]
    max_grad_norm: f64,
    /// AdamW weight decay, ≥ 0.
    #[arg(long = "weight-decay", default_value_t = 0.0, value_parser = check::non_negative)]
    weight_decay: f64,
    /// Checkpoint every N steps (0 = at the end only).
    #[arg(long = "save-steps", default_value_t = 100)]
    save_steps: usize,
    /// Examples per micro-batch, ≥ 1.
    #[arg(long = "batch-size", default_value_t = 64, value_parser = check::count)]
    batch_size: usize,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Continue from the latest checkpoint in the output folder.
    #[arg(long)]
    resume: bool,
    /// Output folder.
    #[arg(long = "output-dir", default_value = "runs/demo")]
    output_dir: PathBuf,
}

const MODEL: MlpConfig = MlpConfig {
    hidden_size: 64,
    intermediate_size: 128,
    num_layers: 2,
    out_size: 16,
};
const HIDDEN_RANK: usize = 4;

struct DemoTask {
    model: Mlp,
    teacher: Mlp,
    cfg: AdapterConfig,
    batch: usize,
    seed: u64,
    plain: bool,
}

fn inputs(seed: u64, cursor: u64, batch: usize) -> postforge::Result<Tensor> {
    let mut rng = postforge::rng::rng_for(seed, &format!("demo-batch-{cursor}"));
    postforge::rng::normal(&[batch, MODEL.hidden_size], 1.0, &mut rng)
}

impl Task for DemoTask {
    fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        self.model.trainable()
    }
    fn loss(&mut self, cursor: u64, ctx: &ForwardCtx) -> postforge::Result<Tensor> {
        let x = inputs(self.seed, cursor, self.batch)?;
        let y = self.model.forward(&x, ctx)?;
        let t = self.teacher.forward(&x, &ForwardCtx::eval())?;
        Ok((y - t)?.sqr()?.mean_all()?)
    }
    fn save_adapter(&self, dir: &Path) -> postforge::Result<()> {
        let layers = self.model.layers();
        peft_files::save(
            dir,
            &layers,
            "default",
            &self.cfg,
            SaveOptions {
                plain_lora: self.plain,
            },
        )
    }
}

/// The teacher: the base with a hidden rank-4 update on every fc1/fc2 weight.
fn teacher_weights(
    base: &std::collections::BTreeMap<String, Tensor>,
    seed: u64,
) -> postforge::Result<std::collections::BTreeMap<String, Tensor>> {
    let mut out = base.clone();
    for (k, w) in base {
        if k.ends_with(".weight") && k.starts_with("layers.") {
            let (o, i) = w.dims2()?;
            let mut rng = postforge::rng::rng_for(seed, &format!("teacher.{k}"));
            let u = postforge::rng::normal(&[o, HIDDEN_RANK], 1.0, &mut rng)?;
            let v = postforge::rng::normal(&[HIDDEN_RANK, i], 1.0, &mut rng)?;
            let delta = (u.matmul(&v)? * (0.6 / ((HIDDEN_RANK * i) as f64).sqrt()))?;
            out.insert(k.clone(), (w + delta)?);
        }
    }
    Ok(out)
}

fn eval_mse(model: &Mlp, teacher: &Mlp, seed: u64) -> postforge::Result<f64> {
    let x = inputs(seed ^ 0xE7A1, 0, 512)?;
    let d =
        (model.forward(&x, &ForwardCtx::eval())? - teacher.forward(&x, &ForwardCtx::eval())?)?;
    Ok(d.sqr()?.mean_all()?.to_scalar::<f32>()? as f64)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let out = a.output_dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let base_w = MODEL.random_weights(a.seed)?;
    let base_file = out.join("base").join("model.safetensors");
    postforge::util::save_safetensors(&base_file, &base_w, None)?;
    postforge::util::write_atomic(
        &out.join("base").join("config.json"),
        serde_json::to_string_pretty(&MODEL)?.as_bytes(),
    )?;
    let teacher = Mlp::new(
        &MODEL,
        &teacher_weights(&base_w, a.seed)?,
        &AdapterPlan::none(),
        Path::new("<teacher>"),
    )?;

    let cfg = a.adapter.config(&base_file, None)?;
    let plan = AdapterPlan::single(cfg.clone(), a.seed)?;
    let model = Mlp::new(&MODEL, &base_w, &plan, &base_file)?;
    let n_train: usize = model.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    let n_base: usize = base_w.values().map(|t| t.elem_count()).sum();
    println!(
        "base MLP: {n_base} frozen parameters; adapters: {n_train} trainable ({:.2}%)",
        100.0 * n_train as f64 / n_base as f64
    );

    let base_only = Mlp::new(&MODEL, &base_w, &AdapterPlan::none(), &base_file)?;
    let before = eval_mse(&base_only, &teacher, a.seed)?;
    let mut task = DemoTask {
        model,
        teacher,
        cfg,
        batch: a.batch_size,
        seed: a.seed,
        plain: a.export_plain_lora,
    };
    let trainer = Trainer::new(TrainConfig {
        learning_rate: a.learning_rate,
        lr_scheduler: a.lr_scheduler,
        warmup_steps: a.warmup_steps,
        max_steps: a.max_steps,
        gradient_accumulation_steps: a.gradient_accumulation_steps,
        max_grad_norm: postforge::check::grad_clip("--max-grad-norm", a.max_grad_norm)?,
        weight_decay: a.weight_decay,
        save_steps: a.save_steps,
        seed: a.seed,
        output_dir: out.clone(),
        // The demo is a self-check: a new run replaces an old one unless asked to resume.
        overwrite_output_dir: !a.resume,
        ..Default::default()
    })?;
    let s = trainer.train(&mut task, a.resume)?;
    let after = eval_mse(&task.model, &task.teacher, a.seed)?;

    // Merge-and-unload, then check the merged checkpoint against the adapted model.
    let merged_file = out.join("merged").join("model.safetensors");
    let layers: Vec<&AdaptedLayer> = task.model.layers();
    let base_for_merge = if a.export_plain_lora || !task.cfg.init_lora_weights.mutates_base() {
        base_file.clone()
    } else {
        // PiSSA/OLoRA changed the base into the residual: merge onto the residual model.
        let mut res = std::collections::BTreeMap::<String, Tensor>::new();
        for l in task.model.layers() {
            res.insert(format!("{}.weight", l.path()), l.weight()?);
            if let Some(b) = l.bias() {
                res.insert(format!("{}.bias", l.path()), b.clone());
            }
        }
        let p = out.join("base").join("residual.safetensors");
        postforge::util::save_safetensors(&p, &res, None)?;
        p
    };
    postforge::peft::merge::merge_and_unload(&layers, &base_for_merge, &merged_file)?;
    let merged = Mlp::load(&MODEL, &merged_file, &AdapterPlan::none())?;
    let x = inputs(a.seed ^ 0x5EED, 0, 64)?;
    let y_ad = task.model.forward(&x, &ForwardCtx::eval())?;
    let y_m = merged.forward(&x, &ForwardCtx::eval())?;
    let merge_err = (y_ad - y_m)?.abs()?.max_all()?.to_scalar::<f32>()?;
    // The adapter folder loads back onto a fresh base and gives the same outputs.
    let reload_base = if a.export_plain_lora || !task.cfg.init_lora_weights.mutates_base() {
        &base_file
    } else {
        &base_for_merge
    };
    let mut reloaded = Mlp::load(&MODEL, reload_base, &AdapterPlan::none())?;
    {
        let mut ls = reloaded.layers_mut();
        peft_files::load(&s.adapter_dir, &mut ls, "default")?;
    }
    let reload_err = (reloaded.forward(&x, &ForwardCtx::eval())?
        - task.model.forward(&x, &ForwardCtx::eval())?)?
    .abs()?
    .max_all()?
    .to_scalar::<f32>()?;

    println!(
        "steps {} ({}), {:.1}s",
        s.steps,
        s.resumed_from
            .map(|r| format!("resumed from {r}"))
            .unwrap_or("fresh run".into()),
        s.seconds
    );
    println!("held-out MSE to the teacher: base {before:.5} -> adapted {after:.5} ({:.1}% of the gap closed)", 100.0 * (1.0 - after / before));
    println!("merged model vs adapted model: max |diff| {merge_err:.2e}; reloaded adapter folder: max |diff| {reload_err:.2e}");
    println!(
        "wrote {}/ (PEFT folder), {}, {}, {}",
        s.adapter_dir.display(),
        out.join("metrics.jsonl").display(),
        out.join("loss_curve.png").display(),
        merged_file.display()
    );
    Ok(())
}
