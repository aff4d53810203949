//! How a model is loaded: at which width its weights are held ([`WeightWidth`]), the memory check
//! that comes before any large allocation, and loading progress ([`LoadOptions`]).
//!
//! The arithmetic is f32 at every width: bf16 and f16 weights widen exactly to f32, so a model held at
//! its stored width computes the same bits as the same model decoded to f32 (tested). The width only
//! decides how much memory the weights take and how many bytes each matrix product reads.
//!
//! This module never allocates in proportion to a checkpoint: it reads sizes from validated headers
//! and the operating system's memory figures.

use crate::{ModelError, Result};

/// At what width the projection weights and the LM head are held in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightWidth {
    /// Decoded to f32 once at load: 4 bytes per parameter.
    F32,
    /// As stored: bf16 and f16 stay 2 bytes per parameter and are widened to f32 panel by panel inside
    /// each matrix product; f32 stays f32 (f64 is rounded to f32).
    Stored,
    /// [`WeightWidth::F32`] when f32 weights take at most half the available memory, else
    /// [`WeightWidth::Stored`] (the model's [`WeightsInfo`] says which was chosen and why).
    #[default]
    Auto,
}

impl WeightWidth {
    pub fn as_str(self) -> &'static str {
        match self {
            WeightWidth::F32 => "f32",
            WeightWidth::Stored => "stored",
            WeightWidth::Auto => "auto",
        }
    }
}

impl std::str::FromStr for WeightWidth {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(WeightWidth::F32),
            "stored" => Ok(WeightWidth::Stored),
            "auto" => Ok(WeightWidth::Auto),
            _ => Err(format!("`{s}` is not a weight width (f32, stored or auto)")),
        }
    }
}

impl std::fmt::Display for WeightWidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Options of [`crate::Model::open_with`] and [`crate::Model::load_with`]. `LoadOptions::default()` is
/// what [`crate::Model::open`] uses: [`WeightWidth::Auto`], the memory the system reports, no progress.
#[derive(Default)]
pub struct LoadOptions<'a> {
    pub weights: WeightWidth,
    /// Bytes of memory the model may use; `None`: what the operating system reports as available
    /// (Linux: `MemAvailable`, lowered by a cgroup memory limit). Where nothing is known, no check is
    /// made and `Auto` holds weights at their stored width.
    pub available_memory: Option<u64>,
    /// Called as weights are converted, with `(bytes read so far, bytes to read)` of the checkpoint's
    /// tensors (the last call has both equal).
    pub progress: Option<&'a mut dyn FnMut(u64, u64)>,
}

/// Memory kept free beyond the weights themselves for activations, caches and the allocator.
pub const WORKING_MARGIN: u64 = 512 << 20;

/// What a loaded model holds, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightsInfo {
    /// The width asked for.
    pub requested: WeightWidth,
    /// The width used: [`WeightWidth::F32`] or [`WeightWidth::Stored`].
    pub width: WeightWidth,
    /// The dtypes the matrices are held in (e.g. `["bf16"]`; `["f32"]` at f32 width).
    pub dtypes: Vec<&'static str>,
    /// Bytes of weights held in memory at the chosen width (the token embedding is read from the
    /// checkpoint's memory map and not counted, unless it is also the LM head).
    pub bytes: u64,
    /// What the weights would take at f32 and at stored width.
    pub f32_bytes: u64,
    pub stored_bytes: u64,
    /// The memory available when the model was loaded, if known.
    pub available: Option<u64>,
}

impl WeightsInfo {
    /// One line for humans, e.g. `bf16 (stored width), 16.1 GB; auto: f32 would need 32.6 GB of 22.3 GB
    /// available`.
    pub fn describe(&self) -> String {
        let gb = |b: u64| format!("{:.1} GB", b as f64 / 1e9);
        let what = match self.width {
            WeightWidth::F32 => "f32".to_string(),
            _ => format!("{} (stored width)", self.dtypes.join("+")),
        };
        let mut s = format!("{what}, {}", gb(self.bytes));
        if self.requested == WeightWidth::Auto {
            match (self.width, self.available) {
                (WeightWidth::F32, Some(a)) => {
                    s += &format!("; auto: f32 fits in half of the {} available", gb(a));
                }
                (_, Some(a)) if self.f32_bytes != self.stored_bytes => {
                    let f32_need = self.f32_bytes + WORKING_MARGIN;
                    s += &format!("; auto: f32 would need {} of {} available", gb(f32_need), gb(a));
                }
                (_, None) => s += "; auto: available memory unknown, stored width",
                _ => {}
            }
        }
        s
    }
}

/// Chooses the width (resolving `Auto`) and checks that the weights fit: `f32_bytes`/`stored_bytes` are
/// what each width holds, `available` the memory there is.
pub(crate) fn choose(
    requested: WeightWidth,
    f32_bytes: u64,
    stored_bytes: u64,
    available: Option<u64>,
) -> Result<WeightWidth> {
    let width = match (requested, available) {
        (WeightWidth::Auto, Some(a)) if f32_bytes.saturating_add(WORKING_MARGIN) <= a / 2 => WeightWidth::F32,
        (WeightWidth::Auto, _) => WeightWidth::Stored,
        (w, _) => w,
    };
    let need = if width == WeightWidth::F32 { f32_bytes } else { stored_bytes }.saturating_add(WORKING_MARGIN);
    if let Some(available) = available
        && need > available
    {
        return Err(ModelError::Memory {
            what: format!("the model's weights at {width} width"),
            need,
            available,
            hint: if width == WeightWidth::F32 && stored_bytes < f32_bytes {
                format!(
                    "; at stored width (`--weights stored`) they need {:.1} GB",
                    (stored_bytes + WORKING_MARGIN) as f64 / 1e9
                )
            } else {
                String::new()
            },
        });
    }
    Ok(width)
}

/// The memory this process can still use, in bytes: Linux's `MemAvailable`, lowered by the cgroup
/// memory limit (v2 or v1) where one is set. `None` elsewhere.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut available = meminfo_kib(&meminfo, "MemAvailable:")? * 1024;
    if let Some(room) = cgroup_room() {
        available = available.min(room);
    }
    Some(available)
}

/// A `Key:   123 kB` line of /proc/meminfo, in KiB.
fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

/// The cgroup limit minus what the cgroup uses (page cache that could be dropped not counted).
fn cgroup_room() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
    // v2, then v1 (whose "no limit" is a huge number).
    let (limit, usage, stat, inactive_key) = if let Some(l) = read("/sys/fs/cgroup/memory.max") {
        (
            num(Some(l))?,
            num(read("/sys/fs/cgroup/memory.current"))?,
            read("/sys/fs/cgroup/memory.stat"),
            "inactive_file",
        )
    } else {
        let l = num(read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))?;
        let u = num(read("/sys/fs/cgroup/memory/memory.usage_in_bytes"))?;
        (l, u, read("/sys/fs/cgroup/memory/memory.stat"), "total_inactive_file")
    };
    if limit >= 1 << 60 {
        return None;
    }
    let inactive = stat
        .as_deref()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(inactive_key)?.trim().parse::<u64>().ok()))
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(inactive)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;

    #[test]
    fn auto_takes_f32_only_when_it_fits_in_half_the_memory() {
        assert_eq!(choose(WeightWidth::Auto, GB, GB / 2, Some(8 * GB)).unwrap(), WeightWidth::F32);
        assert_eq!(choose(WeightWidth::Auto, 32 * GB, 16 * GB, Some(22 * GB)).unwrap(), WeightWidth::Stored);
        assert_eq!(choose(WeightWidth::Auto, GB, GB / 2, None).unwrap(), WeightWidth::Stored);
        assert_eq!(choose(WeightWidth::F32, 32 * GB, 16 * GB, None).unwrap(), WeightWidth::F32);
    }

    #[test]
    fn a_model_that_does_not_fit_is_refused_with_both_figures() {
        let e = choose(WeightWidth::F32, 32 * GB, 16 * GB, Some(22 * GB)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the model's weights at f32 width need 32.5 GB of memory, but 22.0 GB are available; \
             at stored width (`--weights stored`) they need 16.5 GB"
        );
        let e = choose(WeightWidth::Auto, 32 * GB, 30 * GB, Some(22 * GB)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the model's weights at stored width need 30.5 GB of memory, but 22.0 GB are available"
        );
    }

    #[test]
    fn the_choice_is_described() {
        let info = |requested, width, available| WeightsInfo {
            requested,
            width,
            dtypes: vec![if width == WeightWidth::F32 { "f32" } else { "bf16" }],
            bytes: if width == WeightWidth::F32 { 32 * GB } else { 16 * GB },
            f32_bytes: 32 * GB,
            stored_bytes: 16 * GB,
            available,
        };
        use WeightWidth::*;
        assert_eq!(
            info(Auto, Stored, Some(22 * GB)).describe(),
            "bf16 (stored width), 16.0 GB; auto: f32 would need 32.5 GB of 22.0 GB available"
        );
        assert_eq!(
            info(Auto, F32, Some(80 * GB)).describe(),
            "f32, 32.0 GB; auto: f32 fits in half of the 80.0 GB available"
        );
        assert_eq!(
            info(Auto, Stored, None).describe(),
            "bf16 (stored width), 16.0 GB; auto: available memory unknown, stored width"
        );
        assert_eq!(info(F32, F32, None).describe(), "f32, 32.0 GB");
    }

    #[test]
    fn meminfo_lines_parse() {
        let m = "MemTotal:       24683772 kB\nMemAvailable:   21416976 kB\n";
        assert_eq!(meminfo_kib(m, "MemAvailable:"), Some(21_416_976));
        assert_eq!(meminfo_kib(m, "SwapTotal:"), None);
    }

    #[test]
    fn widths_parse_and_print() {
        for w in [WeightWidth::F32, WeightWidth::Stored, WeightWidth::Auto] {
            assert_eq!(w.to_string().parse::<WeightWidth>(), Ok(w));
        }
        assert_eq!("bf16".parse::<WeightWidth>().unwrap_err(), "`bf16` is not a weight width (f32, stored or auto)");
    }
}
