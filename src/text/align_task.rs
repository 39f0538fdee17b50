//! Preference training of a causal LM with adapters: DPO (all loss types), IPO, SimPO/CPO, ORPO and
//! KTO over the same model. The reference policy is the same model with its adapters switched off
//! (or with a frozen reference adapter active): no second copy in memory. Reference log-probs can be
//! computed once and cached on disk under a hash of the data, the model and the settings.

use crate::align::cpo::CpoConfig;
use crate::align::dpo::{DpoConfig, PairLogps};
use crate::align::kto::{KtoConfig, KtoLogps};
use crate::align::logps::{sequence_logps, SeqLogps};
use crate::align::orpo::OrpoConfig;
use crate::data::pref::Seq;
use crate::models::llama::{Inputs, LlamaForCausalLM};
use crate::peft::formats::peft::{save, SaveOptions};
use crate::peft::{Adapted, AdapterConfig, ForwardCtx};
use crate::rng::rng_for;
use crate::train::Task;
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The training objective.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    /// DPO family (IPO is DPO with `loss_type = ipo`).
    Dpo(DpoConfig),
    /// CPO / SimPO (no reference).
    Cpo(CpoConfig),
    /// ORPO (no reference).
    Orpo(OrpoConfig),
    /// KTO (unpaired).
    Kto(KtoConfig),
}

impl Objective {
    /// Whether the loss needs reference log-probs.
    pub fn needs_reference(&self) -> bool {
        matches!(self, Self::Dpo(_) | Self::Kto(_))
    }
    /// The method's name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Dpo(_) => "dpo",
            Self::Cpo(_) => "cpo",
            Self::Orpo(_) => "orpo",
            Self::Kto(_) => "kto",
        }
    }
}

/// Training examples: pairs (chosen, rejected) or unpaired (sequence, desirable, KL partner).
#[derive(Debug, Clone)]
pub enum AlignData {
    /// DPO / CPO / ORPO.
    Pairs(Vec<(Seq, Seq)>),
    /// KTO: each example with the mismatched sequence (its prompt with another example's
    /// completion) used for the KL estimate.
    Unpaired(Vec<(Seq, bool, Seq)>),
}

impl AlignData {
    fn len(&self) -> usize {
        match self {
            Self::Pairs(p) => p.len(),
            Self::Unpaired(u) => u.len(),
        }
    }
}

/// Builds KTO examples: example i's KL partner pairs its prompt with the completion of example
/// (i + 1) mod n (TRL rotates completions the same way).
pub fn kto_examples(
    seqs: Vec<(Seq, bool)>,
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
    max_len: usize,
) -> Vec<(Seq, bool, Seq)> {
    let n = seqs.len();
    seqs.into_iter()
        .enumerate()
        .map(|(i, (s, l))| {
            let j = (i + 1) % n.max(1);
            let mut ids = prompts[i].clone();
            let mut completion = vec![0u8; ids.len()];
            let c = &completions[j];
            ids.extend_from_slice(c);
            completion.extend(std::iter::repeat_n(1u8, c.len()));
            ids.truncate(max_len);
            completion.truncate(max_len);
            (s, l, Seq { ids, completion })
        })
        .collect()
}

/// The alignment task.
pub struct AlignTask {
    /// The model: trainable adapter `default` (plus, when stacking, frozen ones).
    pub model: LlamaForCausalLM,
    /// The trainable adapter's configuration.
    pub adapter: AdapterConfig,
    objective: Objective,
    data: AlignData,
    batch_size: usize,
    pad_id: u32,
    seed: u64,
    /// Adapters active in the policy.
    policy_active: Vec<String>,
    /// Adapters active in the reference (`None`: all off).
    ref_active: Option<Vec<String>>,
    /// Cached reference log-probs per example: [chosen, rejected] or [seq, kl].
    ref_cache: Option<Vec<[f32; 2]>>,
    epoch: Option<(u64, Vec<usize>)>,
    acc: BTreeMap<String, (f64, usize)>,
}

/// Pads prompt + completion sequences on the right: (ids, completion mask as f32, attention mask).
pub(crate) fn collate(seqs: &[&Seq], pad: u32) -> Result<(Tensor, Tensor, Tensor)> {
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    if seqs.is_empty() || t < 2 {
        return Err(Error::Msg("an empty preference batch".into()));
    }
    let b = seqs.len();
    let (mut ids, mut cm, mut am) = (vec![pad; b * t], vec![0f32; b * t], vec![0u32; b * t]);
    for (i, s) in seqs.iter().enumerate() {
        for k in 0..s.ids.len() {
            ids[i * t + k] = s.ids[k];
            cm[i * t + k] = s.completion[k] as f32;
            am[i * t + k] = 1;
        }
    }
    let d = &crate::util::device::current();
    Ok((
        Tensor::from_vec(ids, (b, t), d)?,
        Tensor::from_vec(cm, (b, t), d)?,
        Tensor::from_vec(am, (b, t), d)?,
    ))
}

impl AlignTask {
    /// A task; the model must carry the trainable adapter `default`.
    pub fn new(
        model: LlamaForCausalLM,
        adapter: AdapterConfig,
        objective: Objective,
        data: AlignData,
        batch_size: usize,
        pad_id: u32,
        seed: u64,
    ) -> Result<Self> {
        if data.len() == 0 {
            return Err(Error::Msg("the preference data set is empty".into()));
        }
        match (&objective, &data) {
            (Objective::Kto(_), AlignData::Unpaired(_)) => {}
            (Objective::Kto(_), _) => return Err(Error::Config("KTO needs unpaired data".into())),
            (_, AlignData::Unpaired(_)) => {
                return Err(Error::Config(format!(
                    "{} needs paired data",
                    objective.name()
                )))
            }
            _ => {}
        }
        if batch_size == 0 {
            return Err(Error::Config("batch size must be positive".into()));
        }
        Ok(Self {
            model,
            adapter,
            objective,
            data,
            batch_size,
            pad_id,
            seed,
            policy_active: vec!["default".into()],
            ref_active: None,
            ref_cache: None,
            epoch: None,
            acc: BTreeMap::new(),
        })
    }

    /// Which adapters are active in the policy and in the reference (`None`: adapters off).
    pub fn with_adapters(mut self, policy: Vec<String>, reference: Option<Vec<String>>) -> Self {
        self.policy_active = policy;
        self.ref_active = reference;
        self
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.data.len().div_ceil(self.batch_size)
    }

    fn set_policy(&mut self) -> Result<()> {
        self.model.set_adapters_enabled(true)?;
        let names: Vec<&str> = self.policy_active.iter().map(|s| s.as_str()).collect();
        self.model.set_active_adapters(&names)
    }

    fn set_reference(&mut self) -> Result<()> {
        match self.ref_active.clone() {
            None => self.model.set_adapters_enabled(false),
            Some(r) => {
                self.model.set_adapters_enabled(true)?;
                let names: Vec<&str> = r.iter().map(|s| s.as_str()).collect();
                self.model.set_active_adapters(&names)
            }
        }
    }

    fn logps(&self, seqs: &[&Seq], ctx: &ForwardCtx) -> Result<SeqLogps> {
        let (ids, cm, am) = collate(seqs, self.pad_id)?;
        let logits = self.model.forward(
            &ids,
            &Inputs {
                attention_mask: Some(&am),
                ..Default::default()
            },
            ctx,
        )?;
        sequence_logps(&logits, &ids, &cm)
    }

    /// Reference log-probs of the rows `idx` ([chosen, rejected] or [seq, kl] sums).
    fn reference(&mut self, idx: &[usize]) -> Result<Vec<[f32; 2]>> {
        if let Some(c) = &self.ref_cache {
            return Ok(idx.iter().map(|&i| c[i]).collect());
        }
        self.set_reference()?;
        let ctx = ForwardCtx::eval();
        let (a, b): (Vec<&Seq>, Vec<&Seq>) = match &self.data {
            AlignData::Pairs(p) => idx.iter().map(|&i| (&p[i].0, &p[i].1)).unzip(),
            AlignData::Unpaired(u) => idx.iter().map(|&i| (&u[i].0, &u[i].2)).unzip(),
        };
        let la = self.logps(&a, &ctx)?.sum.detach().to_vec1::<f32>()?;
        let lb = self.logps(&b, &ctx)?.sum.detach().to_vec1::<f32>()?;
        self.set_policy()?;
        Ok(la.into_iter().zip(lb).map(|(x, y)| [x, y]).collect())
    }

    /// Computes every reference log-prob once (in batches), reading or writing `cache` (a JSON
    /// file) when given.
    pub fn precompute_reference(&mut self, cache: Option<&Path>) -> Result<()> {
        if let Some(p) = cache {
            if let Ok(t) = std::fs::read_to_string(p) {
                match read_reference_cache(&t, self.data.len()) {
                    Some(v) => {
                        self.ref_cache = Some(v);
                        return Ok(());
                    }
                    None => eprintln!(
                        "warning: {}: the reference log-prob cache does not match its checksum \
                         or the data; it is rebuilt",
                        p.display()
                    ),
                }
            }
        }
        let n = self.data.len();
        let mut all = Vec::with_capacity(n);
        for start in (0..n).step_by(self.batch_size) {
            let idx: Vec<usize> = (start..(start + self.batch_size).min(n)).collect();
            all.extend(self.reference(&idx)?);
        }
        if let Some(p) = cache {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            }
            let json = serde_json::json!({"sha256": cache_checksum(&all), "logps": all});
            crate::util::write_atomic(p, json.to_string().as_bytes())?;
        }
        self.ref_cache = Some(all);
        Ok(())
    }

    fn record(&mut self, m: BTreeMap<String, f64>) {
        for (k, v) in m {
            let e = self.acc.entry(k).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }

    fn batch_indices(&mut self, cursor: u64) -> Vec<usize> {
        let bpe = self.batches_per_epoch() as u64;
        let (epoch, i) = (cursor / bpe, (cursor % bpe) as usize);
        if self.epoch.as_ref().map(|e| e.0) != Some(epoch) {
            let mut order: Vec<usize> = (0..self.data.len()).collect();
            order.shuffle(&mut rng_for(self.seed, &format!("align-epoch-{epoch}")));
            self.epoch = Some((epoch, order));
        }
        match &self.epoch {
            Some((_, o)) => o
                .iter()
                .skip(i * self.batch_size)
                .take(self.batch_size)
                .copied()
                .collect(),
            None => vec![],
        }
    }

    /// The loss of the examples `idx` and TRL's metrics.
    pub fn loss_of(
        &mut self,
        idx: &[usize],
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, BTreeMap<String, f64>)> {
        let refs = if self.objective.needs_reference() {
            Some(self.reference(idx)?)
        } else {
            None
        };
        self.set_policy()?;
        let dev = crate::util::device::current();
        match (&self.objective, &self.data) {
            (Objective::Kto(cfg), AlignData::Unpaired(u)) => {
                let seqs: Vec<&Seq> = idx.iter().map(|&i| &u[i].0).collect();
                let kls: Vec<&Seq> = idx.iter().map(|&i| &u[i].2).collect();
                let lp = self.logps(&seqs, ctx)?;
                // TRL computes the policy's KL log-probs without gradient.
                let kl = self.logps(&kls, &ForwardCtx::eval())?.sum.detach();
                let refs = refs.unwrap_or_default();
                let pick = |want: bool| -> Result<Tensor> {
                    let v: Vec<u32> = idx
                        .iter()
                        .enumerate()
                        .filter(|(_, &i)| u[i].1 == want)
                        .map(|(k, _)| k as u32)
                        .collect();
                    Ok(Tensor::from_vec(v.clone(), v.len(), &dev)?)
                };
                let (ci, ri) = (pick(true)?, pick(false)?);
                let ref_seq = Tensor::from_vec(
                    refs.iter().map(|r| r[0]).collect::<Vec<_>>(),
                    refs.len(),
                    &dev,
                )?;
                let ref_kl = Tensor::from_vec(
                    refs.iter().map(|r| r[1]).collect::<Vec<_>>(),
                    refs.len(),
                    &dev,
                )?;
                let k = KtoLogps {
                    chosen: lp.sum.index_select(&ci, 0)?,
                    rejected: lp.sum.index_select(&ri, 0)?,
                    ref_chosen: ref_seq.index_select(&ci, 0)?,
                    ref_rejected: ref_seq.index_select(&ri, 0)?,
                    kl,
                    ref_kl,
                };
                let (loss, mut m) = cfg.loss(&k)?;
                let rows = |want: bool| {
                    lp.mean_logit(
                        idx.iter()
                            .enumerate()
                            .filter(move |(_, &i)| u[i].1 == want)
                            .map(|(k, _)| k),
                    )
                };
                m.insert("logits/chosen".into(), rows(true)?);
                m.insert("logits/rejected".into(), rows(false)?);
                Ok((loss, m))
            }
            (obj, AlignData::Pairs(p)) => {
                let b = idx.len();
                let seqs: Vec<&Seq> = idx
                    .iter()
                    .map(|&i| &p[i].0)
                    .chain(idx.iter().map(|&i| &p[i].1))
                    .collect();
                let lp = self.logps(&seqs, ctx)?;
                let (c_sum, r_sum) = (lp.sum.narrow(0, 0, b)?, lp.sum.narrow(0, b, b)?);
                let (c_tok, r_tok) = (lp.tokens.narrow(0, 0, b)?, lp.tokens.narrow(0, b, b)?);
                let chosen_nll =
                    (c_sum.sum_all()? / -(c_tok.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64))?;
                let (loss, mut m) = match obj {
                    Objective::Dpo(cfg) => {
                        let refs = refs.unwrap_or_default();
                        let rc: Vec<f32> = refs.iter().map(|r| r[0]).collect();
                        let rr: Vec<f32> = refs.iter().map(|r| r[1]).collect();
                        cfg.loss(&PairLogps {
                            chosen: c_sum.clone(),
                            rejected: r_sum.clone(),
                            ref_chosen: Tensor::from_vec(rc, b, &dev)?,
                            ref_rejected: Tensor::from_vec(rr, b, &dev)?,
                            chosen_tokens: c_tok.clone(),
                            rejected_tokens: r_tok.clone(),
                            chosen_nll: Some(chosen_nll.clone()),
                        })?
                    }
                    Objective::Cpo(cfg) => {
                        let (c, r) = if cfg.average_log_prob() {
                            (
                                c_sum.div(&c_tok.clamp(1f32, f32::MAX)?)?,
                                r_sum.div(&r_tok.clamp(1f32, f32::MAX)?)?,
                            )
                        } else {
                            (c_sum.clone(), r_sum.clone())
                        };
                        cfg.loss(&c, &r, &chosen_nll)?
                    }
                    Objective::Orpo(cfg) => {
                        let c = c_sum.div(&c_tok.clamp(1f32, f32::MAX)?)?;
                        let r = r_sum.div(&r_tok.clamp(1f32, f32::MAX)?)?;
                        cfg.loss(&c, &r, &chosen_nll)?
                    }
                    Objective::Kto(_) => {
                        return Err(Error::Config("KTO needs unpaired data".into()))
                    }
                };
                m.insert("logits/chosen".into(), lp.mean_logit(0..b)?);
                m.insert("logits/rejected".into(), lp.mean_logit(b..2 * b)?);
                Ok((loss, m))
            }
            _ => Err(Error::Config("objective and data do not fit".into())),
        }
    }

    /// The share of `pairs` whose chosen completion has the higher mean log-prob under the reference
    /// (`reference`: the model the run started from) or the policy.
    pub fn mean_logp_accuracy(&mut self, pairs: &[(Seq, Seq)], reference: bool) -> Result<f64> {
        if reference {
            self.set_reference()?;
        } else {
            self.set_policy()?;
        }
        let acc = self.pair_accuracy(pairs, |t, seqs| t.logps(seqs, &ForwardCtx::eval())?.mean());
        self.set_policy()?;
        acc
    }

    /// Held-out preference accuracy: the share of pairs whose chosen completion the policy scores
    /// higher than the rejected one relative to the reference (DPO's implicit reward), or by
    /// length-averaged log-probs for reference-free methods.
    pub fn preference_accuracy(&mut self, pairs: &[(Seq, Seq)], implicit: bool) -> Result<f64> {
        if !implicit {
            return self.mean_logp_accuracy(pairs, false);
        }
        self.pair_accuracy(pairs, |t, seqs| {
            t.set_policy()?;
            let lp = t.logps(seqs, &ForwardCtx::eval())?;
            t.set_reference()?;
            let r = t.logps(seqs, &ForwardCtx::eval())?;
            t.set_policy()?;
            Ok((lp.sum - r.sum)?)
        })
    }

    /// The share of `pairs` whose chosen completion gets the higher `score` (one value per
    /// sequence of [chosen..., rejected...]), in batches.
    fn pair_accuracy(
        &mut self,
        pairs: &[(Seq, Seq)],
        mut score: impl FnMut(&mut Self, &[&Seq]) -> Result<Tensor>,
    ) -> Result<f64> {
        let mut ok = 0usize;
        for chunk in pairs.chunks(self.batch_size.max(1)) {
            let seqs: Vec<&Seq> = chunk
                .iter()
                .map(|p| &p.0)
                .chain(chunk.iter().map(|p| &p.1))
                .collect();
            let v = score(self, &seqs)?.to_vec1::<f32>()?;
            let b = chunk.len();
            ok += (0..b).filter(|&i| v[i] > v[b + i]).count();
        }
        Ok(ok as f64 / pairs.len().max(1) as f64)
    }
}

impl Task for AlignTask {
    fn trainable(&self) -> Vec<(String, Var)> {
        // Only the adapter being trained (`default`); stacked or reference adapters stay frozen.
        self.model
            .trainable()
            .into_iter()
            .filter(|(n, _)| n.contains(".default"))
            .collect()
    }

    fn loss(&mut self, cursor: u64, ctx: &ForwardCtx) -> Result<Tensor> {
        let idx = self.batch_indices(cursor);
        let (loss, m) = self.loss_of(&idx, ctx)?;
        self.record(m);
        Ok(loss)
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        save(
            dir,
            &self.model.layers(),
            "default",
            &self.adapter,
            SaveOptions::default(),
        )
    }

    fn step_metrics(&mut self, _step: usize) -> Result<BTreeMap<String, f64>> {
        Ok(std::mem::take(&mut self.acc)
            .into_iter()
            .map(|(k, (s, n))| (k, s / n.max(1) as f64))
            .collect())
    }
}

/// SHA-256 (hex) of the cached values' bits.
fn cache_checksum(v: &[[f32; 2]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for [a, b] in v {
        h.update(a.to_le_bytes());
        h.update(b.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The cached log-probs if the file's checksum matches its values, every value is finite and
/// there is one pair per example; `None` means "rebuild".
fn read_reference_cache(text: &str, n: usize) -> Option<Vec<[f32; 2]>> {
    #[derive(serde::Deserialize)]
    struct Cache {
        sha256: String,
        logps: Vec<[f32; 2]>,
    }
    let c: Cache = serde_json::from_str(text).ok()?;
    let ok = c.logps.len() == n
        && c.logps.iter().flatten().all(|x| x.is_finite())
        && cache_checksum(&c.logps) == c.sha256;
    ok.then_some(c.logps)
}

/// The reference-cache file for a run: a hash of the data file, the model weights, the reference
/// adapter (if any) and the settings that change the log-probs.
pub fn reference_cache_path(dir: &Path, inputs: &[&Path], settings: &str) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in inputs {
        let mut files: Vec<PathBuf> = if p.is_dir() {
            std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .flatten()
                .map(|e| e.path())
                .filter(|f| {
                    f.extension()
                        .is_some_and(|x| x == "safetensors" || x == "json" || x == "jsonl")
                })
                .collect()
        } else {
            vec![p.to_path_buf()]
        };
        files.sort();
        for f in files {
            let bytes = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
            h.update(
                f.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            h.update(&bytes);
        }
    }
    h.update(settings.as_bytes());
    let digest = h.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    Ok(dir.join(format!("ref-logps-{hex}.json")))
}
