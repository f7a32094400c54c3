pub mod faults;
pub mod local_kinesis;
pub mod proxy;
pub mod rng;

/// Every failure the stream delivers until the producer has stopped.
#[allow(dead_code)]
pub async fn drain(
    mut failures: kinesis_producer::FailureStream,
) -> Vec<kinesis_producer::FailedRecord> {
    let mut out = Vec::new();
    while let Some(failed) = failures.recv().await {
        out.push(failed);
    }
    out
}
