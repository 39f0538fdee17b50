//! Preference training on a tiny fresh Llama with LoRA: DPO raises the implicit-reward accuracy of
//! the training pairs, the reference is the adapter-free model (precomputed and cached, or on the
//! fly, to the same numbers), only the trained adapter is optimized, TRL's metric names reach
//! metrics.jsonl, and KTO / ORPO / SimPO train too.

use postforge::align::cpo::{CpoConfig, CpoLossType};
use postforge::align::dpo::DpoConfig;
use postforge::align::kto::KtoConfig;
use postforge::align::orpo::OrpoConfig;
use postforge::data::pref::{tokenize_pc, Seg, Seq};
use postforge::data::text::TextTokenizer;
use postforge::models::llama::{LlamaConfig, LlamaForCausalLM};
use postforge::models::Weights;
use postforge::peft::{AdapterConfig, AdapterPlan, ForwardCtx, ModuleSpec};
use postforge::text::align_task::{
    kto_examples, reference_cache_path, AlignData, AlignTask, Objective,
};
use postforge::text::tiny_chat::{preference_pairs, pretraining_data, train_tokenizer};
use postforge::train::{Task, TrainConfig, Trainer};

fn setup() -> (TextTokenizer, Vec<(Seq, Seq)>) {
    let (ex, _) = pretraining_data(300, 0, 1);
    let tok = train_tokenizer(&ex, 320).unwrap();
    let pairs = preference_pairs(&ex[..24], 3)
        .iter()
        .map(|p| {
            (
                tokenize_pc(&p.prompt, &p.chosen, &tok, 64).unwrap(),
                tokenize_pc(&p.prompt, &p.rejected, &tok, 64).unwrap(),
            )
        })
        .collect();
    (tok, pairs)
}

fn model(vocab: usize) -> (LlamaForCausalLM, AdapterConfig) {
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rope_theta": 10000.0
    }))
    .unwrap();
    let mut a = AdapterConfig::lora(8, 16.0, &[]);
    a.target_modules = Some(ModuleSpec::Regex("all-linear".into()));
    let w = Weights::fresh(5, AdapterPlan::single(a.clone(), 1).unwrap());
    (LlamaForCausalLM::new(&cfg, &w).unwrap(), a)
}

#[test]
fn dpo_learns_the_preferences_with_the_adapter_free_model_as_reference() {
    let (tok, pairs) = setup();
    let (m, a) = model(tok.vocab_size());
    let mut task = AlignTask::new(
        m,
        a,
        Objective::Dpo(DpoConfig {
            beta: 0.5,
            ..Default::default()
        }),
        AlignData::Pairs(pairs.clone()),
        8,
        tok.pad_id,
        7,
    )
    .unwrap();
    // At the start (B = 0) policy = reference: every implicit reward is 0.
    let before = task.preference_accuracy(&pairs, true).unwrap();
    assert_eq!(before, 0.0, "ties are not counted as right");
    // Only the `default` adapter is trained.
    assert!(task.trainable().iter().all(|(n, _)| n.contains(".default")));
    // The precomputed (and cached) reference equals the on-the-fly one.
    let (idx, ctx) = (vec![0usize, 3, 5], ForwardCtx::eval());
    let (l_fly, _) = task.loss_of(&idx, &ctx).unwrap();
    let d = tempfile::tempdir().unwrap();
    let cache = reference_cache_path(d.path(), &[], "test").unwrap();
    task.precompute_reference(Some(&cache)).unwrap();
    assert!(cache.exists());
    let (l_pre, _) = task.loss_of(&idx, &ctx).unwrap();
    let diff = (l_fly.to_scalar::<f32>().unwrap() - l_pre.to_scalar::<f32>().unwrap()).abs();
    assert!(diff < 1e-6, "precomputed reference differs by {diff}");
    // A tampered cache is not trusted: its checksum fails and it is rebuilt.
    let good = std::fs::read_to_string(&cache).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["logps"][0][0] = serde_json::json!(-1.0e3);
    std::fs::write(&cache, v.to_string()).unwrap();
    task.precompute_reference(Some(&cache)).unwrap();
    let (l_re, _) = task.loss_of(&idx, &ctx).unwrap();
    let diff = (l_re.to_scalar::<f32>().unwrap() - l_pre.to_scalar::<f32>().unwrap()).abs();
    assert!(diff < 1e-6, "the tampered cache was used: {diff}");
    assert_eq!(std::fs::read_to_string(&cache).unwrap(), good);
    let cfg = TrainConfig {
        learning_rate: 5e-3,
        max_steps: 24,
        output_dir: d.path().join("run"),
        ..Default::default()
    };
    let s = Trainer::new(cfg).unwrap().train(&mut task, false).unwrap();
    assert!(
        s.last_loss < s.first_loss,
        "{} -> {}",
        s.first_loss,
        s.last_loss
    );
    let after = task.preference_accuracy(&pairs, true).unwrap();
    assert!(
        after > 0.8,
        "implicit-reward accuracy on the training pairs: {after}"
    );
    let metrics = std::fs::read_to_string(d.path().join("run/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    ] {
        assert!(last[k].is_number(), "metrics.jsonl lacks {k}");
    }
    assert_ne!(last["logits/chosen"], last["logits/rejected"]);
    assert!(s.adapter_dir.join("adapter_config.json").exists());
}

#[test]
fn kto_orpo_and_simpo_train_and_bad_combinations_are_refused() {
    let (tok, pairs) = setup();
    let d = tempfile::tempdir().unwrap();
    for (i, obj) in [
        Objective::Orpo(OrpoConfig::default()),
        Objective::Cpo(CpoConfig {
            loss_type: CpoLossType::Simpo,
            cpo_alpha: 0.0,
            beta: 2.0,
            ..Default::default()
        }),
    ]
    .into_iter()
    .enumerate()
    {
        let (m, a) = model(tok.vocab_size());
        let mut task =
            AlignTask::new(m, a, obj, AlignData::Pairs(pairs.clone()), 8, tok.pad_id, 7).unwrap();
        let cfg = TrainConfig {
            learning_rate: 5e-3,
            max_steps: 12,
            output_dir: d.path().join(format!("r{i}")),
            ..Default::default()
        };
        let s = Trainer::new(cfg).unwrap().train(&mut task, false).unwrap();
        assert!(
            s.last_loss.is_finite() && s.last_loss < s.first_loss,
            "{i}: {} -> {}",
            s.first_loss,
            s.last_loss
        );
    }
    // KTO from the same pairs, unpaired.
    let mut seqs = vec![];
    let (mut prompts, mut comps) = (vec![], vec![]);
    for (c, r) in &pairs {
        for (s, l) in [(c, true), (r, false)] {
            let n = s.completion.iter().position(|x| *x == 1).unwrap();
            prompts.push(s.ids[..n].to_vec());
            comps.push(s.ids[n..].to_vec());
            seqs.push((s.clone(), l));
        }
    }
    let data = AlignData::Unpaired(kto_examples(seqs, &prompts, &comps, 64));
    let (m, a) = model(tok.vocab_size());
    let mut task = AlignTask::new(
        m,
        a,
        Objective::Kto(KtoConfig::default()),
        data,
        8,
        tok.pad_id,
        7,
    )
    .unwrap();
    let cfg = TrainConfig {
        learning_rate: 5e-3,
        max_steps: 12,
        output_dir: d.path().join("kto"),
        ..Default::default()
    };
    let s = Trainer::new(cfg).unwrap().train(&mut task, false).unwrap();
    assert!(s.last_loss.is_finite());
    let metrics = std::fs::read_to_string(d.path().join("kto/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"kl\"") && metrics.contains("\"logits/rejected\""));
    // KTO with paired data, DPO with unpaired data, and empty data are refused.
    let (m, a) = model(tok.vocab_size());
    assert!(AlignTask::new(
        m,
        a,
        Objective::Kto(KtoConfig::default()),
        AlignData::Pairs(pairs.clone()),
        8,
        0,
        0
    )
    .is_err());
    let (m, a) = model(tok.vocab_size());
    assert!(AlignTask::new(
        m,
        a,
        Objective::Dpo(DpoConfig::default()),
        AlignData::Pairs(vec![]),
        8,
        0,
        0
    )
    .is_err());
    let _ = Seg::Text(String::new());
}
