//! Supervised fine-tuning data in TRL's formats (JSONL): language modelling `{"text"}`,
//! prompt-completion `{"prompt", "completion"}` (strings, or message lists in the conversational
//! form) and `{"messages"}`; tokenized with the model's chat template, with TRL's loss masks
//! (completion-only for prompt-completion data, optionally assistant-only for conversations),
//! truncation, padding, and best-fit-decreasing packing in which positions restart per sequence and
//! no token attends across sequences.

use super::text::TextTokenizer;
use crate::{Error, Result};
use candle_core::Tensor;
use serde_json::Value as Json;
use std::path::Path;

/// One side of a prompt-completion example.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Plain text.
    Text(String),
    /// Messages (`[{"role", "content"}]`).
    Messages(Vec<Json>),
}

/// One example.
#[derive(Debug, Clone, PartialEq)]
pub enum SftExample {
    /// `{"text"}`: loss on every token.
    Text(String),
    /// `{"prompt", "completion"}`.
    PromptCompletion {
        /// Prompt.
        prompt: Part,
        /// Completion.
        completion: Part,
    },
    /// `{"messages"}`.
    Messages(Vec<Json>),
}

fn part(v: &Json, what: &str) -> std::result::Result<Part, String> {
    match v {
        Json::String(s) => Ok(Part::Text(s.clone())),
        Json::Array(a) if a.iter().all(|m| m["role"].is_string()) => Ok(Part::Messages(a.clone())),
        _ => Err(format!(
            "`{what}` is neither a string nor a list of messages"
        )),
    }
}

impl SftExample {
    /// Parses one JSON object.
    pub fn from_json(v: &Json) -> std::result::Result<Self, String> {
        if let Some(m) = v.get("messages") {
            return match part(m, "messages")? {
                Part::Messages(m) => Ok(Self::Messages(m)),
                Part::Text(_) => Err("`messages` must be a list of messages".into()),
            };
        }
        if let (Some(p), Some(c)) = (v.get("prompt"), v.get("completion")) {
            let (prompt, completion) = (part(p, "prompt")?, part(c, "completion")?);
            if matches!(prompt, Part::Text(_)) != matches!(completion, Part::Text(_)) {
                return Err("prompt and completion must both be text or both be messages".into());
            }
            return Ok(Self::PromptCompletion { prompt, completion });
        }
        if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
            return Ok(Self::Text(t.to_string()));
        }
        Err("expected `text`, `prompt` + `completion`, or `messages`".into())
    }
}

/// Reads a JSONL file of examples; errors name the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<SftExample>> {
    Ok(read_jsonl_lines(path)?
        .into_iter()
        .map(|(_, e)| e)
        .collect())
}

/// [`read_jsonl`] with each example's line number (1-based), for errors found later.
pub fn read_jsonl_lines(path: &Path) -> Result<Vec<(usize, SftExample)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Json = serde_json::from_str(line)
            .map_err(|e| Error::format(path, crate::util::json_line_error(i + 1, &e)))?;
        out.push((
            i + 1,
            SftExample::from_json(&v)
                .map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?,
        ));
    }
    if out.is_empty() {
        return Err(Error::format(path, "no examples"));
    }
    Ok(out)
}

/// Tokenization settings (TRL's `SFTConfig` names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SftOptions {
    /// Longest sequence (longer ones are truncated on the right).
    pub max_length: usize,
    /// Loss on the completion only (`None`: yes for prompt-completion data).
    pub completion_only_loss: Option<bool>,
    /// Loss on assistant turns only (conversations).
    pub assistant_only_loss: bool,
}

impl Default for SftOptions {
    fn default() -> Self {
        Self {
            max_length: 1024,
            completion_only_loss: None,
            assistant_only_loss: false,
        }
    }
}

/// Token ids and which of them are learned (1) or only context (0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Ids.
    pub ids: Vec<u32>,
    /// Loss mask.
    pub mask: Vec<u8>,
}

impl Tokenized {
    fn push(&mut self, ids: &[u32], learn: bool) {
        self.ids.extend_from_slice(ids);
        self.mask
            .extend(std::iter::repeat_n(learn as u8, ids.len()));
    }
}

/// Tokenizes one example.
pub fn tokenize(ex: &SftExample, tok: &TextTokenizer, opts: &SftOptions) -> Result<Tokenized> {
    let mut t = Tokenized {
        ids: vec![],
        mask: vec![],
    };
    let eos: Vec<u32> = tok.eos.as_ref().map(|e| vec![e.1]).unwrap_or_default();
    let bos: Vec<u32> = match (&tok.bos, tok.add_bos) {
        (Some(b), true) => vec![b.1],
        _ => vec![],
    };
    match ex {
        SftExample::Text(s) => {
            t.push(&bos, false);
            t.push(&tok.encode(s)?, true);
            if !s.ends_with(tok.eos.as_ref().map_or("\u{0}", |e| e.0.as_str())) {
                t.push(&eos, true);
            }
        }
        SftExample::PromptCompletion {
            prompt: Part::Text(p),
            completion: Part::Text(c),
        } => {
            let only = opts.completion_only_loss.unwrap_or(true);
            t.push(&bos, false);
            t.push(&tok.encode(p)?, !only);
            t.push(&tok.encode(c)?, true);
            t.push(&eos, true);
        }
        SftExample::PromptCompletion {
            prompt: Part::Messages(p),
            completion: Part::Messages(c),
        } => {
            let tmpl = tok.template()?;
            let only = opts.completion_only_loss.unwrap_or(true);
            let ptxt = tmpl.render(p, true)?;
            let all: Vec<Json> = p.iter().chain(c).cloned().collect();
            let full = tmpl.render(&all, false)?;
            let rest = full.strip_prefix(&ptxt).ok_or_else(|| {
                Error::Config(
                    "the chat template renders the prompt differently inside the conversation (it is not prefix-stable), so the completion cannot be located"
                        .into(),
                )
            })?;
            t.push(&tok.encode(&ptxt)?, !only);
            t.push(&tok.encode(rest)?, true);
        }
        SftExample::PromptCompletion { .. } => {
            return Err(Error::Config(
                "prompt and completion must both be text or both be messages".into(),
            ))
        }
        SftExample::Messages(m) => {
            let tmpl = tok.template()?;
            let full = tmpl.render(m, false)?;
            if !opts.assistant_only_loss {
                t.push(&tok.encode(&full)?, true);
            } else {
                // Render growing prefixes: the text between "…, generation prompt" and "…,
                // assistant turn" is the assistant's part.
                let mut done = String::new();
                for i in 0..m.len() {
                    if m[i]["role"] != "assistant" {
                        continue;
                    }
                    let before = tmpl.render(&m[..i], true)?;
                    let after = tmpl.render(&m[..=i], false)?;
                    let (Some(ctx), Some(turn)) =
                        (before.strip_prefix(&done), after.strip_prefix(&before))
                    else {
                        return Err(Error::Config(
                            "the chat template is not prefix-stable, so assistant turns cannot be located for assistant_only_loss"
                                .into(),
                        ));
                    };
                    t.push(&tok.encode(ctx)?, false);
                    t.push(&tok.encode(turn)?, true);
                    done = after;
                }
                let tail = full.strip_prefix(&done).unwrap_or_default();
                t.push(&tok.encode(tail)?, false);
            }
        }
    }
    let had_targets = t.mask.iter().skip(1).any(|m| *m == 1);
    let full_len = t.ids.len();
    t.ids.truncate(opts.max_length);
    t.mask.truncate(opts.max_length);
    if t.ids.len() < 2 {
        return Err(Error::Msg("an example shorter than two tokens".into()));
    }
    if !t.mask.iter().skip(1).any(|m| *m == 1) {
        // A row with nothing to learn would train on nothing (or divide by zero): say why.
        return Err(Error::Msg(if had_targets {
            format!(
                "every token the loss uses lies beyond max_length {} (the example has {full_len} \
                 tokens); raise --max-length",
                opts.max_length
            )
        } else if opts.assistant_only_loss {
            "the conversation has no assistant turn, so --assistant-only-loss leaves it no \
             token to learn from"
                .into()
        } else {
            "the example has no token to learn from (an empty completion)".into()
        }));
    }
    Ok(t)
}

/// A training row: several sequences packed together, or one padded sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Ids.
    pub ids: Vec<u32>,
    /// Loss mask (1 = learned target).
    pub mask: Vec<u8>,
    /// Position of each token within its sequence.
    pub positions: Vec<u32>,
    /// Sequence index of each token within the row.
    pub segments: Vec<u32>,
}

impl Row {
    /// Real tokens (padding excluded).
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// Whether the row is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// One row per sequence.
pub fn unpacked(seqs: &[Tokenized]) -> Vec<Row> {
    seqs.iter()
        .map(|s| Row {
            ids: s.ids.clone(),
            mask: s.mask.clone(),
            positions: (0..s.ids.len() as u32).collect(),
            segments: vec![0; s.ids.len()],
        })
        .collect()
}

/// Best-fit-decreasing packing into rows of at most `max_length` tokens: longest sequences first,
/// each into the fullest row that still has room. The first token of every sequence is never a
/// target (TRL masks labels where the position is 0).
pub fn pack_bfd(seqs: &[Tokenized], max_length: usize) -> Vec<Row> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(seqs[i].ids.len()), i));
    let mut rows: Vec<Row> = vec![];
    for i in order {
        let s = &seqs[i];
        let n = s.ids.len().min(max_length);
        let best = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.ids.len() + n <= max_length)
            .max_by_key(|(j, r)| (r.ids.len(), std::cmp::Reverse(*j)))
            .map(|(j, _)| j);
        let j = match best {
            Some(j) => j,
            None => {
                rows.push(Row {
                    ids: vec![],
                    mask: vec![],
                    positions: vec![],
                    segments: vec![],
                });
                rows.len() - 1
            }
        };
        let r = &mut rows[j];
        let seg = r.segments.last().map_or(0, |s| s + 1);
        r.ids.extend_from_slice(&s.ids[..n]);
        let mut m = s.mask[..n].to_vec();
        m[0] = 0;
        r.mask.extend(m);
        r.positions.extend(0..n as u32);
        r.segments.extend(std::iter::repeat_n(seg, n));
    }
    rows
}

/// A batch as tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (B, T) ids, padded with the pad id.
    pub ids: Tensor,
    /// (B, T) f32 loss weights (0 on padding and context).
    pub weights: Tensor,
    /// (B, T) 1 for real tokens.
    pub attention_mask: Tensor,
    /// (B, T) positions.
    pub positions: Tensor,
    /// (B, T) sequence ids.
    pub segments: Tensor,
    /// Learned target tokens in the batch.
    pub num_tokens: usize,
}

/// Pads rows on the right into a batch.
pub fn collate(rows: &[&Row], pad_id: u32) -> Result<Batch> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    if rows.is_empty() || t == 0 {
        return Err(Error::Msg("an empty batch".into()));
    }
    let b = rows.len();
    let (mut ids, mut w, mut am, mut pos, mut seg) = (
        vec![pad_id; b * t],
        vec![0f32; b * t],
        vec![0u32; b * t],
        vec![0u32; b * t],
        vec![0u32; b * t],
    );
    let mut num = 0;
    for (i, r) in rows.iter().enumerate() {
        for k in 0..r.len() {
            ids[i * t + k] = r.ids[k];
            w[i * t + k] = if k > 0 { r.mask[k] as f32 } else { 0.0 };
            num += (k > 0 && r.mask[k] > 0) as usize;
            am[i * t + k] = 1;
            pos[i * t + k] = r.positions[k];
            seg[i * t + k] = r.segments[k];
        }
        // Padding continues the last segment's positions, as its own segment (never attended).
        let last_seg = r.segments.last().copied().unwrap_or(0) + 1;
        for k in r.len()..t {
            seg[i * t + k] = last_seg;
            pos[i * t + k] = (k - r.len()) as u32;
        }
    }
    let d = &crate::util::device::current();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), d)?,
        weights: Tensor::from_vec(w, (b, t), d)?,
        attention_mask: Tensor::from_vec(am, (b, t), d)?,
        positions: Tensor::from_vec(pos, (b, t), d)?,
        segments: Tensor::from_vec(seg, (b, t), d)?,
        num_tokens: num,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chat::{message, CHATML};

    fn tok() -> TextTokenizer {
        let texts: Vec<String> = (0..100)
            .map(|i| format!("user assistant what is {i} plus {}? {}", i + 1, 2 * i + 1))
            .collect();
        let t = crate::data::text::train_bpe(
            &texts,
            400,
            &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        )
        .unwrap();
        TextTokenizer::from_parts(
            t,
            &serde_json::json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}),
        )
        .unwrap()
    }

    #[test]
    fn formats_and_masks_follow_trl() {
        let t = tok();
        let o = SftOptions::default();
        let lines = [
            r#"{"text": "what is 1 plus 2? 3"}"#,
            r#"{"prompt": "what is 1 plus 2?", "completion": " 3"}"#,
            r#"{"prompt": [{"role": "user", "content": "what is 1 plus 2?"}], "completion": [{"role": "assistant", "content": "3"}]}"#,
            r#"{"messages": [{"role": "user", "content": "what is 1 plus 2?"}, {"role": "assistant", "content": "3"}, {"role": "user", "content": "what is 2 plus 3?"}, {"role": "assistant", "content": "5"}]}"#,
        ];
        let ex: Vec<SftExample> = lines
            .iter()
            .map(|l| SftExample::from_json(&serde_json::from_str(l).unwrap()).unwrap())
            .collect();
        // Text: everything learned, EOS appended.
        let a = tokenize(&ex[0], &t, &o).unwrap();
        assert!(a.mask.iter().all(|m| *m == 1));
        assert_eq!(*a.ids.last().unwrap(), t.eos.as_ref().unwrap().1);
        // Prompt-completion: the prompt is context only.
        let b = tokenize(&ex[1], &t, &o).unwrap();
        let np = t.encode("what is 1 plus 2?").unwrap().len();
        assert!(b.mask[..np].iter().all(|m| *m == 0) && b.mask[np..].iter().all(|m| *m == 1));
        let b_all = tokenize(
            &ex[1],
            &t,
            &SftOptions {
                completion_only_loss: Some(false),
                ..o
            },
        )
        .unwrap();
        assert!(b_all.mask.iter().all(|m| *m == 1));
        // Conversational prompt-completion: the completion is the assistant turn and its end.
        let c = tokenize(&ex[2], &t, &o).unwrap();
        let learned: Vec<u32> = c
            .ids
            .iter()
            .zip(&c.mask)
            .filter(|(_, m)| **m == 1)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(t.decode(&learned, false).unwrap(), "3<|im_end|>\n");
        // Messages: all tokens by default; assistant turns only with assistant_only_loss.
        let d = tokenize(&ex[3], &t, &o).unwrap();
        assert!(d.mask.iter().all(|m| *m == 1));
        let d2 = tokenize(
            &ex[3],
            &t,
            &SftOptions {
                assistant_only_loss: true,
                ..o
            },
        )
        .unwrap();
        assert_eq!(d2.ids, d.ids, "the same tokens, only the mask differs");
        let learned: Vec<u32> = d2
            .ids
            .iter()
            .zip(&d2.mask)
            .filter(|(_, m)| **m == 1)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(
            t.decode(&learned, false).unwrap(),
            "3<|im_end|>\n5<|im_end|>\n"
        );
        // Truncation.
        let e = tokenize(&ex[3], &t, &SftOptions { max_length: 5, ..o }).unwrap();
        assert_eq!(e.ids.len(), 5);
        // A row left with nothing to learn says why: the learned part cut off, or no assistant turn.
        let cut = tokenize(
            &ex[3],
            &t,
            &SftOptions {
                max_length: 5,
                assistant_only_loss: true,
                ..o
            },
        )
        .unwrap_err()
        .to_string();
        assert!(cut.contains("beyond max_length 5"), "{cut}");
        let user_only = SftExample::from_json(
            &serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        let none = tokenize(
            &user_only,
            &t,
            &SftOptions {
                assistant_only_loss: true,
                ..o
            },
        )
        .unwrap_err()
        .to_string();
        assert!(none.contains("no assistant turn"), "{none}");
        // Bad lines name what is wrong.
        assert!(SftExample::from_json(&serde_json::json!({"prompt": "x"})).is_err());
        assert!(SftExample::from_json(&serde_json::json!({"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]})).is_err());
        let _ = message("user", "x");
    }

    #[test]
    fn bfd_packing_fits_rows_and_never_learns_across_sequences() {
        let seqs: Vec<Tokenized> = [5usize, 3, 4, 2, 6]
            .iter()
            .enumerate()
            .map(|(k, &n)| Tokenized {
                ids: (0..n as u32).map(|i| 10 * k as u32 + i).collect(),
                mask: vec![1; n],
            })
            .collect();
        let rows = pack_bfd(&seqs, 8);
        assert_eq!(rows.len(), 3, "20 tokens in rows of 8");
        let total: usize = rows.iter().map(|r| r.len()).sum();
        assert_eq!(total, 20);
        for r in &rows {
            assert!(r.len() <= 8);
            for k in 0..r.len() {
                if r.positions[k] == 0 {
                    assert_eq!(r.mask[k], 0, "a sequence's first token is no target");
                }
                if k > 0 && r.segments[k] != r.segments[k - 1] {
                    assert_eq!(r.positions[k], 0);
                }
            }
        }
        let refs: Vec<&Row> = rows.iter().collect();
        let b = collate(&refs, 0).unwrap();
        assert_eq!(b.ids.dims(), &[3, 8]);
        assert_eq!(b.num_tokens, 20 - 5);
    }
}
