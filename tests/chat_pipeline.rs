//! The text path end to end on a tiny model folder built here (tiny-chat's tokenizer recipe, fresh
//! weights): `pretraining_data` + tokenizer files, a pipeline file with an `sft` stage and a
//! `task-eval` stage, the merged model folder, and the shipped chat-sft pipeline parses.

use postforge::align::tiny_chat::{self as tc, pretraining_data, train_tokenizer};
use postforge::models::llama::LlamaForCausalLM;
use postforge::models::Weights;
use postforge::peft::AdapterPlan;
use postforge::recipe::{Recipe, StageReport};
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
        .run(false, &indicatif::ProgressBar::hidden(), &mut |l| lines.push(l.to_string()))
        .unwrap();
    let StageReport::FineTuned(ft) = &reps[0] else { panic!("stage 1 is sft") };
    assert_eq!(ft.summary.steps, 4);
    assert_eq!(ft.history.len(), 3, "evaluations at steps 0, 2, 4");
    assert!(ft.history.iter().all(|p| p.eval_loss.is_finite() && p.reference_ppl.is_finite()));
    let StageReport::TaskEvaluated(te) = &reps[1] else { panic!("stage 2 is task-eval") };
    assert_eq!(te.before.total, 4);
    assert_eq!(te.after.total, 4);
    assert!(d.join("run/task_eval.json").exists());
    assert!(d.join("run/adapter/adapter_config.json").exists());
    assert!(lines.iter().any(|l| l.contains("forgetting")));
    assert!(lines.iter().any(|l| l.contains("before") && l.contains("after")));
}
