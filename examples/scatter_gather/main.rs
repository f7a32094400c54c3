//! Scatter-gather on local servers, no AWS account needed: `./scripts/scatter-gather.sh`
//! (which installs moto and runs `cargo run --release --example scatter_gather -- ARGS`).
//!
//! A file of N records (`{"itemNo": "item#i", "price": ...}`) is uploaded to S3 (moto); the job
//! reads it and scatters tasks to SQS (moto) through the SQS batch helper, one record per
//! message or chunked; workers write each record to DynamoDB (moto) through the batch helper,
//! emit one event per record to Kinesis (embedded ferrokinesis) through the producer, delete
//! their messages in batches, and count each task exactly once; the worker that completes the
//! count gathers a summary file into S3, which is checked against the input.
//!
//! ```text
//! scatter_gather [--records N] [--chunk C] [--workers W] [--redeliver-every K]
//! scatter_gather --bench [--out DIR]     the benchmark matrix: CSV and PNG into DIR
//! scatter_gather --plot DIR              redraws DIR/results.png from DIR/results.csv
//! ```

mod job;
#[path = "../../tests/support/local_kinesis.rs"]
mod local_kinesis;
#[path = "../../tests/support/moto.rs"]
mod moto;
#[path = "../common/plot.rs"]
mod plot;
#[path = "../../tests/support/ports.rs"]
mod ports;

use std::path::{Path, PathBuf};

use job::{Clients, Error, JobConfig, Report};

/// The seed's published medians for its chunked variant on AWS Lambda: (records, seconds).
const SEED_CHUNKED: [(usize, f64); 4] = [
    (1_001, 1.0),
    (10_001, 4.0),
    (100_001, 33.0),
    (1_000_001, 277.0),
];

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run_command().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The SDK's errors say little in Display; this shows their causes.
            let error = aws_smithy_types::error::display::DisplayErrorContext(&*error);
            eprintln!("scatter_gather failed: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_command() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| -> Result<Option<usize>, Error> {
        match args.iter().position(|a| a == name) {
            Some(i) => {
                let text = args
                    .get(i + 1)
                    .ok_or_else(|| format!("{name} needs a value"))?;
                Ok(Some(text.parse().map_err(|_| {
                    format!("{name}: {text:?} is not a number")
                })?))
            }
            None => Ok(None),
        }
    };
    if args.iter().any(|a| a == "--bench") {
        let out = match args.iter().position(|a| a == "--out") {
            Some(i) => PathBuf::from(args.get(i + 1).ok_or("--out needs a directory")?),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/scatter_gather"),
        };
        return bench(&out).await;
    }
    if let Some(i) = args.iter().position(|a| a == "--plot") {
        return plot_csv(Path::new(
            args.get(i + 1)
                .ok_or("--plot needs the directory of results.csv")?,
        ));
    }
    let config = JobConfig {
        records: value("--records")?.unwrap_or(10_000),
        chunk: value("--chunk")?.unwrap_or(100),
        workers: value("--workers")?.unwrap_or(8),
        redeliver_every: value("--redeliver-every")?,
    };
    let report = run_once(&config).await?;
    println!("{}", report.summary_json.trim());
    print_report(&config, &report);
    if report.gathered != report.expected {
        return Err(format!(
            "the summary {:?} does not match the input {:?}",
            report.gathered, report.expected
        )
        .into());
    }
    println!(
        "summary matches the input: {} records",
        report.expected.count
    );
    Ok(())
}

/// Starts fresh local servers (moto reset, a new embedded Kinesis) and runs the job once.
async fn run_once(config: &JobConfig) -> Result<Report, Error> {
    let moto = moto::moto().await;
    let kinesis = local_kinesis::LocalKinesis::start(false).await;
    let clients = Clients::new(
        &moto::sdk_config(&moto.endpoint).await,
        kinesis.client.clone(),
    );
    let queue_url = job::create_resources(&clients).await?;
    job::run(&clients, &queue_url, config).await
}

fn print_report(config: &JobConfig, report: &Report) {
    println!(
        "{} records, chunk {}, {} workers: {} messages; scatter {} ms, process {} ms, gather {} ms; {} redeliveries",
        config.records,
        config.chunk,
        config.workers,
        report.messages,
        report.scatter.as_millis(),
        report.process.as_millis(),
        report.gather.as_millis(),
        report.redelivered,
    );
}

/// The benchmark matrix: per-record and chunked messages, worker counts, N from 1,000 up.
async fn bench(out: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(out)?;
    // Chunks of 100 records and one record per message, with 4 and 16 workers, up to where
    // moto stops being practical: one record per message costs it about 90 ms a message, so
    // that variant stops at 1,000 records; chunks stop at 100,000 (a million would take it
    // about half an hour a run).
    let mut variants = Vec::new();
    for (chunk, sizes) in [(100, &[1_000, 10_000, 100_000][..]), (1, &[1_000][..])] {
        for &records in sizes {
            for workers in [4, 16] {
                variants.push(JobConfig {
                    records,
                    chunk,
                    workers,
                    redeliver_every: None,
                });
            }
        }
    }
    let mut csv = String::from(
        "variant,chunk,workers,records,messages,scatter_ms,process_ms,gather_ms,total_ms\n",
    );
    for config in &variants {
        let report = run_once(config).await?;
        print_report(config, &report);
        if report.gathered != report.expected {
            return Err(format!("{config:?}: the summary does not match the input").into());
        }
        let total = report.scatter + report.process + report.gather;
        let variant = if config.chunk == 1 {
            "per-record"
        } else {
            "chunked"
        };
        csv.push_str(&format!(
            "{variant},{},{},{},{},{},{},{},{}\n",
            config.chunk,
            config.workers,
            config.records,
            report.messages,
            report.scatter.as_millis(),
            report.process.as_millis(),
            report.gather.as_millis(),
            total.as_millis()
        ));
        std::fs::write(out.join("results.csv"), &csv)?;
    }
    plot_csv(out)?;
    Ok(())
}

/// Draws `results.png` from `results.csv` in `out`.
fn plot_csv(out: &Path) -> Result<(), Error> {
    let csv = std::fs::read_to_string(out.join("results.csv"))?;
    let mut rows = Vec::new();
    for line in csv.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        let [variant, _, workers, records, _, _, _, _, total_ms] = fields[..] else {
            return Err(format!("a results.csv line with {} fields: {line}", fields.len()).into());
        };
        rows.push((
            format!("{variant}, {workers} workers"),
            records.parse()?,
            total_ms.parse::<f64>()? / 1000.0,
        ));
    }
    plot(&rows, &out.join("results.png"))?;
    println!("wrote {}", out.join("results.png").display());
    Ok(())
}

/// Total time against N, log-log, one line per variant and one for the seed's chunked medians.
fn plot(rows: &[(String, usize, f64)], path: &Path) -> Result<(), Error> {
    let mut names: Vec<&String> = Vec::new();
    for (name, _, _) in rows {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let mut series: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .map(|name| {
            let points = rows
                .iter()
                .filter(|r| &r.0 == *name)
                .map(|r| (r.1 as f64, r.2))
                .collect();
            ((*name).clone(), points)
        })
        .collect();
    series.push((
        "seed, chunked, AWS Lambda (published medians)".to_owned(),
        SEED_CHUNKED.iter().map(|(n, s)| (*n as f64, *s)).collect(),
    ));
    plot::draw(
        plot::Chart {
            title: "Scatter-gather: total time by records (local servers vs the seed on AWS)",
            x_desc: "records",
            y_desc: "seconds (scatter + process + gather)",
            x_range: (500.0, 2_000_000.0),
            y_range: (0.05, 1_000.0),
            series,
        },
        path,
    )
}
