//! Token routing in a decoder: the Llama blocks declare a sequence layout, so a per-token mask
//! (b, t) gates every adapted projection — zero is the base model, one the unrouted adapter, and
//! tokens before the first routed one keep the base logits (causal attention).

use candle_core::{DType, Device, Tensor};
use postforge::models::llama::{Inputs, LlamaForCausalLM};
use postforge::peft::{AdapterConfig, AdapterPlan, ForwardCtx, InitSpec, Routing};
use std::path::Path;
use std::sync::Arc;

#[test]
fn a_per_token_mask_routes_a_decoder_lora() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/models/tiny-chat");
    let base = LlamaForCausalLM::load(&dir, AdapterPlan::none()).unwrap();
    let mut cfg = AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj", "o_proj", "down_proj"]);
    cfg.init_lora_weights = InitSpec::Bool(false);
    let m = LlamaForCausalLM::load(&dir, AdapterPlan::single(cfg, 2).unwrap()).unwrap();
    let ids = Tensor::new(&[[5u32, 9, 14, 3, 7, 11]], &Device::Cpu).unwrap();
    let run = |model: &LlamaForCausalLM, ctx: &ForwardCtx| {
        model.forward(&ids, &Inputs::default(), ctx).unwrap()
    };
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let routed = |mask: &[f32]| {
        let mk = Tensor::from_vec(mask.to_vec(), (1, 6), &Device::Cpu).unwrap();
        let r = Routing::new().with_mask("default", &mk).unwrap();
        run(&m, &ForwardCtx::eval().routed(Arc::new(r)))
    };
    let (yb, y) = (
        run(&base, &ForwardCtx::eval()),
        run(&m, &ForwardCtx::eval()),
    );
    assert!(diff(&y, &yb) > 1e-3, "the adapter is a no-op");
    assert!(diff(&routed(&[0.; 6]), &yb) < 1e-5, "zero mask != base");
    assert!(diff(&routed(&[1.; 6]), &y) < 1e-4, "one mask != unrouted");
    // Route only the last three tokens: the first three keep the base logits exactly.
    let h = routed(&[0., 0., 0., 1., 1., 1.]);
    let first = |t: &Tensor| t.narrow(1, 0, 3).unwrap();
    let last = |t: &Tensor| t.narrow(1, 3, 3).unwrap();
    assert!(diff(&first(&h), &first(&yb)) < 1e-5);
    assert!(diff(&last(&h), &last(&yb)) > 1e-3);
    let _ = DType::F32;
}
