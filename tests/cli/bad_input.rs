//! Bad input gets a clear error that names the file, the key and the shapes, never a panic.

use crate::common::*;
use postforge::peft::formats::peft::{self as files, SaveOptions};
use postforge::peft::{AdaptedLayer, AdapterConfig, AdapterPlan, BaseKind};
use std::path::Path;

fn saved_lora(dir: &Path) -> AdapterConfig {
    let cfg = AdapterConfig::lora(4, 8.0, &["proj"]);
    let l = AdapterPlan::single(cfg.clone(), 1)
        .unwrap()
        .apply(
            AdaptedLayer::new(
                "block.proj",
                BaseKind::Linear,
                randn(&[24, 16], 0.3, "w"),
                None,
            )
            .unwrap(),
        )
        .unwrap();
    files::save(dir, &[&l], "default", &cfg, SaveOptions::default()).unwrap();
    cfg
}

fn layer(out: usize, inn: usize) -> AdaptedLayer {
    AdaptedLayer::new(
        "block.proj",
        BaseKind::Linear,
        randn(&[out, inn], 0.3, "w2"),
        None,
    )
    .unwrap()
}

#[test]
fn mismatched_adapter_names_key_and_both_shapes() {
    let d = tempfile::tempdir().unwrap();
    saved_lora(d.path());
    let mut l = layer(24, 12);
    let msg = files::load(d.path(), &mut [&mut l], "default")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("base_model.model.block.proj.lora_A.weight"),
        "{msg}"
    );
    assert!(msg.contains("[4, 16]") && msg.contains("[4, 12]"), "{msg}");
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
}

#[test]
fn unknown_peft_type_and_values_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    saved_lora(d.path());
    let cfg_path = d.path().join("adapter_config.json");
    let orig = std::fs::read_to_string(&cfg_path).unwrap();
    for (from, to, needle) in [
        (
            "\"peft_type\": \"LORA\"",
            "\"peft_type\": \"PROMPT_TUNING\"",
            "PROMPT_TUNING",
        ),
        (
            "\"init_lora_weights\": true",
            "\"init_lora_weights\": \"eva\"",
            "eva",
        ),
        ("\"bias\": \"none\"", "\"bias\": \"some\"", "bias"),
        ("\"r\": 4", "\"r\": \"four\"", "adapter_config.json"),
    ] {
        assert!(orig.contains(from), "{from} not in {orig}");
        std::fs::write(&cfg_path, orig.replace(from, to)).unwrap();
        let msg = files::load(d.path(), &mut [&mut layer(24, 16)], "default")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(needle) && msg.contains("adapter_config.json"),
            "{to}: {msg}"
        );
    }
    std::fs::write(
        &cfg_path,
        orig.replacen("{", "{\n  \"use_qalora\": true,", 1),
    )
    .unwrap();
    let msg = files::load(d.path(), &mut [&mut layer(24, 16)], "default")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("use_qalora"), "{msg}");
}

#[test]
fn truncated_or_foreign_files_are_errors_not_panics() {
    let d = tempfile::tempdir().unwrap();
    saved_lora(d.path());
    let w = d.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 10]).unwrap();
    let msg = files::load(d.path(), &mut [&mut layer(24, 16)], "default")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("adapter_model.safetensors") && msg.contains("safetensors"),
        "{msg}"
    );
    std::fs::write(&w, b"this is not a safetensors file at all").unwrap();
    let msg = files::load(d.path(), &mut [&mut layer(24, 16)], "default")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
    std::fs::write(&w, b"").unwrap();
    assert!(files::load(d.path(), &mut [&mut layer(24, 16)], "default").is_err());
    let msg = files::load(&d.path().join("nope"), &mut [&mut layer(24, 16)], "default")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nope"), "{msg}");
}

#[test]
fn missing_and_unmatched_tensors_are_named() {
    let d = tempfile::tempdir().unwrap();
    saved_lora(d.path());
    // The model has no module `block.proj`: the file's tensors match nothing.
    let mut other = AdaptedLayer::new(
        "block.other",
        BaseKind::Linear,
        randn(&[24, 16], 0.3, "w"),
        None,
    )
    .unwrap();
    let msg = files::load(d.path(), &mut [&mut other], "default")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("block.proj") && msg.contains("does not match any module"),
        "{msg}"
    );
    // A targeted module whose tensors are missing.
    let w = d.path().join("adapter_model.safetensors");
    let st = postforge::util::SafeTensors::read(&w).unwrap();
    let mut t = st.into_tensors();
    t.remove("base_model.model.block.proj.lora_B.weight");
    postforge::util::save_safetensors(&w, &t, None).unwrap();
    let msg = files::load(d.path(), &mut [&mut layer(24, 16)], "default")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing") && msg.contains("block.proj"),
        "{msg}"
    );
}

#[test]
fn merged_checkpoint_shape_mismatch_names_key() {
    let d = tempfile::tempdir().unwrap();
    saved_lora(d.path());
    let base = d.path().join("base.safetensors");
    let t = std::collections::BTreeMap::from([(
        "block.proj.weight".to_string(),
        randn(&[24, 15], 0.3, "x"),
    )]);
    postforge::util::save_safetensors(&base, &t, None).unwrap();
    let msg = postforge::peft::merge::merge_folder_into_checkpoint(
        &base,
        d.path(),
        &d.path().join("out.safetensors"),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("block.proj"), "{msg}");
    assert!(
        !d.path().join("out.safetensors").exists(),
        "nothing half-written"
    );
}

#[test]
fn bad_config_values_are_rejected_at_plan_time() {
    let mut c = AdapterConfig::lora(0, 8.0, &["proj"]);
    assert!(AdapterPlan::single(c.clone(), 0)
        .unwrap_err()
        .to_string()
        .contains("r must be"));
    c.r = 4;
    c.lora_dropout = 1.5;
    assert!(AdapterPlan::single(c.clone(), 0)
        .unwrap_err()
        .to_string()
        .contains("lora_dropout"));
    c.lora_dropout = 0.0;
    c.target_modules = Some(postforge::peft::ModuleSpec::Regex("(unclosed".into()));
    assert!(AdapterPlan::single(c, 0)
        .unwrap_err()
        .to_string()
        .contains("regex"));
    // PiSSA on an embedding is refused with the reason.
    let mut c = AdapterConfig::lora(2, 2.0, &["emb"]);
    c.init_lora_weights = postforge::peft::InitSpec::Method("pissa".into());
    let e = AdapterPlan::single(c, 0).unwrap().apply(
        AdaptedLayer::new("emb", BaseKind::Embedding, randn(&[10, 4], 1.0, "e"), None).unwrap(),
    );
    assert!(e
        .err()
        .unwrap()
        .to_string()
        .contains("only defined for Linear"));
}

#[test]
fn a_nan_adapter_weight_is_refused_unless_allowed() {
    use candle_core::{Device, Tensor};
    use postforge::peft::formats::lora_file::{LoraFile, LoraFormat, ModuleLora};
    let d = tempfile::tempdir().unwrap();
    let mut f = LoraFile::default();
    let mut down = vec![0.1f32; 8];
    down[3] = f32::NAN;
    f.modules.insert(
        "unet.down_blocks.0.attentions.0.proj_in".into(),
        ModuleLora {
            down: Tensor::from_vec(down, (2, 4), &Device::Cpu).unwrap(),
            up: Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
            alpha: 2.0,
            magnitude: None,
        },
    );
    let input = d.path().join("nan.safetensors");
    f.write(&input, LoraFormat::Kohya).unwrap();
    let out = d.path().join("out.safetensors");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_postforge"))
            .args(extra)
            .args(["convert", "--to", "diffusers", "--out"])
            .arg(&out)
            .arg(&input)
            .output()
            .unwrap()
    };
    let refused = run(&[]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && !out.exists());
    assert!(
        err.contains("nan.safetensors")
            && err.contains("lora_down.weight")
            && err.contains("--allow-nonfinite"),
        "{err}"
    );
    let allowed = run(&["--allow-nonfinite"]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert!(out.exists());
}
