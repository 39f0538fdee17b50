//! AutoencoderKL parity with diffusers 0.42.1 (fixtures from `scripts/fixtures/make_vae_fixtures.py`):
//! the encoder's posterior and the decoder's output on a tiny random VAE, within 1e-4 relative, for
//! the current and the legacy attention tensor names.

use crate::common::*;
use postforge::models::vae::{AutoencoderKL, VaeConfig};
use postforge::models::Weights;
use postforge::peft::{AdapterPlan, ForwardCtx};
use postforge::util::SafeTensors;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae")
}

#[test]
fn encoder_posterior_and_decoder_output_match_diffusers() {
    let io = SafeTensors::read(&dir().join("io.safetensors")).unwrap();
    let cfg = VaeConfig::from_file(&dir().join("config.json")).unwrap();
    for file in ["diffusion_pytorch_model.safetensors", "legacy.safetensors"] {
        let vae = AutoencoderKL::new(
            &cfg,
            &Weights::from_files(&[dir().join(file)], AdapterPlan::none()).unwrap(),
        )
        .unwrap();
        let (mean, logvar) = vae
            .encode(&io.get("x").unwrap(), &ForwardCtx::eval())
            .unwrap();
        let e = rel_err(&mean, &io.get("mean").unwrap());
        assert!(e < 1e-4, "{file}: posterior mean {e}");
        let e = rel_err(&logvar, &io.get("logvar").unwrap());
        assert!(e < 1e-4, "{file}: posterior logvar {e}");
        let dec = vae
            .decode(&io.get("z").unwrap(), &ForwardCtx::eval())
            .unwrap();
        let e = rel_err(&dec, &io.get("decoded").unwrap());
        assert!(e < 1e-4, "{file}: decoded {e}");
        // Scaling: decode_scaled(encode_scaled(x)) goes through the same latents.
        let z = vae
            .encode_scaled(&io.get("x").unwrap(), None, &ForwardCtx::eval())
            .unwrap();
        assert!(rel_err(&(z / 0.5).unwrap(), &io.get("mean").unwrap()) < 1e-5);
    }
    let vae = AutoencoderKL::load(&dir()).unwrap();
    let bad =
        postforge::rng::normal(&[1, 3, 15, 16], 1.0, &mut postforge::rng::rng_for(0, "x")).unwrap();
    let e = vae
        .encode(&bad, &ForwardCtx::eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("15x16"), "{e}");
}
