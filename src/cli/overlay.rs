//! The one config-file overlay: a command's settings are the TOML table of `--config-file` (the
//! same keys a pipeline stage takes), with every flag given on the command line laid over it.
//! Flags left at their defaults do not override the file; keys in neither take the library's
//! defaults when the table is deserialized.

use anyhow::Context;
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::Serialize;
use std::path::Path;

/// The merged settings as a JSON object, ready for `serde_json::from_value`. `flags` is the parsed
/// command (serialized with the library's key names; command-only flags are `#[serde(skip)]`),
/// `given` its matches. `fallback` fills keys that neither the file nor the command line set;
/// `required` keys must be set by one of them.
pub fn settings<T: Serialize>(
    config_file: Option<&Path>,
    flags: &T,
    given: &ArgMatches,
    fallback: &[(&str, serde_json::Value)],
    required: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut table = match config_file {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let t: toml::Table =
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
            // JSON has no NaN or infinity: they would turn into `null` (an error or, for an
            // optional key, silently the default), so they are refused here, by name.
            let bad = postforge::check::non_finite_in_toml(&t);
            if !bad.is_empty() {
                anyhow::bail!(
                    "{}: {} is out of range: every number must be finite",
                    p.display(),
                    bad.join(", ")
                );
            }
            serde_json::to_value(t)?
        }
        None => serde_json::json!({}),
    };
    let obj = table
        .as_object_mut()
        .context("the config file must be a table")?;
    let parsed = serde_json::to_value(flags)?;
    let parsed = parsed.as_object().context("flags serialize to a table")?;
    for id in given.ids() {
        let id = id.as_str();
        if given.value_source(id) == Some(ValueSource::CommandLine) {
            if let Some(v) = parsed.get(id) {
                // A non-finite flag value serializes to `null`; the flags' parsers refuse them,
                // and this keeps one from ever reaching the settings as "unset".
                let null =
                    v.is_null() || v.as_array().is_some_and(|a| a.iter().any(|x| x.is_null()));
                if null {
                    anyhow::bail!("--{}: every number must be finite", id.replace('_', "-"));
                }
                obj.insert(id.to_string(), v.clone());
            }
        }
    }
    for (k, v) in fallback {
        if !obj.contains_key(*k) {
            obj.insert(k.to_string(), v.clone());
        }
    }
    for k in required {
        if !obj.contains_key(*k) {
            anyhow::bail!(
                "--{} is required (on the command line or as `{k}` in --config-file)",
                k.replace('_', "-")
            );
        }
    }
    Ok(table)
}

/// What a config-file key was called when deserializing failed: the error, with the file named.
pub fn context(config_file: Option<&Path>, what: &str) -> String {
    match config_file {
        Some(p) => format!("invalid {what} (command line and {})", p.display()),
        None => format!("invalid {what}"),
    }
}

/// Deserializes the merged settings; a value of the wrong type is reported with its key (serde
/// names none for flattened keys such as the adapter flags).
pub fn deserialize<T: serde::de::DeserializeOwned>(
    v: serde_json::Value,
    config_file: Option<&Path>,
    what: &str,
) -> anyhow::Result<T> {
    serde_json::from_value::<T>(v.clone()).map_err(|e| {
        let msg = match v.as_object() {
            Some(obj) => postforge::check::with_blamed_key::<T>(obj, &e.to_string()),
            None => e.to_string(),
        };
        anyhow::anyhow!("{}: {msg}", context(config_file, what))
    })
}
