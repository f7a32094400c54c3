//! Draws the performance plots from the figures `benches/perf-grid.sh` measured:
//!
//! ```text
//! cargo run --release --example perf_plot -- benches/results/perf-grid.csv
//! ```
//!
//! Writes `perf-record-size.png` (throughput against record size, one shard) and
//! `perf-shards.png` (throughput, CPU per record and aggregation density against shard count,
//! 100-byte records) next to the CSV.

#[path = "common/plot.rs"]
mod plot;

use std::path::Path;

use plot::{Chart, Error};

/// One measured run: a line of the CSV.
struct Run {
    sweep: String,
    record_size: f64,
    shards: f64,
    records_per_second: f64,
    mb_per_second: f64,
    cpu_ns_per_record: f64,
    per_kinesis_record: f64,
    floor_ns_per_record: f64,
}

fn read(path: &Path) -> Result<Vec<Run>, Error> {
    let csv = std::fs::read_to_string(path)?;
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().ok_or("an empty CSV")?.split(',').collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| format!("no column {name} in {}", path.display()))
    };
    let (sweep, size, shards, rate, mb, cpu, density, floor) = (
        column("sweep")?,
        column("record_size")?,
        column("shards")?,
        column("records_per_second")?,
        column("mb_per_second")?,
        column("cpu_ns_per_record")?,
        column("user_records_per_kinesis_record")?,
        column("floor_ns_per_record")?,
    );
    let mut runs = Vec::new();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        let number = |i: usize| -> Result<f64, Error> {
            let text = fields
                .get(i)
                .ok_or_else(|| format!("a short line: {line}"))?;
            Ok(text
                .parse::<f64>()
                .map_err(|_| format!("{text:?} is not a number in: {line}"))?)
        };
        runs.push(Run {
            sweep: fields.get(sweep).unwrap_or(&"").to_string(),
            record_size: number(size)?,
            shards: number(shards)?,
            records_per_second: number(rate)?,
            mb_per_second: number(mb)?,
            cpu_ns_per_record: number(cpu)?,
            per_kinesis_record: number(density)?,
            floor_ns_per_record: number(floor)?,
        });
    }
    Ok(runs)
}

fn main() -> Result<(), Error> {
    let csv = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "benches/results/perf-grid.csv".to_owned());
    let csv = Path::new(&csv);
    let runs = read(csv)?;
    let dir = csv.parent().unwrap_or(Path::new("."));
    // One line per (name, y) over the runs of one sweep, against `x`.
    type Column = fn(&Run) -> f64;
    let lines = |sweep: &str, x: Column, ys: &[(&str, Column)]| -> Vec<(String, Vec<(f64, f64)>)> {
        ys.iter()
            .map(|(name, y)| {
                let points = runs
                    .iter()
                    .filter(|r| r.sweep == sweep)
                    .map(|r| (x(r), y(r)))
                    .collect();
                (name.to_string(), points)
            })
            .collect()
    };
    let thousands: Column = |r| r.records_per_second / 1e3;
    let cpu: Column = |r| r.cpu_ns_per_record / 1e3;
    let floor: Column = |r| r.floor_ns_per_record / 1e3;

    let by_size = dir.join("perf-record-size.png");
    plot::draw(
        Chart {
            title: "kinesis-producer perf: throughput by record size (1 shard, null sink, 2 cores)",
            x_desc: "record size (bytes)",
            y_desc: "thousand records/s; MB/s; CPU µs per record",
            x_range: (5.0, 200_000.0),
            y_range: (0.1, 5_000.0),
            series: lines(
                "size",
                |r| r.record_size,
                &[
                    ("thousand records/s", thousands),
                    ("MB/s of record data", |r| r.mb_per_second),
                    ("CPU µs per record", cpu),
                    ("floor µs per record", floor),
                ],
            ),
        },
        &by_size,
    )?;
    println!("wrote {}", by_size.display());

    let by_shards = dir.join("perf-shards.png");
    plot::draw(
        Chart {
            title: "kinesis-producer perf: by shard count (100-byte records, null sink, 2 cores)",
            x_desc: "shards",
            y_desc: "thousand records/s; CPU µs per record; records per aggregate",
            x_range: (0.7, 20_000.0),
            y_range: (0.1, 5_000.0),
            series: lines(
                "shards",
                |r| r.shards,
                &[
                    ("thousand records/s", thousands),
                    ("CPU µs per record", cpu),
                    ("floor µs per record", floor),
                    ("user records per Kinesis record", |r| r.per_kinesis_record),
                ],
            ),
        },
        &by_shards,
    )?;
    println!("wrote {}", by_shards.display());
    Ok(())
}
