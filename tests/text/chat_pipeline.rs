//! The text path end to end on a tiny model folder built here (tiny-chat's tokenizer recipe, fresh
//! weights): `pretraining_data` + tokenizer files, a pipeline file with an `sft` stage and a
//! `task-eval` stage, the merged model folder, and the shipped chat-sft pipeline parses.

use postforge::models::llama::LlamaForCausalLM;
use postforge::models::Weights;
use postforge::peft::AdapterPlan;
use postforge::recipe::{Recipe, StageReport};
use postforge::text::tiny_chat::{self as tc, pretraining_data, train_tokenizer};
use std::path::Path;

fn tiny_model(dir: &Path) {
    let (train, _) = pretraining_data(400, 0, 1);
    let tok = train_tokenizer(&train, 320).unwrap();
    let mut cfg = tc::config(tok.vocab_size());
    cfg.hidden_size = 32;
    cfg.intermediate_size = 64;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(2);
    let m = LlamaForCausalLM::new(&cfg, &Weights::fresh(3, AdapterPlan::none())).unwrap();
    m.save_pretrained(dir).unwrap();
    tc::write_tokenizer(dir, &tok).unwrap();
}

#[test]
fn a_chat_pipeline_fine_tunes_and_evaluates_tasks() {
    let r = Recipe::load(Path::new("pipelines/chat-sft.toml")).unwrap();
    assert_eq!(r.stage.len(), 2);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_model(&d.join("model"));
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data/chat");
    let text = format!(
        r#"[[stage]]
kind = "sft"
model = "{m}"
data = "{data}/max-train.jsonl"
eval_data = "{data}/max-eval.jsonl"
reference = "{data}/general.jsonl"
replay = "{data}/general.jsonl"
max_forgetting = 0.5
eval_steps = 2
r = 4
lora_alpha = 8
packing = true
max_length = 128
learning_rate = 1e-3
max_steps = 4
per_device_train_batch_size = 4
output_dir = "{o}"

[[stage]]
kind = "task-eval"
tasks = ["max", "add"]
per_task = 2
"#,
        m = d.join("model").display(),
        data = data.display(),
        o = d.join("run").display()
    );
    std::fs::write(d.join("p.toml"), text).unwrap();
    let mut lines = vec![];
    let reps = Recipe::load(&d.join("p.toml"))
        .unwrap()
        .run(false, &indicatif::ProgressBar::hidden(), &mut |l| {
            lines.push(l.to_string())
        })
        .unwrap();
    let StageReport::FineTuned(ft) = &reps[0] else {
        panic!("stage 1 is sft")
    };
    assert_eq!(ft.summary.steps, 4);
    assert_eq!(ft.history.len(), 3, "evaluations at steps 0, 2, 4");
    assert!(ft
        .history
        .iter()
        .all(|p| p.eval_loss.is_finite() && p.reference_ppl.is_finite()));
    let StageReport::TaskEvaluated(te) = &reps[1] else {
        panic!("stage 2 is task-eval")
    };
    assert_eq!(te.before.total, 4);
    assert_eq!(te.after.total, 4);
    assert!(d.join("run/task_eval.json").exists());
    assert!(d.join("run/adapter/adapter_config.json").exists());
    assert!(lines.iter().any(|l| l.contains("forgetting")));
    assert!(lines
        .iter()
        .any(|l| l.contains("before") && l.contains("after")));
}

#[test]
fn the_three_stage_alignment_pipeline_runs_with_merge_and_stack() {
    let r = Recipe::load(Path::new("pipelines/llm-orpo-dora-dpo.toml")).unwrap();
    assert_eq!(r.stage.len(), 4);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_model(&d.join("model"));
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data/chat");
    let common = |kind: &str| {
        format!("max_steps = 2\nper_device_train_batch_size = 4\nmax_length = 64\nlearning_rate = 1e-3\nr = 4\nlora_alpha = 8\nmodel = \"{}\"\n{kind}", d.join("model").display())
    };
    let text = format!(
        "[[stage]]\nkind = \"align\"\nloss = \"orpo\"\ndata = \"{p}/prefs-eval.jsonl\"\neval_data = \"{p}/hard-prefs-eval.jsonl\"\noutput_dir = \"{o}/1\"\n{c1}\n\n\
         [[stage]]\nkind = \"sft\"\nprevious = \"merge\"\nuse_dora = true\ndata = \"{p}/prefs-chosen-sft.jsonl\"\noutput_dir = \"{o}/2\"\n{c2}\n\n\
         [[stage]]\nkind = \"align\"\nprevious = \"stack\"\nloss = \"dpo\"\nprecompute_ref_logps = true\ndata = \"{p}/prefs-eval.jsonl\"\noutput_dir = \"{o}/3\"\n{c3}\n\n\
         [[stage]]\nkind = \"align\"\nprevious = \"merge\"\nloss = \"kto\"\ndata = \"{p}/prefs-eval.jsonl\"\noutput_dir = \"{o}/4\"\n{c4}\n",
        p = data.display(),
        o = d.join("runs").display(),
        c1 = common(""),
        c2 = common(""),
        c3 = common(""),
        c4 = common(""),
    );
    std::fs::write(d.join("a.toml"), text).unwrap();
    let mut lines = vec![];
    let reps = Recipe::load(&d.join("a.toml"))
        .unwrap()
        .run(false, &indicatif::ProgressBar::hidden(), &mut |l| {
            lines.push(l.to_string())
        })
        .unwrap();
    assert_eq!(reps.len(), 4);
    // The ORPO stage measured held-out preference accuracy before and after, and said so.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("runs/1/run_report.json")).unwrap())
            .unwrap();
    let acc = &report["eval_preference_accuracy"];
    for k in ["before", "after"] {
        let v = acc[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k}: {v}");
    }
    assert!(lines
        .iter()
        .any(|l| l.contains("held-out preference accuracy")));
    assert!(
        d.join("runs/2/base-merged/model.safetensors").exists(),
        "ORPO adapter merged before DoRA"
    );
    assert!(d.join("runs/3/base-merged/model.safetensors").exists());
    assert!(
        std::fs::read_dir(d.join("runs/.ref-cache"))
            .unwrap()
            .count()
            == 1,
        "DPO reference cached"
    );
    let m = std::fs::read_to_string(d.join("runs/3/metrics.jsonl")).unwrap();
    assert!(m.contains("rewards/accuracies"));
    let k = std::fs::read_to_string(d.join("runs/4/metrics.jsonl")).unwrap();
    assert!(k.contains("\"kl\""));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("runs/2/adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["use_dora"], true);
    // A stage that needs an earlier one says so.
    std::fs::write(d.join("b.toml"), format!("[[stage]]\nkind = \"align\"\nprevious = \"merge\"\ndata = \"{p}/prefs-eval.jsonl\"\noutput_dir = \"{o}/x\"\n{c}\n", p = data.display(), o = d.join("runs").display(), c = common(""))).unwrap();
    let e = Recipe::load(&d.join("b.toml"))
        .unwrap()
        .run(false, &indicatif::ProgressBar::hidden(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("previous"), "{e}");
}
