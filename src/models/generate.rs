//! Autoregressive decoding shared by every decoder (the Llama family today, VLM language models
//! next): transformers' `generation_config.json` settings, greedy / temperature / top-k / top-p
//! token choice, and the loop over a KV cache. Generation runs without an autograd graph.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// A model that decodes with a cache: the next-token logits of `ids` appended to the cache.
pub trait Decoder {
    /// The decoder's cache of keys and values.
    type Cache;
    /// An empty cache.
    fn new_cache(&self) -> Self::Cache;
    /// Positions already in `cache`.
    fn cached(&self, cache: &Self::Cache) -> usize;
    /// The longest sequence the model takes.
    fn max_positions(&self) -> usize;
    /// The logits (V) after the last of `ids`, with `ids` added to `cache`; no graph recorded.
    fn next_logits(&self, ids: &[u32], cache: &mut Self::Cache) -> Result<Vec<f32>>;
}

/// Generates a continuation of `prompt` (token ids); returns the new tokens. A prompt that leaves
/// no room for one new token within the model's positions is an error that says so.
pub fn generate<D: Decoder>(model: &D, prompt: &[u32], cfg: &GenerationConfig) -> Result<Vec<u32>> {
    cfg.validate()?;
    if prompt.is_empty() {
        return Err(Error::Msg("generation needs a non-empty prompt".into()));
    }
    if prompt.len() >= model.max_positions() {
        return Err(Error::Msg(format!(
            "the prompt has {} tokens; the model takes {} positions, which leaves no room to generate",
            prompt.len(),
            model.max_positions()
        )));
    }
    let mut rng = crate::rng::rng_for(cfg.seed, "generate");
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut out = vec![];
    for _ in 0..cfg.max_new_tokens {
        if model.cached(&cache) + input.len() > model.max_positions() {
            break;
        }
        let last = model.next_logits(&input, &mut cache)?;
        let next = pick_token(&last, cfg, &mut rng)?;
        out.push(next);
        if cfg.stop_token_ids.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

/// Decoding settings (transformers' `generation_config.json` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Sample (false: greedy).
    pub do_sample: bool,
    /// Softmax temperature when sampling.
    pub temperature: f64,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop when one of these is generated (it is kept in the output).
    pub stop_token_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_token_ids: vec![],
        }
    }
}

impl GenerationConfig {
    /// Checks the values (each named): a temperature that is finite and not negative, `top_p` in
    /// (0, 1], at least one new token.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Config(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Config(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::Config("max_new_tokens must be at least 1".into()));
        }
        Ok(())
    }
}

/// Picks the next token from logits (V) as configured.
pub fn pick_token(
    logits: &[f32],
    cfg: &GenerationConfig,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<u32> {
    use rand::Rng;
    if logits.is_empty() {
        return Err(Error::Msg("empty logits".into()));
    }
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 {
                    (i, v)
                } else {
                    b
                }
            })
            .0 as u32
    };
    if !cfg.do_sample || cfg.temperature <= 0.0 {
        return Ok(argmax());
    }
    let t = cfg.temperature as f32;
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l - m) / t).exp()))
        .collect();
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if cfg.top_k > 0 {
        p.truncate(cfg.top_k);
    }
    let total: f32 = p.iter().map(|x| x.1).sum();
    if cfg.top_p < 1.0 {
        let mut acc = 0f32;
        let mut keep = 0;
        for (k, x) in p.iter().enumerate() {
            acc += x.1 / total;
            keep = k + 1;
            if acc >= cfg.top_p as f32 {
                break;
            }
        }
        p.truncate(keep.max(1));
    }
    let total: f32 = p.iter().map(|x| x.1).sum();
    let mut u = rng.random::<f32>() * total;
    for (i, w) in &p {
        if u < *w {
            return Ok(*i as u32);
        }
        u -= w;
    }
    Ok(p.last().map(|x| x.0 as u32).unwrap_or_else(argmax))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder whose next token is always (last id + 1) mod 5, with 8 positions.
    struct Counter;
    impl Decoder for Counter {
        type Cache = usize;
        fn new_cache(&self) -> usize {
            0
        }
        fn cached(&self, c: &usize) -> usize {
            *c
        }
        fn max_positions(&self) -> usize {
            8
        }
        fn next_logits(&self, ids: &[u32], c: &mut usize) -> Result<Vec<f32>> {
            *c += ids.len();
            let mut l = vec![0f32; 5];
            l[((ids[ids.len() - 1] + 1) % 5) as usize] = 1.0;
            Ok(l)
        }
    }

    #[test]
    fn the_loop_stops_at_a_stop_token_or_the_last_position() {
        let cfg = GenerationConfig {
            max_new_tokens: 10,
            ..Default::default()
        };
        // Prompt of 2: 6 more positions, the last token is generated from position 7.
        assert_eq!(
            generate(&Counter, &[0, 1], &cfg).unwrap(),
            vec![2, 3, 4, 0, 1, 2, 3]
        );
        let stop = GenerationConfig {
            stop_token_ids: vec![4],
            ..cfg.clone()
        };
        assert_eq!(generate(&Counter, &[1], &stop).unwrap(), vec![2, 3, 4]);
        let e = generate(&Counter, &[0; 8], &cfg).unwrap_err().to_string();
        assert!(e.contains("8 tokens") && e.contains("no room"), "{e}");
        assert!(generate(&Counter, &[], &cfg).is_err());
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        for (c, key) in [
            (
                GenerationConfig {
                    temperature: f64::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerationConfig {
                    top_p: 5.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerationConfig {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerationConfig {
                    max_new_tokens: 0,
                    ..Default::default()
                },
                "max_new_tokens",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
