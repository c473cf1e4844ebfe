//! Where MLX runs: the CPU or the GPU (Metal on macOS, CUDA on Linux).

use std::{fmt, str::FromStr};

use crate::BackendError;

/// The device that runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// MLX's CPU backend.
    Cpu,
    /// MLX's GPU backend: Metal on Apple silicon, CUDA with the CUDA wheel.
    Gpu,
}

impl Device {
    /// Whether this MLX build sees at least one GPU.
    pub fn gpu_available() -> bool {
        let mut count: std::os::raw::c_int = 0;
        // SAFETY: `mlx_device_count` only writes the count through the
        // pointer, which points at a live local; it reports failure through
        // its return value, which is checked.
        let status =
            unsafe { mlx_sys::mlx_device_count(&mut count, mlx_sys::mlx_device_type__MLX_GPU) };
        status == 0 && count > 0
    }

    /// The GPU when MLX reports one, else the CPU.
    pub fn best_available() -> Self {
        if Self::gpu_available() {
            Self::Gpu
        } else {
            Self::Cpu
        }
    }

    /// Returns `self` when MLX can run on it here, so that a configured
    /// `gpu` on a machine without one fails at start-up, not at the first
    /// request.
    pub fn ensure_available(self) -> Result<Self, BackendError> {
        match self {
            Self::Cpu => Ok(self),
            Self::Gpu if Self::gpu_available() => Ok(self),
            Self::Gpu => Err(BackendError::DeviceUnavailable(self)),
        }
    }

    /// The matching `mlx-rs` device.
    pub fn to_mlx(self) -> mlx_rs::Device {
        match self {
            Self::Cpu => mlx_rs::Device::cpu(),
            Self::Gpu => mlx_rs::Device::gpu(),
        }
    }

    /// The name that [`FromStr`] accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Gpu => "gpu",
        }
    }
}

/// The best available device; see [`Device::best_available`].
impl Default for Device {
    fn default() -> Self {
        Self::best_available()
    }
}

impl FromStr for Device {
    type Err = BackendError;

    /// Parses `cpu` or `gpu`, ignoring case and surrounding blanks.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "gpu" => Ok(Self::Gpu),
            _ => Err(BackendError::UnknownDevice(text.to_owned())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for device in [Device::Cpu, Device::Gpu] {
            assert_eq!(device.to_string().parse::<Device>().unwrap(), device);
        }
        assert_eq!(" GPU ".parse::<Device>().unwrap(), Device::Gpu);
        assert_eq!("Cpu".parse::<Device>().unwrap(), Device::Cpu);
    }

    #[test]
    fn unknown_names_are_rejected_with_the_name() {
        let err = "tpu".parse::<Device>().unwrap_err();
        assert!(matches!(&err, BackendError::UnknownDevice(name) if name == "tpu"));
        assert!(err.to_string().contains("\"cpu\" or \"gpu\""));
    }

    #[test]
    fn the_default_follows_what_mlx_reports() {
        let expected = if Device::gpu_available() {
            Device::Gpu
        } else {
            Device::Cpu
        };
        assert_eq!(Device::default(), expected);
        assert_eq!(Device::Cpu.ensure_available().unwrap(), Device::Cpu);
        assert_eq!(
            Device::Gpu.ensure_available().is_ok(),
            Device::gpu_available()
        );
    }
}
