//! Every numeric flag and pipeline key has a documented range, checked where the flags and files
//! are parsed: a bad value fails fast (no model is loaded: the model paths here do not exist),
//! with an error that names the flag or key, the value and the allowed range.

use std::process::Command;

const NO_MODEL: &str = "/nonexistent/postforge-model";

/// Runs the binary; returns (success, stderr).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_postforge"))
        .args(args)
        .output()
        .expect("the postforge binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The command fails, its stderr holds every needle, and nothing was loaded (the range was
/// checked before the nonexistent model or data).
fn refused(args: &[&str], needles: &[&str]) {
    let (ok, err) = run(args);
    assert!(!ok, "{args:?} succeeded");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` not in:\n{err}");
    }
    for loaded in ["No such file", "not a tokenizers file", "nonexistent"] {
        assert!(
            !err.contains(loaded),
            "{args:?} reached loading before the range check:\n{err}"
        );
    }
}

#[test]
fn bad_flags_are_refused_with_the_flag_value_and_range() {
    let gen = |flag: &str, v: &str| {
        vec![
            "generate".to_string(),
            "--model".into(),
            NO_MODEL.into(),
            "--prompt".into(),
            "hi".into(),
            flag.into(),
            v.into(),
        ]
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            gen("--temperature", "nan"),
            vec!["--temperature", "NaN", "a finite number ≥ 0"],
        ),
        (gen("--top-p", "5"), vec!["--top-p", "5", "(0, 1]"]),
        (gen("--top-p", "0"), vec!["--top-p", "(0, 1]"]),
        (
            gen("--max-new-tokens", "0"),
            vec!["--max-new-tokens", "at least 1"],
        ),
    ];
    for (args, needles) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&args, needles);
    }
    let m = NO_MODEL;
    let flag_cases: &[(&[&str], &[&str])] = &[
        (
            &["align", "--model", m, "--data", m, "--label-smoothing", "2"],
            &["--label-smoothing", "2", "[0, 0.5)"],
        ),
        (
            &["align", "--model", m, "--data", m, "--beta", "nan"],
            &["--beta", "NaN", "≥ 0"],
        ),
        (
            &["align", "--model", m, "--data", m, "--max-grad-norm", "nan"],
            &["--max-grad-norm", "NaN", "≥ 0"],
        ),
        (
            &[
                "align",
                "--model",
                m,
                "--data",
                m,
                "--loss-weights",
                "1",
                "-1",
            ],
            &["--loss-weights", "-1", "≥ 0"],
        ),
        (
            &["demo", "--max-grad-norm", "nan"],
            &["--max-grad-norm", "NaN", "≥ 0"],
        ),
        (
            &["demo", "--weight-decay=-5"],
            &["--weight-decay", "-5", "≥ 0"],
        ),
        // A negative value after a space reaches the range check (not "unexpected argument").
        (
            &["demo", "--weight-decay", "-5"],
            &["--weight-decay", "-5", "≥ 0"],
        ),
        (&["demo", "--lora-alpha", "0"], &["--lora-alpha", "> 0"]),
        (
            &["sft", "--model", m, "--data", m, "--lora-dropout", "1"],
            &["--lora-dropout", "[0, 1)"],
        ),
        (
            &["sft", "--model", m, "--data", m, "--learning-rate", "nan"],
            &["--learning-rate", "NaN", "> 0"],
        ),
        (
            &[
                "sft",
                "--model",
                m,
                "--data",
                m,
                "--position-interpolation",
                "0.5",
            ],
            &["--position-interpolation", "0.5", "≥ 1"],
        ),
        (
            &[
                "sft",
                "--model",
                m,
                "--data",
                m,
                "--s2-attn-group-ratio",
                "0",
            ],
            &["--s2-attn-group-ratio", "(0, 1]"],
        ),
        (
            &["sft", "--model", m, "--data", m, "--max-forgetting=-0.1"],
            &["--max-forgetting", "-0.1", "≥ 0"],
        ),
        (
            &[
                "sft",
                "--model",
                m,
                "--data",
                m,
                "--init-lora-weights",
                "pissa_niter_x",
            ],
            &["--init-lora-weights", "pissa_niter_x", "whole number ≥ 0"],
        ),
        (
            &["combine", m, m, "--weights", "nan,1", "--out", m],
            &["--weights", "NaN", "a finite number"],
        ),
        (
            &["combine", m, m, "--density", "0", "--out", m],
            &["--density", "(0, 1]"],
        ),
        (
            &["combine", m, m, "--svd-clamp", "0.2", "--out", m],
            &["--svd-clamp", "(0.5, 1]"],
        ),
        (
            &["grid", "--model", m, "--x", "cfg=1|nan"],
            &["--x", "cfg=nan", "≥ 0"],
        ),
        (
            &["grid", "--model", m, "--x", "steps=2.9"],
            &["--x", "steps=2.9", "whole number ≥ 1"],
        ),
        (
            &["grid", "--model", m, "--x", "seed=-1"],
            &["--x", "seed=-1", "whole number ≥ 0"],
        ),
        (
            &["grid", "--model", m, "--x", "seed=1", "--cfg", "inf"],
            &["--cfg", "inf", "≥ 0"],
        ),
        (
            &[
                "grid",
                "--model",
                m,
                "--x",
                "seed=1",
                "--guidance-rescale",
                "1.5",
            ],
            &["--guidance-rescale", "[0, 1]"],
        ),
        (
            &[
                "train-diffusion",
                "--pretrained_model_name_or_path",
                m,
                "--network_alpha",
                "0",
            ],
            &["--network-alpha", "> 0"],
        ),
        (
            &["train-diffusion", "--min_snr_gamma", "nan"],
            &["--min-snr-gamma", "NaN", "> 0"],
        ),
        (
            &["train-diffusion", "--validation_split", "1"],
            &["--validation-split", "[0, 1)"],
        ),
        (
            &[
                "train-diffusion",
                "--pretrained_model_name_or_path",
                m,
                "--train_data_dir",
                m,
                "--output_dir",
                m,
                "--network_args",
                "conv_alpha=nan",
            ],
            &["--network_args conv_alpha=nan", "> 0"],
        ),
        (
            &["pretrain", "tiny-sd", "--guidance", "nan"],
            &["--guidance", "NaN", "≥ 0"],
        ),
        (
            &["pretrain", "tiny-sd", "--ema-decay", "2"],
            &["--ema-decay", "[0, 1]"],
        ),
        (
            &["make-style-set", "--images", "0", "--out", m],
            &["--images", "at least 1"],
        ),
        (
            &["make-task-data", "--n", "0", "--out", m],
            &["--n", "at least 1"],
        ),
        (
            &["eval", "--model", m, "--runs", m, "--per-task", "0"],
            &["--per-task", "at least 1"],
        ),
    ];
    for (args, needles) in flag_cases {
        refused(args, needles);
    }
}

#[test]
fn bad_config_file_values_are_refused_with_the_file_and_key() {
    let d = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = d.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let head = format!("model = \"{NO_MODEL}\"\ndata = \"{NO_MODEL}\"\n");
    // A NaN in the file used to become `null`: an "invalid type" error, or silently the default.
    let f = write("sft.toml", &format!("{head}max_forgetting = nan\n"));
    refused(
        &["sft", "--config-file", &f],
        &["sft.toml", "max_forgetting = NaN", "finite"],
    );
    let f = write("align.toml", &format!("{head}max_grad_norm = -1\n"));
    refused(
        &["align", "--config-file", &f],
        &["align.toml", "max_grad_norm = -1", "a finite number ≥ 0"],
    );
    let f = write(
        "align2.toml",
        &format!("{head}loss = \"kto\"\ndesirable_weight = 0\n"),
    );
    refused(
        &["align", "--config-file", &f],
        &["align2.toml", "desirable_weight = 0", "> 0"],
    );
    let f = write(
        "td.toml",
        &format!("pretrained_model_name_or_path = \"{NO_MODEL}\"\ntrain_data_dir = \"{NO_MODEL}\"\noutput_dir = \"o\"\nnoise_offset = inf\n"),
    );
    refused(
        &["train-diffusion", "--config-file", &f],
        &["td.toml", "noise_offset = inf", "finite"],
    );
    // A good file with a bad flag: the flag is named.
    let f = write("ok.toml", &head);
    refused(
        &["sft", "--config-file", &f, "--weight-decay", "-1"],
        &["--weight-decay", "-1", "≥ 0"],
    );
    // With good values the command gets as far as the (nonexistent) model.
    let (ok, err) = run(&["sft", "--config-file", &f]);
    assert!(!ok && err.contains(NO_MODEL), "{err}");
}

#[test]
fn bad_pipeline_values_are_refused_before_stage_one_with_stage_and_key() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("pipe.toml");
    let p_s = p.to_str().unwrap();
    let first = format!(
        "[[stage]]\nkind = \"train-diffusion\"\npretrained_model_name_or_path = \"{NO_MODEL}\"\ntrain_data_dir = \"{NO_MODEL}\"\noutput_dir = \"{o}\"\n",
        o = d.path().join("o").display()
    );
    let cases: &[(&str, &[&str])] = &[
        (
            "\n[[stage]]\nkind = \"align\"\nmodel = \"m\"\ndata = \"d\"\noutput_dir = \"o\"\nbeta = nan\n",
            &["pipe.toml", "stage 2 (align)", "beta = NaN", "> 0"],
        ),
        (
            "min_snr_gamma = 0\n",
            &["stage 1 (train-diffusion)", "min_snr_gamma = 0", "> 0"],
        ),
        (
            "\n[[stage]]\nkind = \"diffusion-eval\"\nprompts = [\"a\"]\nguidance_rescale = 2\n",
            &["stage 2 (diffusion-eval)", "guidance_rescale = 2", "[0, 1]"],
        ),
        (
            "\n[[stage]]\nkind = \"sft\"\nmodel = \"m\"\ndata = \"d\"\noutput_dir = \"o\"\nlora_alpha = -inf\n",
            &["stage 2 (sft)", "lora_alpha = -inf", "> 0"],
        ),
        (
            "\n[[stage]]\nkind = \"task-eval\"\ntasks = [\"add\"]\nper_task = 0\n",
            &["stage 2 (task-eval)", "per_task = 0", "at least 1"],
        ),
    ];
    for (tail, needles) in cases {
        std::fs::write(&p, format!("{first}{tail}")).unwrap();
        refused(&["run", p_s], needles);
        assert!(!d.path().join("o").exists(), "stage 1 ran");
    }
}
