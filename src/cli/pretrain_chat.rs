use super::pretrain::Args;
use postforge::models::llama::LlamaForCausalLM;
use postforge::models::Weights;
use postforge::peft::{Adapted, AdapterPlan};
use postforge::text::sft::{MonitorConfig, SftTask};
use postforge::text::tiny_chat::{self as tc, accuracy, pretraining_data, rows, train_tokenizer};
use postforge::train::{ScheduleKind, TrainConfig, Trainer};
use std::io::IsTerminal;
use std::path::PathBuf;

pub fn run(a: &Args) -> anyhow::Result<()> {
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
