//! Property tests over every parser of user files: mutated and random inputs must give an error
//! or a value that passes the parser's own checks, never a panic, and a truncated or damaged
//! structure must never parse as a success.
//!
//! CI runs each target with a bounded number of cases (`PROPTEST_CASES`, default 48 here); a
//! longer run is documented in the README ("Fuzzing"):
//! `PROPTEST_CASES=5000 cargo test --release --locked --test fuzz`.

#[path = "../common/mod.rs"]
#[allow(dead_code)]
mod common;

use candle_core::{DType, Device, Tensor};
use postforge::data::chat::ChatTemplate;
use postforge::diffusion::grid::Axis;
use postforge::peft::formats::lora_file::{kohya_to_path, LoraFile, LoraFormat, ModuleLora};
use postforge::peft::AdapterConfig;
use postforge::util::SafeTensors;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A small valid kohya LoRA file (two modules: a linear and a conv), as bytes.
fn kohya_bytes() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let m = |shape_d: &[usize], shape_u: &[usize]| ModuleLora {
        down: Tensor::randn(0f32, 0.1, shape_d, &dev).unwrap(),
        up: Tensor::randn(0f32, 0.1, shape_u, &dev).unwrap(),
        alpha: 4.0,
        magnitude: None,
    };
    let mut f = LoraFile::default();
    f.modules.insert(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".into(),
        m(&[4, 8], &[8, 4]),
    );
    f.modules.insert(
        "unet.down_blocks.0.resnets.0.conv1".into(),
        m(&[2, 3, 3, 3], &[5, 2, 1, 1]),
    );
    let p = d.path().join("k.safetensors");
    f.write(&p, LoraFormat::Kohya).unwrap();
    std::fs::read(p).unwrap()
}

/// A mutation of a byte string: flip bytes, cut it short, or splice random bytes in.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Vec<(usize, u8)>),
    Truncate(usize),
    Splice(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..8).prop_map(Mutation::Flip),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(i, b)| Mutation::Splice(i, b)),
    ]
}

fn apply(bytes: &[u8], m: &Mutation) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match m {
        Mutation::Flip(fl) => {
            for (i, v) in fl {
                let n = b.len();
                b[i % n] ^= v | 1;
            }
        }
        Mutation::Truncate(i) => b.truncate(i % bytes.len()),
        Mutation::Splice(i, s) => {
            let at = i % b.len();
            b.splice(at..at, s.iter().copied());
        }
    }
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

proptest! {
    #![proptest_config(cases())]

    /// safetensors: a damaged header or a cut file is an error naming the file; a flipped data
    /// byte may still parse (the values are checked by the adapter readers).
    #[test]
    fn safetensors_files(m in mutation()) {
        let good = kohya_bytes();
        let d = tempfile::tempdir().unwrap();
        let bad = apply(&good, &m);
        let p = write(d.path(), "x.safetensors", &bad);
        let r = SafeTensors::read(&p);
        if let Mutation::Truncate(_) = m {
            prop_assert!(r.is_err(), "a truncated file parsed");
        }
        if let Err(e) = r {
            prop_assert!(e.to_string().contains("x.safetensors"), "{}", e);
        }
    }

    /// kohya / diffusers / LyCORIS files: any success has finite weights whose factors agree.
    #[test]
    fn lora_files(m in mutation()) {
        let good = kohya_bytes();
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "k.safetensors", &apply(&good, &m));
        if let Ok((f, _)) = LoraFile::read(&p, None) {
            for (k, mo) in &f.modules {
                prop_assert!(mo.alpha.is_finite(), "{}: alpha {}", k, mo.alpha);
                prop_assert_eq!(mo.up.dims()[1], mo.down.dims()[0], "{}", k);
                for t in [&mo.down, &mo.up] {
                    let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                    prop_assert!(v.iter().all(|x| x.is_finite()), "{}: non-finite weights loaded", k);
                }
            }
        }
    }

    /// Random kohya key sets: names that map to no module are errors, never panics.
    #[test]
    fn kohya_key_sets(keys in prop::collection::vec(("lora_(unet|te1|te2|te)_[a-z0-9_]{0,24}", prop_oneof![
        Just("lora_down.weight"), Just("lora_up.weight"), Just("alpha"), Just("dora_scale"),
        Just("hada_w1_a"), Just("lokr_w1"), Just("diff"), Just("x")]), 1..6),
        rank in 1usize..4) {
        let d = tempfile::tempdir().unwrap();
        let mut t = BTreeMap::new();
        for (m, f) in &keys {
            let shape: Vec<usize> = match *f {
                "lora_down.weight" => vec![rank, 6],
                "lora_up.weight" => vec![6, rank],
                "alpha" => vec![],
                _ => vec![rank, rank],
            };
            t.insert(format!("{m}.{f}"), Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap());
        }
        let p = d.path().join("keys.safetensors");
        postforge::util::save_safetensors(&p, &t, None).unwrap();
        let _ = LoraFile::read(&p, None);
        for (m, _) in &keys {
            let _ = kohya_to_path(m.trim_start_matches("lora_unet_"), None);
        }
    }

    /// PEFT adapter_config.json: edits of a real config parse to a config that validates and
    /// saves, or to an error naming the file.
    #[test]
    fn peft_configs(edits in prop::collection::vec((any::<usize>(), prop_oneof![
        Just("\"".to_string()), Just("{".to_string()), Just("null".to_string()), Just("-1".to_string()),
        Just("1e400".to_string()), Just("\"LOKR\"".to_string()), Just("[".to_string()), "[a-z_]{1,8}"]), 1..4)) {
        let good = std::fs::read_to_string(repo("tests/fixtures/methods/ia3/adapter_config.json")).unwrap();
        let mut s = good.clone();
        for (i, ins) in &edits {
            let mut at = i % (s.len() + 1);
            while !s.is_char_boundary(at) { at -= 1; }
            s.insert_str(at, ins);
        }
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "adapter_config.json", s.as_bytes());
        match AdapterConfig::from_json_file(&p) {
            Ok(c) => {
                prop_assert!(c.validate().is_ok());
                prop_assert!(c.to_json().is_ok());
            }
            Err(e) => prop_assert!(e.to_string().contains("adapter_config.json"), "{}", e),
        }
    }

    /// JSONL records (SFT, preference pairs, unpaired): random lines never panic; an error names
    /// the file.
    #[test]
    fn jsonl_records(lines in prop::collection::vec(prop_oneof![
        Just(r#"{"prompt": "a", "completion": "b"}"#.to_string()),
        Just(r#"{"messages": [{"role": "user", "content": "a"}]}"#.to_string()),
        Just(r#"{"prompt": "a", "chosen": "b", "rejected": "c"}"#.to_string()),
        Just(r#"{"prompt": "a", "completion": "b", "label": true}"#.to_string()),
        Just(r#"{"chosen": [{"role": "user", "content": 1}], "rejected": null}"#.to_string()),
        Just("{".to_string()), Just("[]".to_string()), Just("".to_string()),
        "[ -~]{0,40}"], 1..6)) {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "data.jsonl", lines.join("\n").as_bytes());
        for r in [
            postforge::data::sft::read_jsonl(&p).map(|_| ()),
            postforge::data::pref::read_pairs(&p).map(|_| ()),
            postforge::data::pref::read_unpaired(&p).map(|_| ()),
        ] {
            if let Err(e) = r {
                prop_assert!(e.to_string().contains("data.jsonl"), "{}", e);
            }
        }
    }

    /// Pipeline TOML: edits of the main job's file load (every stage checked) or name the file.
    #[test]
    fn pipeline_files(edits in prop::collection::vec((any::<usize>(), prop_oneof![
        Just("nan".to_string()), Just("-1".to_string()), Just("\"".to_string()), Just("[[stage]]\n".to_string()),
        Just("= ".to_string()), Just("1e999".to_string()), Just("\nbogus = 1\n".to_string()), "[a-z0-9_ =.]{1,10}"]), 1..4)) {
        let good = std::fs::read_to_string(repo("pipelines/style-lora.toml")).unwrap();
        let mut s = good;
        for (i, ins) in &edits {
            let mut at = i % (s.len() + 1);
            while !s.is_char_boundary(at) { at -= 1; }
            s.insert_str(at, ins);
        }
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "pipe.toml", s.as_bytes());
        if let Err(e) = postforge::recipe::Recipe::load(&p) {
            prop_assert!(e.to_string().contains("pipe.toml"), "{}", e);
        }
    }

    /// Chat templates: random Jinja never panics or hangs.
    #[test]
    fn chat_templates(src in prop_oneof![
        "[ -~]{0,60}",
        Just("{% for m in messages %}{{ m['role'] }}{{ m['content'] }}{% endfor %}".to_string()),
        Just("{{ raise_exception('no') }}".to_string()),
        Just("{% for i in range(999999999) %}x{% endfor %}".to_string()),
        Just("{{ messages[99]['content'] }}".to_string()),
        Just("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}".to_string()),
    ], content in "[ -~]{0,20}") {
        let t = ChatTemplate { source: src, bos_token: "<s>".into(), eos_token: "</s>".into() };
        let _ = t.render(&[postforge::data::chat::message("user", &content)], true);
    }

    /// Images: a damaged PNG is an error naming the file.
    #[test]
    fn png_files(m in mutation()) {
        let good = std::fs::read(repo("assets/data/styles/striped/10_striped/0000.png")).unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "img.png", &apply(&good, &m));
        let r = postforge::media::image::read_rgb(&p);
        // Cut inside the image data: an error. (A cut that only loses the 12-byte IEND trailer
        // leaves every pixel intact; decoders accept it.)
        if let Mutation::Truncate(i) = m {
            if i % good.len() < good.len() - 12 {
                prop_assert!(r.is_err(), "a truncated PNG decoded");
            }
        }
        if let Err(e) = r {
            prop_assert!(e.to_string().contains("img.png"), "{}", e);
        }
    }

    /// Grid axis specs: random specs never panic; numbers that parse are finite.
    #[test]
    fn grid_axes(spec in prop_oneof![
        "(scale|cfg|steps|seed|prompt|sampler|lora)=[-0-9.,a-z]{0,20}",
        "[ -~]{0,30}",
    ]) {
        let _ = Axis::parse(&spec);
    }
}
