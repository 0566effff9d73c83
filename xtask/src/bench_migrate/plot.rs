//! The plot of `bench-migrate`: the client's median pause against the server's resident size,
//! one line per mode, as SVG (plotters' SVG backend: text stays text, no font files needed).

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::{Mode, Summary};

/// Colours of the modes' lines, in `Mode::ALL` order.
const COLOURS: [RGBColor; 5] = [
    RGBColor(120, 120, 120),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

/// Renders the SVG. Sizes are drawn on a log2 axis (0 MiB, the plain demo server, at the
/// left edge as "demo"); pauses on a log10 axis, since they span milliseconds to seconds.
pub(crate) fn pause_against_size(summaries: &[Summary]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        // x: log2(size MiB), demo server (0) drawn at 2 (4 MiB, about its real size).
        let x_of = |mib: u32| f64::from(mib.max(4)).log2();
        let points: Vec<(Mode, f64, f64)> = summaries
            .iter()
            .filter_map(|s| Some((s.mode, x_of(s.size_mib), s.pause?.median)))
            .filter(|&(_, _, p)| p > 0.0)
            .collect();
        let x_max = points.iter().map(|p| p.1).fold(4.0_f64, f64::max) + 0.5;
        let y_max = points.iter().map(|p| p.2).fold(10.0_f64, f64::max) * 1.5;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Client pause (median) against the server's resident memory",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(1.5_f64..x_max, (1.0_f64..y_max).log_scale())
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("resident ballast, MiB (log scale; left: the plain demo server)")
            .y_desc("pause, ms (log scale)")
            .x_label_formatter(&|x| {
                let mib = 2f64.powf(*x).round();
                if mib <= 4.0 {
                    "demo".to_owned()
                } else {
                    format!("{mib}")
                }
            })
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, mode) in Mode::ALL.iter().enumerate() {
            let mut line: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.0 == *mode)
                .map(|p| (p.1, p.2))
                .collect();
            if line.is_empty() {
                continue;
            }
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            let colour = COLOURS[i];
            chart
                .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(mode.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(line.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::super::stats::Spread;
    use super::*;

    #[test]
    fn the_plot_has_a_line_per_mode_measured() {
        let s = |mode, size, pause| Summary {
            mode,
            size_mib: size,
            moves: 1,
            pause: Spread::of(&[pause]),
            freeze: None,
            overhead: None,
            image_mib: None,
            resident: None,
            latency_while_paging: None,
            goodput_back: None,
            client_handshakes: None,
            server_handshakes: None,
            problems: Vec::new(),
        };
        let svg = pause_against_size(&[
            s(Mode::Seed, 0, 100.0),
            s(Mode::Seed, 256, 400.0),
            s(Mode::PostCopy, 256, 40.0),
        ])
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("seed (1 phase, cold)"));
        assert!(svg.contains("two-phase, post-copy"));
        assert!(
            !svg.contains("podman checkpoint"),
            "unmeasured modes have no line"
        );
        // No data at all still draws the axes.
        assert!(pause_against_size(&[]).unwrap().contains("Client pause"));
    }
}
