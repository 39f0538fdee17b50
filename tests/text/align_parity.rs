//! Preference losses against TRL 1.16.0 (fixtures from `scripts/fixtures/make_align_fixtures.py`,
//! computed by TRL's own trainer code on fixed log-probs): every DPO loss type and f-divergence,
//! CPO (sigmoid, hinge, ipo, simpo, AlphaPO), ORPO and KTO — loss values, reward metrics and the
//! gradients with respect to the sequence log-probs.

use crate::common::max_abs_diff;
use candle_core::{DType, Tensor, Var};
use postforge::align::cpo::{CpoConfig, CpoLossType};
use postforge::align::dpo::{DpoConfig, DpoLossType, FDivergence, PairLogps};
use postforge::align::kto::{KtoConfig, KtoLogps, KtoLossType};
use postforge::align::orpo::OrpoConfig;
use postforge::util::SafeTensors;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/align")
}

fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-3);
    let e = max_abs_diff(a, b) / scale;
    assert!(e < tol, "{what}: relative error {e:e}");
}

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
}

/// (sums (2B), shifted completion mask (2B, T−1) as f32).
fn sums(f: &SafeTensors) -> (Tensor, Tensor) {
    let pt = f.get("per_token").unwrap();
    let m = f
        .get("completion_mask")
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let t = m.dim(1).unwrap();
    let sm = m.narrow(1, 1, t - 1).unwrap();
    ((&pt * &sm).unwrap().sum(1).unwrap(), sm)
}

#[test]
fn dpo_family_matches_trl() {
    let mut n = 0;
    for e in std::fs::read_dir(dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if !name.starts_with("dpo_") {
            continue;
        }
        n += 1;
        let f = SafeTensors::read(&p).unwrap();
        let meta = f.metadata().clone();
        let lt: DpoLossType = serde_json::from_value(meta["loss_type"].clone().into()).unwrap();
        let fd: FDivergence =
            serde_json::from_value(meta["f_divergence_type"].clone().into()).unwrap();
        let cfg = DpoConfig {
            beta: meta["beta"].parse().unwrap(),
            loss_type: vec![lt],
            label_smoothing: meta["label_smoothing"].parse().unwrap(),
            f_divergence_type: fd,
            f_alpha_divergence_coef: meta["f_alpha_divergence_coef"].parse().unwrap(),
            ..Default::default()
        };
        let (s, sm) = sums(&f);
        let b = s.dim(0).unwrap() / 2;
        let c = Var::from_tensor(&s.narrow(0, 0, b).unwrap()).unwrap();
        let r = Var::from_tensor(&s.narrow(0, b, b).unwrap()).unwrap();
        let toks = sm.sum(1).unwrap();
        // `sft`: the mean NLL of the chosen tokens, as a function of the chosen sums.
        let nchosen = toks
            .narrow(0, 0, b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let nll = (c.as_tensor().sum_all().unwrap() * (-1.0 / nchosen as f64)).unwrap();
        let lp = PairLogps {
            chosen: c.as_tensor().clone(),
            rejected: r.as_tensor().clone(),
            ref_chosen: f.get("ref_chosen").unwrap(),
            ref_rejected: f.get("ref_rejected").unwrap(),
            chosen_tokens: toks.narrow(0, 0, b).unwrap(),
            rejected_tokens: toks.narrow(0, b, b).unwrap(),
            chosen_nll: Some(nll),
        };
        let (loss, m) = cfg.loss(&lp).unwrap();
        let want = scalar(&f.get("loss").unwrap());
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{name}: loss {got} vs TRL {want}"
        );
        let g = loss.backward().unwrap();
        // (`sft` does not depend on the rejected completions: no gradient there.)
        let gz = |v: &Var| {
            g.get(v.as_tensor())
                .cloned()
                .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
        };
        let grad = Tensor::cat(&[gz(&c), gz(&r)], 0).unwrap();
        close(
            &grad,
            &f.get("seq_grad").unwrap(),
            1e-5,
            &format!("{name}: d loss / d logps"),
        );
        let mt = f.get("metrics").unwrap().to_vec1::<f32>().unwrap();
        for (k, w) in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
        ]
        .iter()
        .zip(mt)
        {
            assert!(
                (m[*k] as f32 - w).abs() < 1e-5,
                "{name}: {k} {} vs {w}",
                m[*k]
            );
        }
    }
    assert_eq!(n, 17, "every DPO fixture was checked");
}

#[test]
fn cpo_simpo_and_orpo_match_trl() {
    for (lt, name, alpha) in [
        (CpoLossType::Sigmoid, "cpo_sigmoid_alpha0.0", 0.0),
        (CpoLossType::Hinge, "cpo_hinge_alpha0.0", 0.0),
        (CpoLossType::Ipo, "cpo_ipo_alpha0.0", 0.0),
        (CpoLossType::Simpo, "cpo_simpo_alpha0.0", 0.0),
        (CpoLossType::Sigmoid, "cpo_sigmoid_alpha0.2", 0.2),
    ] {
        let f = SafeTensors::read(dir().join(format!("{name}.safetensors"))).unwrap();
        let cfg = CpoConfig {
            loss_type: lt,
            alpha,
            cpo_alpha: 0.0,
            ..Default::default()
        };
        let c = Var::from_tensor(&f.get("chosen").unwrap()).unwrap();
        let r = Var::from_tensor(&f.get("rejected").unwrap()).unwrap();
        let zero = Tensor::new(0f32, &candle_core::Device::Cpu).unwrap();
        let (loss, _) = cfg.loss(c.as_tensor(), r.as_tensor(), &zero).unwrap();
        let want = scalar(&f.get("loss").unwrap());
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{name}: {got} vs {want}"
        );
        let g = loss.backward().unwrap();
        close(
            g.get(c.as_tensor()).unwrap(),
            &f.get("grad_chosen").unwrap(),
            1e-5,
            name,
        );
        close(
            g.get(r.as_tensor()).unwrap(),
            &f.get("grad_rejected").unwrap(),
            1e-5,
            name,
        );
    }
    let f = SafeTensors::read(dir().join("orpo.safetensors")).unwrap();
    let c = Var::from_tensor(&f.get("chosen").unwrap()).unwrap();
    let r = Var::from_tensor(&f.get("rejected").unwrap()).unwrap();
    let zero = Tensor::new(0f32, &candle_core::Device::Cpu).unwrap();
    let (loss, m) = OrpoConfig::default()
        .loss(c.as_tensor(), r.as_tensor(), &zero)
        .unwrap();
    let want = scalar(&f.get("loss_minus_nll").unwrap());
    assert!(
        (loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6,
        "orpo loss"
    );
    assert!((m["log_odds_ratio"] as f32 - scalar(&f.get("log_odds_ratio").unwrap())).abs() < 1e-5);
    assert!(
        (m["log_odds_chosen"] as f32 - scalar(&f.get("log_odds_chosen").unwrap())).abs() < 1e-4
    );
    let g = loss.backward().unwrap();
    close(
        g.get(c.as_tensor()).unwrap(),
        &f.get("grad_chosen").unwrap(),
        1e-5,
        "orpo chosen",
    );
    close(
        g.get(r.as_tensor()).unwrap(),
        &f.get("grad_rejected").unwrap(),
        1e-5,
        "orpo rejected",
    );
}

#[test]
fn kto_matches_trl() {
    for (lt, name, uw) in [
        (KtoLossType::Kto, "kto_kto_uw1.0", 1.0),
        (KtoLossType::Kto, "kto_kto_uw1.33", 1.33),
        (
            KtoLossType::ApoZeroUnpaired,
            "kto_apo_zero_unpaired_uw1.0",
            1.0,
        ),
    ] {
        let f = SafeTensors::read(dir().join(format!("{name}.safetensors"))).unwrap();
        let (s, _) = sums(&f);
        let labels: Vec<i64> = f.get("labels").unwrap().to_vec1().unwrap();
        let idx = |want: i64| -> Tensor {
            let v: Vec<u32> = labels
                .iter()
                .enumerate()
                .filter(|(_, l)| **l == want)
                .map(|(i, _)| i as u32)
                .collect();
            Tensor::new(v.as_slice(), &candle_core::Device::Cpu).unwrap()
        };
        let (ci, ri) = (idx(1), idx(0));
        let sv = Var::from_tensor(&s).unwrap();
        let refs = f.get("ref_logps").unwrap();
        let kl_sm = f
            .get("completion_mask")
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let t = kl_sm.dim(1).unwrap();
        let kl_mask = Tensor::cat(
            &[
                &kl_sm.narrow(0, 7, 1).unwrap(),
                &kl_sm.narrow(0, 0, 7).unwrap(),
            ],
            0,
        )
        .unwrap();
        let kl = (f.get("kl_token").unwrap() * kl_mask.narrow(1, 1, t - 1).unwrap())
            .unwrap()
            .sum(1)
            .unwrap();
        let lp = KtoLogps {
            chosen: sv.as_tensor().index_select(&ci, 0).unwrap(),
            rejected: sv.as_tensor().index_select(&ri, 0).unwrap(),
            ref_chosen: refs.index_select(&ci, 0).unwrap(),
            ref_rejected: refs.index_select(&ri, 0).unwrap(),
            kl,
            ref_kl: f.get("ref_kl").unwrap(),
        };
        let cfg = KtoConfig {
            loss_type: lt,
            undesirable_weight: uw,
            ..Default::default()
        };
        let (loss, m) = cfg.loss(&lp).unwrap();
        let want = scalar(&f.get("loss").unwrap());
        assert!(
            (loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6,
            "{name}: loss"
        );
        assert!(
            (m["kl"] as f32 - scalar(&f.get("kl").unwrap())).abs() < 1e-5,
            "{name}: kl"
        );
        let g = loss.backward().unwrap();
        close(
            g.get(sv.as_tensor()).unwrap(),
            &f.get("seq_grad").unwrap(),
            1e-5,
            name,
        );
    }
    // TRL's advice for unbalanced data.
    let cfg = KtoConfig::default();
    assert!(postforge::align::kto::weight_advice(&cfg, 100, 100).is_none());
    let w = postforge::align::kto::weight_advice(&cfg, 100, 10).unwrap();
    assert!(w.contains("desirable_weight in [0.1, 0.13]"), "{w}");
}

#[test]
fn log1mexp_is_accurate_across_its_branch_point() {
    use postforge::align::logps::log1mexp;
    let xs = [-20.0f64, -3.0, -0.7, -0.6931, -0.5, -0.05, -0.009, -1e-4];
    let t = Tensor::new(
        xs.iter().map(|x| *x as f32).collect::<Vec<_>>().as_slice(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let got: Vec<f32> = log1mexp(&t).unwrap().to_vec1().unwrap();
    for (x, g) in xs.iter().zip(got) {
        let want = (-x.exp_m1()).ln();
        assert!(
            ((g as f64) - want).abs() < 2e-5 * want.abs().max(1.0),
            "log1mexp({x}) = {g}, want {want}"
        );
    }
}
