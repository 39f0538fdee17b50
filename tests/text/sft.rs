//! SFT on a freshly initialised tiny Llama with LoRA: the loss on held-out task data falls, the
//! forgetting monitor records reference perplexity (and can stop a run), replay mixes data in, and
//! a resumed run equals an unbroken one.

use postforge::data::chat::CHATML;
use postforge::data::sft::{pack_bfd, tokenize, unpacked, SftExample, SftOptions};
use postforge::data::text::{train_bpe, TextTokenizer};
use postforge::models::llama::{LlamaConfig, LlamaForCausalLM};
use postforge::models::Weights;
use postforge::peft::{AdapterConfig, AdapterPlan};
use postforge::text::sft::{MonitorConfig, SftTask};
use postforge::train::{Task, TrainConfig, Trainer};

fn tokenizer() -> TextTokenizer {
    let texts: Vec<String> = (0..300)
        .map(|i| {
            format!(
                "what is {} plus {}? {}. the sky is blue and the grass is green.",
                i % 50,
                i % 7,
                i % 50 + i % 7
            )
        })
        .collect();
    let t = train_bpe(
        &texts,
        320,
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    .unwrap();
    TextTokenizer::from_parts(
        t,
        &serde_json::json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}),
    )
    .unwrap()
}

/// A LoRA r8 / alpha 16 config on every linear layer.
fn all_linear() -> AdapterConfig {
    let mut a = AdapterConfig::lora(8, 16.0, &[]);
    a.target_modules = Some(postforge::peft::config::ModuleSpec::Regex(
        "all-linear".into(),
    ));
    a
}

/// A fresh tiny Llama carrying adapter `a`.
fn model_with(vocab: usize, a: AdapterConfig) -> (LlamaForCausalLM, AdapterConfig) {
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rope_theta": 10000.0
    }))
    .unwrap();
    let w = Weights::fresh(5, AdapterPlan::single(a.clone(), 1).unwrap());
    (LlamaForCausalLM::new(&cfg, &w).unwrap(), a)
}

fn model(vocab: usize) -> (LlamaForCausalLM, AdapterConfig) {
    model_with(vocab, all_linear())
}

/// The two tasks' trainable tensors agree to 1e-6 (a resumed run against an unbroken one).
fn assert_same_trainables(a: &SftTask, b: &SftTask) {
    for ((n, x), (_, y)) in a.trainable().iter().zip(&b.trainable()) {
        let dlt: f32 = (x.as_tensor() - y.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(dlt < 1e-6, "{n}: resumed differs by {dlt}");
    }
}

fn rows(
    tok: &TextTokenizer,
    range: std::ops::Range<usize>,
    packed: bool,
) -> Vec<postforge::data::sft::Row> {
    let seqs: Vec<_> = range
        .map(|i| {
            let ex = SftExample::from_json(&serde_json::json!({
                "prompt": [{"role": "user", "content": format!("what is {} plus {}?", i % 50, i % 7)}],
                "completion": [{"role": "assistant", "content": format!("{}", i % 50 + i % 7)}]}))
            .unwrap();
            tokenize(&ex, tok, &SftOptions::default()).unwrap()
        })
        .collect();
    if packed {
        pack_bfd(&seqs, 96)
    } else {
        unpacked(&seqs)
    }
}

fn reference(tok: &TextTokenizer) -> Vec<postforge::data::sft::Row> {
    let seqs: Vec<_> = (0..6)
        .map(|i| {
            tokenize(
                &SftExample::Text(format!("the sky is blue and the grass is green. {i}")),
                tok,
                &SftOptions::default(),
            )
            .unwrap()
        })
        .collect();
    unpacked(&seqs)
}

#[test]
fn sft_learns_the_task_and_the_monitor_tracks_forgetting() {
    let tok = tokenizer();
    let (m, a) = model(tok.vocab_size());
    let d = tempfile::tempdir().unwrap();
    let mut task = SftTask::new(m, a, rows(&tok, 0..64, true), 4, tok.pad_id, 3)
        .unwrap()
        .with_replay(reference(&tok), 0.1)
        .unwrap()
        .with_monitor(
            rows(&tok, 100..116, false),
            reference(&tok),
            MonitorConfig {
                eval_steps: 10,
                max_forgetting: Some(10.0),
                stop_on_forgetting: false,
            },
        );
    let before = task.mean_loss(&rows(&tok, 100..116, false)).unwrap();
    let cfg = TrainConfig {
        learning_rate: 5e-3,
        max_steps: 30,
        output_dir: d.path().join("run"),
        save_steps: 10,
        ..Default::default()
    };
    let s = Trainer::new(cfg.clone())
        .unwrap()
        .train(&mut task, false)
        .unwrap();
    let after = task.mean_loss(&rows(&tok, 100..116, false)).unwrap();
    assert!(after < 0.7 * before, "held-out loss {before} -> {after}");
    assert_eq!(task.history.len(), 4, "evaluations at steps 0, 10, 20, 30");
    assert_eq!(task.history[0].forgetting, 0.0);
    assert!(task.history.iter().all(|p| p.reference_ppl.is_finite()));
    let lines = std::fs::read_to_string(d.path().join("run/eval.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);
    // The adapter is a PEFT folder.
    assert!(s.adapter_dir.join("adapter_config.json").exists());
    assert!(s.adapter_dir.join("adapter_model.safetensors").exists());

    // A resumed run (from step 20) ends where the unbroken one did.
    let (m2, a2) = model(tok.vocab_size());
    let mut t2 = SftTask::new(m2, a2, rows(&tok, 0..64, true), 4, tok.pad_id, 3)
        .unwrap()
        .with_replay(reference(&tok), 0.1)
        .unwrap();
    std::fs::remove_dir_all(d.path().join("run/checkpoint-30")).unwrap();
    let s2 = Trainer::new(cfg).unwrap().train(&mut t2, true).unwrap();
    assert_eq!(s2.resumed_from, Some(20));
    assert_same_trainables(&task, &t2);
}

#[test]
fn the_forgetting_monitor_can_stop_a_run_and_empty_data_is_refused() {
    let tok = tokenizer();
    let (m, a) = model(tok.vocab_size());
    assert!(SftTask::new(m, a.clone(), vec![], 4, 0, 0).is_err());
    let (m, a) = model(tok.vocab_size());
    let d = tempfile::tempdir().unwrap();
    // A threshold below any possible change stops at the first evaluation.
    let mut task = SftTask::new(m, a, rows(&tok, 0..16, false), 4, tok.pad_id, 3)
        .unwrap()
        .with_monitor(
            vec![],
            reference(&tok),
            MonitorConfig {
                eval_steps: 2,
                max_forgetting: Some(-1.0),
                stop_on_forgetting: true,
            },
        );
    let cfg = TrainConfig {
        max_steps: 4,
        output_dir: d.path().join("run"),
        ..Default::default()
    };
    let e = Trainer::new(cfg)
        .unwrap()
        .train(&mut task, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("forgetting"), "{e}");
}

fn adalora_model(vocab: usize) -> (LlamaForCausalLM, AdapterConfig) {
    let mut a = all_linear();
    a.peft_type = "ADALORA".into();
    for (k, v) in [
        ("init_r", 6),
        ("target_r", 3),
        ("tinit", 2),
        ("tfinal", 3),
        ("total_step", 12),
    ] {
        a.extra.insert(k.into(), serde_json::json!(v));
    }
    a.validate().unwrap();
    model_with(vocab, a)
}

#[test]
fn adalora_sft_prunes_to_the_target_budget_saves_its_pattern_and_resumes_exactly() {
    let tok = tokenizer();
    let d = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        learning_rate: 5e-3,
        max_steps: 12,
        output_dir: d.path().join("run"),
        save_steps: 4,
        ..Default::default()
    };
    let (m, a) = adalora_model(tok.vocab_size());
    let mut task = SftTask::new(m, a, rows(&tok, 0..64, true), 4, tok.pad_id, 3).unwrap();
    let s = Trainer::new(cfg.clone())
        .unwrap()
        .train(&mut task, false)
        .unwrap();
    assert!(
        s.last_loss < s.first_loss,
        "{} -> {}",
        s.first_loss,
        s.last_loss
    );
    // 14 layers × target_r 3 ranks survive, the rest of E is zero; the config says which.
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["peft_type"], "ADALORA");
    let pattern = saved["rank_pattern"].as_object().unwrap();
    assert_eq!(pattern.len(), 14);
    let kept: usize = pattern
        .values()
        .map(|m| {
            m.as_array()
                .unwrap()
                .iter()
                .filter(|b| b == &&serde_json::json!(true))
                .count()
        })
        .sum();
    assert_eq!(kept, 14 * 3);
    let st = postforge::util::SafeTensors::read(s.adapter_dir.join("adapter_model.safetensors"))
        .unwrap();
    let e_rows: usize = st
        .keys()
        .filter(|k| k.ends_with("lora_E"))
        .map(|k| st.get(k).unwrap().dim(0).unwrap())
        .sum();
    assert_eq!(e_rows, kept, "saved tensors are cut to the kept ranks");
    // Interrupted at step 8 and resumed (allocator state from the checkpoint): the same factors.
    let (m2, a2) = adalora_model(tok.vocab_size());
    let mut t2 = SftTask::new(m2, a2, rows(&tok, 0..64, true), 4, tok.pad_id, 3).unwrap();
    std::fs::remove_dir_all(d.path().join("run/checkpoint-12")).unwrap();
    let s2 = Trainer::new(cfg).unwrap().train(&mut t2, true).unwrap();
    assert_eq!(s2.resumed_from, Some(8));
    assert_same_trainables(&task, &t2);
}
