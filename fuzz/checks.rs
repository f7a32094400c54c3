//! The checks the fuzz targets run, shared with `tests/fuzz_regressions.rs` so that every seed
//! and every committed crash input is replayed by the ordinary test suite.

use kinesis_producer::aggregation::{AggregateBuilder, AggregateLimits, MAGIC};
use kinesis_producer::{Deaggregator, OutOfRange, UserRecord};

/// Any bytes, read as a Kinesis record in every mode, must give records or an error value —
/// never a panic — and whatever decodes strictly must survive being aggregated again.
pub fn deaggregate(input: &[u8]) {
    // Byte 0: whether to take the rest as a whole Kinesis record, or as a protobuf body to frame
    // with the magic and a correct checksum (random bytes almost never carry a valid MD5, so
    // without this the fuzzer would rarely get past the checksum). The next 32 bytes choose a
    // shard range.
    let Some((&frame, input)) = input.split_first() else {
        return;
    };
    let (range, body) = input.split_at(input.len().min(32));
    let data = if frame & 1 == 1 {
        let mut framed = MAGIC.to_vec();
        framed.extend_from_slice(body);
        framed.extend_from_slice(&md5_of(body));
        framed
    } else {
        body.to_vec()
    };
    let data = &data[..];
    let mut bounds = [0u8; 32];
    bounds[..range.len()].copy_from_slice(range);
    let a = u128::from_le_bytes(bounds[..16].try_into().unwrap());
    let b = u128::from_le_bytes(bounds[16..].try_into().unwrap());
    let (start, end) = (a.min(b), a.max(b));

    let _ = Deaggregator::kcl(start, end).deaggregate(data.to_vec(), "pk");
    for policy in [
        OutOfRange::Flag,
        OutOfRange::Filter,
        OutOfRange::DropAggregate,
        OutOfRange::Error,
    ] {
        let _ = Deaggregator::new()
            .shard_range(start, end)
            .out_of_range(policy)
            .deaggregate(data.to_vec(), "pk");
    }
    let Ok(records) = Deaggregator::new().deaggregate(data.to_vec(), "pk") else {
        return;
    };
    if records.len() < 2 {
        return;
    }
    let mut builder = AggregateBuilder::new(AggregateLimits {
        max_size: usize::MAX,
        max_count: usize::MAX,
    });
    for r in &records {
        let mut user = UserRecord::new(r.data.clone(), r.partition_key.clone());
        if let Some(ehk) = &r.explicit_hash_key {
            user = user.with_explicit_hash_key(ehk.clone());
        }
        builder.try_push(user).expect("no limits");
    }
    let entry = builder.finish().expect("not empty");
    let again = Deaggregator::new()
        .deaggregate(entry.data, &entry.partition_key)
        .expect("our own aggregate decodes");
    assert_eq!(again.len(), records.len());
    for (x, y) in again.iter().zip(&records) {
        assert_eq!(
            (&x.partition_key, &x.explicit_hash_key, &x.data),
            (&y.partition_key, &y.explicit_hash_key, &y.data)
        );
    }
}

/// Any line given to the CLI's JSON-lines parser gives a record or an error value, never a
/// panic; a record's validation never panics either.
pub fn jsonl(line: &[u8]) {
    if let Ok(record) = kinesis_producer::jsonl::parse_line(line) {
        let _ = record.validate(1 << 20);
    }
}

fn md5_of(bytes: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    Md5::digest(bytes).into()
}
