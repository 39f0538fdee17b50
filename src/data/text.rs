//! Text tokenizers of Hugging Face model folders: `tokenizer.json` through the tokenizers crate, the
//! special tokens and chat template of `tokenizer_config.json`, and a byte-level BPE trainer for the
//! embedded models.

use super::chat::ChatTemplate;
use crate::{Error, Result};
use serde_json::Value as Json;
use std::path::Path;

/// A tokenizer with its special tokens and chat template.
pub struct TextTokenizer {
    /// The tokenizers-crate tokenizer.
    pub tok: tokenizers::Tokenizer,
    /// BOS text and id, if the model has one.
    pub bos: Option<(String, u32)>,
    /// EOS text and id.
    pub eos: Option<(String, u32)>,
    /// Padding id (the pad token, else EOS, else 0).
    pub pad_id: u32,
    /// Whether `bos_token` is prepended to plain text (`add_bos_token`).
    pub add_bos: bool,
    /// The chat template, if any.
    pub chat_template: Option<ChatTemplate>,
}

fn special(cfg: &Json, key: &str) -> Option<String> {
    match &cfg[key] {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from a model folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| Error::format(&file, format!("not a tokenizers file: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => {
                serde_json::from_str(&t).map_err(|e| Error::format(&cfg_path, e.to_string()))?
            }
            Err(_) => Json::Null,
        };
        let mut t = Self::from_parts(tok, &cfg)?;
        t.chat_template = ChatTemplate::from_dir(dir)?;
        Ok(t)
    }

    /// From a tokenizer and a `tokenizer_config.json` value.
    pub fn from_parts(tok: tokenizers::Tokenizer, cfg: &Json) -> Result<Self> {
        let id = |s: Option<String>| -> Result<Option<(String, u32)>> {
            match s {
                None => Ok(None),
                Some(s) => match tok.token_to_id(&s) {
                    Some(i) => Ok(Some((s, i))),
                    None => Err(Error::Config(format!(
                        "special token `{s}` is not in the vocabulary"
                    ))),
                },
            }
        };
        let bos = id(special(cfg, "bos_token"))?;
        let eos = id(special(cfg, "eos_token"))?;
        let pad = id(special(cfg, "pad_token"))?;
        Ok(Self {
            pad_id: pad.as_ref().or(eos.as_ref()).map(|p| p.1).unwrap_or(0),
            add_bos: cfg["add_bos_token"].as_bool().unwrap_or(false) && bos.is_some(),
            chat_template: ChatTemplate::from_tokenizer_config(cfg),
            tok,
            bos,
            eos,
        })
    }

    /// Token ids of `text` exactly as written (special tokens in the text are recognised; nothing
    /// is added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tok
            .encode(text, false)
            .map_err(|e| Error::Msg(format!("tokenizing: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids` (special tokens skipped when `skip_special`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tok
            .decode(ids, skip_special)
            .map_err(|e| Error::Msg(format!("decoding: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Replaces the chat template with a built-in one (`chatml`, `llama3`, `vicuna`) that uses this
    /// tokenizer's BOS and EOS texts.
    pub fn use_builtin_template(&mut self, name: &str) -> Result<()> {
        let bos = self.bos.as_ref().map(|b| b.0.clone()).unwrap_or_default();
        let eos = self.eos.as_ref().map(|b| b.0.clone()).unwrap_or_default();
        self.chat_template = Some(ChatTemplate::builtin(name, &bos, &eos)?);
        Ok(())
    }

    /// The chat template, or an error naming what to do.
    pub fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| {
            Error::Config(
                "the tokenizer has no chat_template; pass a built-in one (chatml, llama3, vicuna)"
                    .into(),
            )
        })
    }
}

/// Trains a byte-level BPE tokenizer of `vocab_size` on `texts`, with `specials` as added special
/// tokens (ids 0..), in GPT-2's byte-level layout (the `Ġ` space marker).
pub fn train_bpe(
    texts: &[String],
    vocab_size: usize,
    specials: &[&str],
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, TokenizerBuilder};
    let specials: Vec<AddedToken> = specials
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| Error::Msg(format!("building the tokenizer: {e}")))?;
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| Error::Msg(format!("training the tokenizer: {e}")))?;
    tok.add_special_tokens(specials.clone())
        .map_err(|e| Error::Msg(format!("adding special tokens: {e}")))?;
    Ok(tok.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_bpe_round_trips_and_keeps_special_tokens_whole() {
        let texts: Vec<String> = (0..200)
            .map(|i| format!("what is {i} plus {}? the answer is {}.", i + 3, 2 * i + 3))
            .collect();
        let tok = train_bpe(
            &texts,
            300,
            &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        )
        .unwrap();
        let cfg = serde_json::json!({"eos_token": "<|im_end|>", "bos_token": null,
            "chat_template": crate::data::chat::CHATML});
        let t = TextTokenizer::from_parts(tok, &cfg).unwrap();
        assert_eq!(t.eos.as_ref().unwrap().1, 2);
        assert_eq!(t.pad_id, 2);
        let s = "<|im_start|>user\nwhat is 12 plus 15?<|im_end|>";
        let ids = t.encode(s).unwrap();
        assert_eq!(ids[0], 1, "the special token is one id");
        assert_eq!(*ids.last().unwrap(), 2);
        assert_eq!(t.decode(&ids, false).unwrap(), s);
        assert!(
            ids.len() < s.len() / 2,
            "BPE merges: {} ids for {} bytes",
            ids.len(),
            s.len()
        );
        let e =
            TextTokenizer::from_parts(t.tok.clone(), &serde_json::json!({"eos_token": "<nope>"}));
        assert!(e.is_err());
    }
}
