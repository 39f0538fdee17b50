//! The embedded default `tiny-sd`: a pixel-space (32×32 RGB) text-to-image pipeline trained from
//! scratch on the procedural shape corpus ([`crate::data::shapes`]), written in the diffusers folder
//! layout, and evaluated with the procedural detector (prompt adherence).

use super::objective::{Objective, TimestepSampler, TimestepSampling};
use super::pipeline::{Pipeline, SampleRequest};
use super::sampler::SamplerKind;
use super::schedule::{NoiseSchedule, Prediction, SchedulerConfig};
use crate::data::shapes::{self, adheres, Scene, Style};
use crate::media::image::{image_to_tensor, tensor_to_image};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::Weights;
use crate::peft::{Adapted, AdapterPlan, ForwardCtx};
use crate::rng::rng_for;
use crate::train::ema::{Ema, EmaConfig};
use crate::train::Task;
use crate::util::{save_safetensors, write_atomic};
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use rand::Rng;
use std::collections::BTreeMap;
use std::path::Path;

/// Image side in pixels.
pub const SIZE: usize = 32;
/// Token sequence length.
pub const MAX_TOKENS: usize = 16;

/// The word-level vocabulary: special tokens, then every word the captions use.
pub fn vocab() -> Vec<String> {
    let mut v: Vec<String> = ["<pad>", "<|startoftext|>", "<|endoftext|>", "<unk>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let words = [
        "a",
        "on",
        "the",
        "in",
        "background",
        ",",
        "style",
        "filled",
        "outlined",
        "striped",
    ];
    v.extend(words.iter().map(|s| s.to_string()));
    v.extend(shapes::SHAPES.iter().map(|s| s.to_string()));
    v.extend(shapes::COLORS.iter().map(|c| c.0.to_string()));
    v.extend(shapes::POSITIONS.iter().map(|p| p.0.to_string()));
    for b in shapes::BACKGROUNDS {
        if !v.iter().any(|w| w == b.0) {
            v.push(b.0.to_string());
        }
    }
    v
}

/// Writes `tokenizer.json` (WordLevel, lowercase, whitespace split, `<|startoftext|> … <|endoftext|>`)
/// and `tokenizer_config.json` into `dir`.
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    let (tok, cfg) = tokenizer_files()?;
    write_atomic(&dir.join("tokenizer.json"), tok.as_bytes())?;
    write_atomic(&dir.join("tokenizer_config.json"), cfg.as_bytes())
}

/// The texts of `tokenizer.json` and `tokenizer_config.json`.
pub fn tokenizer_files() -> Result<(String, String)> {
    let vocab = vocab();
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i.into()))
        .collect();
    let added: Vec<serde_json::Value> = vocab[..4]
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let special = |t: &str, id: usize| serde_json::json!({"id": t, "ids": [id], "tokens": [t]});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|startoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|startoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}],
            "special_tokens": {"<|startoftext|>": special("<|startoftext|>", 1), "<|endoftext|>": special("<|endoftext|>", 2)}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": "<unk>"}
    });
    let cfg = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"});
    let pretty = |v: &serde_json::Value| {
        serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))
    };
    Ok((pretty(&tok)?, pretty(&cfg)?))
}

/// The U-Net configuration: 3 levels (32, 64, 64 channels), attention at 16×16 and 8×8 only.
pub fn unet_config() -> UNetConfig {
    serde_json::from_value(serde_json::json!({
        "_class_name": "UNet2DConditionModel", "sample_size": SIZE, "in_channels": 3, "out_channels": 3,
        "block_out_channels": [32, 64, 64], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": 64, "attention_head_dim": 4,
        "norm_num_groups": 8, "norm_eps": 1e-5, "flip_sin_to_cos": true, "freq_shift": 0, "act_fn": "silu",
        "use_linear_projection": true
    }))
    .expect("static config")
}

/// The text encoder configuration.
pub fn text_config() -> ClipTextConfig {
    serde_json::from_value(serde_json::json!({
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab().len(),
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "projection_dim": 64
    }))
    .expect("static config")
}

/// The noise schedule (cosine, ε-prediction; DDIM by default for sampling).
pub fn scheduler_config() -> SchedulerConfig {
    serde_json::from_value(serde_json::json!({
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon", "clip_sample": false, "clip_sample_range": 1.0, "set_alpha_to_one": true,
        "steps_offset": 1, "timestep_spacing": "trailing"
    }))
    .expect("static config")
}

/// `tensors` plus every layer's merged weight and bias under its checkpoint name.
fn with_layers(
    mut tensors: BTreeMap<String, Tensor>,
    layers: Vec<&crate::peft::AdaptedLayer>,
) -> Result<BTreeMap<String, Tensor>> {
    for l in layers {
        let (w, b) = l.merged_tensors()?;
        tensors.insert(format!("{}.weight", l.path()), w);
        if let Some(b) = b {
            tensors.insert(format!("{}.bias", l.path()), b);
        }
    }
    Ok(tensors)
}

/// Every tensor of a freshly initialised U-Net of `cfg` (seeded), under diffusers names: for
/// writing test and template pipelines.
pub fn fresh_unet_tensors(cfg: &UNetConfig, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let w = Weights::fresh(
        seed,
        AdapterPlan {
            full_training: true,
            ..AdapterPlan::none()
        },
    );
    let unet = UNet2DConditionModel::new(cfg, &w)?;
    with_layers(w.created(), unet.layers())
}

/// Every tensor of a freshly initialised CLIP text encoder of `cfg` (seeded), under transformers
/// names; with `projection` also a `text_projection.weight` of that width (CLIPTextModelWithProjection).
pub fn fresh_text_tensors(
    cfg: &ClipTextConfig,
    seed: u64,
    projection: Option<usize>,
) -> Result<BTreeMap<String, Tensor>> {
    let w = Weights::fresh(
        seed,
        AdapterPlan {
            full_training: true,
            ..AdapterPlan::none()
        },
    );
    let te = ClipTextModel::new(cfg, &w)?;
    let mut t = with_layers(w.created(), te.layers())?;
    if let Some(p) = projection {
        t.insert(
            "text_projection.weight".into(),
            crate::rng::normal(
                &[p, cfg.hidden_size],
                0.1,
                &mut rng_for(seed, "text_projection"),
            )?,
        );
    }
    Ok(t)
}

/// Pretraining: U-Net and text encoder trained in full on captioned shapes.
pub struct PretrainTask {
    /// The denoiser.
    pub unet: UNet2DConditionModel,
    /// The text encoder.
    pub text: ClipTextModel,
    unet_init: BTreeMap<String, Tensor>,
    text_init: BTreeMap<String, Tensor>,
    images: Vec<Tensor>,
    ids: Vec<Tensor>,
    empty_ids: Tensor,
    schedule: NoiseSchedule,
    objective: Objective,
    batch: usize,
    seed: u64,
    caption_dropout: f64,
    zero_snr: bool,
    timesteps: TimestepSampler,
    ema: Option<Ema>,
}

impl PretrainTask {
    /// A fresh model and a corpus of `n` images (seeded).
    pub fn new(n: usize, batch: usize, seed: u64) -> Result<Self> {
        Self::with_init(n, batch, seed, None)
    }

    /// Like [`Self::new`], but starting from the weights of an existing tiny-sd pipeline folder
    /// (to continue pretraining with a new schedule).
    pub fn with_init(n: usize, batch: usize, seed: u64, init: Option<&Path>) -> Result<Self> {
        let full = AdapterPlan {
            full_training: true,
            ..AdapterPlan::none()
        };
        let (uw, tw) = match init {
            None => (
                Weights::fresh(seed, full.clone()),
                Weights::fresh(seed ^ 1, full),
            ),
            Some(dir) => (
                Weights::from_files(
                    &crate::models::weights::weight_files(&dir.join("unet"))?,
                    full.clone(),
                )?,
                Weights::from_files(
                    &crate::models::weights::weight_files(&dir.join("text_encoder"))?,
                    full,
                )?,
            ),
        };
        let unet = UNet2DConditionModel::new(&unet_config(), &uw)?;
        let text = ClipTextModel::new(&text_config(), &tw)?;
        // Tensors that are not layers (norms, position embeddings) are written back as they are.
        let keep = |w: &Weights| -> Result<BTreeMap<String, Tensor>> {
            if init.is_none() {
                return Ok(w.created());
            }
            let mut m = BTreeMap::new();
            for k in w.keys() {
                m.insert(k.clone(), w.get_any(k)?);
            }
            Ok(m)
        };
        let (unet_init, text_init) = (keep(&uw)?, keep(&tw)?);
        let (json, cfg) = tokenizer_files()?;
        let cfg: serde_json::Value =
            serde_json::from_str(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
        let tok = super::pipeline::PromptTokenizer::from_json(&json, &cfg, MAX_TOKENS)?;
        let data = shapes::dataset(n, SIZE as u32, Style::Filled, seed)?;
        let mut images = vec![];
        let mut ids = vec![];
        for (img, cap, _) in &data {
            images.push(image_to_tensor(img, &crate::util::device::current())?);
            ids.push(
                tok.encode(std::slice::from_ref(cap), &crate::util::device::current())?
                    .squeeze(0)?,
            );
        }
        let empty_ids = tok
            .encode(&[String::new()], &crate::util::device::current())?
            .squeeze(0)?;
        Ok(Self {
            unet,
            text,
            unet_init,
            text_init,
            images,
            ids,
            empty_ids,
            schedule: NoiseSchedule::new(&scheduler_config())?,
            objective: Objective {
                prediction: Prediction::Epsilon,
                min_snr_gamma: None,
                noise_offset: 0.0,
            },
            batch,
            seed,
            caption_dropout: 0.1,
            zero_snr: false,
            timesteps: TimestepSampling::default()
                .sampler(scheduler_config().num_train_timesteps)?,
            ema: None,
        })
    }

    /// Trains v-prediction instead of ε (the scheduler config written says `v_prediction`): at
    /// high noise v ≈ −x₀, so the model must take global content (background, position) from the
    /// prompt, which ε-prediction barely rewards there.
    pub fn with_v_prediction(mut self, v: bool) -> Self {
        self.objective.prediction = if v {
            Prediction::V
        } else {
            Prediction::Epsilon
        };
        self
    }

    /// Rescales the betas to zero terminal SNR (diffusers' `rescale_betas_zero_snr`, Lin et al.
    /// 2024): the last training timestep is pure noise, as at the start of sampling, so the model
    /// learns to draw the whole layout from the prompt. Needs v-prediction.
    pub fn with_zero_terminal_snr(mut self, on: bool) -> Result<Self> {
        if on {
            self.objective.prediction.check_zero_terminal_snr()?;
        }
        self.zero_snr = on;
        self.schedule = NoiseSchedule::new(&self.scheduler())?;
        Ok(self)
    }

    /// Keeps an exponential moving average of the weights (diffusers' `--use_ema`); the pipeline
    /// is then written with the averaged weights.
    pub fn with_ema(mut self, cfg: Option<EmaConfig>) -> Result<Self> {
        self.ema = match cfg {
            Some(c) => Some(Ema::new(c, &self.trainable())?),
            None => None,
        };
        Ok(self)
    }

    /// Sets which timesteps training draws.
    pub fn with_timestep_sampling(mut self, s: &TimestepSampling) -> Result<Self> {
        self.timesteps = s.sampler(self.schedule.len())?;
        Ok(self)
    }

    fn scheduler(&self) -> SchedulerConfig {
        let mut c = scheduler_config();
        if self.objective.prediction == Prediction::V {
            c.prediction_type = "v_prediction".into();
        }
        c.rescale_betas_zero_snr = self.zero_snr;
        c
    }

    /// Sets min-SNR-γ weighting of the loss (`None`: the plain ε-prediction MSE).
    pub fn with_min_snr_gamma(mut self, gamma: Option<f64>) -> Self {
        self.objective.min_snr_gamma = gamma;
        self
    }

    /// Writes the pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/),
    /// with the EMA weights when an average is kept.
    pub fn write_pipeline(&self, dir: &Path) -> Result<()> {
        let Some(ema) = &self.ema else {
            return self.write_pipeline_now(dir);
        };
        let vars = self.trainable();
        let old = ema.swap_in(&vars)?;
        let r = self.write_pipeline_now(dir);
        Ema::restore(&vars, &old)?;
        r
    }

    fn write_pipeline_now(&self, dir: &Path) -> Result<()> {
        // The library versions the files are written for, as diffusers / transformers write them.
        fn versioned(
            v: impl serde::Serialize,
            key: &str,
            version: &str,
        ) -> Result<serde_json::Value> {
            let mut v = serde_json::to_value(v).map_err(|e| Error::Msg(e.to_string()))?;
            if let Some(o) = v.as_object_mut() {
                o.insert(key.into(), version.into());
            }
            Ok(v)
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let pretty = |v: &serde_json::Value| {
            serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))
        };
        save_safetensors(
            &dir.join("unet/diffusion_pytorch_model.safetensors"),
            &with_layers(self.unet_init.clone(), self.unet.layers())?,
            Some(meta.clone()),
        )?;
        write_atomic(
            &dir.join("unet/config.json"),
            pretty(&versioned(unet_config(), "_diffusers_version", "0.42.1")?)?.as_bytes(),
        )?;
        save_safetensors(
            &dir.join("text_encoder/model.safetensors"),
            &with_layers(self.text_init.clone(), self.text.layers())?,
            Some(meta),
        )?;
        write_atomic(
            &dir.join("text_encoder/config.json"),
            pretty(&versioned(text_config(), "transformers_version", "5.24.0")?)?.as_bytes(),
        )?;
        std::fs::create_dir_all(dir.join("tokenizer")).map_err(|e| Error::io(dir, e))?;
        write_tokenizer(&dir.join("tokenizer"))?;
        write_atomic(
            &dir.join("scheduler/scheduler_config.json"),
            pretty(&versioned(
                self.scheduler(),
                "_diffusers_version",
                "0.42.1",
            )?)?
            .as_bytes(),
        )?;
        let index = serde_json::json!({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "scheduler": ["diffusers", "DDIMScheduler"],
            "vae": [null, null], "safety_checker": [null, null], "feature_extractor": [null, null], "requires_safety_checker": false});
        write_atomic(&dir.join("model_index.json"), pretty(&index)?.as_bytes())
    }
}

impl Task for PretrainTask {
    fn trainable(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .unet
            .trainable()
            .into_iter()
            .map(|(n, v)| (format!("unet/{n}"), v))
            .collect();
        v.extend(
            self.text
                .trainable()
                .into_iter()
                .map(|(n, v)| (format!("text_encoder/{n}"), v)),
        );
        v
    }

    fn loss(&mut self, cursor: u64, ctx: &ForwardCtx) -> Result<Tensor> {
        let n = self.images.len();
        let mut rng = rng_for(self.seed, &format!("pretrain-batch-{cursor}"));
        let (mut xs, mut ids, mut ts) = (vec![], vec![], vec![]);
        for _ in 0..self.batch {
            let i = rng.random_range(0..n);
            xs.push(self.images[i].clone());
            ids.push(if rng.random::<f64>() < self.caption_dropout {
                self.empty_ids.clone()
            } else {
                self.ids[i].clone()
            });
            ts.push(self.timesteps.draw(&mut rng));
        }
        let x0 = Tensor::stack(&xs, 0)?;
        let noise = self.objective.noise(x0.dims(), &mut rng)?;
        let xt = self.schedule.add_noise(&x0, &noise, &ts)?;
        let cond = self.text.condition(&Tensor::stack(&ids, 0)?, 1, ctx)?;
        let t = Tensor::from_vec(
            ts.iter().map(|t| *t as f32).collect::<Vec<_>>(),
            self.batch,
            &crate::util::device::current(),
        )?;
        let pred = self.unet.forward(&xt, &t, &cond, None, ctx)?;
        let target = self.objective.target(&self.schedule, &x0, &noise, &ts)?;
        self.objective.loss(
            &pred,
            &target,
            &self.objective.weights(&self.schedule, &ts),
            None,
        )
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        self.write_pipeline(dir)
    }

    fn after_update(
        &mut self,
        _step: usize,
        _grads: &BTreeMap<String, Tensor>,
        _grad_scale: f64,
    ) -> Result<()> {
        if self.ema.is_some() {
            let vars = self.trainable();
            if let Some(e) = self.ema.as_mut() {
                e.update(&vars)?;
            }
        }
        Ok(())
    }

    fn task_state(&self) -> Result<(BTreeMap<String, Tensor>, serde_json::Value)> {
        Ok(match &self.ema {
            Some(e) => e.state(),
            None => (BTreeMap::new(), serde_json::Value::Null),
        })
    }

    fn load_task_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        json: &serde_json::Value,
    ) -> Result<()> {
        match self.ema.as_mut() {
            Some(e) => e.load_state(tensors, json),
            None => Ok(()),
        }
    }
}

/// Samples `n` random scenes (seeded) and reports how many the detector finds as prompted.
pub fn adherence(
    p: &Pipeline,
    n: usize,
    seed: u64,
    steps: usize,
    guidance: f64,
) -> Result<(usize, AttributeHits, Vec<(image::RgbImage, String)>)> {
    let mut hits = AttributeHits::default();
    let mut rng = rng_for(seed, "adherence");
    let scenes: Vec<Scene> = (0..n).map(|_| Scene::random(&mut rng)).collect();
    let prompts: Vec<String> = scenes.iter().map(|s| s.caption()).collect();
    let mut ok = 0;
    let mut out = vec![];
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let ps: Vec<String> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let seeds: Vec<u64> = chunk.iter().map(|&i| seed + i as u64).collect();
        let imgs = p.sample(
            &SampleRequest {
                prompts: ps.to_vec(),
                negative: String::new(),
                seeds: seeds.to_vec(),
                steps,
                guidance,
                sampler: SamplerKind::Ddim { eta: 0.0 },
                size: (SIZE, SIZE),
            },
            &ForwardCtx::eval(),
        )?;
        for (k, &i) in chunk.iter().enumerate() {
            let img = tensor_to_image(&imgs.get(k)?)?;
            if adheres(&img, &scenes[i]) {
                ok += 1;
            }
            if let Some(d) = shapes::detect(&img).scene {
                let w = &scenes[i];
                hits.shape += (d.shape == w.shape) as usize;
                hits.color += (d.color == w.color) as usize;
                hits.position += (d.position == w.position) as usize;
                hits.background += (d.background == w.background) as usize;
            }
            out.push((img, prompts[i].clone()));
        }
    }
    Ok((ok, hits, out))
}

/// How many sampled images show each prompted attribute (detected separately).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttributeHits {
    /// Shape as prompted.
    pub shape: usize,
    /// Colour as prompted.
    pub color: usize,
    /// Position as prompted.
    pub position: usize,
    /// Background as prompted.
    pub background: usize,
}
