//! Block-wise control of a U-Net LoRA, as kohya's `networks/lora.py` spells it, and LyCORIS's
//! module presets.
//!
//! kohya numbers the U-Net in 25 blocks: `IN00`–`IN11` (0–11), `MID` (12), `OUT00`–`OUT11` (13–24).
//! A module's block comes from its diffusers path: in `(down|up)_blocks.i.(resnets|attentions).j`
//! the block is `3i + j`, in `(down|up)_blocks.i.(down|up)samplers.0` it is `3i + 2`; down blocks
//! add 1, up blocks add 13; anything in `mid_block` is 12 (kohya's formula, kept as is for every
//! U-Net so a setting means what it means in kohya).
//!
//! - `block_dims` / `block_alphas`: 25 ranks / alphas of the linear (and 1×1 conv) adapters per block;
//!   `conv_block_dims` / `conv_block_alphas`: the same for 3×3 convs (LoCon). Rank 0 leaves the
//!   block's modules alone.
//! - `down_lr_weight` / `up_lr_weight`: 12 learning-rate multipliers (IN00–IN11 / OUT00–OUT11), or a
//!   preset `cosine`, `sine`, `linear`, `reverse_linear`, `zeros`, optionally `+x` (added to every
//!   entry); `mid_lr_weight`: one multiplier. A block whose multiplier is at most
//!   `block_lr_zero_threshold` gets no adapter.

use crate::{Error, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// The U-Net modules kohya's LoRA adapts (the linears of every Transformer2DModel).
pub const UNET_TARGETS: [&str; 8] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
];
/// The U-Net convolutions LoCon adds with `conv_dim` (resnets, down- and upsamplers).
pub const UNET_CONV_PATTERN: &str =
    r"(resnets\.\d+\.(conv1|conv2|conv_shortcut)|downsamplers\.0\.conv|upsamplers\.0\.conv)";
/// The text-encoder modules kohya's LoRA adapts (CLIPAttention and CLIPMLP linears).
pub const TEXT_TARGETS: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

/// kohya's `NUM_OF_BLOCKS`: input (and output) blocks of a full SD U-Net.
pub const NUM_BLOCKS: usize = 12;
/// Entries of a `block_dims`-style list (IN00–IN11, MID, OUT00–OUT11).
pub const TOTAL_BLOCKS: usize = 2 * NUM_BLOCKS + 1;

/// kohya's block index of a U-Net module path (diffusers names), `None` outside the blocks
/// (`conv_in`, `time_embedding`, `conv_out`).
pub fn block_index(path: &str) -> Option<usize> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(
            r"(up|down)_blocks\.(\d+)\.(resnets|upsamplers|downsamplers|attentions)\.(\d+)\.",
        )
        .expect("static regex")
    });
    if let Some(c) = re.captures(path) {
        let i: usize = c[2].parse().ok()?;
        let j: usize = c[4].parse().ok()?;
        let idx = match &c[3] {
            "resnets" | "attentions" => 3 * i + j,
            _ => 3 * i + 2,
        };
        return Some(if &c[1] == "down" {
            1 + idx
        } else {
            NUM_BLOCKS + 1 + idx
        });
    }
    path.contains("mid_block.").then_some(NUM_BLOCKS)
}

/// kohya's block name of an index (`IN04`, `MID`, `OUT11`).
pub fn block_name(b: usize) -> String {
    match b {
        b if b < NUM_BLOCKS => format!("IN{b:02}"),
        NUM_BLOCKS => "MID".into(),
        b => format!("OUT{:02}", b - NUM_BLOCKS - 1),
    }
}

/// A list of numbers written as kohya writes it (`"2,4,4"`) or as a TOML array.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NumList {
    /// Comma-separated.
    Text(String),
    /// An array.
    List(Vec<f64>),
}

impl NumList {
    /// The numbers, exactly `n` of them, each finite; errors name `key`.
    pub fn values(&self, key: &str, n: usize) -> Result<Vec<f64>> {
        let v: Vec<f64> = match self {
            NumList::List(v) => v.clone(),
            NumList::Text(s) => s
                .split(',')
                .map(|x| {
                    x.trim().parse::<f64>().map_err(|_| {
                        Error::Config(format!("{key}: `{}` is not a number in `{s}`", x.trim()))
                    })
                })
                .collect::<Result<_>>()?,
        };
        if v.len() != n {
            return Err(Error::Config(format!(
                "{key} needs {n} values (IN00..IN11, MID, OUT00..OUT11 for 25; 12 for a lr weight list), got {}",
                v.len()
            )));
        }
        if let Some(x) = v.iter().find(|x| !x.is_finite() || **x < 0.0) {
            return Err(Error::Config(format!(
                "{key}: {x} is not a finite number >= 0"
            )));
        }
        Ok(v)
    }

    /// Ranks: whole numbers.
    pub fn ranks(&self, key: &str) -> Result<Vec<usize>> {
        self.values(key, TOTAL_BLOCKS)?
            .into_iter()
            .map(|x| {
                if x.fract() == 0.0 {
                    Ok(x as usize)
                } else {
                    Err(Error::Config(format!(
                        "{key}: rank {x} is not a whole number"
                    )))
                }
            })
            .collect()
    }
}

/// A `down_lr_weight` / `up_lr_weight` value: 12 numbers or a kohya preset name with an optional
/// `+x`.
pub fn lr_weights(spec: &NumList, key: &str) -> Result<Vec<f64>> {
    let NumList::Text(s) = spec else {
        return spec.values(key, NUM_BLOCKS);
    };
    let (name, base) = match s.split_once('+') {
        Some((n, b)) => (
            n.trim(),
            b.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| Error::Config(format!("{key}: bad offset in `{s}`")))?,
        ),
        None => (s.trim(), 0.0),
    };
    let n = NUM_BLOCKS;
    let at = |i: usize| i as f64 / (n - 1) as f64;
    let half_sine = |i: usize| (std::f64::consts::PI * at(i) / 2.0).sin();
    let v: Vec<f64> = match name {
        "cosine" => (0..n).rev().map(half_sine).collect(),
        "sine" => (0..n).map(half_sine).collect(),
        "linear" => (0..n).map(at).collect(),
        "reverse_linear" => (0..n).rev().map(at).collect(),
        "zeros" => vec![0.0; n],
        _ if name.contains(',') || name.parse::<f64>().is_ok() => {
            return spec.values(key, NUM_BLOCKS)
        }
        other => {
            return Err(Error::Config(format!(
                "{key}: `{other}` is neither 12 numbers nor a preset (cosine, sine, linear, reverse_linear, zeros, with an optional +x)"
            )))
        }
    };
    Ok(v.into_iter().map(|x| x + base).collect())
}

/// The per-block settings in force for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocks {
    /// Rank and alpha of the linear / 1×1-conv adapters per block.
    pub dims: Vec<(usize, f64)>,
    /// Rank and alpha of the 3×3-conv adapters per block (`None`: no conv adapters).
    pub conv: Option<Vec<(usize, f64)>>,
    /// Learning-rate multiplier per block.
    pub lr: Vec<f64>,
}

impl Blocks {
    /// The learning-rate multiplier of the module at `path` (1 outside the blocks).
    pub fn lr_weight(&self, path: &str) -> f64 {
        block_index(path).map_or(1.0, |b| self.lr[b])
    }
}

/// The modules a LyCORIS preset adapts in a U-Net and a text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// Linear layers of the transformer blocks, by name.
    pub linear: Vec<&'static str>,
    /// Convolutions of the resnets and samplers (3×3, and the 1×1 `conv_shortcut`).
    pub conv: bool,
    /// Modules outside the blocks (`conv_in`, `conv_out`, `time_embedding.linear_1/2`).
    pub outer: bool,
    /// Text-encoder modules (empty: the text encoder is left alone).
    pub text: Vec<&'static str>,
}

const ATTN: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
const TEXT_ATTN: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

impl Preset {
    /// LyCORIS's preset `name`: full, full-lin, attn-mlp, attn-only, unet-transformer-only,
    /// unet-convblock-only.
    pub fn named(name: &str) -> Result<Self> {
        let lin = UNET_TARGETS.to_vec();
        let text = TEXT_TARGETS.to_vec();
        Ok(match name {
            "full" => Self { linear: lin, conv: true, outer: true, text },
            "full-lin" => Self { linear: lin, conv: false, outer: true, text },
            "attn-mlp" => Self { linear: lin, conv: false, outer: false, text },
            "attn-only" => Self {
                linear: ATTN.to_vec(),
                conv: false,
                outer: false,
                text: TEXT_ATTN.to_vec(),
            },
            "unet-transformer-only" => Self { linear: lin, conv: false, outer: false, text: vec![] },
            "unet-convblock-only" => Self { linear: vec![], conv: true, outer: false, text: vec![] },
            other => {
                return Err(Error::Config(format!(
                    "preset `{other}` is not one of full, full-lin, attn-mlp, attn-only, unet-transformer-only, unet-convblock-only"
                )))
            }
        })
    }
}

/// The path prefixes (regex) of the modules in block `b`.
fn block_prefixes(b: usize) -> Vec<String> {
    let (side, idx) = match b {
        0 => return vec![],
        b if b < NUM_BLOCKS => ("down", b - 1),
        NUM_BLOCKS => return vec![r"mid_block".into()],
        b => ("up", b - NUM_BLOCKS - 1),
    };
    let mut v = vec![];
    for i in 0..=idx / 3 {
        let j = idx - 3 * i;
        if j <= 2 {
            v.push(format!(r"{side}_blocks\.{i}\.(?:resnets|attentions)\.{j}"));
        }
        if j == 2 {
            v.push(format!(r"{side}_blocks\.{i}\.{side}samplers\.0"));
        }
    }
    v
}

fn alt(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| regex::escape(n))
        .collect::<Vec<_>>()
        .join("|")
}

/// The target regex and the rank / alpha patterns of a U-Net LoRA with per-block settings: each
/// block's linear and conv modules get that block's rank (blocks of rank 0 are not targeted).
pub struct Targets {
    /// Full-match regex over module paths.
    pub target: String,
    /// (pattern, rank, alpha), PEFT's `rank_pattern` / `alpha_pattern` keys.
    pub patterns: Vec<(String, usize, f64)>,
}

/// Builds [`Targets`] for `preset` with `blocks` (outer modules get `outer_dims`).
pub fn targets(preset: &Preset, blocks: &Blocks, outer_dims: (usize, f64)) -> Result<Targets> {
    let mut groups = vec![];
    let mut patterns = vec![];
    let lin = alt(&preset.linear);
    for b in 0..TOTAL_BLOCKS {
        for p in block_prefixes(b) {
            let (r, a) = blocks.dims[b];
            if r > 0 && !preset.linear.is_empty() {
                let g = format!(r"{p}\.(?:.*\.)?(?:{lin})");
                patterns.push((g.clone(), r, a));
                groups.push(g);
            }
            if preset.conv && r > 0 {
                let g = format!(r"{p}\.conv_shortcut");
                patterns.push((g.clone(), r, a));
                groups.push(g);
            }
            if let (true, Some(conv)) = (preset.conv, &blocks.conv) {
                let (r, a) = conv[b];
                if r > 0 {
                    let g = format!(r"{p}\.(?:conv1|conv2|conv)");
                    patterns.push((g.clone(), r, a));
                    groups.push(g);
                }
            }
        }
    }
    if preset.outer && outer_dims.0 > 0 {
        let g =
            r"(?:conv_in|conv_out|time_embedding\.linear_1|time_embedding\.linear_2)".to_string();
        let g = if preset.conv {
            g
        } else {
            r"(?:time_embedding\.linear_1|time_embedding\.linear_2)".to_string()
        };
        patterns.push((g.clone(), outer_dims.0, outer_dims.1));
        groups.push(g);
    }
    if groups.is_empty() {
        return Err(Error::Config(
            "the block settings leave no U-Net module to adapt (every rank or lr weight is 0)"
                .into(),
        ));
    }
    Ok(Targets {
        target: format!("(?:{})", groups.join("|")),
        patterns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_block_indices() {
        for (path, b) in [
            ("down_blocks.0.resnets.0.conv1", Some(1)),
            (
                "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
                Some(2),
            ),
            ("down_blocks.0.downsamplers.0.conv", Some(3)),
            ("down_blocks.3.resnets.1.conv2", Some(11)),
            ("mid_block.attentions.0.proj_in", Some(12)),
            ("up_blocks.0.resnets.2.conv1", Some(15)),
            ("up_blocks.0.upsamplers.0.conv", Some(15)),
            ("up_blocks.3.attentions.2.proj_out", Some(24)),
            ("conv_in", None),
            ("time_embedding.linear_1", None),
        ] {
            assert_eq!(block_index(path), b, "{path}");
            if let Some(b) = b {
                // The prefixes of the block find the path again.
                assert!(
                    block_prefixes(b)
                        .iter()
                        .any(|p| Regex::new(&format!("^{p}\\.")).unwrap().is_match(path)),
                    "{path}: {:?}",
                    block_prefixes(b)
                );
            }
        }
        assert_eq!(block_name(4), "IN04");
        assert_eq!(block_name(12), "MID");
        assert_eq!(block_name(24), "OUT11");
    }

    #[test]
    fn lr_weight_presets_are_kohyas() {
        let w = lr_weights(&NumList::Text("sine".into()), "up_lr_weight").unwrap();
        assert_eq!(w.len(), 12);
        assert!(w[0].abs() < 1e-12 && (w[11] - 1.0).abs() < 1e-12);
        let c = lr_weights(&NumList::Text("cosine+0.5".into()), "x").unwrap();
        assert!((c[0] - 1.5).abs() < 1e-12 && (c[11] - 0.5).abs() < 1e-12);
        let l = lr_weights(&NumList::Text("linear".into()), "x").unwrap();
        assert!((l[1] - 1.0 / 11.0).abs() < 1e-12);
        assert_eq!(
            lr_weights(&NumList::Text("zeros".into()), "x").unwrap(),
            vec![0.0; 12]
        );
        let list = "0,0,0,0,0,0,1,1,1,1,1,1";
        assert_eq!(
            lr_weights(&NumList::Text(list.into()), "x").unwrap()[6],
            1.0
        );
        for bad in ["cosin", "1,2", "sine+x"] {
            let e = lr_weights(&NumList::Text(bad.into()), "down_lr_weight").unwrap_err();
            assert!(e.to_string().contains("down_lr_weight"), "{e}");
        }
        let e = NumList::Text("4,4".into()).ranks("block_dims").unwrap_err();
        assert!(e.to_string().contains("25"), "{e}");
        let e = NumList::List(vec![1.5; 25])
            .ranks("block_dims")
            .unwrap_err();
        assert!(e.to_string().contains("whole"), "{e}");
    }
}
