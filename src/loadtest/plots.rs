//! PNG plots of a run with plotters' bitmap backend; text in DejaVu Sans, read from the
//! system's fonts (fonts-dejavu). A plot that cannot be drawn is left out of the report.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use super::report::{Results, throughput_series};
use super::stats::cdf;

const FONT_PATHS: [&str; 3] = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];
const FONT: &str = "sans-serif";

/// Register DejaVu Sans once; false if no font was found (then no plots).
fn font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let Some(bytes) = FONT_PATHS.iter().find_map(|p| std::fs::read(p).ok()) else {
            eprintln!("no DejaVu Sans font found ({FONT_PATHS:?}): the report has no plots");
            return false;
        };
        plotters::style::register_font(FONT, FontStyle::Normal, Box::leak(bytes.into_boxed_slice())).is_ok()
    })
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

const COLORS: [RGBColor; 6] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];

/// Lines on one chart: (label, points).
fn lines(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> DrawResult {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    for (x, y) in pts {
        if x.is_finite() && y.is_finite() {
            x_max = x_max.max(*x);
            y_max = y_max.max(*y);
        }
    }
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart =
        ChartBuilder::on(&root).caption(title, (FONT, 22)).margin(15).x_label_area_size(45).y_label_area_size(65).build_cartesian_2d(0.0..(x_max * 1.05).max(1e-3), 0.0..(y_max * 1.1).max(1e-3))?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).label_style((FONT, 14)).axis_desc_style((FONT, 15)).draw()?;
    for (i, (label, p)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(p.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()), color.stroke_width(2)))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if series.len() > 1 || series.first().is_some_and(|(l, _)| !l.is_empty()) {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font((FONT, 14)).position(SeriesLabelPosition::LowerRight).draw()?;
    }
    root.present()?;
    Ok(())
}

fn keep(dir: &Path, name: &str, r: DrawResult, out: &mut Vec<String>) {
    match r {
        Ok(()) => out.push(name.to_string()),
        Err(e) => eprintln!("plot {} not drawn: {e}", dir.join(name).display()),
    }
}

/// The plots of one run; returns the file names drawn.
pub fn run_plots(dir: &Path, r: &Results) -> Vec<String> {
    let mut out = Vec::new();
    if !font() {
        return out;
    }
    if !r.step_end_times.is_empty() {
        let thr = throughput_series(r);
        let wf: Vec<(f64, f64)> = r.series.iter().map(|s| (s.t, s.ended as f64)).collect();
        keep(dir, "throughput.png", lines(&dir.join("throughput.png"), "Steps finished per second (5 s buckets)", "seconds since the first create", "steps/s", &[("steps/s".into(), thr)]), &mut out);
        keep(dir, "workflows-ended.png", lines(&dir.join("workflows-ended.png"), "Workflows ended over time", "seconds since the first create", "workflows", &[("ended".into(), wf)]), &mut out);
    }
    let mut lat = Vec::new();
    if !r.completion_latencies.is_empty() {
        lat.push(("workflow completion".to_string(), cdf(&r.completion_latencies, 400)));
    }
    if !r.dispatch_latencies.is_empty() {
        let d: Vec<f64> = r.dispatch_latencies.clone();
        keep(
            dir,
            "dispatch-cdf.png",
            lines(&dir.join("dispatch-cdf.png"), "Step dispatch latency CDF", "seconds (dependency done -> dependent Job created)", "fraction of steps", &[("dispatch".into(), cdf(&d, 400))]),
            &mut out,
        );
    }
    if !lat.is_empty() {
        keep(dir, "completion-cdf.png", lines(&dir.join("completion-cdf.png"), "Completion latency CDF", "seconds (created -> ended)", "fraction", &lat), &mut out);
    }
    if r.series.iter().any(|s| !s.replicas.is_empty()) {
        let names: Vec<String> = r.series.iter().flat_map(|s| s.replicas.keys().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        // CPU as a rate (CPU-s per s) between samples.
        let cpu: Vec<(String, Vec<(f64, f64)>)> = names
            .iter()
            .map(|n| {
                let pts: Vec<(f64, f64)> =
                    r.series.windows(2).filter_map(|w| Some((w[1].t, (w[1].replicas.get(n)?.0 - w[0].replicas.get(n)?.0) / (w[1].t - w[0].t).max(1e-3)))).map(|(t, v)| (t, v.max(0.0))).collect();
                (n.clone(), pts)
            })
            .collect();
        keep(dir, "cpu.png", lines(&dir.join("cpu.png"), "Operator CPU per replica", "seconds", "CPU cores", &cpu), &mut out);
        let mem: Vec<(String, Vec<(f64, f64)>)> = names.iter().map(|n| (n.clone(), r.series.iter().filter_map(|s| Some((s.t, s.replicas.get(n)?.1))).collect())).collect();
        keep(dir, "memory.png", lines(&dir.join("memory.png"), "Operator RSS per replica", "seconds", "MB", &mem), &mut out);
    }
    if r.series.iter().any(|s| !s.control_plane_cpu.is_empty()) {
        let names: Vec<String> = r.series.iter().flat_map(|s| s.control_plane_cpu.keys().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let cpu: Vec<(String, Vec<(f64, f64)>)> = names
            .iter()
            .map(|n| {
                let pts = r.series.windows(2).filter_map(|w| Some((w[1].t, ((w[1].control_plane_cpu.get(n)? - w[0].control_plane_cpu.get(n)?) / (w[1].t - w[0].t).max(1e-3)).max(0.0)))).collect();
                (n.clone(), pts)
            })
            .collect();
        keep(dir, "control-plane-cpu.png", lines(&dir.join("control-plane-cpu.png"), "Control-plane CPU per component", "seconds", "CPU cores", &cpu), &mut out);
    }
    if let Some(st) = r.settle.as_ref().filter(|st| st.samples.len() > 1) {
        let count = |f: fn(&super::report::SettleSample) -> usize| st.samples.iter().map(|x| (x.t, f(x) as f64)).collect::<Vec<_>>();
        let objects = [("workflows".to_string(), count(|x| x.workflows)), ("Jobs".to_string(), count(|x| x.jobs)), ("pods".to_string(), count(|x| x.pods))];
        keep(dir, "settle-objects.png", lines(&dir.join("settle-objects.png"), "The run's objects left after its end", "seconds after the last workflow ended", "objects", &objects), &mut out);
        let names: std::collections::BTreeSet<String> = st.samples.iter().flat_map(|x| x.rss_mb.keys().cloned()).collect();
        let mem: Vec<(String, Vec<(f64, f64)>)> = names.iter().map(|n| (n.clone(), st.samples.iter().filter_map(|x| Some((x.t, *x.rss_mb.get(n)?))).collect())).collect();
        if !mem.is_empty() {
            keep(dir, "settle-memory.png", lines(&dir.join("settle-memory.png"), "Operator RSS per replica after the run", "seconds after the last workflow ended", "MB", &mem), &mut out);
        }
    }
    out
}

/// Throughput against replica count, over several runs.
pub fn comparison_plots(dir: &Path, rs: &[&Results]) -> Vec<String> {
    let mut out = Vec::new();
    if !font() {
        return out;
    }
    let rs: Vec<&Results> = rs.iter().copied().filter(|r| r.scenario.kind == super::scenario::Kind::Workflows).collect();
    let mut by_replicas: Vec<(f64, f64)> = rs.iter().filter(|r| r.scenario.chaos.is_none()).map(|r| (r.scenario.replicas as f64, r.steps_per_s)).collect();
    by_replicas.sort_by(|a, b| a.0.total_cmp(&b.0));
    if by_replicas.len() > 1 {
        let ceiling: Vec<(f64, f64)> = rs.iter().filter(|r| r.scenario.chaos.is_none()).filter_map(|r| Some((r.scenario.replicas as f64, r.bare.as_ref()?.per_s))).collect();
        let mut series = vec![("shoal steps/s".to_string(), by_replicas)];
        if !ceiling.is_empty() {
            let mut c = ceiling;
            c.sort_by(|a, b| a.0.total_cmp(&b.0));
            series.push(("bare ceiling, Jobs or pods/s".to_string(), c));
        }
        let mut frac: Vec<(f64, f64)> = rs.iter().filter(|r| r.scenario.chaos.is_none()).filter_map(|r| Some((r.scenario.replicas as f64, r.fraction_of_ceiling? * 100.0))).collect();
        frac.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !frac.is_empty() {
            keep(
                dir,
                "fraction-vs-replicas.png",
                lines(&dir.join("fraction-vs-replicas.png"), "Fraction of the bare ceiling against replica count", "replicas", "% of the ceiling", &[("shoal".into(), frac)]),
                &mut out,
            );
        }
        keep(dir, "throughput-vs-replicas.png", lines(&dir.join("throughput-vs-replicas.png"), "Throughput against replica count", "replicas", "steps/s", &series), &mut out);
    }
    let cdfs: Vec<(String, Vec<(f64, f64)>)> = rs.iter().filter(|r| !r.dispatch_latencies.is_empty()).map(|r| (r.scenario.name.clone(), cdf(&r.dispatch_latencies, 400))).collect();
    if !cdfs.is_empty() {
        keep(dir, "dispatch-cdf.png", lines(&dir.join("dispatch-cdf.png"), "Step dispatch latency CDF per run", "seconds", "fraction of steps", &cdfs), &mut out);
    }
    out
}
