//! Masked edits on the embedded tiny-sd with the shipped striped LoCon: the outside of the mask is
//! kept bit-exact by route+blend with every sampler, a zero mask is the base edit and a full mask the
//! unmasked one, two adapters normalised over one region add up to one, a latent (VAE) pipeline
//! keeps the outside through the paste-back, and masks are read and refused with clear errors.

use image::RgbImage;
use postforge::data::masks::{Combine, Mask};
use postforge::data::shapes::{Scene, Style};
use postforge::diffusion::edit::{edit, region_diff, EditMode, EditRequest, Region};
use postforge::diffusion::eval::load_with_lora;
use postforge::diffusion::pipeline::Pipeline;
use postforge::diffusion::sampler::SamplerKind;
use postforge::peft::{Adapted, AdapterPlan, GateResize};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn lora() -> PathBuf {
    root().join("assets/loras/striped/striped.safetensors")
}

fn scene() -> (RgbImage, Mask) {
    let s = Scene::parse("a green square on the left, gray background").unwrap();
    let img = s.draw(
        32,
        Style::Filled,
        &mut postforge::rng::rng_for(3, "edit-test"),
    );
    let m = Mask::from_shape(&img, "green square").unwrap().dilate(2);
    (img, m)
}

fn request(
    src: &RgbImage,
    regions: Vec<Region>,
    mode: EditMode,
    sampler: SamplerKind,
) -> EditRequest {
    EditRequest {
        source: src.clone(),
        prompt: "a green square on the left, gray background".into(),
        negative: String::new(),
        seed: 4,
        steps: 10,
        strength: 0.6,
        guidance: 2.5,
        sampler,
        mode,
        regions,
        normalize: false,
        feather: 0.0,
        gate: GateResize::Area,
        route_grow: 0,
    }
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    a.pixels()
        .zip(b.pixels())
        .flat_map(|(p, q)| (0..3).map(move |c| p.0[c].abs_diff(q.0[c])))
        .max()
        .unwrap_or(0)
}

#[test]
fn route_blend_keeps_the_outside_bit_exact_and_masks_bound_the_modes() {
    let mut p = load_with_lora(&root().join("assets/models/tiny-sd"), &lora()).unwrap();
    let (src, m) = scene();
    let outside = m.invert().threshold(0.5);
    let inside = m.threshold(0.5);
    let region = |mask: &Mask| {
        vec![Region {
            adapter: "lora".into(),
            mask: mask.clone(),
        }]
    };
    for sampler in [
        SamplerKind::Ddim { eta: 0.0 },
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
    ] {
        let out = edit(
            &p,
            &request(&src, region(&m), EditMode::RouteBlend, sampler),
        )
        .unwrap();
        let d = region_diff(&out.image, &src, &outside);
        assert!(
            d.psnr.is_infinite() && d.max_abs == 0,
            "{sampler:?}: outside changed by {}",
            d.max_abs
        );
        assert!(
            region_diff(&out.image, &src, &inside).max_abs > 20,
            "{sampler:?}: nothing was edited inside"
        );
    }
    let s = SamplerKind::EulerAncestral;
    let unmasked = edit(&p, &request(&src, region(&m), EditMode::Unmasked, s))
        .unwrap()
        .image;
    let zero = Mask::filled(32, 32, 0.0);
    let full = Mask::filled(32, 32, 1.0);
    let routed_full = edit(&p, &request(&src, region(&full), EditMode::Route, s))
        .unwrap()
        .image;
    assert!(
        max_diff(&routed_full, &unmasked) <= 1,
        "a full mask is the unmasked edit"
    );
    let routed_zero = edit(&p, &request(&src, region(&zero), EditMode::Route, s))
        .unwrap()
        .image;
    p.set_adapter_scale("lora", 0.0).unwrap();
    let base = edit(&p, &request(&src, region(&m), EditMode::Unmasked, s))
        .unwrap()
        .image;
    assert!(
        max_diff(&routed_zero, &base) <= 1,
        "a zero mask is the base edit"
    );
    assert!(max_diff(&unmasked, &base) > 20, "the LoRA changes the edit");
    // Routing alone keeps the style's changes mostly inside: the outside moves less than unmasked.
    p.set_adapter_scale("lora", 1.0).unwrap();
    let routed = edit(&p, &request(&src, region(&m), EditMode::Route, s))
        .unwrap()
        .image;
    let leak = |img: &RgbImage| region_diff(img, &base, &outside).mean_abs;
    assert!(
        leak(&routed) < leak(&unmasked),
        "{} vs {}",
        leak(&routed),
        leak(&unmasked)
    );
}

#[test]
fn two_adapters_normalised_over_one_region_add_up_to_one() {
    let mut p = Pipeline::load(
        &root().join("assets/models/tiny-sd"),
        AdapterPlan::none(),
        AdapterPlan::none(),
    )
    .unwrap();
    p.apply_lora_file(&lora(), "a").unwrap();
    // The left half: binary on every U-Net grid (32, 16, 8, 4), where normalising gives each of
    // two equal masks exactly one half (on a soft edge cell it would give 1/2 of 1, not of m).
    let (src, _) = scene();
    let m = Mask::from_box(32, 32, (0, 0, 16, 32)).unwrap();
    let single = {
        let mut q = load_with_lora(&root().join("assets/models/tiny-sd"), &lora()).unwrap();
        q.set_adapter_scale("lora", 1.0).unwrap();
        let r = vec![Region {
            adapter: "lora".into(),
            mask: m.clone(),
        }];
        edit(&q, &request(&src, r, EditMode::Route, SamplerKind::Euler))
            .unwrap()
            .image
    };
    p.apply_lora_file(&lora(), "b").unwrap();
    let regions = vec![
        Region {
            adapter: "a".into(),
            mask: m.clone(),
        },
        Region {
            adapter: "b".into(),
            mask: m.clone(),
        },
    ];
    let mut req = request(&src, regions, EditMode::Route, SamplerKind::Euler);
    req.normalize = true;
    let both = edit(&p, &req).unwrap().image;
    assert!(
        max_diff(&both, &single) <= 1,
        "normalised halves != one adapter"
    );
    req.normalize = false;
    let doubled = edit(&p, &req).unwrap().image;
    assert!(
        max_diff(&doubled, &single) > 5,
        "additive masks should double the adapter"
    );
    // The union of the masks is what may change.
    let u = postforge::diffusion::edit::union(&req.regions).unwrap();
    assert_eq!(u, m.combine(&m, Combine::Union));
}

#[test]
fn a_latent_pipeline_edit_keeps_the_outside_through_the_paste_back() {
    use postforge::diffusion::tiny_sd::PretrainTask;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    PretrainTask::new(4, 2, 3)
        .unwrap()
        .write_pipeline(&model)
        .unwrap();
    crate::common::make_latent_pipeline(&model);
    let mut cfg = postforge::peft::AdapterConfig::lora(2, 2.0, &["conv1", "conv2", "to_q"]);
    cfg.init_lora_weights = postforge::peft::InitSpec::Bool(false);
    let p = Pipeline::load(
        &model,
        AdapterPlan::single(cfg, 1).unwrap(),
        AdapterPlan::none(),
    )
    .unwrap();
    let (src, m) = scene();
    let r = vec![Region {
        adapter: "default".into(),
        mask: m.clone(),
    }];
    let mut req = request(&src, r, EditMode::RouteBlend, SamplerKind::Euler);
    req.steps = 4;
    let out = edit(&p, &req).unwrap();
    let d = region_diff(&out.image, &src, &m.invert().threshold(0.5));
    assert!(d.psnr.is_infinite(), "outside changed by {}", d.max_abs);
    // A feathered paste-back softens the edge but still keeps pixels far from the mask.
    req.feather = 1.0;
    let soft = edit(&p, &req).unwrap();
    let far = m.dilate(4).invert();
    assert_eq!(region_diff(&soft.image, &src, &far).max_abs, 0);
    // An odd size is refused with the factor named.
    req.source = image::imageops::crop_imm(&src, 0, 0, 31, 32).to_image();
    req.regions[0].mask = Mask::filled(31, 32, 1.0);
    let e = edit(&p, &req).unwrap_err().to_string();
    assert!(e.contains("31x32") && e.contains("factor 2"), "{e}");
}

#[test]
fn masks_read_every_layout_and_refuse_bad_files_with_their_names() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Grey, RGB and RGBA files of the same mask read the same; alpha multiplies.
    let grey = image::GrayImage::from_fn(8, 4, |x, _| image::Luma([if x < 4 { 255 } else { 0 }]));
    grey.save(d.join("g.png")).unwrap();
    image::DynamicImage::ImageLuma8(grey.clone())
        .to_rgb8()
        .save(d.join("rgb.png"))
        .unwrap();
    let mut rgba = image::DynamicImage::ImageLuma8(grey.clone()).to_rgba8();
    rgba.get_pixel_mut(0, 0).0[3] = 0;
    rgba.save(d.join("rgba.png")).unwrap();
    let g = Mask::read(&d.join("g.png")).unwrap();
    assert_eq!(g, Mask::read(&d.join("rgb.png")).unwrap());
    assert_eq!(g.coverage(), 0.5);
    let a = Mask::read(&d.join("rgba.png")).unwrap();
    assert_eq!(a.data[0], 0.0);
    assert_eq!(a.data[1], 1.0);
    // A 1-bit PNG (checkerboard, written by hand with zlib) and a grey JPEG.
    let one = Mask::read(&root().join("tests/fixtures/masks/onebit_checker_8x4.png")).unwrap();
    assert_eq!((one.w, one.h, one.data[0], one.data[1]), (8, 4, 1.0, 0.0));
    assert_eq!(one.coverage(), 0.5);
    grey.save(d.join("g.jpg")).unwrap();
    assert!((Mask::read(&d.join("g.jpg")).unwrap().coverage() - 0.5).abs() < 0.05);
    // Another size: resized with a warning, or refused under strict with both sizes.
    let (r, warn) = g.clone().fit(16, 8, false, &d.join("g.png")).unwrap();
    assert_eq!((r.w, r.h), (16, 8));
    assert!(warn.unwrap().contains("8x4"));
    let e = g
        .fit(16, 8, true, &d.join("g.png"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("g.png") && e.contains("8x4") && e.contains("16x8"),
        "{e}"
    );
    // Truncated and corrupt files name the file.
    let full = std::fs::read(d.join("g.png")).unwrap();
    std::fs::write(d.join("trunc.png"), &full[..full.len() / 2]).unwrap();
    std::fs::write(d.join("junk.png"), b"not a png at all").unwrap();
    for f in ["trunc.png", "junk.png"] {
        let e = Mask::read(&d.join(f)).unwrap_err().to_string();
        assert!(e.contains(f) && e.contains("cannot read mask"), "{e}");
    }
}

#[test]
fn a_lora_with_a_text_encoder_part_routes_and_derives_masks() {
    // kohya files often carry `lora_te_*` modules: the text-encoder part acts on the whole prompt
    // (tokens have no pixels), the U-Net part is routed, and mask derivation turns both off.
    let mut cfg =
        postforge::peft::AdapterConfig::lora(2, 2.0, &["to_q", "conv1", "q_proj", "v_proj"]);
    cfg.init_lora_weights = postforge::peft::InitSpec::Bool(false);
    let p = Pipeline::load(
        &root().join("assets/models/tiny-sd"),
        AdapterPlan::single(cfg.clone(), 1).unwrap(),
        AdapterPlan::single(cfg, 2).unwrap(),
    )
    .unwrap();
    assert!(p
        .text_encoder
        .layers()
        .iter()
        .any(|l| l.has_adapter("default")));
    let (src, m) = scene();
    let r = vec![Region {
        adapter: "default".into(),
        mask: m.clone(),
    }];
    let out = edit(
        &p,
        &request(&src, r, EditMode::RouteBlend, SamplerKind::Euler),
    )
    .unwrap();
    assert!(region_diff(&out.image, &src, &m.invert().threshold(0.5))
        .psnr
        .is_infinite());
    let derived = postforge::diffusion::attn_mask::mask_from_token(
        &p,
        &src,
        "a green square on the left, gray background",
        "square",
        4,
        10,
        0.6,
        2.5,
        SamplerKind::Euler,
        0.5,
    )
    .unwrap();
    assert!(derived.coverage() > 0.0 && derived.coverage() < 1.0);
    // Too small a strength re-runs no step: refused, not silently the source.
    let mut req = request(&src, vec![], EditMode::Route, SamplerKind::Euler);
    req.regions = vec![Region {
        adapter: "default".into(),
        mask: m,
    }];
    req.strength = 0.01;
    let e = edit(&p, &req).unwrap_err().to_string();
    assert!(e.contains("strength 0.01") && e.contains("0 steps"), "{e}");
}
