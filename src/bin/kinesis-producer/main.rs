//! `kinesis-producer`: `put` ships stdin to a stream through the producer; `tail` reads a stream
//! back, de-aggregating KPL aggregates, one JSON line per user record; `perf` measures the
//! producer and `perf-sink` serves the null endpoint it measures against.

// `perf` reads per-thread CPU time and peak memory the Linux way (getrusage's RUSAGE_THREAD,
// ru_maxrss in KiB): it is built on Linux only.
#[cfg(target_os = "linux")]
mod floor;
#[cfg(target_os = "linux")]
mod perf;
mod put;
#[cfg(target_os = "linux")]
mod sink;
mod tail;
#[cfg(target_os = "linux")]
mod usage;

use std::io::Write;
use std::process::ExitCode;

use aws_sdk_kinesis::Client;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kinesis-producer",
    version,
    about = "A KPL-compatible Kinesis producer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reads stdin, one record per line, and puts every line into the stream.
    Put(put::PutArgs),
    /// Reads the stream (every shard, or one), de-aggregates, and prints one JSON line per user
    /// record; follows new records and new shards unless --no-follow.
    Tail(tail::TailArgs),
    /// Measures the producer (Linux only): puts generated records (to the in-process null sink or an
    /// endpoint) and prints CPU per record, throughput, memory, latency and the floor, one
    /// key=value per line.
    #[cfg(target_os = "linux")]
    Perf(perf::PerfArgs),
    /// Runs the null sink alone on 127.0.0.1, so other producers can be measured against it.
    #[cfg(target_os = "linux")]
    PerfSink(perf::SinkArgs),
}

/// Which stream, and how to reach it: shared by the commands.
#[derive(clap::Args)]
pub struct StreamArgs {
    /// Name of the stream.
    #[arg(
        long,
        required_unless_present = "stream_arn",
        conflicts_with = "stream_arn"
    )]
    pub stream_name: Option<String>,
    /// ARN of the stream.
    #[arg(long)]
    pub stream_arn: Option<String>,
    /// AWS region (default: from the environment or profile).
    #[arg(long)]
    pub region: Option<String>,
    /// Endpoint to send requests to (default: AWS_ENDPOINT_URL, else the region's endpoint).
    #[arg(long)]
    pub endpoint_url: Option<String>,
}

impl StreamArgs {
    /// A client from the environment (credentials, profile), with --region and --endpoint-url.
    pub async fn client(&self) -> Client {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &self.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        Client::new(&loader.load().await)
    }
}

/// Writes one JSON value as a line on stderr (problems and reports, never record data).
pub fn report(value: serde_json::Value) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{value}");
}

/// Kinesis' largest record when the stream allows it (10 MiB), data and key together.
pub const RECORD_SIZE_LIMIT: usize = 10 << 20;

/// Waits for SIGINT or SIGTERM and names it.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Put(args) => put::run(args).await,
        Command::Tail(args) => tail::run(args).await,
        #[cfg(target_os = "linux")]
        Command::Perf(args) => perf::run(args).await,
        #[cfg(target_os = "linux")]
        Command::PerfSink(args) => perf::run_sink(args).await,
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("kinesis-producer: {message}");
            ExitCode::from(2)
        }
    }
}
