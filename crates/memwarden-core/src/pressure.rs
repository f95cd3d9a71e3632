//! Memory pressure levels from measured samples: utilization thresholds (the seed's
//! `MemoryThresholds`: 75 / 90 / 95 %), raised one level by sustained PSI stall, with hysteresis so
//! the level does not flap, a 0–100 number, and a time-to-critical estimate from the recent trend.
//! Pure: the daemon's sampler feeds it readings.

use crate::units::MIB;
use serde::Deserialize;
use std::collections::VecDeque;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Level {
    #[default]
    Low,
    Moderate,
    High,
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::Moderate => "moderate",
            Level::High => "high",
            Level::Critical => "critical",
        }
    }

    fn up(self) -> Level {
        match self {
            Level::Low => Level::Moderate,
            Level::Moderate => Level::High,
            _ => Level::Critical,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the pressure levels start: fractions of total memory (0–1) and PSI percentages.
///
/// The one definition of these values and their defaults: the daemon's configuration reads them
/// from its `[pressure]` section (the field names are the TOML keys; a key left out keeps its
/// default here) and the API reports them (`thresholds` of `GET /api/memory/pressure`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PressureThresholds {
    /// Utilization (0–1) at which the level becomes moderate.
    pub moderate: f64,
    /// … high.
    pub high: f64,
    /// … critical.
    pub critical: f64,
    /// A level is left only once utilization is this far (0–1) below its threshold.
    pub hysteresis: f64,
    /// PSI `some avg10` (% of time some task stalled on memory) at which the level rises by one.
    pub psi_some_percent: f64,
    /// PSI `full avg10` at which the level rises by one.
    pub psi_full_percent: f64,
}

impl Default for PressureThresholds {
    fn default() -> Self {
        PressureThresholds {
            moderate: 0.75,
            high: 0.90,
            critical: 0.95,
            hysteresis: 0.05,
            psi_some_percent: 10.0,
            psi_full_percent: 5.0,
        }
    }
}

/// Why [`PressureThresholds::validate`] refused a set of thresholds.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PressureThresholdsError {
    #[error(
        "pressure thresholds must satisfy 0 ≤ moderate ≤ high ≤ critical ≤ 1 \
         (moderate {moderate}, high {high}, critical {critical})"
    )]
    Unordered { moderate: f64, high: f64, critical: f64 },
    #[error("pressure hysteresis must be in [0, 0.5), not {hysteresis}")]
    Hysteresis { hysteresis: f64 },
}

impl PressureThresholds {
    pub fn validate(&self) -> Result<(), PressureThresholdsError> {
        let ordered =
            0.0 <= self.moderate && self.moderate <= self.high && self.high <= self.critical && self.critical <= 1.0;
        if !ordered {
            return Err(PressureThresholdsError::Unordered {
                moderate: self.moderate,
                high: self.high,
                critical: self.critical,
            });
        }
        if !(0.0..0.5).contains(&self.hysteresis) {
            return Err(PressureThresholdsError::Hysteresis { hysteresis: self.hysteresis });
        }
        Ok(())
    }

    pub fn level_of(&self, utilization: f64) -> Level {
        if utilization >= self.critical {
            Level::Critical
        } else if utilization >= self.high {
            Level::High
        } else if utilization >= self.moderate {
            Level::Moderate
        } else {
            Level::Low
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds on a monotonic clock.
    pub at_secs: f64,
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// PSI `some avg10` / `full avg10` in percent, where the source has PSI (hosts).
    pub psi_some10: Option<f64>,
    pub psi_full10: Option<f64>,
    /// A counter of memory-limit hits and OOM kills (the host's cgroup), where one applies.
    pub limit_events: Option<u64>,
}

impl Sample {
    pub fn used_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.available_bytes)
    }

    pub fn utilization(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            self.used_bytes() as f64 / self.total_bytes as f64
        }
    }
}

/// A level change and the sample that caused it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Change {
    pub old: Level,
    pub new: Level,
    pub sample: Sample,
}

/// How far back the trend for time-to-critical looks.
const TREND_WINDOW_SECS: f64 = 10.0;
const TREND_MAX_SAMPLES: usize = 512;
/// How long a memory-limit hit keeps the level raised.
pub const LIMIT_EVENT_HOLD_SECS: f64 = 10.0;

/// The level of one device, updated sample by sample.
#[derive(Debug, Clone)]
pub struct Tracker {
    thresholds: PressureThresholds,
    level: Level,
    /// The utilization level (before any PSI escalation).
    base: Level,
    psi_escalated: bool,
    /// When the limit-event counter last grew.
    limit_event_at: Option<f64>,
    last: Option<Sample>,
    trend: VecDeque<(f64, f64)>,
}

impl Tracker {
    pub fn new(thresholds: PressureThresholds) -> Self {
        Tracker {
            thresholds,
            level: Level::Low,
            base: Level::Low,
            psi_escalated: false,
            limit_event_at: None,
            last: None,
            trend: VecDeque::new(),
        }
    }

    pub fn thresholds(&self) -> &PressureThresholds {
        &self.thresholds
    }

    pub fn level(&self) -> Level {
        self.level
    }

    pub fn last(&self) -> Option<&Sample> {
        self.last.as_ref()
    }

    /// Feeds one sample; returns the change it caused, if any.
    pub fn update(&mut self, s: Sample) -> Option<Change> {
        let t = &self.thresholds;
        let u = s.utilization();
        // Utilization level with hysteresis: rise at once, fall only once `hysteresis` below.
        let current_base = self.base;
        let rising = t.level_of(u);
        let falling = t.level_of(u + t.hysteresis);
        let base = if rising > current_base {
            rising
        } else if falling < current_base {
            falling
        } else {
            current_base
        };
        // Sustained stall raises one level; it ends once PSI falls below half the threshold.
        let some = s.psi_some10.unwrap_or(0.0);
        let full = s.psi_full10.unwrap_or(0.0);
        let stalled = some >= t.psi_some_percent || full >= t.psi_full_percent;
        let calm = some < t.psi_some_percent / 2.0 && full < t.psi_full_percent / 2.0;
        self.psi_escalated = stalled || (self.psi_escalated && !calm);
        // The cgroup hit its limit (or the OOM killer acted) since the last sample: the memory
        // that is "available" is not, for this process; raise one level for a while.
        let grew = matches!((self.last.and_then(|l| l.limit_events), s.limit_events), (Some(a), Some(b)) if b > a);
        if grew {
            self.limit_event_at = Some(s.at_secs);
        }
        let limit_pressed = self.limit_event_at.is_some_and(|t| s.at_secs - t < LIMIT_EVENT_HOLD_SECS);
        self.base = base;
        let new = if self.psi_escalated || limit_pressed { base.up() } else { base };
        self.last = Some(s);
        self.trend.push_back((s.at_secs, s.used_bytes() as f64));
        while self.trend.len() > TREND_MAX_SAMPLES
            || self.trend.front().is_some_and(|f| s.at_secs - f.0 > TREND_WINDOW_SECS)
        {
            self.trend.pop_front();
        }
        if new != self.level {
            let old = self.level;
            self.level = new;
            Some(Change { old, new, sample: s })
        } else {
            None
        }
    }

    /// 0–100: utilization in percent, plus the PSI `some avg10` stall percentage while it
    /// escalates the level, capped at 100.
    pub fn pressure_level(&self) -> u8 {
        let Some(s) = self.last else { return 0 };
        let mut p = s.utilization() * 100.0;
        if self.psi_escalated {
            p += s.psi_some10.unwrap_or(0.0);
        }
        p.clamp(0.0, 100.0).round() as u8
    }

    /// Seconds until utilization reaches the critical threshold at the current rate of growth
    /// (least squares over the last 10 s); `None` when usage is not rising.
    pub fn time_to_critical(&self) -> Option<f64> {
        let s = self.last?;
        if self.trend.len() < 3 {
            return None;
        }
        let n = self.trend.len() as f64;
        let (mx, my) = self.trend.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
        let (mut num, mut den) = (0.0, 0.0);
        for (x, y) in &self.trend {
            num += (x - mx) * (y - my);
            den += (x - mx) * (x - mx);
        }
        if den <= 0.0 {
            return None;
        }
        let slope = num / den; // bytes per second
        let target = self.thresholds.critical * s.total_bytes as f64;
        let used = s.used_bytes() as f64;
        if used >= target {
            return Some(0.0);
        }
        // Growth below 1 MiB/s is noise, not a trend.
        (slope > MIB as f64).then(|| (target - used) / slope)
    }
}

/// Parses `/proc/pressure/memory`: (some avg10, full avg10, some total µs, full total µs).
/// Written here rather than taken from procfs, whose `PressureRecord` holds the averages as
/// `f32`: the kernel's `0.10` would reach the API as `0.10000000149011612`.
pub fn parse_psi(text: &str) -> Option<PsiReading> {
    let mut r = PsiReading::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let kind = parts.next()?;
        let (mut avg10, mut total) = (None, None);
        for kv in parts {
            match kv.split_once('=') {
                Some(("avg10", v)) => avg10 = v.parse::<f64>().ok(),
                Some(("total", v)) => total = v.parse::<u64>().ok(),
                _ => {}
            }
        }
        match kind {
            "some" => (r.some_avg10, r.some_total_us) = (avg10?, total?),
            "full" => (r.full_avg10, r.full_total_us) = (avg10?, total?),
            _ => {}
        }
    }
    Some(r)
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PsiReading {
    pub some_avg10: f64,
    pub full_avg10: f64,
    pub some_total_us: u64,
    pub full_total_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::units::GIB;

    fn at(t: f64, used_gib: f64) -> Sample {
        let total = 100 * GIB;
        Sample {
            at_secs: t,
            total_bytes: total,
            available_bytes: total - (used_gib * GIB as f64) as u64,
            psi_some10: None,
            psi_full10: None,
            limit_events: None,
        }
    }

    fn levels(tr: &mut Tracker, used: &[f64]) -> Vec<Level> {
        used.iter()
            .enumerate()
            .map(|(i, &u)| {
                tr.update(at(i as f64 * 0.02, u));
                tr.level()
            })
            .collect()
    }

    #[test]
    fn levels_follow_the_seed_thresholds() {
        let mut tr = Tracker::new(PressureThresholds::default());
        use Level::*;
        assert_eq!(levels(&mut tr, &[10.0, 74.9, 75.0, 90.0, 95.0]), vec![Low, Low, Moderate, High, Critical]);
    }

    #[test]
    fn hysteresis_stops_flapping() {
        let mut tr = Tracker::new(PressureThresholds::default());
        use Level::*;
        // Hovering around 90 %: up at 90, stays High until below 85.
        let seq = [89.0, 90.0, 89.5, 90.1, 88.0, 86.0, 85.1, 84.9, 80.0, 69.9];
        assert_eq!(levels(&mut tr, &seq), vec![Moderate, High, High, High, High, High, High, Moderate, Moderate, Low]);
        // Counting changes over a noisy plateau: one change, not one per crossing.
        let mut tr = Tracker::new(PressureThresholds::default());
        let noisy: Vec<f64> = (0..100).map(|i| if i % 2 == 0 { 89.9 } else { 90.1 }).collect();
        let changes = noisy.iter().enumerate().filter(|(i, &u)| tr.update(at(*i as f64, u)).is_some()).count();
        assert_eq!(changes, 2, "Low→Moderate once, Moderate→High once");
    }

    #[test]
    fn a_drop_can_skip_levels() {
        let mut tr = Tracker::new(PressureThresholds::default());
        tr.update(at(0.0, 99.0));
        assert_eq!(tr.level(), Level::Critical);
        let c = tr.update(at(1.0, 10.0)).expect("change");
        assert_eq!((c.old, c.new), (Level::Critical, Level::Low));
    }

    #[test]
    fn psi_stall_raises_one_level_until_it_calms() {
        let mut tr = Tracker::new(PressureThresholds::default());
        let mut s = at(0.0, 50.0);
        s.psi_some10 = Some(12.0);
        assert_eq!(tr.update(s).map(|c| c.new), Some(Level::Moderate), "stall escalates Low to Moderate");
        assert!(tr.pressure_level() >= 62);
        s.psi_some10 = Some(6.0);
        assert!(tr.update(s).is_none(), "still above half the threshold: stays escalated");
        s.psi_some10 = Some(4.0);
        assert_eq!(tr.update(s).map(|c| c.new), Some(Level::Low), "calm: back to the utilization level");
        s.psi_full10 = Some(5.0);
        s.psi_some10 = Some(0.0);
        assert_eq!(tr.update(s).map(|c| c.new), Some(Level::Moderate), "full stall escalates too");
    }

    #[test]
    fn cgroup_limit_hits_raise_the_level_for_a_while() {
        let mut tr = Tracker::new(PressureThresholds::default());
        let mut s = at(0.0, 50.0);
        s.limit_events = Some(3);
        assert!(tr.update(s).is_none(), "a counter's first value is no event");
        s.at_secs = 1.0;
        s.limit_events = Some(4);
        assert_eq!(tr.update(s).map(|c| c.new), Some(Level::Moderate), "the limit was hit");
        s.at_secs = 5.0;
        assert!(tr.update(s).is_none(), "held for a while");
        s.at_secs = 11.5;
        assert_eq!(tr.update(s).map(|c| c.new), Some(Level::Low), "no new hits: back down");
    }

    #[test]
    fn time_to_critical_from_the_trend() {
        let mut tr = Tracker::new(PressureThresholds::default());
        for i in 0..10 {
            tr.update(at(i as f64, 50.0 + i as f64)); // +1 GiB/s
        }
        let ttc = tr.time_to_critical().expect("rising");
        assert!((ttc - 36.0).abs() < 0.5, "95 − 59 GiB at 1 GiB/s: {ttc}");
        let mut flat = Tracker::new(PressureThresholds::default());
        for i in 0..10 {
            flat.update(at(i as f64, 50.0));
        }
        assert_eq!(flat.time_to_critical(), None);
    }

    #[test]
    fn thresholds_are_checked() {
        assert!(PressureThresholds::default().validate().is_ok());
        assert_eq!(
            PressureThresholds { high: 0.7, ..Default::default() }.validate(),
            Err(PressureThresholdsError::Unordered { moderate: 0.75, high: 0.7, critical: 0.95 })
        );
        let e = PressureThresholds { hysteresis: 0.6, ..Default::default() }.validate();
        assert_eq!(e, Err(PressureThresholdsError::Hysteresis { hysteresis: 0.6 }));
        assert!(e.is_err_and(|e| e.to_string().contains("[0, 0.5)")));
    }

    #[test]
    fn psi_parses() {
        let r = parse_psi("some avg10=12.50 avg60=4.20 avg300=1.05 total=987654321\nfull avg10=3.10 avg60=1.00 avg300=0.25 total=123456789\n").expect("psi");
        assert_eq!(
            r,
            PsiReading { some_avg10: 12.5, full_avg10: 3.1, some_total_us: 987654321, full_total_us: 123456789 }
        );
        assert!(parse_psi("some avg10=x total=1\n").is_none());
    }
}
