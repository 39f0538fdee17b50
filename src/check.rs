//! The one validation layer for user values: every numeric flag and pipeline key has a documented
//! range, checked where the value is parsed, with an error that names the flag or key, the value
//! and the range.
//!
//! Two entry points share the ranges:
//! - clap value parsers (`#[arg(long, value_parser = check::positive)]`): a bad flag is refused by
//!   clap itself, with the flag's name, before anything runs; a non-finite value never reaches the
//!   config-file overlay (where JSON would turn it into `null`);
//! - [`Ranged::check`] on a deserialised config (pipeline stage, `--config-file`, the merged flags):
//!   `check::f64_in("learning_rate", v, POSITIVE)?` names the key.

use crate::{Error, Result};
use std::fmt;

/// A closed, open or half-open interval of finite numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    /// Lower end (`f64::NEG_INFINITY`: none).
    pub lo: f64,
    /// Whether `lo` itself is allowed.
    pub lo_incl: bool,
    /// Upper end (`f64::INFINITY`: none).
    pub hi: f64,
    /// Whether `hi` itself is allowed.
    pub hi_incl: bool,
}

impl Range {
    /// `[lo, hi]`.
    pub const fn closed(lo: f64, hi: f64) -> Self {
        Self {
            lo,
            lo_incl: true,
            hi,
            hi_incl: true,
        }
    }
    /// `[lo, hi)`.
    pub const fn closed_open(lo: f64, hi: f64) -> Self {
        Self {
            lo,
            lo_incl: true,
            hi,
            hi_incl: false,
        }
    }
    /// `(lo, hi]`.
    pub const fn open_closed(lo: f64, hi: f64) -> Self {
        Self {
            lo,
            lo_incl: false,
            hi,
            hi_incl: true,
        }
    }
    /// `(lo, hi)`.
    pub const fn open(lo: f64, hi: f64) -> Self {
        Self {
            lo,
            lo_incl: false,
            hi,
            hi_incl: false,
        }
    }
    /// Whether `v` is finite and inside.
    pub fn contains(&self, v: f64) -> bool {
        v.is_finite()
            && (v > self.lo || (self.lo_incl && v == self.lo))
            && (v < self.hi || (self.hi_incl && v == self.hi))
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.lo.is_finite(), self.hi.is_finite()) {
            (false, false) => write!(f, "a finite number"),
            (true, false) => {
                write!(
                    f,
                    "a finite number {} {}",
                    if self.lo_incl { "≥" } else { ">" },
                    self.lo
                )
            }
            (false, true) => {
                write!(
                    f,
                    "a finite number {} {}",
                    if self.hi_incl { "≤" } else { "<" },
                    self.hi
                )
            }
            (true, true) => write!(
                f,
                "a number in {}{}, {}{}",
                if self.lo_incl { "[" } else { "(" },
                self.lo,
                self.hi,
                if self.hi_incl { "]" } else { ")" }
            ),
        }
    }
}

/// Any finite number.
pub const FINITE: Range = Range::open(f64::NEG_INFINITY, f64::INFINITY);
/// A finite number > 0 (learning rates, alphas, norms, temperatures of a softmax...).
pub const POSITIVE: Range = Range::open(0.0, f64::INFINITY);
/// A finite number ≥ 0 (weight decay, guidance, loss weights...).
pub const NON_NEGATIVE: Range = Range::closed(0.0, f64::INFINITY);
/// [0, 1] (shares, ratios, probabilities that may be 1).
pub const UNIT: Range = Range::closed(0.0, 1.0);
/// [0, 1): dropout rates (1 would drop everything).
pub const DROPOUT: Range = Range::closed_open(0.0, 1.0);
/// (0, 1]: nucleus sampling's top-p, fractions that must keep something.
pub const FRACTION: Range = Range::open_closed(0.0, 1.0);
/// [0, 0.5): label smoothing of a binary preference (0.5 and above flips it).
pub const LABEL_SMOOTHING: Range = Range::closed_open(0.0, 0.5);
/// A finite number ≥ 1 (stretch factors such as linear RoPE scaling).
pub const AT_LEAST_ONE: Range = Range::closed(1.0, f64::INFINITY);

/// `v` if it lies in `range`, else an error naming `key`, the value and the range.
pub fn f64_in(key: &str, v: f64, range: Range) -> Result<f64> {
    if range.contains(v) {
        Ok(v)
    } else {
        Err(Error::Config(format!(
            "{key} = {v} is out of range: it must be {range}"
        )))
    }
}

/// [`f64_in`] for an optional value (`None` passes).
pub fn opt_f64_in(key: &str, v: Option<f64>, range: Range) -> Result<Option<f64>> {
    v.map(|v| f64_in(key, v, range)).transpose()
}

/// Every element of `v` in `range`; the error names `key[i]`.
pub fn all_in(key: &str, v: &[f64], range: Range) -> Result<()> {
    for (i, x) in v.iter().enumerate() {
        f64_in(&format!("{key}[{i}]"), *x, range)?;
    }
    Ok(())
}

/// `v` ≥ `min` (counts where 0 makes no sense: batch sizes, steps, ranks).
pub fn count_at_least(key: &str, v: usize, min: usize) -> Result<usize> {
    if v >= min {
        Ok(v)
    } else {
        Err(Error::Config(format!(
            "{key} = {v} is out of range: it must be at least {min}"
        )))
    }
}

/// A `max_grad_norm` as the trainer takes it: `None` (no clipping) for 0, the norm for a finite
/// positive value, an error naming `key` for a negative or non-finite one (which once turned
/// clipping off without a word).
pub fn grad_clip(key: &str, v: f64) -> Result<Option<f64>> {
    f64_in(key, v, NON_NEGATIVE).map(|v| (v > 0.0).then_some(v))
}

/// [`count_at_least`] for an optional count (`None` passes).
pub fn opt_count_at_least(key: &str, v: Option<usize>, min: usize) -> Result<Option<usize>> {
    v.map(|v| count_at_least(key, v, min)).transpose()
}

/// PEFT's `init_lora_weights` spelled `pissa_niter_K`: K must be a whole number ≥ 0 (the subspace
/// iterations of torch's `svd_lowrank`); every other spelling passes (the adapter config names the
/// unknown ones).
pub fn init_lora_weights(key: &str, s: &str) -> Result<()> {
    init_lora_weights_flag(s)
        .map(drop)
        .map_err(|e| Error::Config(format!("{key}: {e}")))
}

/// A finite number in `range` from text (a clap value, a grid axis, a `key=value` argument); the
/// error says what the text is and the range, for the caller to name the flag or key.
pub fn parse_in(s: &str, range: Range) -> std::result::Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number (it must be {range})"))?;
    if range.contains(v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: it must be {range}"))
    }
}

/// clap value parser: any finite number.
pub fn finite(s: &str) -> std::result::Result<f64, String> {
    parse_in(s, FINITE)
}
/// clap value parser: a finite number > 0.
pub fn positive(s: &str) -> std::result::Result<f64, String> {
    parse_in(s, POSITIVE)
}
/// clap value parser: a finite number ≥ 0.
pub fn non_negative(s: &str) -> std::result::Result<f64, String> {
    parse_in(s, NON_NEGATIVE)
}
/// clap value parser: a number in [0, 1].
pub fn unit(s: &str) -> std::result::Result<f64, String> {
    parse_in(s, UNIT)
}
/// clap value parser: a number in [0, 1).
pub fn dropout(s: &str) -> std::result::Result<f64, String> {
    parse_in(s, DROPOUT)
}
/// clap value parser: a number in (0, 1].
pub fn fraction(s: &str) -> std::result::Result<f64, String> {
    parse_in(s, FRACTION)
}
/// clap value parser: a number in [0, 0.5).
pub fn label_smoothing(s: &str) -> std::result::Result<f64, String> {
    parse_in(s, LABEL_SMOOTHING)
}
/// clap value parser: a number ≥ 1.
pub fn at_least_one(s: &str) -> std::result::Result<f64, String> {
    parse_in(s, AT_LEAST_ONE)
}
/// clap value parser: a count ≥ 1.
pub fn count(s: &str) -> std::result::Result<usize, String> {
    count_from(s, 1)
}
/// clap value parser: a whole number ≥ 1 that fits 32 bits (pixel sizes).
pub fn count_u32(s: &str) -> std::result::Result<u32, String> {
    let v = count_from(s, 1)?;
    u32::try_from(v).map_err(|_| format!("{v} is out of range: it must be at most {}", u32::MAX))
}
/// clap value parser: a count ≥ 2 (sequence lengths: a prompt token and a target).
pub fn count_2(s: &str) -> std::result::Result<usize, String> {
    count_from(s, 2)
}
/// A whole number ≥ `min` from text (clap values, grid axes, prompt-file options).
pub fn count_from(s: &str, min: usize) -> std::result::Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number ≥ {min}"))?;
    if v < min {
        Err(format!("{v} is out of range: it must be at least {min}"))
    } else {
        Ok(v)
    }
}
/// clap value parser for `--init-lora-weights`: [`init_lora_weights`]'s check.
pub fn init_lora_weights_flag(s: &str) -> std::result::Result<String, String> {
    match s.strip_prefix("pissa_niter_") {
        Some(k) if k.parse::<usize>().is_err() => Err(format!(
            "the iteration count `{k}` of `{s}` is out of range: it must be a whole number ≥ 0"
        )),
        _ => Ok(s.to_string()),
    }
}

static ALLOW_NONFINITE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets adapter files with NaN/inf weights load (the CLI's global `--allow-nonfinite`); off by
/// default, so a non-finite tensor is an error that names the file and key.
pub fn set_allow_nonfinite(allow: bool) {
    ALLOW_NONFINITE.store(allow, std::sync::atomic::Ordering::Relaxed);
}

/// Whether non-finite adapter weights are let through (see [`set_allow_nonfinite`]).
pub fn allow_nonfinite() -> bool {
    ALLOW_NONFINITE.load(std::sync::atomic::Ordering::Relaxed)
}

/// A config whose numeric keys have documented ranges. `check` is called once, right after the
/// config is parsed (pipeline stage, `--config-file`, merged flags), before anything is loaded.
pub trait Ranged {
    /// The first value out of its range, as an error naming the key.
    fn check(&self) -> Result<()>;
}

/// The key of `table` that a failed deserialization into `T` is to blame on: the first key without
/// which the rest deserializes (or fails differently). serde's messages for a value of the wrong
/// type ("invalid type: string \"high\", expected f64") name no key when the value went through a
/// buffered (flattened or tagged) table; this finds it. `None` when no single key is to blame
/// (e.g. a required key is missing, which serde names itself).
pub fn blame_key<T: serde::de::DeserializeOwned>(
    table: &serde_json::Map<String, serde_json::Value>,
    err: &str,
) -> Option<String> {
    for k in table.keys() {
        let mut rest = table.clone();
        rest.remove(k);
        match serde_json::from_value::<T>(serde_json::Value::Object(rest)) {
            Ok(_) => return Some(k.clone()),
            // A different error, and not the one about `k` itself being required.
            Err(e)
                if e.to_string() != err
                    && !e.to_string().starts_with(&format!("missing field `{k}`")) =>
            {
                return Some(k.clone())
            }
            Err(_) => {}
        }
    }
    None
}

/// A serde error message with the key [`blame_key`] finds put in front (`key `x` = v: ...`), unless
/// the message already names it.
pub fn with_blamed_key<T: serde::de::DeserializeOwned>(
    table: &serde_json::Map<String, serde_json::Value>,
    err: &str,
) -> String {
    match blame_key::<T>(table, err) {
        Some(k) if !err.contains(&format!("`{k}`")) => {
            format!("`{k}` = {}: {err}", table[&k])
        }
        _ => err.to_string(),
    }
}

/// Every non-finite float in a parsed TOML table, as `key.path = value` (a `--config-file` goes
/// through JSON, where a NaN would silently become `null`).
pub fn non_finite_in_toml(t: &toml::Table) -> Vec<String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Float(f) if !f.is_finite() => out.push(format!("{prefix} = {f}")),
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, v, out);
                }
            }
            toml::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(&format!("{prefix}[{i}]"), v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = vec![];
    for (k, v) in t {
        walk(k, v, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_refuse_non_finite_and_out_of_range_values_by_name() {
        for r in [
            FINITE,
            POSITIVE,
            NON_NEGATIVE,
            UNIT,
            DROPOUT,
            FRACTION,
            LABEL_SMOOTHING,
        ] {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                assert!(!r.contains(bad), "{r} accepted {bad}");
            }
        }
        assert!(POSITIVE.contains(1e-9) && !POSITIVE.contains(0.0));
        assert!(NON_NEGATIVE.contains(0.0) && !NON_NEGATIVE.contains(-1e-12));
        assert!(DROPOUT.contains(0.0) && !DROPOUT.contains(1.0));
        assert!(FRACTION.contains(1.0) && !FRACTION.contains(0.0));
        assert!(!LABEL_SMOOTHING.contains(0.5));
        let e = f64_in("top_p", 5.0, FRACTION).unwrap_err().to_string();
        assert!(e.contains("top_p = 5") && e.contains("(0, 1]"), "{e}");
        let e = all_in("weights", &[1.0, f64::NAN], FINITE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("weights[1] = NaN"), "{e}");
        assert!(count_at_least("train_batch_size", 0, 1).is_err());
    }

    #[test]
    fn clap_parsers_explain_the_range() {
        assert_eq!(positive("2e-4"), Ok(2e-4));
        assert!(positive("nan")
            .unwrap_err()
            .contains("must be a finite number > 0"));
        assert!(fraction("0").unwrap_err().contains("(0, 1]"));
        assert!(non_negative("-5").unwrap_err().contains("≥ 0"));
        assert!(unit("abc").unwrap_err().contains("not a number"));
        assert!(count("0").is_err() && count("3") == Ok(3));
        assert!(count("2.5").unwrap_err().contains("not a whole number ≥ 1"));
        assert_eq!(
            count_2("1"),
            Err("1 is out of range: it must be at least 2".into())
        );
        assert!(count_u32("0").is_err() && count_u32("4294967296").is_err());
        assert_eq!(count_u32("32"), Ok(32));
        assert!(at_least_one("0.5").unwrap_err().contains("≥ 1"));
        assert_eq!(
            init_lora_weights_flag("pissa_niter_4"),
            Ok("pissa_niter_4".into())
        );
        assert!(init_lora_weights_flag("pissa_niter_-1")
            .unwrap_err()
            .contains("whole number ≥ 0"));
        assert_eq!(init_lora_weights_flag("olora"), Ok("olora".into()));
    }

    #[test]
    fn config_helpers_name_the_key() {
        assert_eq!(grad_clip("max_grad_norm", 0.0).unwrap(), None);
        assert_eq!(grad_clip("max_grad_norm", 0.5).unwrap(), Some(0.5));
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let e = grad_clip("max_grad_norm", bad).unwrap_err().to_string();
            assert!(e.contains("max_grad_norm") && e.contains("≥ 0"), "{e}");
        }
        assert!(opt_count_at_least("max_steps", None, 1).is_ok());
        let e = opt_count_at_least("max_steps", Some(0), 1).unwrap_err();
        assert!(e.to_string().contains("max_steps = 0"), "{e}");
        let e = init_lora_weights("init_lora_weights", "pissa_niter_x").unwrap_err();
        assert!(e.to_string().contains("init_lora_weights"), "{e}");
    }

    #[test]
    fn a_wrongly_typed_value_is_blamed_on_its_key_even_through_flatten() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Inner {
            #[serde(default)]
            dropout: f64,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Outer {
            model: String,
            #[serde(default)]
            beta: f64,
            #[serde(flatten)]
            inner: Inner,
        }
        let t = |v: serde_json::Value| v.as_object().unwrap().clone();
        let bad = t(serde_json::json!({"model": "m", "beta": 0.1, "dropout": "high"}));
        let err = serde_json::from_value::<Outer>(serde_json::Value::Object(bad.clone()))
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("dropout"), "serde named it after all: {err}");
        let msg = with_blamed_key::<Outer>(&bad, &err);
        assert!(msg.starts_with("`dropout` = \"high\": "), "{msg}");
        // A missing required key is serde's own message, blamed on nothing else.
        let missing = t(serde_json::json!({"beta": 0.1}));
        let err = serde_json::from_value::<Outer>(serde_json::Value::Object(missing.clone()))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(with_blamed_key::<Outer>(&missing, &err), err);
    }

    #[test]
    fn non_finite_toml_values_are_found_with_their_path() {
        let t: toml::Table = toml::from_str("a = nan\n[b]\nc = [1.0, inf]\nd = 2").unwrap();
        assert_eq!(non_finite_in_toml(&t), vec!["a = NaN", "b.c[1] = inf"]);
    }
}
