//! Result records, their JSON and Markdown forms, and a hand-written SVG latency chart.

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::stats::Stats;

/// One measured quantity: twill against its reference in the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    pub name: String,
    pub unit: String,
    pub twill: Option<Stats>,
    /// What twill is compared with ("bridge+host-local", "ip -batch", "underlay", ...).
    pub reference_label: String,
    pub reference: Option<Stats>,
    /// twill median / reference median (for a latency below 1 means twill is faster; for a
    /// throughput it is the share of the reference that twill gets).
    pub ratio: Option<f64>,
    pub target: Option<String>,
    /// Whether the target is met; None when there is no target or nothing to judge.
    pub met: Option<bool>,
    /// For a paired comparison (`vs_paired`): each pair's ratio, in the order run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pair_ratios: Vec<f64>,
    pub note: String,
}

impl Metric {
    pub fn new(name: &str, unit: &str, twill: &[f64]) -> Metric {
        Metric {
            name: name.into(),
            unit: unit.into(),
            twill: Stats::of(twill),
            reference_label: String::new(),
            reference: None,
            ratio: None,
            target: None,
            met: None,
            pair_ratios: Vec::new(),
            note: String::new(),
        }
    }

    pub fn vs(mut self, label: &str, reference: &[f64]) -> Metric {
        self.reference_label = label.into();
        self.reference = Stats::of(reference);
        self.ratio = match (&self.twill, &self.reference) {
            (Some(t), Some(r)) if r.median != 0.0 => Some(t.median / r.median),
            _ => None,
        };
        self
    }

    /// Like `vs`, for samples taken in pairs back to back (`twill[i]` right next to
    /// `reference[i]`): the ratio is the median of the pairs' ratios, so that the machine's
    /// drift between pairs cancels out instead of landing in one side's median.
    pub fn vs_paired(mut self, label: &str, twill: &[f64], reference: &[f64]) -> Metric {
        self = self.vs(label, reference);
        if twill.len() == reference.len() && !twill.is_empty() {
            self.pair_ratios = twill
                .iter()
                .zip(reference)
                .filter(|(_, b)| **b != 0.0)
                .map(|(a, b)| a / b)
                .collect();
            let mut r = self.pair_ratios.clone();
            r.sort_by(f64::total_cmp);
            if !r.is_empty() {
                self.ratio = Some(crate::stats::percentile(&r, 50.0));
            }
        }
        self
    }

    /// A reference that is a published number rather than something measured here.
    pub fn vs_value(mut self, label: &str, value: f64) -> Metric {
        self = self.vs(label, &[value]);
        self
    }

    pub fn target(mut self, text: &str, met: Option<bool>) -> Metric {
        self.target = Some(text.into());
        self.met = met;
        self
    }

    pub fn note(mut self, text: impl Into<String>) -> Metric {
        self.note = text.into();
        self
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub quick: bool,
    pub seconds: f64,
    /// The parameters used (N, iterations, durations...).
    pub config: Value,
    pub metrics: Vec<Metric>,
    pub notes: Vec<String>,
    /// Set when the scenario failed part-way; the metrics are what was measured before.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub mem_total_mib: u64,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: u64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu,
            mem_total_mib: mem_kib / 1024,
        }
    }
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

fn cell(s: &Option<Stats>) -> [String; 3] {
    match s {
        Some(s) => [
            num(s.median),
            num(s.p99),
            format!("{}–{} (n={})", num(s.min), num(s.max), s.n),
        ],
        None => ["–".into(), "–".into(), "–".into()],
    }
}

/// The scenario as a Markdown section: a table of its metrics plus its notes.
pub fn markdown(r: &ScenarioResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### {}{}\n",
        r.scenario,
        if r.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(
        out,
        "| metric | unit | twill median | twill p99 | twill min–max | reference | ref median | ref p99 | ref min–max | twill/ref | target | met |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for m in &r.metrics {
        let [tm, tp, tr] = cell(&m.twill);
        let [rm, rp, rr] = cell(&m.reference);
        let ratio = m.ratio.map(num).unwrap_or_else(|| "–".into());
        let met = match m.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {tm} | {tp} | {tr} | {} | {rm} | {rp} | {rr} | {ratio} | {} | {met} |",
            m.name,
            m.unit,
            if m.reference_label.is_empty() {
                "–"
            } else {
                &m.reference_label
            },
            m.target.as_deref().unwrap_or("–"),
        );
    }
    let notes: Vec<String> = r
        .metrics
        .iter()
        .filter(|m| !m.note.is_empty())
        .map(|m| format!("- `{}`: {}", m.name, m.note))
        .chain(r.notes.iter().map(|n| format!("- {n}")))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(out, "\n{}", notes.join("\n"));
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "\n**Scenario failed part-way:** {e}");
    }
    let _ = writeln!(out, "\nConfig: `{}`, {:.0} s.", r.config, r.seconds);
    out
}

pub fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// An empirical CDF of latency samples per series, log-scaled x axis (milliseconds).
pub fn ecdf_svg(title: &str, series: &[(&str, &str, &[f64])]) -> String {
    const W: f64 = 760.0;
    const H: f64 = 420.0;
    const L: f64 = 70.0;
    const R: f64 = 20.0;
    const T: f64 = 40.0;
    const B: f64 = 60.0;
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .filter(|v| *v > 0.0)
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(0.0, f64::max);
    let (lo, hi) = if all.is_empty() {
        (0.1, 100.0)
    } else {
        (lo * 0.8, hi * 1.25)
    };
    let (llo, lhi) = (lo.log10(), hi.log10().max(lo.log10() + 0.5));
    let x = |v: f64| L + (v.max(lo).log10() - llo) / (lhi - llo) * (W - L - R);
    let y = |p: f64| T + (1.0 - p) * (H - T - B);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        xml(title)
    );
    // Grid: decades and 2x/5x steps inside the range.
    for e in (llo.floor() as i32)..=(lhi.ceil() as i32) {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(e);
            if v < lo || v > hi {
                continue;
            }
            let px = x(v);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{}" stroke="#ddd"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
                H - B,
                H - B + 16.0,
                num(v)
            );
        }
    }
    for p in [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0] {
        let py = y(p);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - R,
            L - 6.0,
            py + 4.0,
            p
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        W - L - R,
        H - T - B
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">latency, ms (log scale)</text>"#,
        (L + W - R) / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">fraction of calls ≤ x</text>"#,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
    for (i, (name, color, data)) in series.iter().enumerate() {
        let mut v: Vec<f64> = data.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mut pts = Vec::with_capacity(v.len() * 2 + 1);
        if let Some(first) = v.first() {
            pts.push(format!("{:.1},{:.1}", x(*first), y(0.0)));
        }
        for (k, val) in v.iter().enumerate() {
            let px = x(*val);
            pts.push(format!("{px:.1},{:.1}", y(k as f64 / n)));
            pts.push(format!("{px:.1},{:.1}", y((k + 1) as f64 / n)));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = T + 18.0 + 18.0 * i as f64;
        let median = if v.is_empty() {
            "–".into()
        } else {
            num(crate::stats::percentile(&v, 50.0))
        };
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{} (n={}, median {} ms)</text>"#,
            L + 12.0,
            L + 36.0,
            L + 42.0,
            ly + 4.0,
            xml(name),
            v.len(),
            median
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paired_ratio_is_the_median_of_the_pairs() {
        // Drift: the second pair ran on a slower machine; pairwise both are 0.9.
        let m = Metric::new("x", "Gbit/s", &[9.0, 4.5, 9.0]).vs_paired(
            "u",
            &[9.0, 4.5, 9.0],
            &[10.0, 5.0, 10.0],
        );
        assert!((m.ratio.unwrap() - 0.9).abs() < 1e-9);
        let unpaired = Metric::new("x", "Gbit/s", &[9.0, 4.5]).vs_paired("u", &[9.0, 4.5], &[10.0]);
        // Counts differ: no pairs; the ratio of the medians stays.
        assert_eq!(unpaired.ratio, Some(6.75 / 10.0));
    }

    #[test]
    fn ratio_is_twill_over_reference() {
        let m = Metric::new("add", "ms", &[2.0, 2.0, 2.0]).vs("ref", &[8.0, 8.0]);
        assert_eq!(m.ratio, Some(0.25));
        let none = Metric::new("add", "ms", &[]).vs("ref", &[8.0]);
        assert_eq!(none.ratio, None);
    }

    #[test]
    fn markdown_has_a_row_per_metric() {
        let r = ScenarioResult {
            scenario: "cni".into(),
            quick: true,
            seconds: 1.0,
            config: serde_json::json!({"n": 1}),
            metrics: vec![
                Metric::new("a", "ms", &[1.0]).vs("r", &[2.0]),
                Metric::new("b", "ms", &[1.0]).target("< 2", Some(true)),
            ],
            notes: vec!["hello".into()],
            error: None,
        };
        let md = markdown(&r);
        assert!(md.contains("| a | ms | 1.00 |"), "{md}");
        assert!(md.contains("| b | ms |"), "{md}");
        assert!(md.contains("- hello"), "{md}");
    }

    #[test]
    fn svg_is_well_formed_and_names_series() {
        let svg = ecdf_svg(
            "t <x>",
            &[("twill", "#c00", &[1.0, 2.0]), ("ref", "#00c", &[10.0])],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("twill (n=2") && svg.contains("ref (n=1"));
        assert!(svg.contains("t &lt;x&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 2);
    }
}
