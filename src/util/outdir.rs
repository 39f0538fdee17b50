//! Output folders that two runs cannot share and that are never seen half-written.
//!
//! - [`DirLock`]: a lock file (`.postforge.lock`, holding the owner's pid) per output folder. A
//!   second run into the same folder is refused with the owner's pid; the lock of a run that died
//!   (its pid no longer exists) is taken over.
//! - [`swap_dir_in`]: a folder written under a temporary name replaces the old one with no moment
//!   at which only part of either is visible: the old folder is renamed aside, the new one renamed
//!   in, then the old one deleted.
//! - [`clean_stale`]: what killed runs left behind (temporary files and folders) is removed when the
//!   next run takes the lock; a folder that was renamed aside but never replaced is put back.

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The lock file's name inside an output folder.
pub const LOCK_FILE: &str = ".postforge.lock";

/// Holds the lock of an output folder until dropped.
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    /// False for a nested acquire by the process that already holds the lock (dropping it then
    /// leaves the outer lock in place).
    owned: bool,
}

/// Whether process `pid` is alive (Linux: `/proc/<pid>`; elsewhere assumed alive, so a stale lock
/// is reported rather than taken over).
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc_root = Path::new("/proc");
    if proc_root.join("self").exists() {
        proc_root.join(pid.to_string()).exists()
    } else {
        true
    }
}

impl DirLock {
    /// Takes the lock of `dir` (created if missing) for this process, then cleans what dead runs
    /// left there. Refused, naming the other run's pid, while another live process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::Config(format!(
                "the output folder {} is a file; choose a folder",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        for _ in 0..3 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
                    let lock = Self { path, owned: true };
                    clean_stale(dir)?;
                    return Ok(lock);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    match text.trim().parse::<u32>() {
                        Ok(pid) if pid == std::process::id() => {
                            return Ok(Self { path, owned: false })
                        }
                        Ok(pid) if alive(pid) => {
                            return Err(Error::Config(format!(
                                "{} is in use by another postforge run (pid {pid}, lock file {}); \
                                 wait for it to finish or choose another output folder",
                                dir.display(),
                                path.display()
                            )))
                        }
                        // A dead owner (or a lock file cut short while it was written): take over.
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::Config(format!(
            "{}: could not take the lock file {} (another run keeps recreating it)",
            dir.display(),
            path.display()
        )))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Replaces `dest` with the folder `tmp` (same parent): `dest` is renamed aside to `.<name>.old`,
/// `tmp` renamed to `dest`, then the old folder deleted. At every moment one complete folder is
/// at `dest` or aside, and [`clean_stale`] puts an aside folder back if a kill left `dest` empty.
pub fn swap_dir_in(tmp: &Path, dest: &Path) -> Result<()> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Msg(format!("{}: not a folder name", dest.display())))?;
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let old = parent.join(format!(".{name}.old"));
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
    }
    std::fs::rename(tmp, dest).map_err(|e| Error::io(dest, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// Cleans the leftovers of killed runs in `dir` (call only while holding its [`DirLock`]):
/// `.<name>.old` folders whose `<name>` is missing are renamed back (the swap was cut between its
/// two renames); other `.old` folders, `.<name>.tmp` folders and `.<file>.tmp<pid>` files are
/// deleted. Returns what was removed or restored.
pub fn clean_stale(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut done = vec![];
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(done);
    };
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.starts_with('.') || name == LOCK_FILE {
            continue;
        }
        let body = &name[1..];
        if let Some(orig) = body.strip_suffix(".old").filter(|_| p.is_dir()) {
            let dest = dir.join(orig);
            if dest.exists() {
                remove(&p)?;
            } else {
                std::fs::rename(&p, &dest).map_err(|e| Error::io(&p, e))?;
                eprintln!(
                    "warning: {} was restored from {} (a run was killed while replacing it)",
                    dest.display(),
                    p.display()
                );
            }
            done.push(p);
        } else if body.ends_with(".tmp")
            || body
                .rsplit_once(".tmp")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        {
            remove(&p)?;
            done.push(p);
        }
    }
    Ok(done)
}

fn remove(p: &Path) -> Result<()> {
    if p.is_dir() {
        std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))
    } else {
        std::fs::remove_file(p).map_err(|e| Error::io(p, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_owner_and_a_dead_owner_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let lock = DirLock::acquire(d.path()).unwrap();
        // The same process may take it again (a pipeline stage, then its trainer).
        drop(DirLock::acquire(d.path()).unwrap());
        assert!(d.path().join(LOCK_FILE).exists());
        // Another live process holds it: refused with its pid.
        let me = std::fs::read_to_string(d.path().join(LOCK_FILE)).unwrap();
        std::fs::write(d.path().join(LOCK_FILE), "1\n").unwrap();
        let e = DirLock::acquire(d.path()).unwrap_err().to_string();
        assert!(e.contains("pid 1,") && e.contains("in use"), "{e}");
        std::fs::write(d.path().join(LOCK_FILE), me).unwrap();
        drop(lock);
        assert!(!d.path().join(LOCK_FILE).exists());
        // pid 0 never names a user process: a dead owner's lock.
        std::fs::write(d.path().join(LOCK_FILE), "4294967294\n").unwrap();
        let _again = DirLock::acquire(d.path()).unwrap();
    }

    #[test]
    fn swaps_replace_whole_folders_and_cleaning_restores_a_cut_swap() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("adapter");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("a"), "old").unwrap();
        let tmp = d.path().join(".adapter.tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("a"), "new").unwrap();
        swap_dir_in(&tmp, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("a")).unwrap(), "new");
        assert!(!tmp.exists() && !d.path().join(".adapter.old").exists());
        // A kill between the two renames: the old folder is aside and `adapter` is missing.
        std::fs::rename(&dest, d.path().join(".adapter.old")).unwrap();
        std::fs::create_dir_all(d.path().join(".checkpoint-4.tmp")).unwrap();
        std::fs::write(d.path().join(".metrics.jsonl.tmp123"), "x").unwrap();
        std::fs::write(d.path().join(".hidden"), "keep").unwrap();
        let done = clean_stale(d.path()).unwrap();
        assert_eq!(done.len(), 3, "{done:?}");
        assert_eq!(std::fs::read_to_string(dest.join("a")).unwrap(), "new");
        assert!(d.path().join(".hidden").exists());
        assert!(!d.path().join(".checkpoint-4.tmp").exists());
    }
}
