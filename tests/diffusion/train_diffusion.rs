//! LoRA training of an image pipeline (kohya semantics) and the pipeline-file runner, on a freshly
//! initialised tiny-sd pipeline and a procedural style set.

use candle_core::Tensor;
use postforge::data::image_folder::write_kohya;
use postforge::data::shapes::{dataset, Style};
use postforge::diffusion::pipeline::SampleRequest;
use postforge::diffusion::tiny_sd::PretrainTask;
use postforge::diffusion::train::{train_lora, LoraTrainConfig, LoraTrainTask};
use postforge::peft::formats::lora_file::{LoraFile, LoraFormat};
use postforge::peft::{Adapted, ForwardCtx};
use postforge::recipe::Recipe;
use postforge::train::Task;
use std::path::Path;

/// A fresh tiny-sd pipeline, a striped style set (square 32×32, plus a few 48×32 images in a
/// second concept folder), and a prompt file.
fn setup(dir: &Path) {
    PretrainTask::new(8, 2, 3)
        .unwrap()
        .write_pipeline(&dir.join("model"))
        .unwrap();
    let items: Vec<_> = dataset(6, 32, Style::Striped, 5)
        .unwrap()
        .into_iter()
        .map(|(i, c, _)| (i, c))
        .collect();
    write_kohya(&dir.join("data"), 2, "striped", &items, ".txt").unwrap();
    let wide: Vec<_> = dataset(3, 32, Style::Striped, 6)
        .unwrap()
        .into_iter()
        .map(|(i, c, _)| {
            (
                image::imageops::resize(&i, 48, 32, image::imageops::FilterType::Nearest),
                c,
            )
        })
        .collect();
    write_kohya(&dir.join("data"), 1, "wide", &wide, ".txt").unwrap();
    std::fs::write(
        dir.join("prompts.txt"),
        "# samples\na red circle on the left, black background --d 3 --s 2 --l 3\n\na blue square in the center, white background --w 32 --h 32 --s 2\n",
    )
    .unwrap();
}

fn config(dir: &Path, out: &str) -> LoraTrainConfig {
    let mut c = LoraTrainConfig::new(&dir.join("model"), &dir.join("data"), &dir.join(out));
    c.resolution = "32".into();
    c.enable_bucket = true;
    c.min_bucket_reso = 16;
    c.max_bucket_reso = 64;
    c.bucket_reso_steps = 8;
    c.network_dim = 4;
    c.network_alpha = 2.0;
    c.conv_dim = Some(2);
    c.learning_rate = 1e-3;
    c.max_train_steps = 4;
    c.train_batch_size = 2;
    c.save_every_n_steps = 2;
    c.min_snr_gamma = Some(5.0);
    c.noise_offset = 0.05;
    c.caption_dropout_rate = 0.25;
    c.shuffle_caption = true;
    c.keep_tokens = 1;
    c.flip_aug = true;
    c.seed = 11;
    c
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let (f, _) = LoraFile::read(path, None).unwrap();
    f.modules
        .iter()
        .flat_map(|(k, m)| {
            [
                (
                    format!("{k}.down"),
                    m.down.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                ),
                (
                    format!("{k}.up"),
                    m.up.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                ),
            ]
        })
        .collect()
}

#[test]
fn lora_training_writes_a_kohya_file_samples_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let mut cfg = config(dir, "run");
    cfg.sample_prompts = Some(dir.join("prompts.txt"));
    cfg.sample_every_n_steps = 2;
    cfg.sample_at_first = true;
    let (s, file, task) = train_lora(&cfg, false, false).unwrap();
    assert_eq!(s.steps, 4);
    assert!(s.first_loss.is_finite() && s.last_loss.is_finite());
    // Buckets: the 48×32 images got their own bucket; 6·2 + 3·1 = 15 images with repeats.
    assert_eq!(task.num_images(), 9);
    // Per bucket: 6 images × 2 repeats in batches of 2, and 3 wide images × 1 repeat: 6 + 2.
    assert_eq!(task.batches_per_epoch(), 8);
    // Samples before training and every 2 steps, kohya's file names.
    for step in [0, 2, 4] {
        assert!(
            dir.join(format!("run/sample/last_{step:06}_00_3.png"))
                .exists(),
            "step {step}"
        );
        assert!(
            dir.join(format!("run/sample/last_{step:06}_01_12.png"))
                .exists(),
            "step {step}"
        );
    }
    // The kohya file: U-Net linears, LoCon convs, text encoder, kohya metadata.
    let (f, fmt) = LoraFile::read(&file, None).unwrap();
    assert_eq!(fmt, LoraFormat::Kohya);
    let keys: Vec<&String> = f.modules.keys().collect();
    assert!(keys.iter().any(|k| k.ends_with("attn1.to_q")));
    assert!(keys.iter().any(|k| k.ends_with("resnets.0.conv1")));
    assert!(keys
        .iter()
        .any(|k| k.starts_with("text_encoder.") && k.ends_with("q_proj")));
    let conv = f
        .modules
        .iter()
        .find(|(k, _)| k.ends_with("resnets.0.conv1"))
        .unwrap()
        .1;
    assert_eq!(
        (conv.rank(), conv.alpha),
        (2, 2.0),
        "conv_dim 2, conv_alpha defaults to network_alpha"
    );
    assert_eq!(
        f.metadata.get("ss_network_dim").map(String::as_str),
        Some("4")
    );
    assert_eq!(f.metadata.get("ss_steps").map(String::as_str), Some("4"));
    assert!(f
        .metadata
        .get("ss_network_args")
        .is_some_and(|a| a.contains("conv_dim")));
    let trained = tensors(&file);
    assert!(
        trained
            .iter()
            .any(|(k, v)| k.ends_with(".up") && v.iter().any(|x| *x != 0.0)),
        "training moved the up projections away from zero"
    );

    // Interrupted after step 2 and resumed: the same LoRA as the unbroken run.
    let full = config(dir, "part");
    let mut inner = LoraTrainTask::new(full.clone()).unwrap();
    let mut killed = Interrupt {
        inner: &mut inner,
        at: 2,
    };
    let trainer = postforge::train::Trainer::new(full.trainer(false).unwrap()).unwrap();
    assert!(
        trainer.train(&mut killed, false).is_err(),
        "the run was interrupted"
    );
    let (s2, file2, _) = train_lora(&full, true, false).unwrap();
    assert_eq!(s2.resumed_from, Some(2));
    let resumed = tensors(&file2);
    assert_eq!(trained.len(), resumed.len());
    for ((k, a), (_, b)) in trained.iter().zip(&resumed) {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-6, "{k}: resumed run differs by {d}");
    }
    // A finished run in the folder is not overwritten by accident.
    assert!(train_lora(&full, false, false).is_err());
}

#[test]
fn every_adapter_tensor_gets_gradient_and_the_base_none() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let mut cfg = config(dir, "grad");
    cfg.caption_dropout_rate = 0.0;
    cfg.dora_wd = true;
    let mut task = LoraTrainTask::new(cfg).unwrap();
    let params = task.trainable();
    assert!(params.iter().any(|(n, _)| n.starts_with("text_encoder.")));
    assert!(params
        .iter()
        .any(|(n, _)| n.contains("lora_magnitude_vector")));
    // B starts at zero, so A gets no gradient on the first step: move B off zero first.
    for (n, v) in &params {
        if n.contains("lora_B") {
            v.set(&(v.as_tensor().ones_like().unwrap() * 0.01).unwrap())
                .unwrap();
        }
    }
    let loss = task.loss(0, &ForwardCtx::train(1, 0)).unwrap();
    let grads = loss.backward().unwrap();
    for (n, v) in &params {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{n}: no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{n}: gradient norm {norm}");
    }
    // Frozen base weights are plain tensors: no gradient is kept for them.
    let layers = task.pipe.unet.layers();
    assert!(layers.iter().any(|l| l.path() == "conv_in"));
    for l in layers.iter().chain(task.pipe.text_encoder.layers().iter()) {
        let w: &Tensor = &l.weight().unwrap();
        assert!(grads.get(w).is_none(), "frozen {} got a gradient", l.path());
    }
}

#[test]
fn bad_training_input_is_refused_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    // Resolution not divisible by the U-Net's downsampling.
    let mut c = config(dir, "bad");
    c.resolution = "30".into();
    let e = LoraTrainTask::new(c).err().unwrap().to_string();
    assert!(e.contains("30x30") && e.contains("downsampling"), "{e}");
    // An empty data folder.
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let mut c = config(dir, "bad");
    c.train_data_dir = dir.join("empty");
    let e = LoraTrainTask::new(c).err().unwrap().to_string();
    assert!(e.contains("no training images"), "{e}");
    // Zero terminal SNR without v-prediction, and timestep settings out of range.
    let mut c = config(dir, "bad");
    c.zero_terminal_snr = true;
    let e = LoraTrainTask::new(c).err().unwrap().to_string();
    assert!(e.contains("v-prediction"), "{e}");
    let mut c = config(dir, "bad");
    c.min_timestep = Some(900);
    c.max_timestep = Some(100);
    let e = LoraTrainTask::new(c).err().unwrap().to_string();
    assert!(e.contains("min_timestep 900"), "{e}");
    let mut c = config(dir, "bad");
    c.timestep_bias_strategy = "middle".into();
    let e = LoraTrainTask::new(c).err().unwrap().to_string();
    assert!(e.contains("timestep_bias_strategy `middle`"), "{e}");
    // With v-prediction both are accepted, and the timesteps stay in the asked range.
    let mut c = config(dir, "ok");
    c.v_parameterization = true;
    c.zero_terminal_snr = true;
    c.min_timestep = Some(500);
    c.timestep_bias_strategy = "later".into();
    c.timestep_bias_multiplier = 3.0;
    assert!(LoraTrainTask::new(c).is_ok());
    // A corrupt image names the file.
    std::fs::write(dir.join("data/2_striped/0000.png"), b"not a png").unwrap();
    let e = LoraTrainTask::new(config(dir, "bad"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("0000.png"), "{e}");
}

#[test]
fn the_shipped_style_pipeline_parses_and_a_small_recipe_runs_end_to_end() {
    let r = Recipe::load(Path::new("pipelines/style-lora.toml")).unwrap();
    assert_eq!(r.stage.len(), 2);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let text = format!(
        r#"name = "mini"
[[stage]]
kind = "train-diffusion"
pretrained_model_name_or_path = "{m}"
train_data_dir = "{d}"
output_dir = "{o}"
resolution = "32"
network_dim = 2
max_train_steps = 2
train_batch_size = 2
network_train_unet_only = true

[[stage]]
kind = "diffusion-eval"
prompts = ["a red circle on the left, black background", "a green square on the top, white background"]
scales = [0.0, 1.0]
steps = 2
style = "striped"
score_samples = 3
"#,
        m = dir.join("model").display(),
        d = dir.join("data").display(),
        o = dir.join("out").display()
    );
    std::fs::write(dir.join("mini.toml"), text).unwrap();
    let r = Recipe::load(&dir.join("mini.toml")).unwrap();
    let mut lines = vec![];
    let reps = r
        .run(false, &indicatif::ProgressBar::hidden(), &mut |l| {
            lines.push(l.to_string())
        })
        .unwrap();
    assert_eq!(reps.len(), 2);
    assert!(dir.join("out/last.safetensors").exists());
    assert!(dir.join("out/loss_curve.png").exists());
    let grid = image::open(dir.join("out/before_after.png")).unwrap();
    assert!(grid.width() > 2 * 32 && grid.height() > 2 * 32);
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/eval.json")).unwrap()).unwrap();
    assert_eq!(eval["scores"].as_array().unwrap().len(), 2);
    // Each scale lists exactly the samples that missed (3 scored), each with a parseable prompt.
    for sc in eval["scores"].as_array().unwrap() {
        let misses = sc["misses"].as_array().unwrap();
        let adherence = sc["adherence"].as_f64().unwrap();
        assert_eq!(
            misses.len(),
            (3.0 * (1.0 - adherence)).round() as usize,
            "{sc}"
        );
        for m in misses {
            assert!(m["index"].as_u64().unwrap() < 3, "{m}");
            let prompt = m["prompt"].as_str().unwrap();
            assert!(
                postforge::data::shapes::Scene::parse(prompt).is_some(),
                "{m}"
            );
        }
    }
    assert!(lines.iter().any(|l| l.contains("style score")));
    // Running the recipe again starts afresh instead of refusing the existing run folder.
    r.run(false, &indicatif::ProgressBar::hidden(), &mut |_| {})
        .unwrap();
    // Unknown keys are refused, naming the key.
    std::fs::write(
        dir.join("bad.toml"),
        "[[stage]]\nkind = \"train-diffusion\"\npretrained_model_name_or_path = \"m\"\ntrain_data_dir = \"d\"\noutput_dir = \"o\"\nnetwork_dimm = 4\n",
    )
    .unwrap();
    let e = Recipe::load(&dir.join("bad.toml")).unwrap_err().to_string();
    assert!(e.contains("network_dimm") && e.contains("bad.toml"), "{e}");
}

/// Delegates to a task and fails at micro-batch `at` (a crash in the middle of a run).
struct Interrupt<'a> {
    inner: &'a mut LoraTrainTask,
    at: u64,
}

impl Task for Interrupt<'_> {
    fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        self.inner.trainable()
    }
    fn loss(&mut self, cursor: u64, ctx: &ForwardCtx) -> postforge::Result<Tensor> {
        if cursor == self.at {
            return Err(postforge::Error::Msg("killed".into()));
        }
        self.inner.loss(cursor, ctx)
    }
    fn save_adapter(&self, dir: &Path) -> postforge::Result<()> {
        self.inner.save_adapter(dir)
    }
}

#[test]
fn a_latent_pipeline_with_a_vae_trains_on_latents_and_samples_images() {
    use postforge::diffusion::pipeline::Pipeline;
    use postforge::diffusion::sampler::SamplerKind;
    use postforge::peft::AdapterPlan;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    // Turn the pixel pipeline into a latent one: the fixture VAE (factor 2, 4 latent channels)
    // and a U-Net with 4 input and output channels.
    let model = dir.join("model");
    crate::common::make_latent_pipeline(&model);

    let p = Pipeline::load(&model, AdapterPlan::none(), AdapterPlan::none()).unwrap();
    assert_eq!(p.vae_factor(), 2);
    let img = p
        .sample(
            &SampleRequest {
                prompts: vec!["a red circle".into()],
                negative: String::new(),
                seeds: vec![1],
                steps: 2,
                guidance: 2.0,
                sampler: SamplerKind::Euler,
                size: (32, 32),
            },
            &ForwardCtx::eval(),
        )
        .unwrap();
    assert_eq!(img.dims(), &[1, 3, 32, 32]);
    // Buckets must now be multiples of 4 (U-Net) × 2 (VAE).
    let mut c = config(dir, "latent");
    c.bucket_reso_steps = 4;
    let e = LoraTrainTask::new(c).err().unwrap().to_string();
    assert!(e.contains("bucket_reso_steps 4") && e.contains('8'), "{e}");
    let c = config(dir, "latent");
    let (s, file, task) = train_lora(&c, false, false).unwrap();
    assert_eq!(s.steps, 4);
    assert!(s.last_loss.is_finite());
    assert!(file.exists());
    // The cached inputs are latents (4 channels at half the resolution).
    assert_eq!(task.pipe.vae_factor(), 2);
}

#[test]
fn an_sdxl_pipeline_with_two_text_encoders_samples_and_trains() {
    use postforge::diffusion::pipeline::Pipeline;
    use postforge::diffusion::sampler::SamplerKind;
    use postforge::diffusion::tiny_sd::{fresh_text_tensors, text_config, write_tokenizer};
    use postforge::models::unet::UNetConfig;
    use postforge::peft::AdapterPlan;
    use postforge::util::save_safetensors;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    // An SDXL-layout pipeline: the SDXL-like U-Net fixture (text_time conditioning, context 32 =
    // 16 + 16, pooled 16), two 16-wide CLIP encoders (the second with a projection), the fixture VAE.
    let m = dir.join("sdxl");
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (sub, from) in [("unet", "unet/sdxl"), ("vae", "vae")] {
        std::fs::create_dir_all(m.join(sub)).unwrap();
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(fx.join(from).join(f), m.join(sub).join(f)).unwrap();
        }
    }
    let ucfg = UNetConfig::from_file(&m.join("unet/config.json")).unwrap();
    assert_eq!(ucfg.addition_embed_type.as_deref(), Some("text_time"));
    for (i, sub) in ["text_encoder", "text_encoder_2"].iter().enumerate() {
        let mut c = text_config();
        c.hidden_size = 16;
        c.intermediate_size = 32;
        c.num_attention_heads = 2;
        std::fs::create_dir_all(m.join(sub)).unwrap();
        std::fs::write(
            m.join(sub).join("config.json"),
            serde_json::to_string(&c).unwrap(),
        )
        .unwrap();
        let t = fresh_text_tensors(&c, 20 + i as u64, (i == 1).then_some(16)).unwrap();
        save_safetensors(&m.join(sub).join("model.safetensors"), &t, None).unwrap();
        let tok = m.join(if i == 0 { "tokenizer" } else { "tokenizer_2" });
        std::fs::create_dir_all(&tok).unwrap();
        write_tokenizer(&tok).unwrap();
    }
    std::fs::create_dir_all(m.join("scheduler")).unwrap();
    std::fs::copy(
        dir.join("model/scheduler/scheduler_config.json"),
        m.join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    std::fs::write(
        m.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"], "force_zeros_for_empty_prompt": true}"#,
    )
    .unwrap();
    let p = Pipeline::load(&m, AdapterPlan::none(), AdapterPlan::none()).unwrap();
    assert!(p.text_time() && p.force_zeros_for_empty_prompt);
    let c = p
        .encode_cond(&["a red circle".into()], &ForwardCtx::eval_with_grad())
        .unwrap();
    assert_eq!(c.context.dims(), &[1, 16, 32]);
    assert_eq!(c.pooled.as_ref().unwrap().dims(), &[1, 16]);
    let img = p
        .sample(
            &SampleRequest {
                prompts: vec!["a red circle".into()],
                negative: String::new(),
                seeds: vec![1],
                steps: 2,
                guidance: 3.0,
                sampler: SamplerKind::Euler,
                size: (16, 24),
            },
            &ForwardCtx::eval(),
        )
        .unwrap();
    assert_eq!(img.dims(), &[1, 3, 16, 24]);
    // LoRA training on both text encoders and the U-Net; the kohya file has lora_te1 / lora_te2.
    let mut cfg = config(dir, "sdxl-run");
    cfg.pretrained_model_name_or_path = m.clone();
    cfg.resolution = "16".into();
    cfg.enable_bucket = false;
    cfg.conv_dim = None;
    cfg.max_train_steps = 2;
    let (s, file, _) = train_lora(&cfg, false, false).unwrap();
    assert!(s.last_loss.is_finite());
    let (f, _) = LoraFile::read(&file, None).unwrap();
    assert!(f.modules.keys().any(|k| k.starts_with("text_encoder.")));
    assert!(f.modules.keys().any(|k| k.starts_with("text_encoder_2.")));
    assert_eq!(
        f.metadata.get("ss_base_model_version").map(String::as_str),
        Some("sdxl_base_v1-0")
    );
    let raw = postforge::util::SafeTensors::read(&file)
        .unwrap()
        .into_tensors();
    assert!(
        raw.keys().any(|k| k.starts_with("lora_te1_"))
            && raw.keys().any(|k| k.starts_with("lora_te2_"))
    );
}

/// kohya's per-block ranks and lr weights reach the layers of their blocks (IN04 = down_blocks.1's
/// resnet and attention, MID = mid_block, OUT = up_blocks), blocks of rank 0 get no adapter, and
/// `unet_lr` / `text_encoder_lr` scale their groups.
#[test]
fn block_dims_and_lr_weights_reach_the_right_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let mut cfg = config(dir, "blocks");
    let mut dims = vec!["4"; 25];
    dims[4] = "3";
    dims[12] = "5";
    for d in dims.iter_mut().skip(13) {
        *d = "0";
    }
    cfg.block_dims = Some(postforge::diffusion::train::blocks::NumList::Text(
        dims.join(","),
    ));
    let mut conv = vec![2.0; 25];
    conv[13..].fill(0.0);
    cfg.conv_block_dims = Some(postforge::diffusion::train::blocks::NumList::List(conv));
    cfg.down_lr_weight = Some(postforge::diffusion::train::blocks::NumList::Text(
        "zeros+0.5".into(),
    ));
    cfg.mid_lr_weight = Some(2.0);
    cfg.unet_lr = Some(3e-3);
    cfg.text_encoder_lr = Some(5e-4);
    let task = LoraTrainTask::new(cfg).unwrap();
    let rank = |path: &str| -> Option<usize> {
        let layers = task.pipe.unet.layers();
        let l = layers
            .iter()
            .find(|l| l.path() == path)
            .unwrap_or_else(|| panic!("no layer {path}"));
        l.lora("default").map(|a| a.r)
    };
    assert_eq!(
        rank("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        Some(3)
    );
    assert_eq!(rank("down_blocks.1.resnets.0.conv_shortcut"), Some(3));
    assert_eq!(rank("down_blocks.1.resnets.0.conv1"), Some(2));
    assert_eq!(rank("down_blocks.0.resnets.0.conv2"), Some(2));
    assert_eq!(
        rank("mid_block.attentions.0.transformer_blocks.0.ff.net.2"),
        Some(5)
    );
    assert_eq!(rank("conv_in"), None);
    for l in task.pipe.unet.layers() {
        if l.path().starts_with("up_blocks.") {
            assert!(!l.has_adapter("default"), "{} has an adapter", l.path());
        }
    }
    let scales = task.lr_scales();
    let params = task.trainable();
    for (n, _) in &params {
        let want = if n.starts_with("unet.") && n.contains(".down_blocks.") {
            1.5
        } else if n.starts_with("unet.") && n.contains(".mid_block.") {
            6.0
        } else if n.starts_with("text_encoder.") {
            0.5
        } else {
            3.0
        };
        assert_eq!(scales.get(n).copied().unwrap_or(1.0), want, "{n}");
    }
}

/// kohya's validation split: the held-out images are chosen by `validation_seed` alone, the
/// validation loss is the same number each time it is measured on the same weights (fixed noise and
/// timesteps, no dropout, no graph), and a run writes it to `metrics.jsonl` at the chosen steps.
#[test]
fn validation_split_is_deterministic_and_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let mut cfg = config(dir, "val");
    cfg.validation_split = 0.25;
    cfg.validation_seed = Some(3);
    cfg.validate_every_n_steps = Some(3);
    cfg.sample_every_n_steps = 0;
    let mut a = LoraTrainTask::new(cfg.clone()).unwrap();
    assert_eq!((a.num_images(), a.num_validation_images()), (6, 3));
    let first = a.validation_loss().unwrap().unwrap();
    assert!(first.is_finite() && first > 0.0);
    assert_eq!(a.validation_loss().unwrap().unwrap(), first);
    // Another training seed, same validation seed: the same images are held out, same loss
    // (the adapters start at zero, so the model is the base).
    let mut other = cfg.clone();
    other.seed = 99;
    let mut b = LoraTrainTask::new(other).unwrap();
    assert_eq!(b.validation_loss().unwrap().unwrap(), first);
    let mut moved = cfg.clone();
    moved.validation_seed = Some(4);
    let mut c = LoraTrainTask::new(moved).unwrap();
    assert_ne!(c.validation_loss().unwrap().unwrap(), first);

    train_lora(&cfg, false, true).unwrap();
    let text = std::fs::read_to_string(dir.join("val").join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["val_loss"].as_f64().is_some_and(f64::is_finite))
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![3, 4], "{text}");

    let mut bad = cfg.clone();
    bad.validation_split = 1.0;
    assert!(LoraTrainTask::new(bad.clone()).is_err() || bad.trainer(true).is_err());
    bad.validation_split = 0.99;
    let e = LoraTrainTask::new(bad).err().unwrap().to_string();
    assert!(e.contains("validation_split"), "{e}");
}

/// kohya's regularisation folders: each epoch has as many regularisation samples as training
/// samples (repeats counted), and `prior_loss_weight` scales their loss (0 = the same loss as
/// training on the training images alone for a batch of regularisation images).
#[test]
fn reg_folders_with_repeats_join_every_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let reg: Vec<_> = dataset(2, 32, Style::Filled, 9)
        .unwrap()
        .into_iter()
        .map(|(i, c, _)| (i, c))
        .collect();
    write_kohya(&dir.join("reg"), 3, "shape", &reg, ".txt").unwrap();
    let mut cfg = config(dir, "reg");
    cfg.enable_bucket = false;
    cfg.flip_aug = false;
    cfg.caption_dropout_rate = 0.0;
    cfg.shuffle_caption = false;
    let plain = LoraTrainTask::new(cfg.clone()).unwrap();
    cfg.reg_data_dir = Some(dir.join("reg"));
    let task = LoraTrainTask::new(cfg.clone()).unwrap();
    assert_eq!((task.num_images(), task.num_reg_images()), (9, 2));
    // 6 × 2 + 3 × 1 = 15 training samples and 15 regularisation samples, batches of 2.
    assert_eq!(plain.batches_per_epoch(), 8);
    assert_eq!(task.batches_per_epoch(), 15);
    // With prior_loss_weight 0 a batch of regularisation images has zero loss.
    cfg.prior_loss_weight = 0.0;
    let mut zero = LoraTrainTask::new(cfg.clone()).unwrap();
    let losses: Vec<f32> = (0..15)
        .map(|c| {
            zero.loss(c, &ForwardCtx::eval())
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .collect();
    assert!(losses.iter().any(|l| *l == 0.0), "{losses:?}");
    assert!(losses.iter().any(|l| *l > 0.0), "{losses:?}");
    cfg.prior_loss_weight = f64::NAN;
    let e = LoraTrainTask::new(cfg).err().unwrap().to_string();
    assert!(e.contains("prior_loss_weight"), "{e}");
}

/// diffusers' prior preservation: the missing class images are drawn by the base model into
/// class_data_dir (and not again on a second run), then train as regularisation images.
#[test]
fn missing_class_images_are_generated_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let mut cfg = config(dir, "prior");
    cfg.with_prior_preservation = true;
    cfg.class_data_dir = Some(dir.join("class"));
    cfg.class_prompt = Some("a red circle on the left, black background".into());
    cfg.num_class_images = 3;
    cfg.sample_batch_size = 2;
    cfg.class_inference_steps = 2;
    let task = LoraTrainTask::new(cfg.clone()).unwrap();
    assert_eq!(task.num_reg_images(), 3);
    let mut files: Vec<_> = std::fs::read_dir(dir.join("class"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["class-00000.png", "class-00001.png", "class-00002.png"]
    );
    let before = std::fs::read(dir.join("class").join("class-00001.png")).unwrap();
    LoraTrainTask::new(cfg.clone()).unwrap();
    assert_eq!(
        std::fs::read(dir.join("class").join("class-00001.png")).unwrap(),
        before
    );
    cfg.class_prompt = None;
    let e = LoraTrainTask::new(cfg).err().unwrap().to_string();
    assert!(e.contains("class_prompt"), "{e}");
}

/// Writes a mask for every training image into `dir/<same relative path>.png`, from `f(w, h)`.
fn write_masks(data: &Path, dir: &Path, f: impl Fn(u32, u32) -> image::GrayImage) {
    for sub in std::fs::read_dir(data).unwrap().flatten() {
        for img in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let p = img.path();
            if p.extension().is_some_and(|e| e == "png") {
                let (w, h) = image::image_dimensions(&p).unwrap();
                let out = dir.join(p.strip_prefix(data).unwrap());
                std::fs::create_dir_all(out.parent().unwrap()).unwrap();
                f(w, h).save(&out).unwrap();
            }
        }
    }
}

#[test]
fn masked_training_learns_only_where_the_masks_are_white() {
    use postforge::diffusion::train::LoraTrainTask;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let task_for = |masks: Option<&str>, route: bool| {
        let mut c = config(dir, "masked");
        c.caption_dropout_rate = 0.0;
        c.flip_aug = false;
        c.shuffle_caption = false;
        if let Some(m) = masks {
            c.masked_loss = true;
            c.route_adapter_to_mask = route;
            c.conditioning_data_dir = Some(dir.join(m));
        }
        let t = LoraTrainTask::new(c).unwrap();
        // B starts at zero: move it off zero so that every factor gets a gradient.
        for (n, v) in t.trainable() {
            if n.contains("lora_B") || n.contains("lora_up") {
                v.set(&(v.as_tensor().ones_like().unwrap() * 0.01).unwrap())
                    .unwrap();
            }
        }
        t
    };
    let grads = |t: &mut LoraTrainTask| {
        let loss = t.loss(0, &ForwardCtx::train(1, 0)).unwrap();
        let g = loss.backward().unwrap();
        let v: Vec<(String, Vec<f32>)> = t
            .trainable()
            .iter()
            .map(|(n, v)| {
                let gr = g
                    .get(v.as_tensor())
                    .map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .unwrap_or_default();
                (n.clone(), gr)
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), v)
    };
    let white = |w, h| image::GrayImage::from_pixel(w, h, image::Luma([255]));
    let black = |w, h| image::GrayImage::from_pixel(w, h, image::Luma([0]));
    let left = |w: u32, h| {
        image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x < w / 2 { 255 } else { 0 }]))
    };
    write_masks(&dir.join("data"), &dir.join("white"), white);
    write_masks(&dir.join("data"), &dir.join("black"), black);
    write_masks(&dir.join("data"), &dir.join("left"), left);
    let (l0, g0) = grads(&mut task_for(None, false));
    // All-white masks, routed: the plain adapter and the plain loss.
    let (l1, g1) = grads(&mut task_for(Some("white"), true));
    assert!((l0 - l1).abs() <= 1e-6 * l0.abs().max(1.0), "{l0} vs {l1}");
    for ((n, a), (_, b)) in g0.iter().zip(&g1) {
        let e = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let s = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(
            e <= 1e-4 * s.max(1e-6),
            "{n}: white-mask gradient off by {e} (scale {s})"
        );
    }
    // All-black masks: nothing to learn from, and the routed adapter acts nowhere.
    let (l2, g2) = grads(&mut task_for(Some("black"), true));
    assert_eq!(l2, 0.0);
    for (n, g) in &g2 {
        assert!(
            g.iter().all(|x| *x == 0.0),
            "{n}: a gradient from a black mask"
        );
    }
    // Half masks, routed: every adapter tensor still learns (finite, non-zero), and the loss is
    // smaller than the whole image's.
    let (l3, g3) = grads(&mut task_for(Some("left"), true));
    assert!(l3 > 0.0 && l3 < l0, "{l3} vs {l0}");
    for (n, g) in &g3 {
        let s: f32 = g.iter().map(|x| x * x).sum();
        assert!(s.is_finite() && s > 0.0, "{n}: gradient norm {s}");
    }
    // A missing mask names the image; alpha_mask on images without alpha says so.
    std::fs::remove_dir_all(dir.join("left/2_striped")).unwrap();
    let mut c = config(dir, "masked");
    c.masked_loss = true;
    c.conditioning_data_dir = Some(dir.join("left"));
    let e = LoraTrainTask::new(c).err().unwrap().to_string();
    assert!(e.contains("2_striped") && e.contains("no mask"), "{e}");
    let mut c = config(dir, "masked");
    c.masked_loss = true;
    c.alpha_mask = true;
    let e = LoraTrainTask::new(c).err().unwrap().to_string();
    assert!(e.contains("alpha channel"), "{e}");
    let mut c = config(dir, "masked");
    c.masked_loss = true;
    let e = postforge::check::Ranged::check(&c).unwrap_err().to_string();
    assert!(e.contains("conditioning_data_dir"), "{e}");
}
