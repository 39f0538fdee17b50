//! The house has no upward arrows: every `crate::<room>` reference in `src/` points to a room on a
//! lower tier (or its own room), with the tiers of the architecture review:
//! cli → recipe → {diffusion, text} → {models, align, data} → {peft, train} → nn → leaves
//! (media, util, rng, error, check). The alignment core knows no model family or data reader, and the
//! per-modality recipe rooms do not use each other. (`scripts/check_layers.py` also checks
//! file-level cycles through re-exports.)

use std::path::{Path, PathBuf};

fn tier(room: &str) -> Option<u8> {
    Some(match room {
        "cli" | "main" => 6,
        "recipe" => 5,
        "diffusion" | "text" => 4,
        "models" | "align" | "data" => 3,
        "peft" | "train" => 2,
        "nn" => 1,
        "media" | "util" | "rng" | "error" | "check" => 0,
        _ => return None,
    })
}

const FORBIDDEN: [(&str, &str); 4] = [
    ("align", "models"),
    ("align", "data"),
    ("diffusion", "text"),
    ("text", "diffusion"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn imports_point_down_the_tiers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut bad = vec![];
    let mut arrows = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let room = first.trim_end_matches(".rs").to_string();
        if room == "lib" {
            continue;
        }
        let from =
            tier(&room).unwrap_or_else(|| panic!("{}: room `{room}` has no tier", rel.display()));
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + 7..];
                let target: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let Some(to) = tier(&target) else { continue };
                arrows += 1;
                let forbidden = FORBIDDEN.contains(&(room.as_str(), target.as_str()));
                if target != room && (to > from || forbidden) {
                    bad.push(format!("{}:{}: {room} → {target}", rel.display(), n + 1));
                }
            }
        }
    }
    assert!(
        arrows > 100,
        "only {arrows} crate:: references found: the scan is broken"
    );
    assert!(
        bad.is_empty(),
        "imports pointing up or sideways:\n{}",
        bad.join("\n")
    );
}
