//! `ferroblock plot`: draws `ferroblock bench --hist` interval logs (any HdrHistogram interval log with
//! values in nanoseconds) as latency-by-percentile curves and IOPS over time, in SVG and PNG.
//!
//! Owns: reading interval logs and drawing charts. Must never: trust a log's content (a bad line or
//! histogram is a `PlotError` naming the file), or need anything but a font file at run time.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine;
use clap::Args;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Chart size in pixels (the SVG uses the same user units).
const CHART_WIDTH_PX: u32 = 1024;
const CHART_HEIGHT_PX: u32 = 640;
/// Largest interval log read into memory.
const LOG_BYTES_MAX: u64 = 1 << 30;
/// Highest "nines" drawn on the percentile axis: 10^-7, i.e. 99.99999%.
const NINES_MAX: f64 = 7.0;
/// Points per decade of 1/(1-p) on a latency curve.
const POINTS_PER_NINE: u32 = 50;
/// Fonts tried, in order, when --font is not given (plotters draws text with a TrueType font).
const FONT_CANDIDATES: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];
/// The family name charts ask for; the loaded font is registered under it.
const FONT_FAMILY: &str = "sans-serif";

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Interval logs written by `ferroblock bench --hist`.
    #[arg(required = true, value_name = "HIST_FILE")]
    pub files: Vec<PathBuf>,

    /// Legend label for each file, in order [default: the file name].
    #[arg(long)]
    pub label: Vec<String>,

    /// Output prefix: writes PREFIX-latency.svg/.png and PREFIX-iops.svg/.png.
    #[arg(long, default_value = "ferroblock")]
    pub out: String,

    /// TrueType font for the labels [default: DejaVu Sans or Liberation Sans from /usr/share/fonts].
    #[arg(long)]
    pub font: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{count} --label for {files} files: give one per file, or none")]
    Labels { count: usize, files: usize },
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Log { path: PathBuf, reason: String },
    #[error("no usable font: {0} (give --font PATH to a .ttf file)")]
    Font(String),
    #[error("drawing {path}: {reason}")]
    Draw { path: PathBuf, reason: String },
}

impl PlotError {
    /// Exit code: 2 for bad arguments, 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            PlotError::Labels { .. } => 2,
            _ => 1,
        }
    }
}

/// One interval log, read.
pub struct Run {
    pub label: String,
    /// All intervals merged; values in nanoseconds.
    pub histogram: Histogram<u64>,
    /// (seconds since the first interval started, operations per second) per interval.
    pub iops: Vec<(f64, f64)>,
}

/// Reads an interval log.
pub fn read_run(path: &Path, label: String) -> Result<Run, PlotError> {
    let bad = |reason: String| PlotError::Log {
        path: path.to_owned(),
        reason,
    };
    let file = File::open(path).map_err(|error| PlotError::Read {
        path: path.to_owned(),
        error,
    })?;
    let length = file
        .metadata()
        .map_err(|error| PlotError::Read {
            path: path.to_owned(),
            error,
        })?
        .len();
    if length > LOG_BYTES_MAX {
        return Err(bad(format!(
            "{length} bytes is larger than the limit of {LOG_BYTES_MAX}"
        )));
    }
    let bytes = std::fs::read(path).map_err(|error| PlotError::Read {
        path: path.to_owned(),
        error,
    })?;
    let mut histogram: Option<Histogram<u64>> = None;
    let mut iops = Vec::new();
    let mut first_start = None;
    let mut deserializer = Deserializer::new();
    for entry in IntervalLogIterator::new(&bytes) {
        let entry = entry.map_err(|error| bad(format!("not an interval log ({error:?})")))?;
        let LogEntry::Interval(interval) = entry else {
            continue;
        };
        let encoded = base64::engine::general_purpose::STANDARD
            .decode(interval.encoded_histogram())
            .map_err(|error| bad(format!("bad base64 histogram: {error}")))?;
        let decoded: Histogram<u64> = deserializer
            .deserialize(&mut encoded.as_slice())
            .map_err(|error| bad(format!("bad histogram: {error:?}")))?;
        let start = interval.start_timestamp().as_secs_f64();
        let first = *first_start.get_or_insert(start);
        let seconds = interval.duration().as_secs_f64();
        if seconds > 0.0 {
            // Each point sits at the end of its interval.
            iops.push((start - first + seconds, decoded.len() as f64 / seconds));
        }
        match &mut histogram {
            Some(total) => total
                .add(&decoded)
                .map_err(|error| bad(format!("histograms do not combine: {error:?}")))?,
            None => histogram = Some(decoded),
        }
    }
    let histogram = histogram
        .filter(|histogram| !histogram.is_empty())
        .ok_or_else(|| bad("no latencies recorded".into()))?;
    Ok(Run {
        label,
        histogram,
        iops,
    })
}

/// "Nines" (log10 of 1/(1-p)) as a percentile label: 0 → 0%, 0.301 → 50%, 1 → 90%, 3 → 99.9%.
pub fn percentile_label(nines: f64) -> String {
    let percent = 100.0 * (1.0 - 10f64.powf(-nines));
    let text = format!("{percent:.5}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

/// The latency curve of one run: (nines, microseconds), up to the resolution its sample count allows.
pub fn latency_curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    let nines_max = (histogram.len() as f64).log10().clamp(0.0, NINES_MAX);
    let steps = (nines_max * f64::from(POINTS_PER_NINE)).ceil() as u32;
    (0..=steps)
        .map(|step| {
            let nines = (f64::from(step) / f64::from(POINTS_PER_NINE)).min(nines_max);
            let quantile = 1.0 - 10f64.powf(-nines);
            let value = histogram.value_at_quantile(quantile);
            (nines, value as f64 / 1000.0)
        })
        .collect()
}

fn load_font(explicit: Option<&Path>) -> Result<(), PlotError> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(path) => vec![path.to_owned()],
        None => FONT_CANDIDATES.iter().map(PathBuf::from).collect(),
    };
    for path in &candidates {
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        // The font table wants 'static bytes; one font per process, so leaking it is bounded.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
            return Ok(());
        }
    }
    Err(PlotError::Font(format!(
        "none of {} could be loaded",
        candidates
            .iter()
            .map(|path| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

type DrawResult = Result<(), String>;

type LinearChart<'a, DB> = ChartContext<
    'a,
    DB,
    plotters::coord::cartesian::Cartesian2d<
        plotters::coord::types::RangedCoordf64,
        plotters::coord::types::RangedCoordf64,
    >,
>;

/// One line per run, each in its own colour and named in the legend, which goes at `position`.
fn draw_lines<'a, DB: DrawingBackend + 'a>(
    chart: &mut LinearChart<'a, DB>,
    lines: impl Iterator<Item = (String, Vec<(f64, f64)>)>,
    position: SeriesLabelPosition,
) -> DrawResult {
    for (index, (label, points)) in lines.enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|error| error.to_string())?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, 14))
        .draw()
        .map_err(|error| error.to_string())
}

fn draw_latency<DB: DrawingBackend>(area: DrawingArea<DB, Shift>, runs: &[Run]) -> DrawResult {
    area.fill(&WHITE).map_err(|error| error.to_string())?;
    let curves: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|run| latency_curve(&run.histogram))
        .collect();
    let nines_max = curves
        .iter()
        .flat_map(|curve| curve.last().map(|&(nines, _)| nines))
        .fold(1.0, f64::max)
        .ceil();
    let latency_max = curves
        .iter()
        .flatten()
        .map(|&(_, us)| us)
        .fold(1.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&area)
        .caption("Latency by percentile", (FONT_FAMILY, 24))
        .margin(16)
        .margin_right(48)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..nines_max, 0.0..latency_max)
        .map_err(|error| error.to_string())?;
    chart
        .configure_mesh()
        .x_labels(nines_max as usize + 1)
        .x_label_formatter(&|nines| percentile_label(*nines))
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .y_label_formatter(&|us| format!("{us:.0}"))
        .label_style((FONT_FAMILY, 14))
        .draw()
        .map_err(|error| error.to_string())?;
    let lines = runs
        .iter()
        .zip(curves)
        .map(|(run, curve)| (run.label.clone(), curve));
    draw_lines(&mut chart, lines, SeriesLabelPosition::UpperLeft)?;
    area.present().map_err(|error| error.to_string())
}

fn draw_iops<DB: DrawingBackend>(area: DrawingArea<DB, Shift>, runs: &[Run]) -> DrawResult {
    area.fill(&WHITE).map_err(|error| error.to_string())?;
    let seconds_max = runs
        .iter()
        .flat_map(|run| run.iops.iter().map(|&(seconds, _)| seconds))
        .fold(1.0, f64::max)
        + 1.0;
    let iops_max = runs
        .iter()
        .flat_map(|run| run.iops.iter().map(|&(_, iops)| iops))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&area)
        .caption("IOPS over time", (FONT_FAMILY, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(88)
        .build_cartesian_2d(0.0..seconds_max, 0.0..iops_max)
        .map_err(|error| error.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("operations per second")
        .y_label_formatter(&|iops| format!("{iops:.0}"))
        .label_style((FONT_FAMILY, 14))
        .draw()
        .map_err(|error| error.to_string())?;
    let lines = runs.iter().map(|run| (run.label.clone(), run.iops.clone()));
    draw_lines(&mut chart, lines, SeriesLabelPosition::UpperRight)?;
    area.present().map_err(|error| error.to_string())
}

/// The two charts.
#[derive(Debug, Clone, Copy)]
enum Chart {
    Latency,
    Iops,
}

impl Chart {
    fn name(self) -> &'static str {
        match self {
            Chart::Latency => "latency",
            Chart::Iops => "iops",
        }
    }

    fn draw<DB: DrawingBackend>(self, area: DrawingArea<DB, Shift>, runs: &[Run]) -> DrawResult {
        match self {
            Chart::Latency => draw_latency(area, runs),
            Chart::Iops => draw_iops(area, runs),
        }
    }
}

/// Draws one chart as PREFIX-NAME.svg and PREFIX-NAME.png.
fn draw_both(prefix: &str, chart: Chart, runs: &[Run]) -> Result<Vec<PathBuf>, PlotError> {
    let svg_path = PathBuf::from(format!("{prefix}-{}.svg", chart.name()));
    let failed = |path: &Path, reason: String| PlotError::Draw {
        path: path.to_owned(),
        reason,
    };
    let svg = SVGBackend::new(&svg_path, (CHART_WIDTH_PX, CHART_HEIGHT_PX)).into_drawing_area();
    chart
        .draw(svg, runs)
        .map_err(|reason| failed(&svg_path, reason))?;

    let png_path = PathBuf::from(format!("{prefix}-{}.png", chart.name()));
    let mut pixels = vec![0u8; CHART_WIDTH_PX as usize * CHART_HEIGHT_PX as usize * 3];
    {
        let bitmap = BitMapBackend::with_buffer(&mut pixels, (CHART_WIDTH_PX, CHART_HEIGHT_PX))
            .into_drawing_area();
        chart
            .draw(bitmap, runs)
            .map_err(|reason| failed(&png_path, reason))?;
    }
    let file = File::create(&png_path).map_err(|error| failed(&png_path, error.to_string()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), CHART_WIDTH_PX, CHART_HEIGHT_PX);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .map_err(|error| failed(&png_path, error.to_string()))?;
    writer
        .write_image_data(&pixels)
        .map_err(|error| failed(&png_path, error.to_string()))?;
    writer
        .finish()
        .map_err(|error| failed(&png_path, error.to_string()))?;
    Ok(vec![svg_path, png_path])
}

/// Runs `ferroblock plot`; returns the paths written.
pub fn plot(args: &PlotArgs) -> Result<Vec<PathBuf>, PlotError> {
    if !args.label.is_empty() && args.label.len() != args.files.len() {
        return Err(PlotError::Labels {
            count: args.label.len(),
            files: args.files.len(),
        });
    }
    let mut runs = Vec::with_capacity(args.files.len());
    for (index, path) in args.files.iter().enumerate() {
        let label = match args.label.get(index) {
            Some(label) => label.clone(),
            None => path.file_name().map_or_else(
                || path.display().to_string(),
                |name| name.to_string_lossy().into_owned(),
            ),
        };
        runs.push(read_run(path, label)?);
    }
    load_font(args.font.as_deref())?;
    let mut written = draw_both(&args.out, Chart::Latency, &runs)?;
    written.extend(draw_both(&args.out, Chart::Iops, &runs)?);
    Ok(written)
}

pub fn run(args: PlotArgs) -> ExitCode {
    match plot(&args) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("ferroblock plot: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels_read_as_nines() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(2f64.log10()), "50%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(5.0), "99.999%");
    }

    #[test]
    fn latency_curves_stop_at_the_sample_resolution() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).expect("bounds");
        for value in 1..=1000u64 {
            histogram.record(value * 1000).expect("in bounds");
        }
        let curve = latency_curve(&histogram);
        let &(nines_last, latency_last) = curve.last().expect("points");
        assert!((nines_last - 3.0).abs() < 1e-9);
        assert!(latency_last >= 999.0);
        assert!(curve.windows(2).all(|pair| pair[0].1 <= pair[1].1));
    }
}
