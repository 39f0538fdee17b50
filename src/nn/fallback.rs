//! Notes, once each, where a fused node is not taken and the composed path runs instead (another
//! device or dtype, an adapter method without a fused node, dropout while training): logged at debug
//! level, so that a slow run can say why (`RUST_LOG=postforge=debug postforge ...`).

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();

/// Logs `"{node}: composed path ({why})"` at debug level the first time this pair is seen; `f`
/// gives (node, why) and runs only when debug logging is on (the forward pays one check otherwise).
pub fn note(f: impl FnOnce() -> (String, String)) {
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    let (node, why) = f();
    let key = format!("{node}: composed path ({why})");
    let seen = SEEN.get_or_init(|| Mutex::new(HashSet::new()));
    if let Ok(mut s) = seen.lock() {
        if s.insert(key.clone()) {
            log::debug!("{key}");
        }
    }
}

/// Why a tensor cannot enter a CPU f32 node: its device or dtype, or `None` when it can.
pub fn cpu_f32_miss(t: &candle_core::Tensor) -> Option<String> {
    if !t.device().is_cpu() {
        Some(format!("device {:?}", t.device().location()))
    } else if t.dtype() != candle_core::DType::F32 {
        Some(format!("dtype {:?}", t.dtype()))
    } else {
        None
    }
}
