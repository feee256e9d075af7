//! Node-wide limits that the layers moving bytes await: the download rate of the whole node
//! (`max_download`), the rate of HuggingFace downloads (`max_hf_download`, the uplink), and
//! the hours HuggingFace may be used at all (`hf_hours = "18:00-07:00"`, local time).
//!
//! The swarm driver awaits [`Limits::download`] before each block request; the Hub client
//! awaits [`Limits::hf_take`] before each request and [`Limits::hf_rate`] for each chunk of a
//! streamed download, and counts what arrived with [`Limits::hf_got`]. Outside `hf_hours` an HF
//! download waits for the window to open (peers keep serving meanwhile) and says so in the
//! log and through [`Limits::notice`]. The provider awaits the upload limit (`max_upload`,
//! [`Limits::upload`]) before each batch it sends.

use std::{
    fmt,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::Serialize;
use tokio::time::Instant;

/// Up to this much of a rate may go out at once after a pause.
const BURST: Duration = Duration::from_millis(100);
/// A limit that made someone wait this recently is binding.
const BINDING_FOR: Duration = Duration::from_secs(2);
/// While waiting for `hf_hours` to open, look at the clock at least this often.
const WINDOW_RECHECK: Duration = Duration::from_secs(30);

/// A token bucket for async callers: each caller reserves its bytes and sleeps until they fit.
#[derive(Debug)]
pub struct Throttle {
    /// Bytes per second.
    rate: u64,
    /// When the bucket is next empty. A std mutex: held for arithmetic only.
    next_free: Mutex<Instant>,
    /// When a caller last had to wait, in milliseconds since `epoch`.
    waited: AtomicU64,
    epoch: Instant,
}

impl Throttle {
    /// A limit of `rate` bytes per second.
    pub fn new(rate: u64) -> Self {
        let now = Instant::now();
        Self {
            rate: rate.max(1),
            next_free: Mutex::new(now),
            waited: AtomicU64::new(u64::MAX),
            epoch: now,
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Reserves `n` bytes and sleeps until they fit the rate.
    pub async fn take(&self, n: u64) {
        let wait = {
            let mut next = self.next_free.lock().expect("throttle lock poisoned");
            let now = Instant::now();
            let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
            *next = start + Duration::from_secs_f64(n as f64 / self.rate as f64);
            next.saturating_duration_since(now + BURST)
        };
        if !wait.is_zero() {
            let at = self.epoch.elapsed().as_millis() as u64;
            self.waited.store(at, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
    }

    /// Whether a caller had to wait in the last two seconds.
    pub fn binding(&self) -> bool {
        let waited = self.waited.load(Ordering::Relaxed);
        waited != u64::MAX
            && self.epoch.elapsed().as_millis() as u64 <= waited + BINDING_FOR.as_millis() as u64
    }
}

/// Daily hours in local time, `HH:MM-HH:MM`; a window may wrap past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hours {
    /// Minute of the day the window opens.
    start: u16,
    /// Minute of the day it closes.
    end: u16,
}

/// A bad `hf_hours` value.
#[derive(Debug, thiserror::Error)]
#[error("bad hours {0:?}: expected HH:MM-HH:MM, e.g. 18:00-07:00")]
pub struct HoursError(String);

impl FromStr for Hours {
    type Err = HoursError;

    fn from_str(s: &str) -> Result<Self, HoursError> {
        let err = || HoursError(s.to_string());
        let minute = |t: &str| -> Result<u16, HoursError> {
            let (h, m) = t.trim().split_once(':').ok_or_else(err)?;
            let (h, m): (u16, u16) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
            if h > 24 || m > 59 || (h == 24 && m > 0) {
                return Err(err());
            }
            Ok((h * 60 + m) % (24 * 60))
        };
        let (a, b) = s.split_once('-').ok_or_else(err)?;
        let (start, end) = (minute(a)?, minute(b)?);
        if start == end {
            return Err(err());
        }
        Ok(Self { start, end })
    }
}

impl fmt::Display for Hours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start), hm(self.end))
    }
}

impl Hours {
    /// Whether `minute` (of the day) is inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }

    /// Minutes from `minute` until the window opens (0 inside it).
    pub fn minutes_until_open(&self, minute: u16) -> u16 {
        if self.contains(minute) {
            0
        } else {
            (self.start + 24 * 60 - minute) % (24 * 60)
        }
    }

    /// `HH:MM` the window opens.
    pub fn opens(&self) -> String {
        format!("{:02}:{:02}", self.start / 60, self.start % 60)
    }
}

/// The minute of the day and the second in it, in local time.
pub fn local_minute() -> (u16, u16) {
    let now = libc_time();
    // SAFETY: `localtime_r` writes only into `tm`, which lives on this stack frame; it reads
    // the time zone the C library loaded (glibc's is thread-safe).
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return (0, 0);
        }
        tm
    };
    ((tm.tm_hour * 60 + tm.tm_min) as u16, tm.tm_sec as u16)
}

fn libc_time() -> libc::time_t {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0)
}

/// What the limits are set to (flags, environment, config file).
#[derive(Clone, Debug, Default)]
pub struct LimitConfig {
    /// Download rate of the whole node, bytes per second.
    pub max_download: Option<u64>,
    /// HuggingFace download rate, bytes per second.
    pub max_hf_download: Option<u64>,
    /// Hours HuggingFace may be used.
    pub hf_hours: Option<Hours>,
    /// Upload rate to peers, bytes per second.
    pub max_upload: Option<u64>,
}

/// The node's limits. Cheap to clone; the default limits nothing.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    download: Option<Throttle>,
    hf_download: Option<Throttle>,
    hf_hours: Option<Hours>,
    upload: Option<Arc<Throttle>>,
    /// Bytes that arrived from HuggingFace.
    hf_bytes: AtomicU64,
    /// Set while an HF download waits for `hf_hours`.
    notice: Mutex<Option<String>>,
}

/// One limit as the fleet page shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LimitStatus {
    /// `max_download`, `max_hf_download`, `max_upload` or `hf_hours`.
    pub name: String,
    /// Its setting, as configured.
    pub value: String,
    /// Whether it is holding something back right now.
    pub binding: bool,
    /// What that means, when binding.
    pub note: Option<String>,
}

impl Limits {
    /// Limits as configured.
    pub fn new(config: &LimitConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                download: config.max_download.map(Throttle::new),
                hf_download: config.max_hf_download.map(Throttle::new),
                hf_hours: config.hf_hours,
                upload: config.max_upload.map(|rate| Arc::new(Throttle::new(rate))),
                ..Inner::default()
            }),
        }
    }

    /// Waits until `n` more downloaded bytes fit `max_download`.
    pub async fn download(&self, n: u64) {
        if let Some(t) = &self.inner.download {
            t.take(n).await;
        }
    }

    /// The upload limit (`max_upload`) the provider awaits, if one is set.
    pub fn upload(&self) -> Option<Arc<Throttle>> {
        self.inner.upload.clone()
    }

    /// Waits until HuggingFace may be used (`hf_hours`) and `n` more bytes from it fit both
    /// `max_hf_download` and `max_download`: before a request.
    pub async fn hf_take(&self, n: u64) {
        self.hf_window().await;
        self.hf_rate(n).await;
    }

    /// Waits until `n` more bytes from HuggingFace fit both rates: for each chunk of a
    /// download already under way (one that started inside `hf_hours` finishes).
    pub async fn hf_rate(&self, n: u64) {
        if let Some(t) = &self.inner.hf_download {
            t.take(n).await;
        }
        self.download(n).await;
    }

    /// Counts `n` bytes that arrived from HuggingFace.
    pub fn hf_got(&self, n: u64) {
        self.inner.hf_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes that arrived from HuggingFace so far.
    pub fn hf_bytes(&self) -> u64 {
        self.inner.hf_bytes.load(Ordering::Relaxed)
    }

    /// What a fetch should tell its user now (HF waiting for its hours), if anything.
    pub fn notice(&self) -> Option<String> {
        self.inner.notice.lock().expect("notice lock").clone()
    }

    /// Waits until the clock is inside `hf_hours`.
    pub async fn hf_window(&self) {
        let Some(hours) = self.inner.hf_hours else {
            return;
        };
        loop {
            let (minute, second) = local_minute();
            let wait = hours.minutes_until_open(minute);
            if wait == 0 {
                *self.inner.notice.lock().expect("notice lock") = None;
                return;
            }
            let message = format!(
                "HuggingFace downloads wait until {} (hf_hours = \"{hours}\"); peers are used meanwhile",
                hours.opens()
            );
            let first = self
                .inner
                .notice
                .lock()
                .expect("notice lock")
                .replace(message.clone())
                .is_none();
            if first {
                // Fetches show it as a notice; the node's log gets it once per wait.
                tracing::info!(hf_hours = %hours, opens = %hours.opens(), "{message}");
            }
            let to_open = Duration::from_secs(u64::from(wait) * 60 - u64::from(second));
            tokio::time::sleep(to_open.clamp(Duration::from_secs(1), WINDOW_RECHECK)).await;
        }
    }

    /// Each configured limit, and whether it binds now.
    pub fn status(&self) -> Vec<LimitStatus> {
        let per_sec = |r: u64| format!("{}/s", human(r));
        let mut out = Vec::new();
        let throttles = [
            (
                "max_download",
                self.inner.download.as_ref(),
                "downloads are slowed to this rate",
            ),
            (
                "max_hf_download",
                self.inner.hf_download.as_ref(),
                "HuggingFace downloads are slowed to this rate",
            ),
            (
                "max_upload",
                self.inner.upload.as_deref(),
                "uploads to peers run at this rate",
            ),
        ];
        for (name, throttle, note) in throttles {
            if let Some(t) = throttle {
                out.push(LimitStatus {
                    name: name.into(),
                    value: per_sec(t.rate()),
                    binding: t.binding(),
                    note: t.binding().then(|| note.to_string()),
                });
            }
        }
        if let Some(hours) = self.inner.hf_hours {
            let notice = self.notice();
            out.push(LimitStatus {
                name: "hf_hours".into(),
                value: hours.to_string(),
                binding: notice.is_some(),
                note: notice,
            });
        }
        out
    }
}

/// Decimal byte counts: 1.5 GB, 20 MB.
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A byte count or rate as written in config, flags and environment: a plain number of bytes,
/// or a number with a unit: `200GB`, `50MB`, `1.5G`, `512MiB` (decimal k/M/G/T, binary
/// Ki/Mi/Gi/Ti; a trailing `B` and `/s` are optional).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: expected bytes like 200GB or 50MB"))?;
    let unit = unit.trim();
    let unit = unit.strip_suffix(['B', 'b']).unwrap_or(unit);
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        "ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("bad size {s:?}: unknown unit {unit:?}")),
    };
    Ok((num * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_parse_and_wrap_past_midnight() {
        let h: Hours = "18:00-07:00".parse().unwrap();
        assert_eq!(h.to_string(), "18:00-07:00");
        assert!(h.contains(18 * 60) && h.contains(23 * 60 + 59) && h.contains(6 * 60 + 59));
        assert!(!h.contains(7 * 60) && !h.contains(12 * 60));
        assert_eq!(h.minutes_until_open(17 * 60 + 30), 30);
        assert_eq!(h.minutes_until_open(7 * 60), 11 * 60);
        let day: Hours = "08:30-16:00".parse().unwrap();
        assert!(day.contains(8 * 60 + 30) && !day.contains(16 * 60));
        assert_eq!(day.minutes_until_open(23 * 60), 9 * 60 + 30);
        for bad in ["18:00", "25:00-01:00", "10:00-10:00", "a-b", "10:60-11:00"] {
            assert!(bad.parse::<Hours>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("200GB").unwrap(), 200_000_000_000);
        assert_eq!(parse_bytes("50MB/s").unwrap(), 50_000_000);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("123").unwrap(), 123);
        assert!(parse_bytes("12 parsecs").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_holds_callers_to_its_rate() {
        let t = Throttle::new(1_000_000);
        let start = Instant::now();
        for _ in 0..10 {
            t.take(500_000).await;
        }
        // 5 MB at 1 MB/s, less the 100 ms burst.
        let took = start.elapsed().as_secs_f64();
        assert!((4.8..5.0).contains(&took), "took {took} s");
        assert!(t.binding());
    }
}
