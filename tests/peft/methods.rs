//! IA3, LoHa, LoKr and VeRA against PEFT 0.21.2 (fixtures from `scripts/fixtures/make_methods_fixtures.py`):
//! PEFT's own adapter folders load onto linear and conv layers (3x3 and 1x1), outputs and the
//! gradient of every adapter tensor match within 1e-5 relative, merging matches PEFT's
//! `merge_and_unload` and unmerging restores the base; saving writes PEFT's keys and config class.

use crate::common::*;
use candle_core::{Tensor, Var};
use postforge::peft::formats::peft as peft_format;
use postforge::peft::{AdaptedConv2d, AdaptedLayer, AdaptedLinear, ConvCfg, ForwardCtx};
use postforge::util::SafeTensors;
use std::path::{Path, PathBuf};

fn dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/methods")
        .join(case)
}

struct Net {
    lin1: AdaptedLinear,
    lin2: AdaptedLinear,
    conv: AdaptedConv2d,
    conv1: AdaptedConv2d,
}

impl Net {
    fn new(io: &SafeTensors) -> Net {
        let g = |k: &str| io.get(&format!("base.{k}")).unwrap();
        let pad1 = ConvCfg {
            padding: 1,
            ..Default::default()
        };
        Net {
            lin1: AdaptedLinear::new("lin1", g("lin1.weight"), Some(g("lin1.bias"))).unwrap(),
            lin2: AdaptedLinear::new("lin2", g("lin2.weight"), Some(g("lin2.bias"))).unwrap(),
            conv: AdaptedConv2d::new("conv", g("conv.weight"), Some(g("conv.bias")), pad1).unwrap(),
            conv1: AdaptedConv2d::new(
                "conv1",
                g("conv1.weight"),
                Some(g("conv1.bias")),
                ConvCfg::default(),
            )
            .unwrap(),
        }
    }
    fn layers(&mut self) -> Vec<&mut AdaptedLayer> {
        vec![
            &mut self.lin1.0,
            &mut self.lin2.0,
            &mut self.conv.0,
            &mut self.conv1.0,
        ]
    }
    fn forward(&self, x: &Tensor, img: &Tensor, ctx: &ForwardCtx) -> (Tensor, Tensor) {
        let y2 = self
            .lin2
            .forward(&self.lin1.forward(x, ctx).unwrap(), ctx)
            .unwrap();
        let c1 = self
            .conv1
            .forward(&self.conv.forward(img, ctx).unwrap(), ctx)
            .unwrap();
        (y2, c1)
    }
    fn vars(&self) -> Vec<(String, Var)> {
        [&self.lin1.0, &self.lin2.0, &self.conv.0, &self.conv1.0]
            .iter()
            .flat_map(|l| l.named_vars())
            .collect()
    }
}

#[test]
fn ia3_loha_lokr_match_peft() {
    for case in ["ia3", "loha", "lokr", "lokr_both", "vera"] {
        let io = SafeTensors::read(dir(case).join("io.safetensors")).unwrap();
        let mut net = Net::new(&io);
        let cfg = peft_format::load(&dir(case), &mut net.layers(), "default").unwrap();
        assert_ne!(cfg.peft_type, "LORA");
        let (x, img) = (io.get("x").unwrap(), io.get("img").unwrap());
        let (y2, c1) = net.forward(&x, &img, &ForwardCtx::train(0, 0));
        let e = rel_err(&y2, &io.get("y2").unwrap()).max(rel_err(&c1, &io.get("c1").unwrap()));
        assert!(e < 1e-5, "{case}: outputs relative error {e:e}");
        let loss =
            (y2.sqr().unwrap().sum_all().unwrap() + c1.sqr().unwrap().sum_all().unwrap()).unwrap();
        let lw = io.get("loss").unwrap().to_vec1::<f32>().unwrap()[0];
        let lv = loss.to_scalar::<f32>().unwrap();
        assert!(
            (lv - lw).abs() < 1e-5 * lw.abs(),
            "{case}: loss {lv} vs {lw}"
        );
        let grads = loss.backward().unwrap();
        let vars = net.vars();
        assert!(!vars.is_empty());
        for (name, v) in &vars {
            let key = format!(
                "grad.{}",
                name.trim_start_matches("base_model.model.")
                    .replace(".default", "")
            );
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
            let e = rel_err(g, &io.get(&key).unwrap_or_else(|_| panic!("{case}: {key}")));
            assert!(e < 1e-5, "{case}: {key} relative error {e:e}");
        }
        // The frozen base gets no gradient.
        for l in net.layers() {
            assert!(grads.get(&l.weight().unwrap()).is_none());
        }
        // Merging matches PEFT's merge_and_unload; unmerging restores the base.
        let w0: Vec<Tensor> = net.layers().iter().map(|l| l.weight().unwrap()).collect();
        for l in net.layers() {
            l.merge(None).unwrap();
        }
        let (m2, mc) = net.forward(&x, &img, &ForwardCtx::eval_with_grad());
        let e = rel_err(&m2, &io.get("merged.y2").unwrap())
            .max(rel_err(&mc, &io.get("merged.c1").unwrap()));
        assert!(e < 1e-5, "{case}: merged outputs relative error {e:e}");
        for l in net.layers() {
            l.unmerge().unwrap();
        }
        for (l, w) in net.layers().iter().zip(&w0) {
            assert!(rel_err(&l.weight().unwrap(), w) < 1e-5, "{case}: unmerge");
        }
        let (u2, _) = net.forward(&x, &img, &ForwardCtx::train(0, 0));
        assert!(
            rel_err(&u2, &io.get("y2").unwrap()) < 1e-5,
            "{case}: after unmerge"
        );
        // Saving writes PEFT's keys (the file PEFT wrote has exactly these) and its config class.
        let tmp = tempfile::tempdir().unwrap();
        let layers: Vec<&AdaptedLayer> = vec![&net.lin1.0, &net.lin2.0, &net.conv.0, &net.conv1.0];
        peft_format::save(tmp.path(), &layers, "default", &cfg, Default::default()).unwrap();
        let ours = SafeTensors::read(tmp.path().join("adapter_model.safetensors")).unwrap();
        let theirs = SafeTensors::read(dir(case).join("adapter_model.safetensors")).unwrap();
        let mut a: Vec<_> = ours.keys().cloned().collect();
        let mut b: Vec<_> = theirs.keys().cloned().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}: saved keys");
        for k in &a {
            assert_eq!(
                max_abs_diff(&ours.get(k).unwrap(), &theirs.get(k).unwrap()),
                0.0,
                "{case}: {k}"
            );
        }
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(json["peft_type"], cfg.peft_type.as_str());
        assert!(json.get("lora_alpha").is_none(), "{case}");
        match case {
            "ia3" => assert!(json.get("feedforward_modules").is_some() && json.get("r").is_none()),
            "vera" => assert!(json.get("alpha").is_none() && json["r"] == 4),
            _ => assert!(json.get("alpha").is_some(), "{case}"),
        }
    }
}

#[test]
fn fresh_adapters_start_as_no_ops_and_every_tensor_trains_on_llama() {
    use postforge::models::llama::{Inputs, LlamaForCausalLM};
    use postforge::nn::loss::next_token_loss;
    use postforge::peft::{Adapted, AdapterConfig, AdapterPlan};
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/llama");
    let ids = ids(&[2, 7], 60);
    let base = LlamaForCausalLM::load(&model, AdapterPlan::none()).unwrap();
    let want = base
        .forward(&ids, &Inputs::default(), &ForwardCtx::eval_with_grad())
        .unwrap();
    for peft_type in ["IA3", "LOHA", "LOKR", "VERA"] {
        for init in [true, false] {
            let mut cfg = AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
            cfg.peft_type = peft_type.into();
            let key = if peft_type == "IA3" {
                cfg.extra.insert(
                    "feedforward_modules".into(),
                    serde_json::json!(["down_proj"]),
                );
                "init_ia3_weights"
            } else {
                "init_weights"
            };
            cfg.extra.insert(key.into(), serde_json::json!(init));
            cfg.validate().unwrap();
            let m = LlamaForCausalLM::load(&model, AdapterPlan::single(cfg, 3).unwrap()).unwrap();
            let n_adapted = m.layers().iter().filter(|l| !l.is_plain()).count();
            assert_eq!(n_adapted, 6, "{peft_type}: 3 modules in each of 2 layers");
            let out = m
                .forward(&ids, &Inputs::default(), &ForwardCtx::train(0, 0))
                .unwrap();
            let e = rel_err(&out, &want);
            if init {
                assert!(
                    e < 1e-6,
                    "{peft_type}: the default init changes the output ({e:e})"
                );
                continue;
            }
            assert!(
                e > 1e-4,
                "{peft_type}: random init leaves the output unchanged"
            );
            let mask = Tensor::ones(
                ids.dims(),
                candle_core::DType::U32,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let grads = next_token_loss(&out, &ids, &mask)
                .unwrap()
                .backward()
                .unwrap();
            assert_all_trained(&grads, &m.trainable(), peft_type);
            for l in m.layers() {
                assert!(
                    grads.get(&l.weight().unwrap()).is_none(),
                    "{peft_type}: frozen base"
                );
            }
        }
    }
}

#[test]
fn loha_and_lokr_travel_in_lycoris_kohya_files() {
    use postforge::peft::formats::lora_file::{LoraFile, LoraFormat};
    for case in ["loha", "lokr", "lokr_both"] {
        let io = SafeTensors::read(dir(case).join("io.safetensors")).unwrap();
        let mut net = Net::new(&io);
        peft_format::load(&dir(case), &mut net.layers(), "default").unwrap();
        let mut f = LoraFile::default();
        let layers: Vec<&AdaptedLayer> = vec![&net.lin1.0, &net.lin2.0, &net.conv.0, &net.conv1.0];
        f.add_layers("unet", &layers, "default").unwrap();
        assert_eq!(f.lycoris.len(), 4);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("lycoris.safetensors");
        f.write(&path, LoraFormat::Kohya).unwrap();
        let st = SafeTensors::read(&path).unwrap();
        let prefix = if case == "loha" {
            ".hada_w1_a"
        } else {
            ".lokr_w"
        };
        assert!(
            st.keys()
                .any(|k| k.starts_with("lora_unet_lin1") && k.contains(prefix)),
            "{case}"
        );
        assert!(st.keys().all(|k| !k.contains("lora_down")));
        // The diffusers layout has no LoHa/LoKr: refused with the reason.
        let e = f
            .write(&tmp.path().join("d.safetensors"), LoraFormat::Diffusers)
            .unwrap_err()
            .to_string();
        assert!(e.contains("kohya"), "{e}");
        // Read back onto fresh layers: PEFT's outputs.
        let (back, fmt) = LoraFile::read(&path, None).unwrap();
        assert_eq!(fmt, LoraFormat::Kohya);
        let mut fresh = Net::new(&io);
        let n = back
            .apply("unet", &mut fresh.layers(), "default", &path)
            .unwrap();
        assert_eq!(n, 4);
        let (x, img) = (io.get("x").unwrap(), io.get("img").unwrap());
        let (y2, c1) = fresh.forward(&x, &img, &ForwardCtx::eval_with_grad());
        let e = rel_err(&y2, &io.get("y2").unwrap()).max(rel_err(&c1, &io.get("c1").unwrap()));
        assert!(e < 1e-5, "{case}: LyCORIS round trip {e:e}");
    }
}

#[test]
fn every_method_merges_into_a_plain_checkpoint() {
    use postforge::peft::merge::merge_folder_into_checkpoint;
    for case in ["ia3", "loha", "lokr", "lokr_both", "vera"] {
        let io = SafeTensors::read(dir(case).join("io.safetensors")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let base: std::collections::BTreeMap<String, Tensor> = io
            .keys()
            .filter_map(|k| {
                k.strip_prefix("base.")
                    .map(|s| (s.to_string(), io.get(k).unwrap()))
            })
            .collect();
        let bp = tmp.path().join("base.safetensors");
        postforge::util::save_safetensors(&bp, &base, None).unwrap();
        let out = tmp.path().join("merged.safetensors");
        let n = merge_folder_into_checkpoint(&bp, &dir(case), &out).unwrap();
        assert!(n >= 2, "{case}: {n} modules");
        let merged = SafeTensors::read(&out).unwrap();
        let g = |k: &str| merged.get(k).unwrap();
        let pad1 = ConvCfg {
            padding: 1,
            ..Default::default()
        };
        let net = Net {
            lin1: AdaptedLinear::new("lin1", g("lin1.weight"), Some(g("lin1.bias"))).unwrap(),
            lin2: AdaptedLinear::new("lin2", g("lin2.weight"), Some(g("lin2.bias"))).unwrap(),
            conv: AdaptedConv2d::new("conv", g("conv.weight"), Some(g("conv.bias")), pad1).unwrap(),
            conv1: AdaptedConv2d::new(
                "conv1",
                g("conv1.weight"),
                Some(g("conv1.bias")),
                ConvCfg::default(),
            )
            .unwrap(),
        };
        let (y2, c1) = net.forward(
            &io.get("x").unwrap(),
            &io.get("img").unwrap(),
            &ForwardCtx::eval_with_grad(),
        );
        let e = rel_err(&y2, &io.get("merged.y2").unwrap())
            .max(rel_err(&c1, &io.get("merged.c1").unwrap()));
        assert!(e < 1e-5, "{case}: merged checkpoint {e:e}");
    }
}
