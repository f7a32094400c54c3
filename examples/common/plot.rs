//! Log-log line charts for the examples' benchmark figures (PNG, with plotters).

use std::path::Path;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// One chart: named series of (x, y) points, both axes logarithmic over the given ranges.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Registers DejaVu Sans as the "sans-serif" font the charts use (apt package
/// fonts-dejavu-core); plotters has no font of its own without the system's.
fn register_font() -> Result<(), Error> {
    use plotters::style::FontStyle;
    let font = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ]
    .iter()
    .find_map(|p| std::fs::read(p).ok())
    .ok_or("no DejaVu Sans font to label the plot (apt package fonts-dejavu-core)")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "the DejaVu Sans font could not be read")?;
    Ok(())
}

/// Draws `chart` into a 900×600 PNG at `path`: a line and dots per series, legend top left.
pub fn draw(chart: Chart<'_>, path: &Path) -> Result<(), Error> {
    use plotters::prelude::*;

    register_font()?;
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (x0, x1) = chart.x_range;
    let (y0, y1) = chart.y_range;
    let mut plot = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?;
    plot.configure_mesh()
        .x_desc(chart.x_desc)
        .y_desc(chart.y_desc)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (name, points)) in chart.series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        plot.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        plot.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 5, color.filled())),
        )?;
    }
    plot.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
