//! Adapted-linear training step (forward + backward) and optimizer update speed, plus peak memory.
//!
//! `cargo bench --bench adapters` prints criterion timings for
//!   linear_step/d{1024,4096}/r{8,64}/{frozen,lora,dora,full_grad}   (1024 tokens, input needs grad)
//!   adamw/4.2M/{fused,candle}
//! and, before them, the peak heap bytes of one step of each variant (a counting allocator).

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, Criterion};
use postforge::peft::{AdaptedLayer, AdapterConfig, AdapterPlan, BaseKind, ForwardCtx, InitSpec};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

struct Counting;
static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let c = CUR.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(c, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CUR.fetch_sub(l.size(), Ordering::Relaxed);
    }
}
#[global_allocator]
static A: Counting = Counting;

const TOKENS: usize = 1024;

#[derive(Clone, Copy, Debug)]
enum Variant {
    Frozen,
    Lora,
    Dora,
    FullGrad,
}

struct Setup {
    layer: AdaptedLayer,
    w: Tensor,
    x: Var,
    variant: Variant,
}

fn setup(d: usize, r: usize, variant: Variant) -> Setup {
    let mut rng = postforge::rng::rng_for(1, "bench");
    let w = postforge::rng::normal(&[d, d], 0.02, &mut rng).unwrap();
    let x =
        Var::from_tensor(&postforge::rng::normal(&[TOKENS, d], 1.0, &mut rng).unwrap()).unwrap();
    let mut cfg = AdapterConfig::lora(r, r as f64, &["proj"]);
    cfg.init_lora_weights = InitSpec::Bool(false);
    cfg.use_dora = matches!(variant, Variant::Dora);
    let plan = if matches!(variant, Variant::Lora | Variant::Dora) {
        AdapterPlan::single(cfg, 0).unwrap()
    } else {
        AdapterPlan::none()
    };
    let layer = plan
        .apply(AdaptedLayer::new("proj", BaseKind::Linear, w.clone(), None).unwrap())
        .unwrap();
    Setup {
        layer,
        w,
        x,
        variant,
    }
}

fn step(s: &Setup) -> usize {
    let y = match s.variant {
        // The full-weight-gradient path: candle's plain matmul, which computes dW for the frozen W.
        Variant::FullGrad => s.x.as_tensor().matmul(&s.w.t().unwrap()).unwrap(),
        _ => s
            .layer
            .forward(s.x.as_tensor(), &ForwardCtx::eval_with_grad())
            .unwrap(),
    };
    let g = y.sum_all().unwrap().backward().unwrap();
    g.get_ids().count()
}

fn peak_of(d: usize, r: usize, v: Variant) -> usize {
    let s = setup(d, r, v);
    step(&s); // warm caches
    let base = CUR.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    step(&s);
    PEAK.load(Ordering::Relaxed) - base
}

fn memory_report() {
    for d in [1024, 4096] {
        let mut line = format!("peak heap above resting, one step, d={d} r=8, tokens={TOKENS}:");
        for v in [
            Variant::Frozen,
            Variant::Lora,
            Variant::Dora,
            Variant::FullGrad,
        ] {
            line += &format!(" {v:?} {:.1} MiB", peak_of(d, 8, v) as f64 / 1048576.0);
        }
        line += &format!(" (one weight = {:.1} MiB)", (d * d * 4) as f64 / 1048576.0);
        eprintln!("{line}");
    }
}

fn bench_linear(c: &mut Criterion) {
    memory_report();
    let mut g = c.benchmark_group("linear_step");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    for d in [1024, 4096] {
        for r in [8, 64] {
            for v in [
                Variant::Frozen,
                Variant::Lora,
                Variant::Dora,
                Variant::FullGrad,
            ] {
                if r == 64 && matches!(v, Variant::Frozen | Variant::FullGrad) {
                    continue; // rank-independent
                }
                let s = setup(d, r, v);
                g.bench_function(format!("d{d}/r{r}/{v:?}"), |b| b.iter(|| step(&s)));
            }
        }
    }
    g.finish();
}

fn bench_adamw(c: &mut Criterion) {
    // 4.2M parameters in LoRA-like tensors (the figure DESIGN.md quotes for candle's AdamW).
    let n_tensors = 64;
    let per = 4_200_000 / n_tensors;
    let mut rng = postforge::rng::rng_for(2, "adam");
    let params: Vec<(String, Var)> = (0..n_tensors)
        .map(|i| {
            (
                format!("p{i}"),
                Var::from_tensor(&postforge::rng::normal(&[per], 0.1, &mut rng).unwrap()).unwrap(),
            )
        })
        .collect();
    let grads: std::collections::BTreeMap<String, Tensor> = params
        .iter()
        .map(|(n, _)| {
            (
                n.clone(),
                postforge::rng::normal(&[per], 0.1, &mut rng).unwrap(),
            )
        })
        .collect();
    let mut g = c.benchmark_group("adamw");
    g.sample_size(20);
    let mut fused = postforge::train::AdamW::new(params.clone(), Default::default()).unwrap();
    g.bench_function("4.2M/fused", |b| {
        b.iter(|| fused.step(&grads, 1e-3, 1.0).unwrap())
    });
    use candle_nn::Optimizer;
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut cand = candle_nn::AdamW::new(
        vars.clone(),
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    // candle's optimizer takes a GradStore; build one from a loss whose gradients equal `grads`.
    let loss = vars
        .iter()
        .zip(grads.values())
        .map(|(v, g)| (v.as_tensor() * g).unwrap().sum_all().unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let gs = loss.backward().unwrap();
    g.bench_function("4.2M/candle", |b| b.iter(|| cand.step(&gs).unwrap()));
    g.finish();
    let _ = Device::Cpu;
}

/// Interleaved timing: every round runs each variant once, so that machine noise hits all variants
/// alike; reports medians of the per-round ratios (the figures the issue asks for).
fn ratio_report() {
    for (d, rounds) in [(1024, 21), (4096, 7)] {
        for r in [8, 64] {
            let vs = [
                Variant::Frozen,
                Variant::Lora,
                Variant::Dora,
                Variant::FullGrad,
            ];
            let setups: Vec<Setup> = vs.iter().map(|v| setup(d, r, *v)).collect();
            setups.iter().for_each(|s| {
                step(s);
            });
            let mut times = vec![vec![]; vs.len()];
            for round in 0..rounds {
                for k in 0..vs.len() {
                    let i = (k + round) % vs.len();
                    let t = std::time::Instant::now();
                    step(&setups[i]);
                    times[i].push(t.elapsed().as_secs_f64());
                }
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            let ratio = |a: usize, b: usize| {
                median(times[a].iter().zip(&times[b]).map(|(x, y)| x / y).collect())
            };
            eprintln!(
                "ratios d={d} r={r} tokens={TOKENS} ({rounds} interleaved rounds): frozen {:.1} ms; LoRA/frozen {:.3}; DoRA/LoRA {:.3}; full-grad/frozen {:.3}",
                median(times[0].clone()) * 1e3,
                ratio(1, 0),
                ratio(2, 1),
                ratio(3, 0)
            );
        }
    }
}

fn bench_ratios(_: &mut Criterion) {
    ratio_report();
}

criterion_group!(benches, bench_ratios, bench_linear, bench_adamw);

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
