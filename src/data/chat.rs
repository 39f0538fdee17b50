//! Chat formats: a model's `tokenizer_config.json` `chat_template` rendered with a Jinja engine
//! (minijinja with Python-method compatibility, `raise_exception`, `strftime_now`, Jinja2's
//! `trim_blocks` / `lstrip_blocks` as transformers sets them), and built-in ChatML, Llama-3 and
//! Vicuna templates for models that have none.

use crate::{Error, Result};
use minijinja::value::{Serde, Value};
use serde_json::Value as Json;
use std::path::Path;

/// ChatML (`<|im_start|>role\ncontent<|im_end|>`).
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama 3 (`<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`).
pub const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// Vicuna v1.1 (`SYSTEM USER: ... ASSISTANT: ...</s>`).
pub const VICUNA: &str = "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}{% else %}{% set system = \"A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.\" %}{% set rest = messages %}{% endif %}{{ system }}{% for message in rest %}{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% else %}{{ raise_exception('Vicuna has roles user and assistant after an optional system message, not ' + message['role']) }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}";

/// A chat template with the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// Jinja source.
    pub source: String,
    /// `bos_token`.
    pub bos_token: String,
    /// `eos_token`.
    pub eos_token: String,
}

fn token_str(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl ChatTemplate {
    /// The template of a `tokenizer_config.json` value (a string, or a list of named templates of
    /// which `default` is taken), or `None` when it has none.
    pub fn from_tokenizer_config(cfg: &Json) -> Option<Self> {
        let source = match &cfg["chat_template"] {
            Json::String(s) => s.clone(),
            Json::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or_else(|| list.first())
                .and_then(|t| t["template"].as_str())
                .map(String::from)?,
            _ => return None,
        };
        Some(Self {
            source,
            bos_token: token_str(&cfg["bos_token"]).unwrap_or_default(),
            eos_token: token_str(&cfg["eos_token"]).unwrap_or_default(),
        })
    }

    /// Reads `tokenizer_config.json` (and `chat_template.jinja` beside it, as transformers 5
    /// writes it) from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join("tokenizer_config.json");
        let cfg: Json = match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| Error::format(&p, e.to_string()))?,
            Err(_) => Json::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        if let Ok(src) = std::fs::read_to_string(&jinja) {
            return Ok(Some(Self {
                source: src,
                bos_token: token_str(&cfg["bos_token"]).unwrap_or_default(),
                eos_token: token_str(&cfg["eos_token"]).unwrap_or_default(),
            }));
        }
        Ok(Self::from_tokenizer_config(&cfg))
    }

    /// A built-in template: `chatml`, `llama3` or `vicuna`.
    pub fn builtin(name: &str, bos: &str, eos: &str) -> Result<Self> {
        let source = match name {
            "chatml" => CHATML,
            "llama3" => LLAMA3,
            "vicuna" => VICUNA,
            n => {
                return Err(Error::Config(format!(
                    "chat template `{n}` is not one of chatml, llama3, vicuna"
                )))
            }
        };
        Ok(Self {
            source: source.into(),
            bos_token: bos.into(),
            eos_token: eos.into(),
        })
    }

    /// Renders `messages` (objects with `role` and `content`, plus anything a template reads),
    /// optionally ending with the assistant's generation prompt.
    pub fn render(&self, messages: &[Json], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| Error::Msg(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date"; a fixed date keeps renders reproducible.
            fmt.replace("%d", "01")
                .replace("%B", "January")
                .replace("%b", "Jan")
                .replace("%m", "01")
                .replace("%Y", "2026")
        });
        env.add_template_owned("chat", self.source.clone())
            .map_err(|e| Error::Config(format!("chat template does not parse: {e:#}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Config(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        tmpl.render(ctx)
            .map_err(|e| Error::Msg(format!("chat template: {e:#}")))
    }
}

/// A message as JSON.
pub fn message(role: &str, content: &str) -> Json {
    serde_json::json!({"role": role, "content": content})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Vec<Json> {
        vec![
            message("system", "Be brief."),
            message("user", "2+2?"),
            message("assistant", "4"),
        ]
    }

    #[test]
    fn builtins_render_as_documented() {
        let t = ChatTemplate::builtin("chatml", "", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&conv()[1..2], true).unwrap(),
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        let t = ChatTemplate::builtin("llama3", "<|begin_of_text|>", "<|eot_id|>").unwrap();
        assert_eq!(
            t.render(&conv()[1..3], false).unwrap(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        );
        let t = ChatTemplate::builtin("vicuna", "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&conv(), true).unwrap(),
            "Be brief. USER: 2+2? ASSISTANT: 4</s> ASSISTANT:"
        );
        assert!(t.render(&[message("tool", "x")], false).is_err());
    }

    #[test]
    fn hf_style_templates_with_python_methods_loops_and_exceptions() {
        // In the manner of Mistral's and Qwen's templates: alternation check, loop variables,
        // Python string methods, tojson, whitespace control with trim/lstrip blocks.
        let src = r#"{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'].strip() + ' [/INST]' }}
    {% else %}
        {{- message['content'] | trim + eos_token }}
    {% endif %}
{% endfor %}
{% if tools is defined %}{{ tools | tojson }}{% endif %}"#;
        let cfg = serde_json::json!({"chat_template": src, "bos_token": "<s>",
            "eos_token": {"content": "</s>", "lstrip": false}});
        let t = ChatTemplate::from_tokenizer_config(&cfg).unwrap();
        let out = t
            .render(
                &[message("user", "  hi "), message("assistant", "hello ")],
                false,
            )
            .unwrap();
        // Jinja2's rendering (transformers' ImmutableSandboxedEnvironment(trim_blocks=True,
        // lstrip_blocks=True) gives exactly this): block lines vanish, `{{-` eats the indentation,
        // newlines after expressions stay.
        assert_eq!(out, "<s>\n[INST] hi [/INST]\nhello</s>\n");
        let e = t
            .render(&[message("assistant", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must alternate"), "{e}");
        // A list of named templates: `default` is used.
        let cfg = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D{{ messages | length }}"}]});
        let t = ChatTemplate::from_tokenizer_config(&cfg).unwrap();
        assert_eq!(t.render(&conv(), false).unwrap(), "D3");
        assert!(ChatTemplate::from_tokenizer_config(&serde_json::json!({})).is_none());
    }
}
