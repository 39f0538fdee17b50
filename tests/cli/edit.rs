//! `postforge mask` and `postforge edit` end to end on the shipped assets: masks are built and
//! transformed in flag order, bad specs are refused by name, and an edit keeps every pixel outside
//! its mask (also with two LoRA/mask pairs and with an attention-derived mask).

use postforge::data::masks::Mask;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_postforge"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("the postforge binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn mask_builds_transforms_and_refuses_bad_specs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.png");
    let o = out.to_str().unwrap();
    let src = "masks/sources/red-triangle-left.png";
    let (ok, _, err) = run(&[
        "mask",
        "--image",
        src,
        "--from",
        "shape:red triangle",
        "-o",
        o,
    ]);
    assert!(ok, "{err}");
    let tight = Mask::read(&out).unwrap();
    let (ok, _, err) = run(&[
        "mask",
        "--image",
        src,
        "--from",
        "shape:red triangle",
        "--op",
        "dilate:2",
        "--op",
        "invert",
        "-o",
        o,
    ]);
    assert!(ok, "{err}");
    let grown_inv = Mask::read(&out).unwrap();
    assert!(grown_inv.invert().coverage() > tight.coverage());
    // The shipped example mask is the dilated object.
    assert_eq!(
        grown_inv.invert(),
        Mask::read(&root().join("masks/red-triangle-left.png")).unwrap()
    );
    for (args, needle) in [
        (vec!["--size", "32x32", "--from", "circle"], "expected box:"),
        (vec!["--size", "32x32", "--from", "box:5,5,2,2"], "empty"),
        (
            vec!["--size", "32x32", "--from", "all", "--op", "dilate:x"],
            "dilate:x",
        ),
        (
            vec!["--size", "32x32", "--from", "shape:red"],
            "needs --image",
        ),
        (
            vec!["--image", src, "--from", "shape:blue square"],
            "no blue object",
        ),
        (
            vec![
                "--size",
                "16x16",
                "--from",
                "file:masks/left-half.png",
                "--strict",
            ],
            "32x32",
        ),
    ] {
        let mut a = vec!["mask"];
        a.extend(args.iter().copied());
        a.extend(["-o", o]);
        let (ok, _, err) = run(&a);
        assert!(!ok && err.contains(needle), "{a:?}: {err}");
    }
    // Without --strict a mask of another size is resized with a warning.
    let (ok, _, err) = run(&[
        "mask",
        "--size",
        "16x16",
        "--from",
        "file:masks/left-half.png",
        "-o",
        o,
    ]);
    assert!(
        ok && err.contains("warning") && err.contains("16x16"),
        "{err}"
    );
}

#[test]
fn edit_keeps_the_outside_with_one_two_and_derived_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("e.png");
    let o = out.to_str().unwrap();
    let src = "masks/sources/red-triangle-left.png";
    let lora = "assets/loras/striped/striped.safetensors";
    let prompt =
        std::fs::read_to_string(root().join("masks/sources/red-triangle-left.txt")).unwrap();
    let base = [
        "edit",
        "--model",
        "assets/models/tiny-sd",
        "--image",
        src,
        "--prompt",
        prompt.trim(),
        "--steps",
        "10",
        "-o",
        o,
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        run(&a)
    };
    let source = image::open(root().join(src)).unwrap().to_rgb8();
    let same_outside = |mask: &Mask| {
        let img = image::open(&out).unwrap().to_rgb8();
        img.enumerate_pixels()
            .all(|(x, y, p)| mask.data[(y * 32 + x) as usize] > 0.0 || p == source.get_pixel(x, y))
    };
    let m = Mask::read(&root().join("masks/red-triangle-left.png")).unwrap();
    let (ok, stdout, err) = with(&["--lora", lora, "--mask", "masks/red-triangle-left.png"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("PSNR inf"), "{stdout}");
    assert!(same_outside(&m));
    // Two pairs: the LoRA on the object and a second copy on the background (the complement).
    let (ok, _, err) = with(&[
        "--lora",
        lora,
        "--mask",
        "masks/red-triangle-left.png",
        "--lora",
        lora,
        "--mask",
        "background",
        "--mode",
        "route",
    ]);
    assert!(ok, "{err}");
    // An attention-derived mask is written next to the output and bounds the edit.
    let (ok, stdout, err) = with(&["--lora", lora, "--mask-from-token", "triangle"]);
    assert!(
        ok && stdout.contains("derived the mask of `triangle`"),
        "{stdout}{err}"
    );
    let derived = Mask::read(&tmp.path().join("e.mask.png")).unwrap();
    assert!(derived.coverage() > 0.02 && derived.coverage() < 0.5);
    assert!(same_outside(&derived));
    for (extra, needle) in [
        (vec!["--lora", lora], "1 --lora files but 0 --mask"),
        (
            vec!["--lora", lora, "--mask", "background"],
            "at least one other --mask",
        ),
        (
            vec!["--lora", lora, "--mask-from-token", "zebra"],
            "`zebra`",
        ),
        (
            vec![
                "--lora",
                lora,
                "--mask",
                "masks/left-half.png",
                "--strength",
                "0",
            ],
            "--strength",
        ),
        (
            vec![
                "--lora",
                lora,
                "--mask",
                "masks/left-half.png",
                "--mode",
                "paint",
            ],
            "edit mode",
        ),
    ] {
        let (ok, _, err) = with(&extra);
        assert!(!ok && err.contains(needle), "{extra:?}: {err}");
    }
}

#[test]
fn a_composed_path_is_noted_once_at_debug_level() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("e.png");
    let args = [
        "edit",
        "--model",
        "assets/models/tiny-sd",
        "--image",
        "masks/sources/red-triangle-left.png",
        "--mask",
        "masks/red-triangle-left.png",
        "--lora",
        "assets/loras/striped/striped.safetensors",
        "--prompt",
        "a red triangle on the left, black background",
        "--steps",
        "4",
        "-o",
        out.to_str().unwrap(),
    ];
    let run_with = |log: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_postforge"));
        c.args(args).current_dir(root()).env_remove("RUST_LOG");
        if let Some(l) = log {
            c.env("RUST_LOG", l);
        }
        let o = c.output().unwrap();
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let debug = run_with(Some("postforge=debug"));
    assert_eq!(
        debug
            .matches("adapted layer: composed path (routed adapters)")
            .count(),
        1,
        "{debug}"
    );
    assert!(!run_with(None).contains("composed path"));
}
