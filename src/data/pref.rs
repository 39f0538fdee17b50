//! Preference data in TRL's formats: paired `{"prompt", "chosen", "rejected"}` (standard strings or
//! conversational message lists; the prompt explicit or implicit in a shared prefix), unpaired
//! `{"prompt", "completion", "label"}` for KTO, and the paired-to-unpaired conversion; tokenized into
//! prompt + completion rows with a completion mask.

use super::chat::ChatTemplate;
use super::text::TextTokenizer;
use crate::{Error, Result};
use serde_json::Value as Json;
use std::path::Path;

/// A prompt or completion: text or messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    /// Plain text.
    Text(String),
    /// Messages.
    Messages(Vec<Json>),
}

/// A preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Prompt.
    pub prompt: Seg,
    /// Preferred completion.
    pub chosen: Seg,
    /// Dispreferred completion.
    pub rejected: Seg,
}

/// An unpaired example (KTO).
#[derive(Debug, Clone, PartialEq)]
pub struct Unpaired {
    /// Prompt.
    pub prompt: Seg,
    /// Completion.
    pub completion: Seg,
    /// Desirable.
    pub label: bool,
}

fn seg(v: &Json, what: &str) -> std::result::Result<Seg, String> {
    match v {
        Json::String(s) => Ok(Seg::Text(s.clone())),
        Json::Array(a) if a.iter().all(|m| m["role"].is_string()) => Ok(Seg::Messages(a.clone())),
        _ => Err(format!(
            "`{what}` is neither a string nor a list of messages"
        )),
    }
}

/// TRL's implicit-prompt split: the shared prefix of chosen and rejected is the prompt (strings:
/// up to the first difference, backing off a trailing space; messages: up to the first differing
/// message).
pub fn split_implicit(chosen: &Seg, rejected: &Seg) -> std::result::Result<Pair, String> {
    match (chosen, rejected) {
        (Seg::Text(c), Seg::Text(r)) => {
            let (cb, rb) = (c.as_bytes(), r.as_bytes());
            let mut idx = 0;
            while idx < cb.len().min(rb.len()) && cb[idx] == rb[idx] {
                idx += 1;
            }
            if idx > 0 && idx < cb.len().min(rb.len()) && cb[idx - 1] == b' ' {
                idx -= 1;
            }
            while !c.is_char_boundary(idx) {
                idx -= 1;
            }
            Ok(Pair {
                prompt: Seg::Text(c[..idx].to_string()),
                chosen: Seg::Text(c[idx..].to_string()),
                rejected: Seg::Text(r[idx..].to_string()),
            })
        }
        (Seg::Messages(c), Seg::Messages(r)) => {
            let mut idx = 0;
            while idx < c.len().min(r.len()) && c[idx] == r[idx] {
                idx += 1;
            }
            if idx == 0 {
                return Err("chosen and rejected share no prompt messages".into());
            }
            Ok(Pair {
                prompt: Seg::Messages(c[..idx].to_vec()),
                chosen: Seg::Messages(c[idx..].to_vec()),
                rejected: Seg::Messages(r[idx..].to_vec()),
            })
        }
        _ => Err("chosen and rejected must both be text or both be messages".into()),
    }
}

impl Pair {
    /// Parses one JSON object (explicit or implicit prompt).
    pub fn from_json(v: &Json) -> std::result::Result<Self, String> {
        let (c, r) = match (v.get("chosen"), v.get("rejected")) {
            (Some(c), Some(r)) => (seg(c, "chosen")?, seg(r, "rejected")?),
            _ => return Err("expected `chosen` and `rejected`".into()),
        };
        match v.get("prompt") {
            Some(p) => Ok(Pair {
                prompt: seg(p, "prompt")?,
                chosen: c,
                rejected: r,
            }),
            None => split_implicit(&c, &r),
        }
    }

    /// TRL's `unpair_preference_dataset`: (prompt, chosen, true) and (prompt, rejected, false).
    pub fn unpair(&self) -> [Unpaired; 2] {
        [
            Unpaired {
                prompt: self.prompt.clone(),
                completion: self.chosen.clone(),
                label: true,
            },
            Unpaired {
                prompt: self.prompt.clone(),
                completion: self.rejected.clone(),
                label: false,
            },
        ]
    }
}

impl Unpaired {
    /// Parses one JSON object.
    pub fn from_json(v: &Json) -> std::result::Result<Self, String> {
        let (Some(p), Some(c), Some(l)) = (v.get("prompt"), v.get("completion"), v.get("label"))
        else {
            return Err("expected `prompt`, `completion` and `label`".into());
        };
        Ok(Self {
            prompt: seg(p, "prompt")?,
            completion: seg(c, "completion")?,
            label: l.as_bool().ok_or("`label` is not a boolean")?,
        })
    }
}

fn lines(path: &Path) -> Result<Vec<(usize, Json)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = vec![];
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        out.push((
            i + 1,
            serde_json::from_str(l)
                .map_err(|e| Error::format(path, crate::util::json_line_error(i + 1, &e)))?,
        ));
    }
    if out.is_empty() {
        return Err(Error::format(path, "no examples"));
    }
    Ok(out)
}

/// Reads paired examples.
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    lines(path)?
        .iter()
        .map(|(i, v)| Pair::from_json(v).map_err(|e| Error::format(path, format!("line {i}: {e}"))))
        .collect()
}

/// Reads unpaired examples; a paired file is unpaired on the way in.
pub fn read_unpaired(path: &Path) -> Result<Vec<Unpaired>> {
    let mut out = vec![];
    for (i, v) in lines(path)? {
        if v.get("label").is_some() {
            out.push(
                Unpaired::from_json(&v)
                    .map_err(|e| Error::format(path, format!("line {i}: {e}")))?,
            );
        } else {
            let p =
                Pair::from_json(&v).map_err(|e| Error::format(path, format!("line {i}: {e}")))?;
            out.extend(p.unpair());
        }
    }
    Ok(out)
}

/// A tokenized prompt + completion with its completion mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seq {
    /// Ids.
    pub ids: Vec<u32>,
    /// 1 on completion tokens.
    pub completion: Vec<u8>,
}

/// Tokenizes a prompt and a completion (truncating the prompt from the left, then the completion
/// from the right, to `max_length`).
pub fn tokenize_pc(
    prompt: &Seg,
    completion: &Seg,
    tok: &TextTokenizer,
    max_length: usize,
) -> Result<Seq> {
    let (p, c) = match (prompt, completion) {
        (Seg::Text(p), Seg::Text(c)) => {
            let mut pi = vec![];
            if let (Some(b), true) = (&tok.bos, tok.add_bos) {
                pi.push(b.1);
            }
            pi.extend(tok.encode(p)?);
            let mut ci = tok.encode(c)?;
            if let Some(e) = &tok.eos {
                ci.push(e.1);
            }
            (pi, ci)
        }
        (Seg::Messages(p), Seg::Messages(c)) => {
            let t: &ChatTemplate = tok.template()?;
            let ptxt = t.render(p, true)?;
            let all: Vec<Json> = p.iter().chain(c).cloned().collect();
            let full = t.render(&all, false)?;
            let rest = full.strip_prefix(&ptxt).ok_or_else(|| {
                Error::Config(
                    "the chat template is not prefix-stable: the completion cannot be located"
                        .into(),
                )
            })?;
            (tok.encode(&ptxt)?, tok.encode(rest)?)
        }
        _ => {
            return Err(Error::Config(
                "prompt and completion must both be text or both be messages".into(),
            ))
        }
    };
    if c.is_empty() {
        return Err(Error::Msg("an empty completion".into()));
    }
    let keep_c = c.len().min(max_length.saturating_sub(1));
    let keep_p = p.len().min(max_length - keep_c).max(1);
    let p = &p[p.len() - keep_p..];
    let mut ids = p.to_vec();
    ids.extend_from_slice(&c[..keep_c]);
    let mut completion = vec![0u8; p.len()];
    completion.extend(std::iter::repeat_n(1u8, keep_c));
    ids.truncate(max_length);
    completion.truncate(max_length);
    Ok(Seq { ids, completion })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trl_formats_parse_and_implicit_prompts_split() {
        let p = Pair::from_json(
            &serde_json::json!({"chosen": "The sky is blue.", "rejected": "The sky is green."}),
        )
        .unwrap();
        assert_eq!(p.prompt, Seg::Text("The sky is".into()));
        assert_eq!(p.chosen, Seg::Text(" blue.".into()));
        assert_eq!(p.rejected, Seg::Text(" green.".into()));
        let conv = serde_json::json!({
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]});
        let p = Pair::from_json(&conv).unwrap();
        assert!(matches!(&p.prompt, Seg::Messages(m) if m.len() == 1));
        let u = p.unpair();
        assert!(u[0].label && !u[1].label);
        let k = Unpaired::from_json(
            &serde_json::json!({"prompt": "a", "completion": "b", "label": false}),
        )
        .unwrap();
        assert!(!k.label);
        assert!(Pair::from_json(&serde_json::json!({"prompt": "x", "chosen": "y"})).is_err());
        assert!(Unpaired::from_json(
            &serde_json::json!({"prompt": "x", "completion": "y", "label": 1})
        )
        .is_err());
    }
}
