//! kohya / diffusers single-file LoRAs: lossless round trips, exact re-application to a U-Net
//! (LoRA, LoCon convs, DoRA), name mapping without a model, and clear errors.

use crate::common::*;
use candle_core::Tensor;
use postforge::models::unet::{UNet2DConditionModel, UNetConfig};
use postforge::models::Weights;
use postforge::peft::formats::lora_file::{kohya_to_path, LoraFile, LoraFormat};
use postforge::peft::{Adapted, AdapterConfig, AdapterPlan, ForwardCtx, InitSpec};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet/sd1")
}

fn unet(plan: AdapterPlan) -> UNet2DConditionModel {
    let cfg = UNetConfig::from_file(&dir().join("config.json")).unwrap();
    let w =
        Weights::from_files(&[dir().join("diffusion_pytorch_model.safetensors")], plan).unwrap();
    UNet2DConditionModel::new(&cfg, &w).unwrap()
}

fn predict(m: &UNet2DConditionModel) -> Tensor {
    let x = randn(&[1, 4, 8, 8], 1.0, "lx");
    let t = Tensor::new(&[500f32], &candle_core::Device::Cpu).unwrap();
    let c = randn(&[1, 5, 32], 1.0, "lc");
    m.forward(&x, &t, &c, None, &ForwardCtx::eval()).unwrap()
}

fn adapted(dora: bool) -> UNet2DConditionModel {
    // Attention LoRA plus LoCon on resnet convs, with a per-module rank and alpha.
    let mut cfg = AdapterConfig::lora(
        4,
        8.0,
        &[
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "ff.net.0.proj",
            "ff.net.2",
            "proj_in",
            "proj_out",
            "conv1",
            "conv2",
        ],
    );
    cfg.rank_pattern.insert("conv1".into(), 2);
    cfg.alpha_pattern.insert("conv2".into(), 1.0);
    cfg.init_lora_weights = InitSpec::Bool(false);
    cfg.use_dora = dora;
    unet(AdapterPlan::single(cfg, 9).unwrap())
}

#[test]
fn kohya_and_diffusers_round_trips_are_lossless_and_reapply_exactly() {
    let d = tempfile::tempdir().unwrap();
    for dora in [false, true] {
        let model = adapted(dora);
        let y = predict(&model);
        let mut f = LoraFile::default();
        f.add_layers("unet", &model.layers(), "default").unwrap();
        let n = f.modules.len();
        assert!(n > 30, "{n} modules");
        let k1 = d.path().join(format!("a{dora}.safetensors"));
        f.write(&k1, LoraFormat::Kohya).unwrap();
        // kohya -> (names re-joined without a model) -> diffusers -> kohya
        let (rk, fmt) = LoraFile::read(&k1, None).unwrap();
        assert_eq!(fmt, LoraFormat::Kohya);
        assert_eq!(
            rk.modules.keys().collect::<Vec<_>>(),
            f.modules.keys().collect::<Vec<_>>(),
            "kohya names map back to diffusers paths"
        );
        let dfile = d.path().join(format!("b{dora}.safetensors"));
        rk.write(&dfile, LoraFormat::Diffusers).unwrap();
        let (rd, fmt) = LoraFile::read(&dfile, None).unwrap();
        assert_eq!(fmt, LoraFormat::Diffusers);
        let k2 = d.path().join(format!("c{dora}.safetensors"));
        rd.write(&k2, LoraFormat::Kohya).unwrap();
        let (a, b) = (
            postforge::util::SafeTensors::read(&k1).unwrap(),
            postforge::util::SafeTensors::read(&k2).unwrap(),
        );
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for k in a.keys() {
            assert_eq!(
                max_abs_diff(&a.get(k).unwrap(), &b.get(k).unwrap()),
                0.0,
                "{k} changed in the round trip"
            );
        }
        assert_eq!(a.metadata()["ss_network_dim"], "4");
        // Both files re-applied to a fresh U-Net give the adapted model's prediction.
        for file in [&k1, &dfile] {
            let (lf, _) = LoraFile::read(file, None).unwrap();
            let mut fresh = unet(AdapterPlan::none());
            let applied = lf
                .apply("unet", &mut fresh.layers_mut(), "default", file)
                .unwrap();
            assert_eq!(applied, n);
            let e = max_abs_diff(&predict(&fresh), &y);
            assert!(e < 1e-5, "dora={dora} {}: {e}", file.display());
        }
    }
}

#[test]
fn kohya_names_map_to_diffusers_paths() {
    for p in [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "up_blocks.1.attentions.2.proj_out",
        "mid_block.resnets.1.time_emb_proj",
        "down_blocks.1.resnets.0.conv_shortcut",
        "text_model.encoder.layers.11.self_attn.out_proj",
        "text_model.encoder.layers.0.mlp.fc1",
        "single_transformer_blocks.3.proj_mlp",
        "transformer_blocks.0.attn.add_q_proj",
    ] {
        assert_eq!(kohya_to_path(&p.replace('.', "_"), None), p);
    }
}

#[test]
fn bad_lora_files_are_named_errors() {
    let d = tempfile::tempdir().unwrap();
    let model = adapted(false);
    let mut f = LoraFile::default();
    f.add_layers("unet", &model.layers(), "default").unwrap();
    let k = d.path().join("k.safetensors");
    f.write(&k, LoraFormat::Kohya).unwrap();
    // Applied to a model with other channel counts: names the module and both shapes.
    let (lf, _) = LoraFile::read(&k, None).unwrap();
    let first = lf.modules.keys().next().unwrap().clone();
    let mut broken = lf.clone();
    let m = broken.modules.get_mut(&first).unwrap();
    m.down = Tensor::zeros((4, 3), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let mut fresh = unet(AdapterPlan::none());
    let msg = broken
        .apply("unet", &mut fresh.layers_mut(), "default", &k)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("lora_down") && msg.contains("[4, 3]"), "{msg}");
    // A module the model lacks.
    let mut extra = lf.clone();
    extra
        .modules
        .insert("unet.no_such.module".into(), lf.modules[&first].clone());
    let mut fresh = unet(AdapterPlan::none());
    let msg = extra
        .apply("unet", &mut fresh.layers_mut(), "default", &k)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no_such"), "{msg}");
    // Tucker cores and foreign keys are refused by name.
    let mut t = postforge::util::SafeTensors::read(&k)
        .unwrap()
        .into_tensors();
    t.insert(
        "lora_unet_x.lora_mid.weight".into(),
        Tensor::zeros(
            (1, 1, 1, 1),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    postforge::util::save_safetensors(&d.path().join("m.safetensors"), &t, None).unwrap();
    let msg = LoraFile::read(&d.path().join("m.safetensors"), None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("lora_mid"), "{msg}");
}

/// Rewrites tensor `key` of the safetensors file `src` with `f` and saves it as `dst`.
fn tamper(src: &Path, dst: &Path, key: &str, f: impl Fn(&Tensor) -> Tensor) {
    let mut t = postforge::util::SafeTensors::read(src)
        .unwrap()
        .into_tensors();
    let v = f(&t[key]);
    t.insert(key.to_string(), v);
    postforge::util::save_safetensors(dst, &t, None).unwrap();
}

#[test]
fn damaged_adapter_tensors_are_refused_on_load() {
    let d = tempfile::tempdir().unwrap();
    let model = adapted(false);
    let mut f = LoraFile::default();
    f.add_layers("unet", &model.layers(), "default").unwrap();
    let k = d.path().join("k.safetensors");
    f.write(&k, LoraFormat::Kohya).unwrap();
    let diff = d.path().join("d.safetensors");
    f.write(&diff, LoraFormat::Diffusers).unwrap();
    let keys: Vec<String> = postforge::util::SafeTensors::read(&k)
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let down = keys
        .iter()
        .find(|k| k.ends_with("lora_down.weight") && k.contains("to_q"))
        .unwrap()
        .clone();
    let up = down.replace("lora_down", "lora_up");
    let alpha = down.replace("lora_down.weight", "alpha");
    let nan_first = |t: &Tensor| {
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[0] = f32::NAN;
        Tensor::from_vec(v, t.dims(), t.device()).unwrap()
    };
    let bad = d.path().join("bad.safetensors");
    let read_err = |p: &Path| LoraFile::read(p, None).unwrap_err().to_string();
    // A NaN weight: named, with the override named.
    tamper(&k, &bad, &down, nan_first);
    let e = read_err(&bad);
    assert!(
        e.contains(&down) && e.contains("non-finite") && e.contains("--allow-nonfinite"),
        "{e}"
    );
    // A NaN alpha.
    tamper(&k, &bad, &alpha, |t| (t * f64::NAN).unwrap());
    let e = read_err(&bad);
    assert!(e.contains(&alpha) && e.contains("non-finite"), "{e}");
    // An integer factor.
    tamper(&k, &bad, &down, |t| {
        t.to_dtype(candle_core::DType::I64).unwrap()
    });
    let e = read_err(&bad);
    assert!(e.contains(&down) && e.contains("dtype"), "{e}");
    // Factors whose ranks disagree, and swapped (transposed) factors.
    tamper(&k, &bad, &up, |t| t.narrow(1, 0, 2).unwrap());
    let e = read_err(&bad);
    assert!(e.contains("rank") && e.contains("lora_up"), "{e}");
    tamper(&k, &bad, &down, |t| t.t().unwrap().contiguous().unwrap());
    let e = read_err(&bad);
    assert!(e.contains("rank") && e.contains("lora_down"), "{e}");
    // The diffusers layout gets the same checks.
    let dkeys: Vec<String> = postforge::util::SafeTensors::read(&diff)
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let a = dkeys.iter().find(|k| k.ends_with("lora_A.weight")).unwrap();
    tamper(&diff, &bad, a, nan_first);
    let e = read_err(&bad);
    assert!(e.contains(a.as_str()) && e.contains("non-finite"), "{e}");
    // With the override, the file loads (the value is the user's responsibility).
    tamper(&k, &bad, &down, nan_first);
    postforge::check::set_allow_nonfinite(true);
    let r = LoraFile::read(&bad, None);
    postforge::check::set_allow_nonfinite(false);
    assert!(r.is_ok());
}
