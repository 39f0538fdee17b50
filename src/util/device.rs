//! Where tensors live: the `--device cpu|cuda[:N]|metal[:N]|auto` option of every command and the
//! `device` key of every pipeline stage.
//!
//! The chosen device is the process's current device: model weights are loaded onto it
//! ([`crate::models::Weights`]), adapters live beside their base weight, and inputs, noise and
//! masks are made on it. A library user who wants two devices at once builds
//! `Weights::on(device)` explicitly; the current device is the default everything else follows.
//! Random draws are made on the CPU and moved, so a seed gives the same values on every device.

use crate::{Error, Result};
use candle_core::Device;
use std::sync::Mutex;

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// CUDA GPU `N` (0 when not given).
    Cuda(usize),
    /// Apple GPU `N`.
    Metal(usize),
    /// CUDA 0 when this build has CUDA and a GPU is present, else Metal, else the CPU.
    Auto,
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal(n) => write!(f, "metal:{n}"),
            DeviceSpec::Auto => write!(f, "auto"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("device `{s}`: expected cpu, cuda, cuda:N, metal, metal:N or auto");
        let t = s.trim().to_ascii_lowercase();
        let (name, index) = match t.split_once(':') {
            Some((n, i)) => (n.to_string(), Some(i.parse::<usize>().map_err(|_| bad())?)),
            None => (t.clone(), None),
        };
        match (name.as_str(), index) {
            ("cpu", None) => Ok(DeviceSpec::Cpu),
            ("auto", None) => Ok(DeviceSpec::Auto),
            ("cuda" | "gpu", i) => Ok(DeviceSpec::Cuda(i.unwrap_or(0))),
            ("metal" | "mps", i) => Ok(DeviceSpec::Metal(i.unwrap_or(0))),
            _ => Err(bad()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl DeviceSpec {
    /// The candle device, or an error that says what this build or machine lacks.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::Config(format!(
                        "--device cuda:{n}: this postforge was built without CUDA; rebuild with `cargo build --release --features cuda` (scripts/gpu/README.md)"
                    )));
                }
                Device::new_cuda(n).map_err(|e| {
                    Error::Config(format!(
                        "--device cuda:{n}: no usable CUDA device ({})",
                        first_line(&e)
                    ))
                })
            }
            DeviceSpec::Metal(n) => {
                if !cfg!(feature = "metal") {
                    return Err(Error::Config(format!(
                        "--device metal:{n}: this postforge was built without Metal; rebuild with `cargo build --release --features metal`"
                    )));
                }
                Device::new_metal(n).map_err(|e| {
                    Error::Config(format!(
                        "--device metal:{n}: no usable Metal device ({})",
                        first_line(&e)
                    ))
                })
            }
            DeviceSpec::Auto => {
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
                    if let Ok(d) = Device::new_metal(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// The first line of a candle error (its backtrace, when it has one, follows on later lines).
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

static CURRENT: Mutex<Option<Device>> = Mutex::new(None);
static DTYPE: Mutex<Option<candle_core::DType>> = Mutex::new(None);

/// A base-weight dtype as the user names it (`--dtype`, `torch_dtype`): f32, bf16 or f16.
pub fn parse_dtype(s: &str) -> std::result::Result<candle_core::DType, String> {
    use candle_core::DType;
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" | "float" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        _ => Err(format!("dtype `{s}`: expected f32, bf16 or f16")),
    }
}

/// The dtype base weights are loaded in (f32 until [`set_dtype`]): adapters and optimizer state
/// stay f32 whatever it is (mixed precision as PEFT runs it).
pub fn current_dtype() -> candle_core::DType {
    DTYPE
        .lock()
        .ok()
        .and_then(|d| *d)
        .unwrap_or(candle_core::DType::F32)
}

/// Sets the dtype base weights are loaded in.
pub fn set_dtype(d: candle_core::DType) {
    if let Ok(mut c) = DTYPE.lock() {
        *c = Some(d);
    }
}

/// A pipeline's `dtype` key (`f32`, `bf16`, `f16`), parsed where it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DTypeSpec(pub candle_core::DType);

impl<'de> serde::Deserialize<'de> for DTypeSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_dtype(&s)
            .map(DTypeSpec)
            .map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for DTypeSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(match self.0 {
            candle_core::DType::BF16 => "bf16",
            candle_core::DType::F16 => "f16",
            _ => "f32",
        })
    }
}

/// Makes `spec` (when given) the load dtype until the guard is dropped: a pipeline stage with
/// its own `dtype` key.
pub fn scoped_dtype(spec: Option<DTypeSpec>) -> DTypeGuard {
    let before = DTYPE.lock().ok().and_then(|d| *d);
    if let Some(DTypeSpec(d)) = spec {
        set_dtype(d);
    }
    DTypeGuard { before }
}

/// Restores the load dtype current before [`scoped_dtype`] when dropped.
pub struct DTypeGuard {
    before: Option<candle_core::DType>,
}

impl Drop for DTypeGuard {
    fn drop(&mut self) {
        if let Ok(mut c) = DTYPE.lock() {
            *c = self.before;
        }
    }
}

/// The current device (the CPU until [`set_current`] is called).
pub fn current() -> Device {
    CURRENT
        .lock()
        .ok()
        .and_then(|d| d.clone())
        .unwrap_or(Device::Cpu)
}

/// Makes `spec` the current device (resolving it first: an unavailable device is an error here,
/// before anything is loaded). Returns the device.
pub fn set_current(spec: DeviceSpec) -> Result<Device> {
    let d = spec.resolve()?;
    if let Ok(mut c) = CURRENT.lock() {
        *c = Some(d.clone());
    }
    if !d.is_cpu() {
        log::info!("device: {spec} ({:?})", d.location());
    }
    Ok(d)
}

/// Makes `spec` (when given) the current device until the guard is dropped: a pipeline stage
/// with its own `device` key.
pub fn scoped(spec: Option<DeviceSpec>) -> Result<DeviceGuard> {
    let before = CURRENT.lock().ok().and_then(|d| d.clone());
    if let Some(spec) = spec {
        set_current(spec)?;
    }
    Ok(DeviceGuard { before })
}

/// Restores the device current before [`scoped`] when dropped.
pub struct DeviceGuard {
    before: Option<Device>,
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        if let Ok(mut c) = CURRENT.lock() {
            *c = self.before.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_bad_ones_are_refused_with_the_choices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(
            "metal:1".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Metal(1)
        );
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        for bad in ["tpu", "cuda:x", "cpu:1", "", "cuda:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected cpu, cuda"), "{bad}: {e}");
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        // A pipeline key: parsed where it is read, with the choices named.
        #[derive(serde::Deserialize)]
        struct S {
            device: DeviceSpec,
        }
        let e = toml::from_str::<S>("device = \"gpu:x\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("expected cpu, cuda"), "{e}");
        assert_eq!(
            toml::from_str::<S>("device = \"cuda:1\"").unwrap().device,
            DeviceSpec::Cuda(1)
        );
    }

    #[test]
    fn dtype_keys_parse_and_bad_ones_name_the_choices() {
        #[derive(serde::Deserialize)]
        struct S {
            dtype: DTypeSpec,
        }
        let v = toml::from_str::<S>("dtype = \"bfloat16\"").unwrap();
        assert_eq!(v.dtype, DTypeSpec(candle_core::DType::BF16));
        let e = toml::from_str::<S>("dtype = \"int4\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("expected f32, bf16 or f16"), "{e}");
    }

    #[test]
    fn a_scoped_device_is_restored() {
        assert!(current().is_cpu());
        {
            let _g = scoped(Some(DeviceSpec::Cpu)).unwrap();
            assert!(current().is_cpu());
        }
        assert!(current().is_cpu());
        assert!(scoped(Some(DeviceSpec::Metal(0))).is_err() || cfg!(feature = "metal"));
    }

    #[test]
    fn auto_and_cpu_resolve_here_and_a_missing_backend_is_named() {
        assert!(DeviceSpec::Cpu.resolve().unwrap().is_cpu());
        // `auto` never fails: without a GPU it is the CPU.
        let _ = DeviceSpec::Auto.resolve().unwrap();
        if !cfg!(feature = "cuda") {
            let e = DeviceSpec::Cuda(0).resolve().unwrap_err().to_string();
            assert!(
                e.contains("built without CUDA") && e.contains("--features cuda"),
                "{e}"
            );
        }
        if !cfg!(feature = "metal") {
            let e = DeviceSpec::Metal(0).resolve().unwrap_err().to_string();
            assert!(e.contains("built without Metal"), "{e}");
        }
    }
}
