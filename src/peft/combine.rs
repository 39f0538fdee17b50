//! Adapter arithmetic with PEFT's `add_weighted_adapter` semantics (peft 0.21), on adapter files
//! (no base model is needed: every combination works on the factors alone), for text and diffusion
//! adapters alike.
//!
//! With `ΔW_i = s_i·B_i A_i` (s_i the adapter's scale) and user weights `w_i`, per module:
//! - `cat`: `A' = [w_1 s_1 A_1; w_2 s_2 A_2; …]`, `B' = [B_1, B_2, …]`: exact, rank `Σ r_i` (a module
//!   some adapters lack is zero-padded to that rank);
//! - `svd` and the `*_svd` variants: the combined `ΔW` (task arithmetic, TIES, DARE or magnitude
//!   pruning over the `ΔW_i`) truncated to `svd_rank` (default: the largest input rank) by SVD:
//!   `B' = U_k S_k`, `A' = V_kᵀ`, optionally clamped at the `svd_clamp` quantile of their entries;
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (equal ranks): A and B are
//!   combined separately, with weights `sign(w s)·√|w s|` on the A's and `√|w s|` on the B's. This
//!   is not `Σ w_i ΔW_i` (PEFT calls it a very rough approximation); it is what PEFT computes.
//!
//! The result has `r = lora_alpha = new rank` (scale 1). DoRA magnitudes are dropped, as PEFT's
//! combination ignores them. PEFT copies the first adapter's `use_rslora` and `use_dora` into the new
//! config (which would rescale the result by √r with rsLoRA); the config written here sets both to
//! false so that the file means what was computed.
//!
//! The operators (TIES: magnitude pruning to `density`, the per-entry majority sign by `total` or
//! `frequency`, the disjoint mean; DARE: Bernoulli(`density`) masks rescaled by 1/density) follow
//! `peft.utils.merge_utils`. DARE's masks come from our seeded generator, not torch's.

use super::config::{AdapterConfig, InitSpec, ModuleSpec};
use super::formats::lora_file::{LoraFile, LoraFormat, ModuleLora};
use super::formats::peft::{CONFIG_FILE, WEIGHTS_FILE};
use super::init::{from_matrix, svd_top};
use crate::rng::rng_for;
use crate::util::{save_safetensors, write_atomic, SafeTensors};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// How adapters are combined (PEFT's `combination_type`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[clap(rename_all = "snake_case")]
pub enum Combination {
    /// Concatenate the factors: exact.
    Cat,
    /// Weighted sum of the ΔW, truncated SVD.
    Svd,
    /// Weighted sums of A and of B (equal ranks).
    Linear,
    /// TIES on A and on B.
    Ties,
    /// TIES on the ΔW, truncated SVD.
    TiesSvd,
    /// DARE then a weighted sum, on A and on B.
    DareLinear,
    /// DARE then TIES, on A and on B.
    DareTies,
    /// DARE then a weighted sum of the ΔW, truncated SVD.
    DareLinearSvd,
    /// DARE then TIES on the ΔW, truncated SVD.
    DareTiesSvd,
    /// Magnitude pruning then a weighted sum, on A and on B.
    MagnitudePrune,
    /// Magnitude pruning then a weighted sum of the ΔW, truncated SVD.
    MagnitudePruneSvd,
}

impl Combination {
    fn is_svd(self) -> bool {
        matches!(
            self,
            Self::Svd
                | Self::TiesSvd
                | Self::DareLinearSvd
                | Self::DareTiesSvd
                | Self::MagnitudePruneSvd
        )
    }
    fn needs_density(self) -> bool {
        !matches!(self, Self::Cat | Self::Svd | Self::Linear)
    }
    /// The operator applied to the task tensors.
    fn operator(self) -> Operator {
        match self {
            Self::Cat | Self::Svd | Self::Linear => Operator::TaskArithmetic,
            Self::Ties | Self::TiesSvd => Operator::Ties,
            Self::DareLinear | Self::DareLinearSvd => Operator::DareLinear,
            Self::DareTies | Self::DareTiesSvd => Operator::DareTies,
            Self::MagnitudePrune | Self::MagnitudePruneSvd => Operator::MagnitudePrune,
        }
    }
}

/// TIES' majority sign per entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SignMethod {
    /// The sign of the sum of the (pruned) task tensors.
    #[default]
    Total,
    /// The sign of the sum of their signs.
    Frequency,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Operator {
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

/// Options of a combination.
#[derive(Debug, Clone)]
pub struct CombineOptions {
    /// The combination type.
    pub combination: Combination,
    /// Rank of the SVD variants (default: the largest input rank).
    pub svd_rank: Option<usize>,
    /// Clamp the SVD factors at this quantile of their entries (e.g. 0.99).
    pub svd_clamp: Option<f64>,
    /// Share of entries kept by TIES, DARE and magnitude pruning.
    pub density: Option<f64>,
    /// TIES' majority sign.
    pub majority_sign_method: SignMethod,
    /// Seed of DARE's random masks.
    pub seed: u64,
}

impl Default for CombineOptions {
    fn default() -> Self {
        Self {
            combination: Combination::Svd,
            svd_rank: None,
            svd_clamp: None,
            density: None,
            majority_sign_method: SignMethod::Total,
            seed: 0,
        }
    }
}

/// Magnitude pruning of `t` (flat) to the top `density` share by |value| (PEFT: `k = int(density·n)`).
fn magnitude_prune(t: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut idx: Vec<usize> = (0..t.len()).collect();
    idx.sort_by(|&a, &b| t[b].abs().total_cmp(&t[a].abs()).then(a.cmp(&b)));
    let mut out = vec![0f32; t.len()];
    for &i in &idx[..k] {
        out[i] = t[i];
    }
    out
}

/// DARE: keep each entry with probability `density`, rescaled by 1/density.
fn random_prune(t: &[f32], density: f64, rng: &mut impl Rng) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    t.iter()
        .map(|v| {
            if rng.random::<f64>() < density {
                (*v as f64 / density) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// Applies `op` to task tensors of equal length with per-task weights: PEFT's `merge_utils`.
fn merge_tasks(
    op: Operator,
    tasks: &[Vec<f32>],
    weights: &[f64],
    density: f64,
    sign: SignMethod,
    rng: &mut impl Rng,
) -> Vec<f32> {
    let n = tasks.first().map_or(0, |t| t.len());
    let tasks: Vec<Vec<f32>> = match op {
        Operator::TaskArithmetic => tasks.to_vec(),
        Operator::Ties | Operator::MagnitudePrune => {
            tasks.iter().map(|t| magnitude_prune(t, density)).collect()
        }
        Operator::DareLinear | Operator::DareTies => tasks
            .iter()
            .map(|t| random_prune(t, density, rng))
            .collect(),
    };
    let mut out = vec![0f32; n];
    match op {
        Operator::TaskArithmetic | Operator::MagnitudePrune | Operator::DareLinear => {
            for (t, w) in tasks.iter().zip(weights) {
                for (o, v) in out.iter_mut().zip(t) {
                    *o += (*v as f64 * w) as f32;
                }
            }
        }
        Operator::Ties | Operator::DareTies => {
            for (j, o) in out.iter_mut().enumerate() {
                // The majority sign from the pruned, unweighted tensors (sign(0) = 0).
                let s: f64 = match sign {
                    SignMethod::Total => tasks.iter().map(|t| t[j] as f64).sum(),
                    SignMethod::Frequency => tasks.iter().map(|t| signum0(t[j]) as f64).sum(),
                };
                let majority = if s >= 0.0 { 1.0 } else { -1.0 };
                let (mut sum, mut kept) = (0f64, 0f64);
                for (t, w) in tasks.iter().zip(weights) {
                    if signum0(t[j]) == majority {
                        sum += t[j] as f64 * w;
                        kept += 1.0;
                    }
                }
                *o = (sum / kept.max(1.0)) as f32;
            }
        }
    }
    out
}

fn signum0(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// torch.quantile with linear interpolation.
fn quantile(v: &[f32], q: f64) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return 0.0;
    }
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let f = pos - lo as f64;
    (s[lo] as f64 + (s[hi] as f64 - s[lo] as f64) * f) as f32
}

/// Combines modules of several adapters (`inputs`: one map per adapter, module name → factors, with
/// its weight). Returns the new modules (scale 1: alpha = rank) and the new rank.
pub fn combine_modules(
    inputs: &[(&BTreeMap<String, ModuleLora>, f64)],
    opts: &CombineOptions,
) -> Result<(BTreeMap<String, ModuleLora>, usize)> {
    if inputs.is_empty() {
        return Err(Error::Config("combine: no adapters given".into()));
    }
    let ranks: Vec<usize> = inputs
        .iter()
        .map(|(m, _)| m.values().map(|l| l.rank()).max().unwrap_or(0))
        .collect();
    // A single adapter is always combined linearly, as in PEFT.
    let combination = if inputs.len() == 1 {
        Combination::Linear
    } else {
        opts.combination
    };
    let new_rank = match combination {
        Combination::Cat => ranks.iter().sum(),
        c if c.is_svd() => opts
            .svd_rank
            .unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0)),
        _ => {
            let all: BTreeSet<usize> = inputs
                .iter()
                .flat_map(|(m, _)| m.values().map(|l| l.rank()))
                .collect();
            if all.len() > 1 {
                return Err(Error::Config(format!(
                    "combination {combination:?} needs adapters of one rank, got ranks {all:?}; use cat or svd"
                )));
            }
            ranks[0]
        }
    };
    if new_rank == 0 {
        return Err(Error::Config(
            "combine: the adapters have no modules".into(),
        ));
    }
    let density = match (combination.needs_density(), opts.density) {
        (true, None) => {
            return Err(Error::Config(format!(
                "combination {combination:?} needs --density"
            )))
        }
        (true, Some(d)) if !(0.0..=1.0).contains(&d) => {
            return Err(Error::Config(format!("density {d} is not in [0, 1]")))
        }
        (_, d) => d.unwrap_or(1.0),
    };
    let names: BTreeSet<&String> = inputs.iter().flat_map(|(m, _)| m.keys()).collect();
    let mut out = BTreeMap::new();
    for name in names {
        let present: Vec<(&ModuleLora, f64)> = inputs
            .iter()
            .filter_map(|(m, w)| m.get(name).map(|l| (l, *w)))
            .collect();
        let first = present[0].0;
        let (a_shape, b_shape) = (first.down.dims().to_vec(), first.up.dims().to_vec());
        for (l, _) in &present {
            let (a, b) = (l.down.dims(), l.up.dims());
            if a[1..] != a_shape[1..] || b[0] != b_shape[0] || b[2..] != b_shape[2..] {
                return Err(Error::Msg(format!(
                    "{name}: the adapters' factor shapes differ (A {a:?} vs {a_shape:?}, B {b:?} vs {b_shape:?})"
                )));
            }
        }
        let scale = |l: &ModuleLora| l.alpha / l.rank() as f64;
        let mut rng = rng_for(opts.seed, name);
        let (down, up) = if combination == Combination::Cat {
            let mut downs = vec![];
            let mut ups = vec![];
            for (l, w) in &present {
                downs.push((&l.down * (w * scale(l)))?);
                ups.push(l.up.clone());
            }
            let (mut a, mut b) = (Tensor::cat(&downs, 0)?, Tensor::cat(&ups, 1)?);
            let have = a.dim(0)?;
            if have < new_rank {
                a = a.pad_with_zeros(0, 0, new_rank - have)?;
                b = b.pad_with_zeros(1, 0, new_rank - have)?;
            }
            (a, b)
        } else if combination.is_svd() {
            // ΔW_i = s_i B_i A_i as (out, in·kh·kw).
            let deltas = present
                .iter()
                .map(|(l, _)| {
                    let a = l.down.to_dtype(DType::F32)?.flatten_from(1)?;
                    let b = l.up.to_dtype(DType::F32)?.flatten_from(1)?;
                    Ok((b.matmul(&a)? * scale(l))?)
                })
                .collect::<Result<Vec<_>>>()?;
            let (o, k) = deltas[0].dims2()?;
            let tasks = deltas.iter().map(flat).collect::<Result<Vec<_>>>()?;
            let weights: Vec<f64> = present.iter().map(|(_, w)| *w).collect();
            let merged = merge_tasks(
                combination.operator(),
                &tasks,
                &weights,
                density,
                opts.majority_sign_method,
                &mut rng,
            );
            let dw = Tensor::from_vec(merged, (o, k), &crate::util::device::current())?;
            let (u, s, vt) = svd_top(&dw, new_rank)?;
            let kk = s.len();
            let mut us = u.clone();
            for j in 0..kk {
                us.column_mut(j).scale_mut(s[j]);
            }
            let (mut ut, mut vtt) = (
                from_matrix(&us, &crate::util::device::current())?,
                from_matrix(&vt, &crate::util::device::current())?,
            );
            if kk < new_rank {
                // A rank larger than min(out, in): pad with zero components.
                ut = ut.pad_with_zeros(1, 0, new_rank - kk)?;
                vtt = vtt.pad_with_zeros(0, 0, new_rank - kk)?;
            }
            if let Some(q) = opts.svd_clamp {
                let mut all = flat(&ut)?;
                all.extend(flat(&vtt)?);
                let hi = quantile(&all, q) as f64;
                ut = ut.clamp(-hi, hi)?;
                vtt = vtt.clamp(-hi, hi)?;
            }
            let mut bs = b_shape.clone();
            bs[1] = new_rank;
            let mut as_ = a_shape.clone();
            as_[0] = new_rank;
            (vtt.reshape(as_)?, ut.reshape(bs)?)
        } else {
            let mut wa = vec![];
            let mut wb = vec![];
            for (l, w) in &present {
                let ws = w * scale(l);
                let root = ws.abs().sqrt();
                wa.push(if ws >= 0.0 { root } else { -root });
                wb.push(root);
            }
            let op = combination.operator();
            let ta = present
                .iter()
                .map(|(l, _)| flat(&l.down))
                .collect::<Result<Vec<_>>>()?;
            let tb = present
                .iter()
                .map(|(l, _)| flat(&l.up))
                .collect::<Result<Vec<_>>>()?;
            let sign = opts.majority_sign_method;
            let a = merge_tasks(op, &ta, &wa, density, sign, &mut rng);
            let b = merge_tasks(op, &tb, &wb, density, sign, &mut rng);
            (
                Tensor::from_vec(a, a_shape.as_slice(), &crate::util::device::current())?,
                Tensor::from_vec(b, b_shape.as_slice(), &crate::util::device::current())?,
            )
        };
        out.insert(
            name.clone(),
            ModuleLora {
                down,
                up,
                alpha: new_rank as f64,
                magnitude: None,
            },
        );
    }
    Ok((out, new_rank))
}

/// An adapter on disk: a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) or a
/// single LoRA file (kohya / diffusers).
#[derive(Debug, Clone)]
pub struct AdapterSet {
    /// Modules by path (PEFT: the module path without `base_model.model.`; single files:
    /// `<component>.<path>`).
    pub modules: BTreeMap<String, ModuleLora>,
    /// Modules that are embeddings (PEFT's `lora_embedding_A/B`).
    pub embeddings: BTreeSet<String>,
    /// The PEFT config, for a folder.
    pub config: Option<AdapterConfig>,
    /// The single-file format, for a file.
    pub format: Option<LoraFormat>,
    /// Header metadata of a single file.
    pub metadata: BTreeMap<String, String>,
    /// Where it was read from.
    pub source: PathBuf,
}

impl AdapterSet {
    /// Reads a PEFT folder or a single LoRA file.
    pub fn read(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::read_peft(path);
        }
        let (f, format) = LoraFile::read(path, None)?;
        if let Some(k) = f.lycoris.keys().next() {
            return Err(Error::format(
                path,
                format!(
                    "`{k}` is a LoHa/LoKr module: adapter arithmetic combines LoRA modules only"
                ),
            ));
        }
        Ok(Self {
            modules: f.modules,
            embeddings: BTreeSet::new(),
            config: None,
            format: Some(format),
            metadata: f.metadata,
            source: path.to_path_buf(),
        })
    }

    fn read_peft(dir: &Path) -> Result<Self> {
        let cfg = AdapterConfig::from_json_file(&dir.join(CONFIG_FILE))?;
        if cfg.peft_type != "LORA" {
            return Err(Error::format(
                dir.join(CONFIG_FILE),
                format!("peft_type {} cannot be combined (LoRA only)", cfg.peft_type),
            ));
        }
        let wpath = dir.join(WEIGHTS_FILE);
        let st = SafeTensors::read(&wpath)?;
        let mut parts: BTreeMap<String, HashMap<&str, Tensor>> = BTreeMap::new();
        let mut embeddings = BTreeSet::new();
        for k in st.keys() {
            let Some(rest) = k.strip_prefix("base_model.model.") else {
                return Err(Error::format(&wpath, format!("`{k}` is not a PEFT key")));
            };
            let (module, field) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, "a")
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, "b")
            } else if let Some(m) = rest.strip_suffix(".lora_embedding_A") {
                embeddings.insert(m.to_string());
                (m, "a")
            } else if let Some(m) = rest.strip_suffix(".lora_embedding_B") {
                (m, "b")
            } else if let Some(m) = rest.strip_suffix(".lora_magnitude_vector") {
                (m, "m")
            } else {
                return Err(Error::format(
                    &wpath,
                    format!("`{k}` is not a LoRA factor (modules_to_save and biases cannot be combined)"),
                ));
            };
            parts.entry(module.to_string()).or_default().insert(
                field,
                crate::peft::formats::checked(&wpath, k, &st.get(k)?)?,
            );
        }
        let mut modules = BTreeMap::new();
        let mut excluded = vec![];
        for (module, mut p) in parts {
            let kind = if embeddings.contains(&module) {
                crate::peft::config::ModuleKind::Embedding
            } else if p.get("a").is_some_and(|a| a.rank() == 4) {
                crate::peft::config::ModuleKind::Conv2d
            } else {
                crate::peft::config::ModuleKind::Linear
            };
            if !cfg.targets(&module, kind, module.ends_with("lm_head"))? {
                // Not an adapted module by the config's own rules: PEFT would not load it.
                excluded.push(module);
                continue;
            }
            let missing = |f: &str| Error::Missing {
                path: wpath.clone(),
                key: format!("base_model.model.{module}.lora_{f}"),
            };
            let down = p.remove("a").ok_or_else(|| missing("A"))?;
            let up = p.remove("b").ok_or_else(|| missing("B"))?;
            let set = cfg.settings_for(&module)?;
            if down.dim(0)? != set.r {
                return Err(Error::format(
                    &wpath,
                    format!(
                        "{module}: lora_A has rank {} but the config says r = {}",
                        down.dim(0)?,
                        set.r
                    ),
                ));
            }
            // alpha such that alpha / r is the adapter's scale (rsLoRA: alpha / √r).
            let alpha = cfg.scale(set.r, set.alpha) * set.r as f64;
            let m = ModuleLora {
                down: down.to_dtype(DType::F32)?,
                up: up.to_dtype(DType::F32)?,
                alpha,
                magnitude: p.remove("m"),
            };
            m.check(&wpath, &module, ("lora_A", "lora_B"))?;
            modules.insert(module, m);
        }
        if let Some(first) = excluded.first() {
            eprintln!(
                "warning: {}: {} module(s) have tensors but are not targeted by {CONFIG_FILE} \
                 and were left out, as PEFT does; the first is `{first}`",
                wpath.display(),
                excluded.len()
            );
        }
        Ok(Self {
            modules,
            embeddings,
            config: Some(cfg),
            format: None,
            metadata: BTreeMap::new(),
            source: dir.to_path_buf(),
        })
    }
}

/// `add_weighted_adapter` over adapters on disk: combines `inputs` (adapter, weight) and returns the
/// result in the first adapter's kind (a PEFT folder or a single file).
pub fn combine(inputs: &[(AdapterSet, f64)], opts: &CombineOptions) -> Result<AdapterSet> {
    for (a, w) in inputs {
        crate::check::f64_in(
            &format!("the weight of {}", a.source.display()),
            *w,
            crate::check::FINITE,
        )?;
    }
    let first = &inputs
        .first()
        .ok_or_else(|| Error::Config("combine: no adapters given".into()))?
        .0;
    for (s, _) in inputs {
        if s.config.is_some() != first.config.is_some() {
            return Err(Error::Config(format!(
                "combine: {} and {} are of different kinds (a PEFT folder and a single LoRA file); convert one first",
                first.source.display(),
                s.source.display()
            )));
        }
    }
    let maps: Vec<(&BTreeMap<String, ModuleLora>, f64)> =
        inputs.iter().map(|(s, w)| (&s.modules, *w)).collect();
    let (modules, rank) = combine_modules(&maps, opts)?;
    let config = match &first.config {
        None => None,
        Some(c0) => {
            let mut c = c0.clone();
            c.r = rank;
            c.lora_alpha = rank as f64;
            c.rank_pattern.clear();
            c.alpha_pattern.clear();
            c.use_dora = false;
            c.use_rslora = false;
            c.init_lora_weights = InitSpec::Bool(true);
            c.extra.remove("loftq_config");
            c.target_modules = Some(union_targets(
                inputs.iter().filter_map(|(s, _)| s.config.as_ref()),
            )?);
            Some(c)
        }
    };
    let mut metadata = first.metadata.clone();
    metadata.remove("lora_adapter_metadata");
    Ok(AdapterSet {
        modules,
        embeddings: inputs
            .iter()
            .flat_map(|(s, _)| s.embeddings.iter().cloned())
            .collect(),
        config,
        format: first.format,
        metadata,
        source: PathBuf::new(),
    })
}

/// PEFT's union of target modules: lists are merged; regexes are joined as `(a)|(b)`.
fn union_targets<'a>(cfgs: impl Iterator<Item = &'a AdapterConfig>) -> Result<ModuleSpec> {
    let specs: Vec<&ModuleSpec> = cfgs.filter_map(|c| c.target_modules.as_ref()).collect();
    if specs.iter().all(|s| matches!(s, ModuleSpec::List(_))) {
        let mut all = BTreeSet::new();
        for s in &specs {
            if let ModuleSpec::List(v) = s {
                all.extend(v.iter().cloned());
            }
        }
        return Ok(ModuleSpec::List(all.into_iter().collect()));
    }
    if specs.iter().all(|s| matches!(s, ModuleSpec::Regex(_))) {
        let parts: Vec<String> = specs
            .iter()
            .filter_map(|s| match s {
                ModuleSpec::Regex(r) => Some(format!("({r})")),
                _ => None,
            })
            .collect();
        return Ok(ModuleSpec::Regex(parts.join("|")));
    }
    Err(Error::Config(
        "combine: target_modules mix a regex and a list; PEFT refuses that too".into(),
    ))
}

impl AdapterSet {
    /// Writes the set: a PEFT folder at `path` when it has a config, else a single file in `format`
    /// (default: the format it was read in). Files are written atomically.
    pub fn write(&self, path: &Path, format: Option<LoraFormat>) -> Result<()> {
        match &self.config {
            Some(cfg) => {
                let mut tensors = BTreeMap::new();
                for (m, l) in &self.modules {
                    let p = format!("base_model.model.{m}");
                    if self.embeddings.contains(m) {
                        tensors.insert(format!("{p}.lora_embedding_A"), l.down.clone());
                        tensors.insert(format!("{p}.lora_embedding_B"), l.up.clone());
                    } else {
                        tensors.insert(format!("{p}.lora_A.weight"), l.down.clone());
                        tensors.insert(format!("{p}.lora_B.weight"), l.up.clone());
                    }
                }
                std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
                let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
                save_safetensors(&path.join(WEIGHTS_FILE), &tensors, Some(meta))?;
                write_atomic(&path.join(CONFIG_FILE), cfg.to_json()?.as_bytes())
            }
            None => {
                let f = LoraFile {
                    modules: self.modules.clone(),
                    lycoris: Default::default(),
                    metadata: self.metadata.clone(),
                };
                let format = format.or(self.format).unwrap_or(LoraFormat::Kohya);
                f.write(path, format)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_keeps_the_majority_sign_and_averages() {
        let tasks = vec![vec![1.0f32, -2.0, 0.5], vec![3.0, 1.0, -0.25]];
        let mut rng = rng_for(0, "t");
        let out = merge_tasks(
            Operator::Ties,
            &tasks,
            &[1.0, 1.0],
            1.0,
            SignMethod::Total,
            &mut rng,
        );
        // entry 0: both positive → mean 2; entry 1: total −1 → only −2 kept; entry 2: total 0.25 →
        // only 0.5 kept.
        assert_eq!(out, vec![2.0, -2.0, 0.5]);
        let out = merge_tasks(
            Operator::Ties,
            &tasks,
            &[1.0, 1.0],
            1.0,
            SignMethod::Frequency,
            &mut rng,
        );
        // entry 1: one vote each → sum 0 → positive wins (>= 0): only 1.0 kept.
        assert_eq!(out, vec![2.0, 1.0, 0.5]);
    }

    #[test]
    fn dare_keeps_about_density_and_rescales() {
        let t = vec![1.0f32; 20000];
        let mut rng = rng_for(3, "dare");
        let out = random_prune(&t, 0.3, &mut rng);
        let kept = out.iter().filter(|v| **v != 0.0).count() as f64 / t.len() as f64;
        assert!((kept - 0.3).abs() < 0.02, "kept {kept}");
        assert!(out
            .iter()
            .all(|v| *v == 0.0 || (*v - 1.0 / 0.3).abs() < 1e-5));
        let mean: f64 = out.iter().map(|v| *v as f64).sum::<f64>() / t.len() as f64;
        assert!((mean - 1.0).abs() < 0.07, "mean {mean}");
    }

    #[test]
    fn magnitude_prune_keeps_the_largest() {
        let out = magnitude_prune(&[0.1, -3.0, 2.0, 0.5], 0.5);
        assert_eq!(out, vec![0.0, -3.0, 2.0, 0.0]);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
    }
}
