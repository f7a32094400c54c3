pub mod batch_faults;
pub mod faults;
pub mod local_kinesis;
pub mod moto;
pub mod ports;
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

/// A producer for `stream` through `endpoint` (the server, or a proxy in front of it), tuned by
/// `tune`.
#[allow(dead_code)]
pub async fn producer_for(
    endpoint: &str,
    stream: &str,
    tune: impl FnOnce(kinesis_producer::ProducerBuilder) -> kinesis_producer::ProducerBuilder,
) -> kinesis_producer::Producer {
    tune(
        kinesis_producer::Producer::builder()
            .stream_name(stream)
            .client(local_kinesis::client_for(endpoint)),
    )
    .build()
    .await
    .expect("producer builds")
}
