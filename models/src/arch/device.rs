//! Where a model runs: Realm's fused CPU pass, the whole graph on Burn's CPU
//! backend (`burn-flex`), or, with the `gpu` feature, on Burn's wgpu backend.

use std::fmt;
use std::str::FromStr;

use burn_tensor::Device;

/// The compute device a model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    /// The CPU, with Realm's fused pass: buffers reused from token to token,
    /// weight products on the quantized blocks, attention across all cores.
    #[default]
    Cpu,
    /// The graph as Burn tensor operations on Burn's `flex` CPU backend (weight
    /// products still on the quantized blocks). Slower at decode sizes, where
    /// each operation's dispatch outweighs its arithmetic; kept as the
    /// reference the fused pass is tested against.
    BurnCpu,
    /// Burn's wgpu backend (Vulkan, Metal, DX12, or Mesa's lavapipe without a
    /// GPU); weights stay quantized on the device, multiplied by Realm's
    /// CubeCL kernels.
    Gpu,
}

impl ComputeDevice {
    /// True if this build can run models on `self`.
    pub fn is_available(self) -> bool {
        match self {
            ComputeDevice::Cpu | ComputeDevice::BurnCpu => true,
            ComputeDevice::Gpu => cfg!(feature = "gpu"),
        }
    }

    /// The Burn device for `self`, or why there is none.
    pub(crate) fn burn_device(self) -> Result<Device, String> {
        match self {
            ComputeDevice::Cpu | ComputeDevice::BurnCpu => Ok(Device::flex()),
            #[cfg(feature = "gpu")]
            ComputeDevice::Gpu => Ok(Device::wgpu(burn_tensor::DeviceKind::DefaultDevice)),
            #[cfg(not(feature = "gpu"))]
            ComputeDevice::Gpu => Err(
                "this build has no GPU support; rebuild realm with `--features gpu`".to_string(),
            ),
        }
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ComputeDevice::Cpu => "cpu",
            ComputeDevice::BurnCpu => "burn-cpu",
            ComputeDevice::Gpu => "gpu",
        })
    }
}

impl FromStr for ComputeDevice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(ComputeDevice::Cpu),
            "burn-cpu" => Ok(ComputeDevice::BurnCpu),
            "gpu" => Ok(ComputeDevice::Gpu),
            other => Err(format!(
                "unknown device `{other}` (expected `cpu`, `burn-cpu` or `gpu`)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for d in [
            ComputeDevice::Cpu,
            ComputeDevice::BurnCpu,
            ComputeDevice::Gpu,
        ] {
            assert_eq!(d.to_string().parse::<ComputeDevice>(), Ok(d));
        }
        assert!("tpu".parse::<ComputeDevice>().unwrap_err().contains("tpu"));
    }

    #[test]
    fn gpu_is_available_only_with_the_feature() {
        assert_eq!(ComputeDevice::Gpu.is_available(), cfg!(feature = "gpu"));
        assert_eq!(
            ComputeDevice::Gpu.burn_device().is_ok(),
            cfg!(feature = "gpu")
        );
    }
}
