use clap::Args as ClapArgs;
use postforge::check;
use postforge::data::chat::message;
use postforge::data::text::TextTokenizer;
use postforge::models::generate::GenerationConfig;
use postforge::models::llama::LlamaForCausalLM;
use postforge::peft::{Adapted, AdapterPlan};
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model folder (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt (a user message when the model has a chat template, unless --raw).
    #[arg(long)]
    prompt: String,
    /// Feed the prompt as plain text, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Built-in chat template (chatml, llama3, vicuna) for models without one.
    #[arg(long)]
    chat_template: Option<String>,
    /// Tokens to generate, ≥ 1.
    #[arg(long, default_value_t = 128, value_parser = check::count)]
    max_new_tokens: usize,
    /// Sampling temperature, ≥ 0 (0 = greedy).
    #[arg(long, default_value_t = 0.0, value_parser = check::non_negative)]
    temperature: f64,
    /// Nucleus sampling: the smallest set of tokens with this much probability, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = check::fraction)]
    top_p: f64,
    /// Sample among the k most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Quantize the base's linear layers on load: nf4, nf4-no-dq or none (4-bit checkpoints are
    /// read in 4 bits regardless).
    #[arg(long, default_value = "none")]
    quantize: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut tok = TextTokenizer::load(&a.model)?;
    if let Some(name) = &a.chat_template {
        tok.use_builtin_template(name)?;
    }
    let quant = postforge::peft::quant::QuantSpec::parse(&a.quantize)?;
    let mut model = LlamaForCausalLM::load(&a.model, AdapterPlan::none().quantized(quant))?;
    if let Some(ad) = &a.adapter {
        postforge::peft::formats::peft::load(ad, &mut model.layers_mut(), "default")?;
    }
    let text = match (&tok.chat_template, a.raw) {
        (Some(t), false) => t.render(&[message("user", &a.prompt)], true)?,
        _ => a.prompt.clone(),
    };
    let mut ids = vec![];
    if let (Some(b), true) = (&tok.bos, tok.add_bos) {
        if !text.starts_with(&b.0) {
            ids.push(b.1);
        }
    }
    ids.extend(tok.encode(&text)?);
    let mut stop = model.config().eos_ids();
    if let Some(e) = &tok.eos {
        stop.push(e.1);
    }
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        do_sample: a.temperature > 0.0,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        stop_token_ids: stop,
    };
    let t0 = std::time::Instant::now();
    let out = model.generate(&ids, &cfg)?;
    let dt = t0.elapsed().as_secs_f64();
    println!("{}", tok.decode(&out, true)?);
    eprintln!(
        "{} tokens in {dt:.2}s ({:.1} tokens/s)",
        out.len(),
        out.len() as f64 / dt.max(1e-9)
    );
    Ok(())
}
