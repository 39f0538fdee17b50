//! The bad-input catalogue (issue 16, item 6): every case in `catalogue.toml` runs the `postforge`
//! binary on one kind of bad input (a value out of range, a damaged adapter file, a corrupted file,
//! a substitution that is now refused, an unusable output folder, a resource guard, a missing
//! file) and asserts a non-zero exit (not a signal), no panic, and an error on stderr that holds
//! every `expect` substring (the file, key or flag named).
//!
//! Each case gets a fresh folder `{dir}` (the working directory of the run); `{repo}` is the
//! crate root. Before the run, a case's setup writes its bad input there: a named fixture
//! (`setup`), copies of committed files (`copy`, optionally cut short, patched or edited as
//! text), deletions (`remove`), text files (`files`), safetensors files written from a tensor list
//! (`tensors`) or from a raw header (`header`), tensor edits of a copied file (`edit`), PNGs
//! (`image`) and earlier runs of the binary that must succeed (`before`).
//!
//! A case marked `pending = "..."` records a known bug: it is run and reported, and the test
//! fails once it passes (remove the marker then).
//!
//! `BAD_INPUTS_FILTER=substring` runs only the cases whose name contains it;
//! `BAD_INPUTS_JOBS=n` sets how many cases run at once.

use candle_core::DType;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The kinds of bad input, each covered by at least one case.
const KINDS: [&str; 7] = [
    "range",
    "shape",
    "corrupt",
    "substitution",
    "output",
    "resource",
    "missing",
];

/// The least number of cases the catalogue holds.
const MIN_CASES: usize = 60;

/// A case that has not finished after this long is killed and fails.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalogue {
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// Unique snake_case name.
    name: String,
    /// One of [`KINDS`].
    kind: String,
    /// The command line after `postforge`.
    args: Vec<String>,
    /// Substrings that must all appear in stderr.
    expect: Vec<String>,
    /// A known bug: the case is expected to fail until it is fixed.
    #[serde(default)]
    pending: Option<String>,
    /// A named fixture written by [`setup`].
    #[serde(default)]
    setup: Option<String>,
    #[serde(default)]
    copy: Vec<CopySpec>,
    #[serde(default)]
    remove: Vec<String>,
    /// Text files: path under `{dir}` → content.
    #[serde(default)]
    files: BTreeMap<String, String>,
    #[serde(default)]
    tensors: Vec<TensorFile>,
    #[serde(default)]
    header: Vec<RawHeader>,
    #[serde(default)]
    edit: Vec<Edit>,
    #[serde(default)]
    image: Vec<ImageSpec>,
    /// Runs of the binary (in `{dir}`) that must succeed before the case runs.
    #[serde(default)]
    before: Vec<Vec<String>>,
}

/// A copy of a file or folder; a file can be cut to its first `keep` bytes, lose its last `cut`
/// bytes, get `patch` written at byte `patch_at`, or have `replace` pairs substituted (each must
/// occur).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CopySpec {
    from: String,
    to: String,
    #[serde(default)]
    keep: Option<usize>,
    #[serde(default)]
    cut: Option<usize>,
    #[serde(default)]
    patch_at: Option<usize>,
    #[serde(default)]
    patch: Option<String>,
    #[serde(default)]
    replace: Vec<[String; 2]>,
}

/// A safetensors file written from a tensor list (keys get `prefix` in front).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorFile {
    to: String,
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    t: Vec<TensorSpec>,
}

/// One tensor: every element `fill` (default 0.01), the first one NaN or inf with `bad`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorSpec {
    key: String,
    shape: Vec<usize>,
    #[serde(default = "f32_name")]
    dtype: String,
    #[serde(default)]
    fill: Option<f64>,
    #[serde(default)]
    bad: Option<String>,
}

fn f32_name() -> String {
    "F32".into()
}

/// A safetensors file from a raw JSON header (8-byte length prefix added) and `data_bytes` zeros.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    to: String,
    json: String,
    #[serde(default)]
    data_bytes: usize,
}

/// An edit of one tensor of an existing safetensors file (read with the library).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Edit {
    file: String,
    key: String,
    /// "nan" or "inf": the first element.
    #[serde(default)]
    bad: Option<String>,
    /// A new dtype (values cast).
    #[serde(default)]
    dtype: Option<String>,
    /// A new shape (filled with 0.01).
    #[serde(default)]
    shape: Option<Vec<usize>>,
    /// Transpose a matrix.
    #[serde(default)]
    transpose: bool,
    /// Drop the tensor.
    #[serde(default)]
    remove: bool,
}

/// A gray PNG of the given size.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageSpec {
    to: String,
    width: u32,
    height: u32,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn catalogue() -> Catalogue {
    let path = repo().join("tests/bad_inputs/catalogue.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tensor held as its dtype name, shape and values (as f64).
struct Raw {
    dtype: String,
    shape: Vec<usize>,
    values: Vec<f64>,
}

fn dtype_name(d: DType) -> Result<&'static str, String> {
    Ok(match d {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::U8 => "U8",
        DType::U32 => "U32",
        d => {
            return Err(format!(
                "dtype {d:?} is not handled by the catalogue's writer"
            ))
        }
    })
}

fn encode(dtype: &str, values: &[f64]) -> Result<Vec<u8>, String> {
    let mut out = vec![];
    for &v in values {
        match dtype {
            "F32" => out.extend_from_slice(&(v as f32).to_le_bytes()),
            "F64" => out.extend_from_slice(&v.to_le_bytes()),
            "F16" => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            "BF16" => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            "I32" => out.extend_from_slice(&(v as i32).to_le_bytes()),
            "I64" => out.extend_from_slice(&(v as i64).to_le_bytes()),
            "U32" => out.extend_from_slice(&(v as u32).to_le_bytes()),
            "U8" => out.push(v as u8),
            d => return Err(format!("unknown dtype `{d}`")),
        }
    }
    Ok(out)
}

/// Writes a safetensors file (any dtype, unlike the library's writer, so that an integer factor
/// can be written).
fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Raw>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), String> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut data = vec![];
    for (k, t) in tensors {
        let n: usize = t.shape.iter().product();
        if n != t.values.len() {
            return Err(format!(
                "tensor `{k}`: {} values for shape {:?}",
                t.values.len(),
                t.shape
            ));
        }
        let bytes = encode(&t.dtype, &t.values)?;
        header.insert(
            k.clone(),
            serde_json::json!({
                "dtype": t.dtype,
                "shape": t.shape,
                "data_offsets": [data.len(), data.len() + bytes.len()],
            }),
        );
        data.extend(bytes);
    }
    let json = serde_json::Value::Object(header).to_string();
    write_raw(path, &json, &data)
}

fn write_raw(path: &Path, json: &str, data: &[u8]) -> Result<(), String> {
    let mut h = json.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend_from_slice(data);
    write_file(path, &bytes)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn poison(values: &mut [f64], bad: &str) -> Result<(), String> {
    let v = match bad {
        "nan" => f64::NAN,
        "inf" => f64::INFINITY,
        b => return Err(format!("bad = `{b}`: expected nan or inf")),
    };
    *values
        .first_mut()
        .ok_or("an empty tensor cannot be poisoned")? = v;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    if from.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
        for e in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
            let e = e.map_err(|e| e.to_string())?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else {
        let bytes = std::fs::read(from).map_err(|e| format!("{}: {e}", from.display()))?;
        write_file(to, &bytes)
    }
}

/// Named fixtures shared by several cases.
fn setup(name: &str, dir: &Path) -> Result<(), String> {
    let r = repo();
    match name {
        // A PEFT LoRA folder (with modules_to_save) for tests/fixtures/peft_net/base.safetensors.
        "peft_lora" => copy_tree(
            &r.join("tests/fixtures/peft_net/lora"),
            &dir.join("adapter"),
        ),
        // Two PEFT LoRA folders of one kind, for `combine`: x (good) and x2 (to be damaged).
        "combine_pair" => {
            copy_tree(&r.join("tests/fixtures/combine/x"), &dir.join("x"))?;
            copy_tree(&r.join("tests/fixtures/combine/x"), &dir.join("x2"))
        }
        // A kohya training folder `data/1_striped` with two captioned 32×32 images.
        "style_folder" => {
            let src = r.join("assets/data/styles/striped/10_striped");
            for f in ["0000.png", "0000.txt", "0001.png", "0001.txt"] {
                copy_tree(&src.join(f), &dir.join("data/1_striped").join(f))?;
            }
            Ok(())
        }
        n => Err(format!("unknown setup `{n}`")),
    }
}

/// Writes the case's bad input under `dir`.
fn prepare(case: &Case, dir: &Path, sub: &dyn Fn(&str) -> String) -> Result<(), String> {
    if let Some(s) = &case.setup {
        setup(s, dir)?;
    }
    for c in &case.copy {
        let (from, to) = (PathBuf::from(sub(&c.from)), PathBuf::from(sub(&c.to)));
        copy_tree(&from, &to)?;
        let edited =
            c.keep.is_some() || c.cut.is_some() || c.patch.is_some() || !c.replace.is_empty();
        if !edited {
            continue;
        }
        let mut bytes = std::fs::read(&to).map_err(|e| format!("{}: {e}", to.display()))?;
        if let Some(k) = c.keep {
            bytes.truncate(k);
        }
        if let Some(n) = c.cut {
            bytes.truncate(bytes.len().saturating_sub(n));
        }
        if let Some(p) = &c.patch {
            let at = c.patch_at.unwrap_or(0);
            let end = at + p.len();
            if end > bytes.len() {
                bytes.resize(end, 0);
            }
            bytes[at..end].copy_from_slice(p.as_bytes());
        }
        if !c.replace.is_empty() {
            let mut text =
                String::from_utf8(bytes).map_err(|e| format!("{}: {e}", to.display()))?;
            for [a, b] in &c.replace {
                if !text.contains(a.as_str()) {
                    return Err(format!("`{a}` does not occur in {}", to.display()));
                }
                text = text.replace(a.as_str(), &sub(b));
            }
            bytes = text.into_bytes();
        }
        write_file(&to, &bytes)?;
    }
    for r in &case.remove {
        let p = PathBuf::from(sub(r));
        let res = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        res.map_err(|e| format!("remove {}: {e}", p.display()))?;
    }
    for (rel, text) in &case.files {
        write_file(&dir.join(sub(rel)), sub(text).as_bytes())?;
    }
    for f in &case.tensors {
        let mut map = BTreeMap::new();
        for t in &f.t {
            let n: usize = t.shape.iter().product();
            let mut values = vec![t.fill.unwrap_or(0.01); n];
            if let Some(b) = &t.bad {
                poison(&mut values, b)?;
            }
            let raw = Raw {
                dtype: t.dtype.clone(),
                shape: t.shape.clone(),
                values,
            };
            if map.insert(format!("{}{}", f.prefix, t.key), raw).is_some() {
                return Err(format!("tensor `{}{}` given twice", f.prefix, t.key));
            }
        }
        write_safetensors(&PathBuf::from(sub(&f.to)), &map, &f.metadata)?;
    }
    for h in &case.header {
        write_raw(
            &PathBuf::from(sub(&h.to)),
            &h.json,
            &vec![0u8; h.data_bytes],
        )?;
    }
    for e in &case.edit {
        let path = PathBuf::from(sub(&e.file));
        let st = postforge::util::SafeTensors::read(&path).map_err(|e| e.to_string())?;
        let metadata: BTreeMap<String, String> = st
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut map = BTreeMap::new();
        for (k, t) in st.into_tensors() {
            let raw = Raw {
                dtype: dtype_name(t.dtype())?.to_string(),
                shape: t.dims().to_vec(),
                values: t
                    .to_dtype(DType::F64)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f64>())
                    .map_err(|e| e.to_string())?,
            };
            map.insert(k, raw);
        }
        let t = map
            .get_mut(&e.key)
            .ok_or_else(|| format!("{}: no tensor `{}` to edit", path.display(), e.key))?;
        if let Some(b) = &e.bad {
            poison(&mut t.values, b)?;
        }
        if let Some(d) = &e.dtype {
            t.dtype = d.clone();
        }
        if let Some(s) = &e.shape {
            t.shape = s.clone();
            t.values = vec![0.01; s.iter().product()];
        }
        if e.transpose {
            let [r, c] = t.shape[..] else {
                return Err(format!("`{}` is not a matrix", e.key));
            };
            t.values = (0..r * c).map(|i| t.values[(i % r) * c + i / r]).collect();
            t.shape = vec![c, r];
        }
        if e.remove {
            map.remove(&e.key);
        }
        write_safetensors(&path, &map, &metadata)?;
    }
    for i in &case.image {
        let path = PathBuf::from(sub(&i.to));
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        let img = image::RgbImage::from_pixel(i.width, i.height, image::Rgb([128, 128, 128]));
        postforge::media::image::write_png(&path, &img).map_err(|e| e.to_string())?;
    }
    for args in &case.before {
        let args: Vec<String> = args.iter().map(|a| sub(a)).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_postforge"))
            .args(&args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "before: postforge {} failed:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// What one case did.
struct Outcome {
    name: String,
    pending: Option<String>,
    /// Empty when the case passed.
    problems: Vec<String>,
    secs: f64,
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}

fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.is_empty()
                || a.contains(|c: char| c.is_whitespace() || "|'\"$\\;&()<>*?".contains(c))
            {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_case(case: &Case) -> Outcome {
    let t0 = Instant::now();
    let mut problems = vec![];
    let root = tempfile::tempdir().expect("a temporary folder");
    let dir = root.path().join("d");
    std::fs::create_dir_all(&dir).expect("the case folder");
    let (dir_s, repo_s) = (
        dir.to_string_lossy().into_owned(),
        repo().to_string_lossy().into_owned(),
    );
    let sub = |s: &str| s.replace("{dir}", &dir_s).replace("{repo}", &repo_s);
    let args: Vec<String> = case.args.iter().map(|a| sub(a)).collect();
    let command = format!("postforge {}", shell_words(&args));
    let done = |problems: Vec<String>| Outcome {
        name: case.name.clone(),
        pending: case.pending.clone(),
        problems,
        secs: t0.elapsed().as_secs_f64(),
    };
    if let Err(e) = prepare(case, &dir, &sub) {
        return done(vec![format!("setup failed: {e}")]);
    }
    let (out_path, err_path) = (root.path().join("stdout"), root.path().join("stderr"));
    let files = (
        std::fs::File::create(&out_path),
        std::fs::File::create(&err_path),
    );
    let (Ok(out_f), Ok(err_f)) = files else {
        return done(vec!["cannot create the output files".into()]);
    };
    let mut child = match Command::new(env!("CARGO_BIN_EXE_postforge"))
        .args(&args)
        .current_dir(&dir)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(out_f)
        .stderr(err_f)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return done(vec![format!("{command}: cannot start: {e}")]),
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if t0.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                problems.push(format!("waiting failed: {e}"));
                break None;
            }
        }
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status.map(|s| (s.code(), s)) {
        None => problems.push(format!(
            "did not finish within {}s (killed)",
            TIMEOUT.as_secs()
        )),
        Some((Some(0), _)) => problems.push("exit code 0: the bad input was accepted".into()),
        Some((Some(_), _)) => {}
        Some((None, s)) => problems.push(format!("killed by a signal ({s})")),
    }
    if stderr.contains("panicked") {
        problems.push("panicked".into());
    }
    for e in &case.expect {
        let e = sub(e);
        if !stderr.contains(&e) {
            problems.push(format!("stderr lacks `{e}`"));
        }
    }
    if !problems.is_empty() {
        let code = status.map_or("none".to_string(), |s| format!("{s}"));
        problems.push(format!(
            "command: {command}\n    {code}\n    stderr: {}\n    stdout: {}",
            tail(stderr.trim(), 1500).replace('\n', "\n      "),
            tail(stdout.trim(), 300).replace('\n', "\n      ")
        ));
    }
    done(problems)
}

#[test]
fn every_bad_input_fails_with_a_named_error() {
    let cat = catalogue();
    let filter = std::env::var("BAD_INPUTS_FILTER").unwrap_or_default();
    let cases: Vec<&Case> = cat
        .case
        .iter()
        .filter(|c| c.name.contains(&filter))
        .collect();
    assert!(
        !cases.is_empty(),
        "no case matches BAD_INPUTS_FILTER={filter}"
    );
    let jobs = std::env::var("BAD_INPUTS_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(1, 4)
        })
        .max(1);
    let t0 = Instant::now();
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(vec![]);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(case) = cases.get(i) else { break };
                let o = run_case(case);
                outcomes.lock().unwrap().push((i, o));
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap();
    outcomes.sort_by_key(|(i, _)| *i);
    let mut failures = vec![];
    let mut pending = vec![];
    for (_, o) in &outcomes {
        match (&o.pending, o.problems.is_empty()) {
            (None, true) => {}
            (None, false) => failures.push(format!("{}:\n  {}", o.name, o.problems.join("\n  "))),
            (Some(_), true) => failures.push(format!(
                "{}: passes now: remove its `pending` line from the catalogue",
                o.name
            )),
            (Some(why), false) => pending.push(format!(
                "{} (pending: {why}):\n  {}",
                o.name,
                o.problems.join("\n  ")
            )),
        }
    }
    let mut slow: Vec<&Outcome> = outcomes.iter().map(|(_, o)| o).collect();
    slow.sort_by(|a, b| b.secs.total_cmp(&a.secs));
    eprintln!(
        "{} cases in {:.1}s with {jobs} jobs; slowest: {}",
        outcomes.len(),
        t0.elapsed().as_secs_f64(),
        slow.iter()
            .take(3)
            .map(|o| format!("{} {:.2}s", o.name, o.secs))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !pending.is_empty() {
        eprintln!(
            "{} pending cases (known bugs) still fail:\n{}",
            pending.len(),
            pending.join("\n")
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        outcomes.len(),
        failures.join("\n")
    );
}

#[test]
fn catalogue_has_enough_unique_cases_of_every_kind() {
    let cat = catalogue();
    let active = cat.case.iter().filter(|c| c.pending.is_none()).count();
    assert!(
        active >= MIN_CASES,
        "{active} cases without a `pending` marker; the catalogue needs at least {MIN_CASES}"
    );
    let mut names = BTreeSet::new();
    for c in &cat.case {
        assert!(
            names.insert(c.name.as_str()),
            "case name `{}` is used twice",
            c.name
        );
        assert!(
            !c.name.is_empty()
                && c.name
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'),
            "case name `{}` is not snake_case",
            c.name
        );
        assert!(
            KINDS.contains(&c.kind.as_str()),
            "{}: kind `{}` is not one of {KINDS:?}",
            c.name,
            c.kind
        );
        assert!(!c.args.is_empty(), "{}: no args", c.name);
        assert!(
            c.expect.iter().any(|e| !e.trim().is_empty()),
            "{}: no expected substring",
            c.name
        );
        if let Some(p) = &c.pending {
            assert!(
                !p.trim().is_empty(),
                "{}: an empty `pending` reason",
                c.name
            );
        }
    }
    for k in KINDS {
        let n = cat.case.iter().filter(|c| c.kind == k).count();
        eprintln!("{k}: {n} cases");
        assert!(n > 0, "no case of kind `{k}`");
    }
}
