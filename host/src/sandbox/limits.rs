//! Per-call resource limits and the store limiter that enforces them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// The largest linear memory any guest may have; the pooling allocator
/// reserves slots of this size.
pub const MAX_GUEST_MEMORY: ByteSize = ByteSize(1 << 30);

/// Resource limits for one guest call. Every breach ends that call only, with
/// an error that names the limit and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wasm fuel (roughly, instructions) the call may consume.
    pub fuel: u64,
    /// Largest linear memory, per memory.
    pub memory: ByteSize,
    /// Wall-clock time for instantiation plus the call, host calls included.
    pub timeout: Duration,
    /// Largest table, in elements.
    pub table_elements: u32,
    /// Core instances, tables and memories the component may create.
    pub instances: u32,
    /// Largest result a guest may return.
    pub output: ByteSize,
    /// Guest stdout + stderr kept for the log; the rest is dropped.
    pub log: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 2_000_000_000,
            memory: ByteSize(64 << 20),
            timeout: Duration::from_secs(10),
            table_elements: 100_000,
            instances: 64,
            output: ByteSize(4 << 20),
            log: ByteSize(64 << 10),
        }
    }
}

/// Optional overrides of [`Limits`], as written in a pipeline or config file.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitOverrides {
    /// See [`Limits::fuel`].
    pub fuel: Option<u64>,
    /// See [`Limits::memory`].
    pub memory: Option<ByteSize>,
    /// See [`Limits::timeout`], e.g. `"5s"` or `"1500ms"`.
    #[serde(
        default,
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// See [`Limits::table_elements`].
    pub table_elements: Option<u32>,
    /// See [`Limits::instances`].
    pub instances: Option<u32>,
    /// See [`Limits::output`].
    pub output: Option<ByteSize>,
    /// See [`Limits::log`].
    pub log: Option<ByteSize>,
}

impl LimitOverrides {
    /// `base` with these overrides applied, or a message saying which value is out of range.
    pub fn apply(&self, base: &Limits) -> Result<Limits, String> {
        let limits = Limits {
            fuel: self.fuel.unwrap_or(base.fuel),
            memory: self.memory.unwrap_or(base.memory),
            timeout: self.timeout.unwrap_or(base.timeout),
            table_elements: self.table_elements.unwrap_or(base.table_elements),
            instances: self.instances.unwrap_or(base.instances),
            output: self.output.unwrap_or(base.output),
            log: self.log.unwrap_or(base.log),
        };
        limits.validate()?;
        Ok(limits)
    }
}

impl Limits {
    /// Checks that every limit is usable: non-zero and within what the engine can host.
    pub fn validate(&self) -> Result<(), String> {
        if self.fuel == 0 {
            return Err("fuel must be greater than 0".into());
        }
        if self.memory.0 == 0 || self.memory > MAX_GUEST_MEMORY {
            return Err(format!(
                "memory must be between 1 byte and {MAX_GUEST_MEMORY}, got {}",
                self.memory
            ));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(3600) {
            return Err(format!(
                "timeout must be between 1ms and 1h, got {}",
                humantime::format_duration(self.timeout)
            ));
        }
        if self.table_elements == 0 || self.table_elements > 1_000_000 {
            return Err(format!(
                "table-elements must be between 1 and 1000000, got {}",
                self.table_elements
            ));
        }
        if self.instances == 0 || self.instances > 1_000 {
            return Err(format!(
                "instances must be between 1 and 1000, got {}",
                self.instances
            ));
        }
        if self.output.0 == 0 {
            return Err("output must be greater than 0".into());
        }
        Ok(())
    }
}

/// A size in bytes, written as `65536`, `"64KiB"`, `"64MiB"`, `"1GiB"` or `"10MB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let digits_end = s
            .find(|c: char| !c.is_ascii_digit() && c != '_')
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(digits_end);
        let number: u64 = number.replace('_', "").parse().map_err(|_| {
            format!("`{s}` is not a size: expected e.g. 65536, \"64KiB\", \"64MiB\"")
        })?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{s}`: use B, KiB, MiB, GiB, KB, MB or GB"
                ));
            }
        };
        number
            .checked_mul(scale)
            .map(ByteSize)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (scale, unit) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
            if n >= scale && n.is_multiple_of(scale) {
                return write!(f, "{}{unit}", n / scale);
            }
        }
        write!(f, "{n}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)
            .map_err(|_| de::Error::custom("expected a size such as 67108864 or \"64MiB\""))?
        {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

fn serialize_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map(Some).map_err(|e| {
        de::Error::custom(format!(
            "`{text}` is not a duration ({e}): use e.g. \"5s\" or \"250ms\""
        ))
    })
}

/// Which limit a guest hit while growing memory or tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breach {
    /// A memory tried to grow to `requested` bytes.
    Memory { requested: u64 },
    /// A table tried to grow to `requested` elements.
    Table { requested: u64 },
}

/// The store's [`wasmtime::ResourceLimiter`]: refuses growth past the limits
/// and records the breach so the host can report which limit was hit.
#[derive(Debug)]
pub(crate) struct GuestLimiter {
    memory: u64,
    table_elements: u64,
    instances: usize,
    /// The first breach in this store, if any.
    pub(crate) breach: Option<Breach>,
}

impl GuestLimiter {
    pub(crate) fn new(limits: &Limits) -> Self {
        GuestLimiter {
            memory: limits.memory.0,
            table_elements: u64::from(limits.table_elements),
            instances: limits.instances as usize,
            breach: None,
        }
    }
}

impl wasmtime::ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory {
            self.breach.get_or_insert(Breach::Memory {
                requested: desired as u64,
            });
            return Err(wasmtime::format_err!("memory limit exceeded"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.table_elements {
            self.breach.get_or_insert(Breach::Table {
                requested: desired as u64,
            });
            return Err(wasmtime::format_err!("table limit exceeded"));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.instances
    }

    fn memories(&self) -> usize {
        self.instances
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!("64MiB".parse::<ByteSize>(), Ok(ByteSize(64 << 20)));
        assert_eq!("1_024".parse::<ByteSize>(), Ok(ByteSize(1024)));
        assert_eq!("10 MB".parse::<ByteSize>(), Ok(ByteSize(10_000_000)));
        assert!(
            "64 lots"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!(
            "99999999999999999GiB"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn overrides_are_validated() {
        let base = Limits::default();
        let over: LimitOverrides =
            toml::from_str("fuel = 5\nmemory = \"2MiB\"\ntimeout = \"250ms\"").unwrap();
        let limits = over.apply(&base).unwrap();
        assert_eq!(limits.fuel, 5);
        assert_eq!(limits.memory, ByteSize(2 << 20));
        assert_eq!(limits.timeout, Duration::from_millis(250));

        let too_big: LimitOverrides = toml::from_str("memory = \"4GiB\"").unwrap();
        assert!(too_big.apply(&base).unwrap_err().contains("memory must be"));
        let bad_time = toml::from_str::<LimitOverrides>("timeout = \"soon\"").unwrap_err();
        assert!(bad_time.to_string().contains("not a duration"));
        let unknown = toml::from_str::<LimitOverrides>("cpu = 1").unwrap_err();
        assert!(unknown.to_string().contains("unknown field"));
    }
}
