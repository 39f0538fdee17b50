//! Runs every differentiable op of `postforge::nn` on a device and compares value and input
//! gradient with the CPU. The fused CPU nodes decline other devices; their composed fallbacks must
//! then give the CPU's numbers (issue 18: "every custom op works on CUDA, its composed fallback at
//! minimum"). Prints one line per op and exits non-zero on any failure.
//!
//!   cargo run --release --example gpu_smoke -- cpu          (self-check)
//!   scripts/gpu/smoke.sh                                     (a CUDA build, on a GPU machine)

use candle_core::{DType, Device, Tensor, Var};
use postforge::nn::{act, attention, conv, frozen, lora_op, norm, rope, softmax};
use postforge::peft::ConvCfg;

type Op = fn(&[Tensor]) -> anyhow::Result<Tensor>;

fn wave(shape: &[usize], phase: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.37 + phase).sin() * 0.8) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("a wave tensor")
}

/// Value and the gradient of sum(value · r) with respect to the first input, on `dev`.
fn run(op: Op, inputs: &[Tensor], dev: &Device) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let x = Var::from_tensor(&inputs[0].to_device(dev)?)?;
    let mut all = vec![x.as_tensor().clone()];
    for t in &inputs[1..] {
        all.push(t.to_device(dev)?);
    }
    let y = op(&all)?;
    let r = wave(y.dims(), 1.3).to_device(dev)?;
    let g = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
    let gx = g
        .get(x.as_tensor())
        .map(|t| t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>())
        .transpose()?
        .unwrap_or_default();
    let v = y
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((v, gx))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn main() {
    let spec = std::env::args().nth(1).unwrap_or_else(|| "cpu".into());
    let dev = match spec.as_str() {
        "cpu" => Device::Cpu,
        s => {
            let n = s
                .strip_prefix("cuda")
                .map(|r| r.trim_start_matches(':'))
                .unwrap_or("");
            let ord = if n.is_empty() {
                0
            } else {
                n.parse().unwrap_or(usize::MAX)
            };
            match Device::new_cuda(ord) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("device `{s}`: {e}");
                    std::process::exit(2);
                }
            }
        }
    };
    let cases: Vec<(&str, Op, Vec<Tensor>)> = vec![
        (
            "frozen_linear",
            |t| Ok(frozen::frozen_linear(&t[0], &t[1])?),
            vec![wave(&[2, 5, 8], 0.0), wave(&[6, 8], 0.5)],
        ),
        (
            "frozen_linear_bias",
            |t| {
                Ok(
                    match frozen::frozen_linear_bias(&t[0], &t[1], Some(&t[2]))? {
                        Some(y) => y,
                        None => frozen::frozen_linear(&t[0], &t[1])?.broadcast_add(&t[2])?,
                    },
                )
            },
            vec![wave(&[2, 5, 8], 0.0), wave(&[6, 8], 0.5), wave(&[6], 0.9)],
        ),
        (
            "lora_linear",
            |t| Ok(lora_op::lora_linear(&t[0], &t[1], &t[2], &t[3], 0.5)?),
            vec![
                wave(&[2, 5, 8], 0.0),
                wave(&[6, 8], 0.5),
                wave(&[2, 8], 0.7),
                wave(&[6, 2], 0.2),
            ],
        ),
        (
            "frozen_conv2d",
            |t| {
                Ok(conv::frozen_conv2d(
                    &t[0],
                    &t[1],
                    ConvCfg {
                        padding: 1,
                        stride: 1,
                        dilation: 1,
                        groups: 1,
                    },
                )?)
            },
            vec![wave(&[2, 3, 6, 6], 0.0), wave(&[4, 3, 3, 3], 0.3)],
        ),
        (
            "lora_conv2d",
            |t| {
                let c = ConvCfg {
                    padding: 1,
                    stride: 1,
                    dilation: 1,
                    groups: 1,
                };
                Ok(
                    match postforge::nn::lora_conv::lora_conv2d(
                        &t[0], &t[1], None, &t[2], &t[3], 0.5, c,
                    )? {
                        Some(y) => y,
                        None => {
                            (conv::frozen_conv2d(&t[0], &t[1], c)?
                                + (conv::conv2d(
                                    &conv::conv2d(&t[0], &t[2], c, false)?,
                                    &t[3],
                                    ConvCfg { padding: 0, ..c },
                                    false,
                                )? * 0.5)?)?
                        }
                    },
                )
            },
            vec![
                wave(&[2, 3, 6, 6], 0.0),
                wave(&[4, 3, 3, 3], 0.3),
                wave(&[2, 3, 3, 3], 0.6),
                wave(&[4, 2, 1, 1], 0.1),
            ],
        ),
        (
            "group_norm_silu",
            |t| Ok(norm::group_norm_silu(&t[0], 2, &t[1], &t[2], 1e-5)?),
            vec![wave(&[2, 4, 3, 3], 0.0), wave(&[4], 0.4), wave(&[4], 0.8)],
        ),
        (
            "group_norm",
            |t| Ok(norm::group_norm_fused(&t[0], 2, &t[1], &t[2], 1e-5)?),
            vec![wave(&[2, 4, 3, 3], 0.0), wave(&[4], 0.4), wave(&[4], 0.8)],
        ),
        (
            "layer_norm",
            |t| Ok(norm::layer_norm(&t[0], &t[1], &t[2], 1e-5)?),
            vec![wave(&[2, 5, 8], 0.0), wave(&[8], 0.4), wave(&[8], 0.8)],
        ),
        (
            "rms_norm",
            |t| Ok(norm::rms_norm(&t[0], &t[1], 1e-6)?),
            vec![wave(&[2, 5, 8], 0.0), wave(&[8], 0.4)],
        ),
        (
            "softmax",
            |t| Ok(softmax::softmax_last(&t[0])?),
            vec![wave(&[2, 5, 8], 0.0)],
        ),
        (
            "scaled_masked_softmax",
            |t| Ok(softmax::scaled_masked_softmax(&t[0], 0.5, None)?),
            vec![wave(&[1, 2, 5, 8], 0.0)],
        ),
        (
            "geglu",
            |t| Ok(act::geglu(&t[0])?),
            vec![wave(&[2, 5, 8], 0.0)],
        ),
        (
            "swiglu",
            |t| Ok(act::swiglu(&t[0], &t[1])?),
            vec![wave(&[2, 5, 8], 0.0), wave(&[2, 5, 8], 0.3)],
        ),
        (
            "attention",
            |t| Ok(attention::attention(&t[0], &t[1], &t[2], None)?),
            vec![
                wave(&[1, 2, 5, 4], 0.0),
                wave(&[1, 2, 5, 4], 0.3),
                wave(&[1, 2, 5, 4], 0.6),
            ],
        ),
        (
            "rope",
            |t| {
                let inv: Vec<f32> = (0..2)
                    .map(|i| 1.0 / 10000f32.powf(i as f32 / 2.0))
                    .collect();
                let pos = Tensor::arange(0u32, t[0].dim(2)? as u32, t[0].device())?.unsqueeze(0)?;
                Ok(rope::rope(&t[0], &pos, &inv)?)
            },
            vec![wave(&[1, 2, 5, 4], 0.0)],
        ),
    ];
    let mut failures = 0;
    for (name, op, inputs) in &cases {
        let cpu = run(*op, inputs, &Device::Cpu);
        let other = run(*op, inputs, &dev);
        match (cpu, other) {
            (Ok((v0, g0)), Ok((v1, g1))) => {
                let (dv, dg) = (max_diff(&v0, &v1), max_diff(&g0, &g1));
                let ok = dv <= 1e-4 && dg <= 1e-4 && !g0.is_empty();
                failures += (!ok) as usize;
                println!(
                    "{} {name}: value {dv:.2e}, input gradient {dg:.2e}",
                    if ok { "ok  " } else { "FAIL" }
                );
            }
            (Err(e), _) => {
                failures += 1;
                println!("FAIL {name}: on the CPU: {e}");
            }
            (_, Err(e)) => {
                failures += 1;
                println!("FAIL {name}: on {dev:?}: {e}");
            }
        }
    }
    println!("{} ops, {failures} failure(s) on {spec}", cases.len());
    std::process::exit(if failures == 0 { 0 } else { 1 });
}
