//! The per-forward context every model entry point takes and passes down: training mode and the
//! seeds of dropout draws, whether a graph is recorded, the layout the current block's layers see,
//! and the routing masks of the adapters.
//!
//! - **No graph at inference.** [`ForwardCtx::eval`] reads every trainable tensor detached
//!   ([`ForwardCtx::read`]), so sampling, generation and evaluation record no autograd graph even
//!   when adapters (variables) are present. [`ForwardCtx::eval_with_grad`] keeps the graph without
//!   dropout (gradient checks).
//! - **Layout.** A block declares what its layers see with [`ForwardCtx::at`]: token grids
//!   `(b, h·w, c)` ([`Layout::Tokens`]), image feature maps `(b, c, h, w)` ([`Layout::Image`]),
//!   frame sequences `(b·h·w, f, c)` ([`Layout::Temporal`]) or text sequences `(b, t, c)`
//!   ([`Layout::Sequence`]). Layers never guess it.
//! - **Routing.** A [`Routing`] holds one mask per adapter at full resolution; each layer asks for
//!   its gate, which is the mask area-averaged to the layer's grid (soft masks stay soft), cached
//!   per (adapter, grid), and optionally normalised across adapters (`M_c / (Σ_u M_u + ε)`).

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the layers of the current block see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// Not declared: a routed adapter here is an error.
    #[default]
    Unknown,
    /// Image feature maps (b, c, h, w); the grid is read off the layer's output.
    Image,
    /// Tokens of an h×w grid, (b, h·w, c).
    Tokens {
        /// Grid height.
        h: usize,
        /// Grid width.
        w: usize,
    },
    /// Frames of an f×h×w video folded as (b·h·w, f, c).
    Temporal {
        /// Frames.
        f: usize,
        /// Grid height.
        h: usize,
        /// Grid width.
        w: usize,
    },
    /// A token sequence (b, t, c) with a per-token mask (b, t).
    Sequence,
    /// Keys and values of cross-attention over a conditioning sequence: not the routed grid, so
    /// a spatial gate cannot apply (routing them is decided per attention output, not here).
    Context,
}

/// Per-forward context: training mode, dropout seeds, graph recording, layout and routing.
#[derive(Debug, Clone)]
pub struct ForwardCtx {
    /// Training mode (dropout active).
    pub train: bool,
    /// The run's seed.
    pub seed: u64,
    /// The micro-step (so that a resumed run draws the same masks).
    pub step: u64,
    /// Whether trainable tensors are read attached (a graph is recorded).
    grad: bool,
    /// Dropout draws so far, shared by every context derived from this one.
    calls: Arc<AtomicU64>,
    layout: Layout,
    routing: Option<Arc<Routing>>,
    /// Under [`Layout::Context`]: the one routed adapter that runs (ungated); the others are off.
    pick: Option<Arc<str>>,
    probe: Option<Arc<AttnProbe>>,
}

/// Records, in every cross-attention layer a forward passes, the attention that the query grid
/// pays to chosen context tokens (attention-derived masks, as LoRAShop and FreeFuse take them).
#[derive(Debug)]
pub struct AttnProbe {
    /// Context token positions whose attention is summed.
    pub tokens: Vec<usize>,
    /// Batch rows kept (e.g. the conditional half of a guided batch).
    pub rows: std::ops::Range<usize>,
    maps: Mutex<Vec<Tensor>>,
}

impl AttnProbe {
    /// A probe of `tokens` over batch rows `rows`.
    pub fn new(tokens: Vec<usize>, rows: std::ops::Range<usize>) -> Self {
        Self {
            tokens,
            rows,
            maps: Mutex::new(vec![]),
        }
    }
    /// Adds one layer's map (b, h, w): the attention probability of the tokens, summed over them
    /// and averaged over heads.
    pub fn record(&self, map: Tensor) -> Result<()> {
        self.maps
            .lock()
            .map_err(|_| Error::Msg("attention probe: poisoned lock".into()))?
            .push(map);
        Ok(())
    }
    /// The maps recorded so far, in order.
    pub fn maps(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .maps
            .lock()
            .map_err(|_| Error::Msg("attention probe: poisoned lock".into()))?
            .clone())
    }
}

impl Default for ForwardCtx {
    fn default() -> Self {
        Self::eval()
    }
}

impl ForwardCtx {
    /// Inference: no dropout, no graph (trainable tensors are read detached).
    pub fn eval() -> Self {
        Self {
            train: false,
            seed: 0,
            step: 0,
            grad: false,
            calls: Arc::new(AtomicU64::new(0)),
            layout: Layout::Unknown,
            routing: None,
            pick: None,
            probe: None,
        }
    }
    /// No dropout, but a graph is recorded (gradient checks, losses evaluated for a backward).
    pub fn eval_with_grad() -> Self {
        Self {
            grad: true,
            ..Self::eval()
        }
    }
    /// Training at micro-step `step` of a run seeded with `seed`.
    pub fn train(seed: u64, step: u64) -> Self {
        Self {
            train: true,
            seed,
            step,
            grad: true,
            ..Self::eval()
        }
    }
    /// Whether a graph is recorded.
    pub fn grad(&self) -> bool {
        self.grad
    }
    /// A trainable tensor as this forward may use it: attached when recording a graph, detached
    /// otherwise (inference records nothing and keeps nothing alive).
    pub fn read(&self, v: &Var) -> Tensor {
        if self.grad {
            v.as_tensor().clone()
        } else {
            v.as_tensor().detach()
        }
    }
    /// The same context for layers that see `layout` (shares the dropout counter and routing).
    pub fn at(&self, layout: Layout) -> Self {
        Self {
            layout,
            ..self.clone()
        }
    }
    /// The same context with adapters routed by `routing`.
    pub fn routed(&self, routing: Arc<Routing>) -> Self {
        Self {
            routing: Some(routing),
            ..self.clone()
        }
    }
    /// For cross-attention keys and values ([`Layout::Context`]): run routed adapter `name` only
    /// (ungated), or with `None` no routed adapter (unrouted ones always run). The attention output
    /// then mixes the branches by the query grid's gates: `o = o₀ + Σ_a G_a ⊙ (o_a − o₀)`.
    pub fn picking(&self, name: Option<&str>) -> Self {
        Self {
            pick: name.map(Arc::from),
            ..self.clone()
        }
    }
    /// The same context with cross-attention maps recorded into `probe`.
    pub fn probed(&self, probe: Arc<AttnProbe>) -> Self {
        Self {
            probe: Some(probe),
            ..self.clone()
        }
    }
    /// The attention probe, if any.
    pub fn probe(&self) -> Option<&AttnProbe> {
        self.probe.as_deref()
    }
    /// The names of the routed adapters.
    pub fn routed_names(&self) -> Vec<String> {
        self.routing
            .as_ref()
            .map(|r| r.names().map(str::to_string).collect())
            .unwrap_or_default()
    }
    /// The declared layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// The routing, if any.
    pub fn routing(&self) -> Option<&Routing> {
        self.routing.as_deref()
    }
    /// Whether adapter `name` is routed in this forward.
    pub fn is_routed(&self, name: &str) -> bool {
        self.routing
            .as_ref()
            .is_some_and(|r| r.masks.contains_key(name))
    }

    fn rng(&self, path: &str) -> rand_chacha::ChaCha8Rng {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        crate::rng::rng_for(
            self.seed ^ self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ call,
            path,
        )
    }
    /// Module dropout (LoHa / LoKr): whether the adapter at `path` runs in this forward.
    pub(crate) fn keep_module(&self, path: &str, p: f64) -> bool {
        self.rng(path).random::<f64>() >= p
    }
    /// An inverted-dropout mask (0 or 1/(1−p)) of `shape`.
    pub(crate) fn dropout_mask(
        &self,
        path: &str,
        shape: &[usize],
        p: f64,
        device: &Device,
    ) -> Result<Tensor> {
        let mut rng = self.rng(path);
        let keep = 1.0 / (1.0 - p);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if rng.random::<f64>() < p {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// The gate of adapter `name` for a layer at `path` whose output is `y` (None: not routed):
    /// its mask resized to the layer's grid, broadcastable against `y`.
    pub(crate) fn gate(&self, path: &str, name: &str, y: &Tensor) -> Result<Option<Tensor>> {
        match &self.routing {
            Some(r) if r.masks.contains_key(name) && self.layout == Layout::Context => {
                let on = self.pick.as_deref() == Some(name);
                let shape = vec![1usize; y.rank()];
                Ok(Some(
                    Tensor::full(on as u8 as f32, shape, y.device())?.to_dtype(y.dtype())?,
                ))
            }
            Some(r) if r.masks.contains_key(name) => r.gate(path, name, self.layout, y).map(Some),
            _ => Ok(None),
        }
    }
}

/// How overlapping masks of several adapters combine.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Blend {
    /// Each adapter's contribution is weighted by its own mask.
    #[default]
    Additive,
    /// Weights are normalised per pixel over the routed adapters, `M_c / (Σ_u M_u + ε)` (LoRAShop).
    Normalized {
        /// ε.
        eps: f64,
    },
}

/// How a mask becomes the gate of a coarser layer grid.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum GateResize {
    /// The mean over each cell's footprint (soft masks stay soft; a cell on the mask's edge gets
    /// the share it covers).
    #[default]
    Area,
    /// The area mean cut at a level: 1 where it reaches `t`, else 0 (`t` = 0.5 is the nearest
    /// cell; near 1 gates only cells wholly inside the mask, near 0 every cell it touches).
    Threshold(f32),
}

impl GateResize {
    /// Parses `area` or `threshold:T` with T in (0, 1].
    pub fn parse(s: &str) -> Result<Self> {
        if s == "area" {
            return Ok(Self::Area);
        }
        if let Some(t) = s.strip_prefix("threshold:") {
            if let Ok(v) = t.parse::<f32>() {
                if v > 0.0 && v <= 1.0 {
                    return Ok(Self::Threshold(v));
                }
            }
        }
        Err(Error::Config(format!(
            "gate resize `{s}` is not `area` or `threshold:T` with T in (0, 1]"
        )))
    }
}

/// Per-adapter routing masks at full resolution, with the gates resized per layer grid.
#[derive(Debug, Default)]
pub struct Routing {
    /// Adapter name → mask in [0, 1]: (b, H, W), (b, f, H, W) or, for text, (b, t).
    masks: BTreeMap<String, Tensor>,
    blend: Blend,
    resize: GateResize,
    cache: Mutex<HashMap<(String, Vec<usize>, Vec<usize>), Tensor>>,
}

impl Routing {
    /// No masks yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Routes adapter `name` by `mask` ((b, H, W), (b, f, H, W) or (b, t), values in [0, 1]).
    pub fn with_mask(mut self, name: &str, mask: &Tensor) -> Result<Self> {
        if !(2..=4).contains(&mask.rank()) {
            return Err(Error::Config(format!(
                "routing mask for adapter `{name}` has shape {:?}; expected (b, H, W), (b, f, H, W) or (b, t)",
                mask.dims()
            )));
        }
        let m = mask.to_dtype(DType::F32)?;
        let (lo, hi) = (
            m.min_all()?.to_scalar::<f32>()?,
            m.max_all()?.to_scalar::<f32>()?,
        );
        if !(lo >= 0.0 && hi <= 1.0) {
            return Err(Error::Config(format!(
                "routing mask for adapter `{name}` spans {lo}..{hi}; values must be finite and in [0, 1]"
            )));
        }
        self.masks.insert(name.to_string(), m);
        self.cache = Mutex::default();
        Ok(self)
    }
    /// Sets how overlapping masks combine.
    pub fn with_blend(mut self, blend: Blend) -> Self {
        self.blend = blend;
        self.cache = Mutex::default();
        self
    }
    /// Sets how masks are resized to coarser grids.
    pub fn with_resize(mut self, resize: GateResize) -> Self {
        self.resize = resize;
        self.cache = Mutex::default();
        self
    }
    /// The routed adapter names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.masks.keys().map(|s| s.as_str())
    }
    /// The mask of adapter `name` at full resolution.
    pub fn mask(&self, name: &str) -> Option<&Tensor> {
        self.masks.get(name)
    }
    /// The union of all masks (elementwise maximum), e.g. for a masked loss.
    pub fn union(&self) -> Result<Option<Tensor>> {
        let mut out: Option<Tensor> = None;
        for m in self.masks.values() {
            out = Some(match out {
                None => m.clone(),
                Some(u) => u.maximum(m)?,
            });
        }
        Ok(out)
    }

    /// The mask of `name` resized to the grid of `y` under `layout`, shaped to broadcast against `y`.
    fn gate(&self, path: &str, name: &str, layout: Layout, y: &Tensor) -> Result<Tensor> {
        let err = |msg: String| Error::layer(path, format!("routing adapter `{name}`: {msg}"));
        // (grid dims for the mask, final view shape, whether frames are permuted)
        let (grid, view): (Vec<usize>, Vec<usize>) = match (layout, y.dims()) {
            (Layout::Image, &[b, _, h, w]) => (vec![b, h, w], vec![b, 1, h, w]),
            (Layout::Tokens { h, w }, &[b, n, _]) if n == h * w => (vec![b, h, w], vec![b, n, 1]),
            (Layout::Temporal { f, h, w }, &[bhw, ff, _]) if ff == f && bhw % (h * w) == 0 => {
                (vec![bhw / (h * w), f, h, w], vec![bhw, f, 1])
            }
            (Layout::Sequence, &[b, t, _]) => (vec![b, t], vec![b, t, 1]),
            (Layout::Unknown, d) => {
                return Err(err(format!(
                    "the block of this layer declared no layout (output {d:?})"
                )))
            }
            (l, d) => return Err(err(format!("output {d:?} does not fit layout {l:?}"))),
        };
        let key = (name.to_string(), grid.clone(), view.clone());
        if let Some(g) = self
            .cache
            .lock()
            .map_err(|_| err("poisoned cache".into()))?
            .get(&key)
        {
            return Ok(g.clone());
        }
        let mut gates = BTreeMap::new();
        // Additive: this adapter's mask only; normalised: every mask (they share the denominator).
        let names: Vec<&str> = match self.blend {
            Blend::Additive => vec![name],
            Blend::Normalized { .. } => self.names().collect(),
        };
        for n in names {
            let m = self.masks.get(n).ok_or_else(|| err("no mask".into()))?;
            let mut g = resize_to(m, &grid).map_err(|e| err(e.to_string()))?;
            if let GateResize::Threshold(t) = self.resize {
                // Cells at full resolution keep the mask as it is.
                if g.dims()[1..] != m.dims()[1..] {
                    g = g.ge(t as f64 - 1e-6)?.to_dtype(DType::F32)?;
                }
            }
            gates.insert(n.to_string(), g);
        }
        if let Blend::Normalized { eps } = self.blend {
            let mut total: Option<Tensor> = None;
            for g in gates.values() {
                total = Some(match total {
                    None => g.clone(),
                    Some(t) => (t + g)?,
                });
            }
            if let Some(t) = total {
                let t = (t + eps)?;
                for g in gates.values_mut() {
                    *g = g.div(&t)?;
                }
            }
        }
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| err("poisoned cache".into()))?;
        let mut out = None;
        for (n, g) in gates {
            let g = match layout {
                // (b, f, h, w) → (b, h, w, f) → (b·h·w, f, 1)
                Layout::Temporal { .. } => g.permute((0, 2, 3, 1))?.contiguous()?,
                _ => g,
            }
            .reshape(view.as_slice())?
            .to_dtype(y.dtype())?;
            if n == name {
                out = Some(g.clone());
            }
            cache.insert((n, grid.clone(), view.clone()), g);
        }
        out.ok_or_else(|| err("no mask".into()))
    }
}

/// Area-averages `mask` ((b, H, W), (b, f, H, W) or (b, t)) to `grid` ((b, h, w), (b, f, h, w) or
/// (b, t)): each target cell is the mean of the source over the cell's exact footprint, so any
/// size ratio works and soft masks stay soft. A single-sample mask is broadcast over the batch.
pub fn resize_to(mask: &Tensor, grid: &[usize]) -> Result<Tensor> {
    let md = mask.dims();
    let bad = || {
        Error::Config(format!(
            "a routing mask of shape {md:?} cannot be resized to the layer grid {grid:?}"
        ))
    };
    if md.len() != grid.len() || (md[0] != grid[0] && md[0] != 1) {
        return Err(bad());
    }
    let mut m = mask.clone();
    if md[0] != grid[0] {
        let mut shape = md.to_vec();
        shape[0] = grid[0];
        m = m.broadcast_as(shape)?.contiguous()?;
    }
    match grid.len() {
        2 => {
            if md[1] != grid[1] {
                return Err(bad());
            }
            Ok(m)
        }
        3 | 4 => {
            if grid.len() == 4 && md[1] != grid[1] {
                return Err(bad());
            }
            let n = grid.len();
            let (hh, ww) = (md[n - 2], md[n - 1]);
            let (h, w) = (grid[n - 2], grid[n - 1]);
            if (hh, ww) == (h, w) {
                return Ok(m);
            }
            let rows = area_matrix(h, hh, m.device())?; // (h, H)
            let cols = area_matrix(w, ww, m.device())?; // (w, W)
            let lead: usize = grid[..n - 2].iter().product();
            let flat = m.reshape((lead, hh, ww))?;
            // (lead, H, W) · colsᵀ → (lead, H, w); rows · → (lead, h, w)
            let t = flat.broadcast_matmul(&cols.t()?)?;
            let t = rows.broadcast_matmul(&t)?;
            Ok(t.reshape(grid)?)
        }
        _ => Err(bad()),
    }
}

/// The (n, src) matrix whose row i averages the source cells overlapping target cell i.
fn area_matrix(n: usize, src: usize, dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; n * src];
    let step = src as f64 / n as f64;
    for i in 0..n {
        let (a, b) = (i as f64 * step, (i + 1) as f64 * step);
        for j in (a.floor() as usize)..(b.ceil() as usize).min(src) {
            let overlap = (b.min(j as f64 + 1.0) - a.max(j as f64)).max(0.0);
            v[i * src + j] = (overlap / step) as f32;
        }
    }
    Ok(Tensor::from_vec(v, (n, src), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_resize_averages_footprints() {
        let dev = Device::Cpu;
        // 4x4 with the left half on: to 2x2 → left column 1, right 0; to 3x3 the middle column 0.5.
        let m = Tensor::from_vec(
            (0..16).map(|i| if i % 4 < 2 { 1f32 } else { 0. }).collect(),
            (1, 4, 4),
            &dev,
        )
        .unwrap();
        let g = resize_to(&m, &[1, 2, 2]).unwrap();
        assert_eq!(
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1., 0., 1., 0.]
        );
        let g = resize_to(&m, &[2, 3, 3]).unwrap().to_vec3::<f32>().unwrap();
        for row in &g[1] {
            assert!(
                (row[0] - 1.0).abs() < 1e-6 && (row[1] - 0.5).abs() < 1e-6 && row[2].abs() < 1e-6
            );
        }
    }

    #[test]
    fn normalized_blend_sums_to_one_where_covered() {
        let dev = Device::Cpu;
        let a = Tensor::ones((1, 2, 2), DType::F32, &dev).unwrap();
        let b = Tensor::new(&[[[1f32, 0.], [1., 0.]]], &dev).unwrap();
        let r = Routing::new()
            .with_mask("a", &a)
            .unwrap()
            .with_mask("b", &b)
            .unwrap()
            .with_blend(Blend::Normalized { eps: 0.0 });
        let y = Tensor::zeros((1, 3, 2, 2), DType::F32, &dev).unwrap();
        let ctx = ForwardCtx::eval().routed(Arc::new(r)).at(Layout::Image);
        let ga = ctx.gate("l", "a", &y).unwrap().unwrap();
        let gb = ctx.gate("l", "b", &y).unwrap().unwrap();
        let s = (ga + gb)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-6));
        assert!(ForwardCtx::eval()
            .routed(Arc::new(Routing::new().with_mask("a", &a).unwrap()))
            .gate("l", "a", &y)
            .is_err());
    }
}
