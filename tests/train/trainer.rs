//! The training core: resume equals an unbroken run (bit-identical on CPU), NaN stops the run and
//! keeps the last good checkpoint, checkpoints are complete, metrics and the loss curve exist.

use crate::common::*;
use candle_core::{Tensor, Var};
use postforge::models::mlp::{Mlp, MlpConfig};
use postforge::peft::formats::peft::{self as files, SaveOptions};
use postforge::peft::{Adapted, AdapterConfig, AdapterPlan, ForwardCtx};
use postforge::train::{ScheduleKind, Task, TrainConfig, Trainer};
use std::path::Path;

const CFG: MlpConfig = MlpConfig {
    hidden_size: 16,
    intermediate_size: 32,
    num_layers: 2,
    out_size: 4,
};

struct Regress {
    model: Mlp,
    cfg: AdapterConfig,
    nan_at: Option<u64>,
}

impl Task for Regress {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.model.trainable()
    }
    fn loss(&mut self, cursor: u64, ctx: &ForwardCtx) -> postforge::Result<Tensor> {
        let x = randn(&[8, 16], 1.0, &format!("batch{cursor}"));
        let t = randn(&[8, 4], 1.0, &format!("target{cursor}"));
        let l = (self.model.forward(&x, ctx)? - t)?.sqr()?.mean_all()?;
        if self.nan_at == Some(cursor) {
            return Ok((l * f64::NAN)?);
        }
        Ok(l)
    }
    fn save_adapter(&self, dir: &Path) -> postforge::Result<()> {
        files::save(
            dir,
            &self.model.layers(),
            "default",
            &self.cfg,
            SaveOptions::default(),
        )
    }
}

fn task(nan_at: Option<u64>) -> Regress {
    let mut cfg = AdapterConfig::lora(4, 8.0, &["fc1", "fc2"]);
    cfg.lora_dropout = 0.1;
    cfg.use_dora = true;
    let w = CFG.random_weights(3).unwrap();
    let model = Mlp::new(
        &CFG,
        &w,
        &AdapterPlan::single(cfg.clone(), 5).unwrap(),
        Path::new("mem"),
    )
    .unwrap();
    Regress { model, cfg, nan_at }
}

fn config(dir: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-2,
        lr_scheduler: ScheduleKind::Cosine,
        warmup_steps: 2,
        max_steps: steps,
        gradient_accumulation_steps: 2,
        max_grad_norm: Some(0.5),
        weight_decay: 0.01,
        save_steps: 3,
        save_total_limit: 2,
        seed: 11,
        output_dir: dir.to_path_buf(),
        ..Default::default()
    }
}

fn params(t: &Regress) -> Vec<(String, Vec<f32>)> {
    t.trainable()
        .into_iter()
        .map(|(n, v)| (n, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn resume_equals_unbroken_run_bit_for_bit() {
    let d1 = tempfile::tempdir().unwrap();
    let mut a = task(None);
    let s = Trainer::new(config(d1.path(), 10))
        .unwrap()
        .train(&mut a, false)
        .unwrap();
    assert_eq!(s.steps, 10);
    assert!(
        s.last_loss < s.first_loss,
        "loss did not fall: {} -> {}",
        s.first_loss,
        s.last_loss
    );

    // Interrupted run: stop after 6 steps (checkpoints at 3 and 6), then resume in a fresh process state.
    let d2 = tempfile::tempdir().unwrap();
    let mut b = task(None);
    let mut c6 = config(d2.path(), 10);
    c6.max_steps = 10;
    // Simulate the interruption by training a run configured for 10 steps but stopping at 6:
    // the schedule must be the 10-step one, so train to 6 with a task that errors at cursor 12.
    b.nan_at = Some(12);
    let err = Trainer::new(c6.clone())
        .unwrap()
        .train(&mut b, false)
        .unwrap_err();
    assert!(err.to_string().contains("non-finite loss"), "{err}");
    assert!(
        err.to_string().contains("checkpoint-6"),
        "error must name the last good checkpoint: {err}"
    );
    let mut b2 = task(None); // fresh model: everything must come from the checkpoint
    let s2 = Trainer::new(c6).unwrap().train(&mut b2, true).unwrap();
    assert_eq!(s2.resumed_from, Some(6));
    assert_eq!(
        params(&a),
        params(&b2),
        "resumed run differs from the unbroken run"
    );
    // Metrics: one line per step, no duplicates after the resume.
    let m1 = std::fs::read_to_string(d1.path().join("metrics.jsonl")).unwrap();
    let m2 = std::fs::read_to_string(d2.path().join("metrics.jsonl")).unwrap();
    assert_eq!(m1.lines().count(), 10);
    assert_eq!(m2.lines().count(), 10);
    let losses = |m: &str| {
        m.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&m1), losses(&m2));
    assert!(d2.path().join("loss_curve.png").exists());
    // Only the newest `save_total_limit` checkpoints are kept.
    let names: Vec<String> = std::fs::read_dir(d2.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn nan_loss_stops_with_error_and_keeps_last_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let mut t = task(Some(9)); // micro-batch 9 = step 5 (2 micro-batches per step)
    let err = Trainer::new(config(d.path(), 10))
        .unwrap()
        .train(&mut t, false)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("non-finite loss") && msg.contains("step 5"),
        "{msg}"
    );
    let ck = d.path().join("checkpoint-3");
    assert!(
        ck.join("trainer_state.json").exists()
            && ck
                .join("adapter")
                .join("adapter_model.safetensors")
                .exists()
    );
    assert!(!d.path().join("checkpoint-5").exists());
    // The checkpointed adapter is finite and loads.
    let mut fresh = Mlp::new(
        &CFG,
        &CFG.random_weights(3).unwrap(),
        &AdapterPlan::none(),
        Path::new("mem"),
    )
    .unwrap();
    let mut ls = fresh.layers_mut();
    files::load(&ck.join("adapter"), &mut ls, "default").unwrap();
}

#[test]
fn empty_trainable_set_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let mut t = task(None);
    t.model = Mlp::new(
        &CFG,
        &CFG.random_weights(3).unwrap(),
        &AdapterPlan::none(),
        Path::new("mem"),
    )
    .unwrap();
    let err = Trainer::new(config(d.path(), 2))
        .unwrap()
        .train(&mut t, false)
        .unwrap_err();
    assert!(err.to_string().contains("nothing to train"), "{err}");
}

#[test]
fn every_trainable_tensor_of_a_model_gets_gradient_and_frozen_weights_none() {
    // Adapters on every linear (fc1, fc2) plus a full trainable copy of the head (modules_to_save).
    for dora in [false, true] {
        let mut cfg = AdapterConfig::lora(4, 8.0, &["fc1", "fc2"]);
        cfg.use_dora = dora;
        cfg.init_lora_weights = postforge::peft::InitSpec::Bool(false);
        cfg.modules_to_save = Some(vec!["head".into()]);
        let w = CFG.random_weights(3).unwrap();
        let model = Mlp::new(
            &CFG,
            &w,
            &AdapterPlan::single(cfg, 5).unwrap(),
            Path::new("mem"),
        )
        .unwrap();
        let trainable = model.trainable();
        assert_eq!(
            trainable.len(),
            2 * 2 * (2 + dora as usize) + 2,
            "{:?}",
            trainable.iter().map(|t| &t.0).collect::<Vec<_>>()
        );
        let x = randn(&[8, 16], 1.0, "gx");
        let loss = model
            .forward(&x, &ForwardCtx::train(1, 0))
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in &trainable {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n.is_finite() && n > 0.0, "{name}: |g|² = {n}");
        }
        // No gradient buffer has the size of a frozen weight.
        let frozen_sizes: Vec<usize> = model
            .layers()
            .iter()
            .filter(|l| l.trainable_copy().is_none())
            .map(|l| l.base_weight().dims().iter().product::<usize>())
            .collect();
        let trainable_ids: Vec<_> = trainable.iter().map(|(_, v)| v.id()).collect();
        for id in grads.get_ids() {
            if trainable_ids.contains(id) {
                continue;
            }
            let t = grads.get_id(*id).unwrap();
            assert!(
                !frozen_sizes.contains(&t.elem_count()),
                "a frozen-weight-sized gradient {:?}",
                t.dims()
            );
        }
    }
}

#[test]
fn a_fresh_run_does_not_mix_with_an_old_one_and_resume_checks_the_run() {
    let d = tempfile::tempdir().unwrap();
    let mut t = task(None);
    Trainer::new(config(d.path(), 3))
        .unwrap()
        .train(&mut t, false)
        .unwrap();
    // A second fresh run in the same folder is refused, unless it overwrites.
    let mut t2 = task(None);
    let msg = Trainer::new(config(d.path(), 3))
        .unwrap()
        .train(&mut t2, false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("earlier run"), "{msg}");
    let mut c = config(d.path(), 3);
    c.overwrite_output_dir = true;
    Trainer::new(c).unwrap().train(&mut t2, false).unwrap();
    // Resuming with another accumulation is another experiment: refused, naming the field.
    let mut c = config(d.path(), 6);
    c.gradient_accumulation_steps = 1;
    let msg = Trainer::new(c)
        .unwrap()
        .train(&mut task(None), true)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("gradient_accumulation_steps") && msg.contains("different run"),
        "{msg}"
    );
    let mut c = config(d.path(), 3);
    c.max_grad_norm = Some(0.0);
    assert!(Trainer::new(c).is_err());
}

#[test]
fn pissa_exported_as_plain_lora_reproduces_the_model_on_the_original_base() {
    let mut cfg = AdapterConfig::lora(4, 8.0, &["fc1", "fc2"]);
    cfg.init_lora_weights = postforge::peft::InitSpec::Method("pissa".into());
    let w = CFG.random_weights(3).unwrap();
    let model = Mlp::new(
        &CFG,
        &w,
        &AdapterPlan::single(cfg.clone(), 5).unwrap(),
        Path::new("mem"),
    )
    .unwrap();
    // Train-like change of the factors.
    for (i, (_, v)) in model.trainable().into_iter().enumerate() {
        v.set(&(v.as_tensor() + randn(v.dims(), 0.05, &format!("n{i}"))).unwrap())
            .unwrap();
    }
    let d = tempfile::tempdir().unwrap();
    files::save(
        d.path(),
        &model.layers(),
        "default",
        &cfg,
        SaveOptions { plain_lora: true },
    )
    .unwrap();
    let saved = AdapterConfig::from_json_file(&d.path().join("adapter_config.json")).unwrap();
    assert_eq!((saved.r, saved.lora_alpha), (8, 16.0));
    assert_eq!(
        saved.init_lora_weights,
        postforge::peft::InitSpec::Bool(true)
    );
    let mut plain = Mlp::new(&CFG, &w, &AdapterPlan::none(), Path::new("mem")).unwrap();
    files::load(d.path(), &mut plain.layers_mut(), "default").unwrap();
    let x = randn(&[5, 16], 1.0, "px");
    let e = max_abs_diff(
        &plain.forward(&x, &ForwardCtx::eval_with_grad()).unwrap(),
        &model.forward(&x, &ForwardCtx::eval_with_grad()).unwrap(),
    );
    assert!(e < 1e-5, "{e}");
    // A PiSSA adapter that lost its initial factors cannot be converted, and says so.
    let mut reloaded = Mlp::new(&CFG, &w, &AdapterPlan::none(), Path::new("mem")).unwrap();
    files::save(
        &d.path().join("pissa"),
        &model.layers(),
        "default",
        &cfg,
        SaveOptions::default(),
    )
    .unwrap();
    files::load(
        &d.path().join("pissa"),
        &mut reloaded.layers_mut(),
        "default",
    )
    .unwrap();
    let msg = files::save(
        &d.path().join("x"),
        &reloaded.layers(),
        "default",
        &cfg,
        SaveOptions { plain_lora: true },
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("cannot be converted"), "{msg}");
}

#[test]
fn modules_to_save_can_name_a_container() {
    let mut cfg = AdapterConfig::lora(4, 8.0, &["fc1"]);
    cfg.modules_to_save = Some(vec!["layers.1".into()]);
    let w = CFG.random_weights(3).unwrap();
    let model = Mlp::new(
        &CFG,
        &w,
        &AdapterPlan::single(cfg, 5).unwrap(),
        Path::new("mem"),
    )
    .unwrap();
    let names: Vec<String> = model.trainable().into_iter().map(|(n, _)| n).collect();
    assert!(
        names
            .iter()
            .any(|n| n.contains("layers.1.fc1.modules_to_save")),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n.contains("layers.1.fc2.modules_to_save")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains("layers.0.fc1.lora_A")),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("layers.1.fc1.lora_A")),
        "inside modules_to_save: no adapter"
    );
}

#[test]
fn resume_without_a_checkpoint_or_of_a_finished_run_is_refused_and_keeps_the_results() {
    let d = tempfile::tempdir().unwrap();
    let msg = Trainer::new(config(d.path(), 3))
        .unwrap()
        .train(&mut task(None), true)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no checkpoint") && msg.contains("--resume"),
        "{msg}"
    );
    Trainer::new(config(d.path(), 3))
        .unwrap()
        .train(&mut task(None), false)
        .unwrap();
    let metrics = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    let msg = Trainer::new(config(d.path(), 3))
        .unwrap()
        .train(&mut task(None), true)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("finished") && msg.contains("max_train_steps"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap(),
        metrics,
        "the finished run's metrics were rewritten"
    );
}

#[test]
fn a_bad_metrics_line_is_named_by_its_own_line_number() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("metrics.jsonl");
    std::fs::write(
        &p,
        "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":0.4}\n{\"step\":3,\"loss\":oops}\n",
    )
    .unwrap();
    let e = postforge::train::trainer::read_metric(&p, "loss")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("metrics.jsonl: line 3, column 18") && !e.contains("line 1"),
        "{e}"
    );
}
