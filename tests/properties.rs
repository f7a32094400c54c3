//! Properties of the aggregation format, over arbitrary input: any user records round-trip
//! through aggregate → bytes → deaggregate, every aggregate respects its limits, and the
//! builder's size accounting equals the encoded size exactly.

use kinesis_producer::aggregation::{AggregateBuilder, AggregateLimits, KinesisEntry};
use kinesis_producer::{deaggregate, UserRecord};
use proptest::prelude::*;

fn partition_key() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 1..=256).prop_map(String::from_iter)
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::collection::vec(any::<u8>(), 0..64),
        3 => prop::collection::vec(any::<u8>(), 0..4_096),
        1 => prop::collection::vec(any::<u8>(), 0..=(1 << 20) - 1_024),
    ]
}

fn user_record() -> impl Strategy<Value = UserRecord> {
    (partition_key(), data(), prop::option::of(any::<u128>())).prop_map(|(key, data, ehk)| {
        let record = UserRecord::new(data, key);
        match ehk {
            Some(ehk) => record.with_explicit_hash_key(ehk.to_string()),
            None => record,
        }
    })
}

/// Packs records the way the producer's aggregators do, checking the accounting as it goes;
/// returns each Kinesis record with the user records pushed into it.
fn pack(records: &[UserRecord], limits: AggregateLimits) -> Vec<(KinesisEntry, Vec<UserRecord>)> {
    let mut out = Vec::new();
    let mut builder = AggregateBuilder::new(limits);
    let mut pushed: Vec<UserRecord> = Vec::new();
    let finish =
        |builder: &mut AggregateBuilder, pushed: &mut Vec<UserRecord>, out: &mut Vec<_>| {
            let expected = builder.encoded_len();
            assert_eq!(builder.len(), pushed.len());
            if let Some(entry) = builder.finish() {
                let entry: KinesisEntry = entry;
                if entry.aggregated {
                    assert_eq!(entry.data.len(), expected, "accounted size = encoded size");
                    assert!(entry.data.len() <= limits.max_size);
                }
                assert!(pushed.len() <= limits.max_count);
                out.push((entry, std::mem::take(pushed)));
            }
            assert!(builder.is_empty());
        };
    for record in records {
        if AggregateBuilder::solo_len(record) > limits.max_size {
            finish(&mut builder, &mut pushed, &mut out);
            let mut alone = AggregateBuilder::new(AggregateLimits {
                max_size: usize::MAX,
                max_count: 1,
            });
            alone.try_push(record.clone()).unwrap();
            let mut one = vec![record.clone()];
            finish(&mut alone, &mut one, &mut out);
            continue;
        }
        if let Err(back) = builder.try_push(record.clone()) {
            finish(&mut builder, &mut pushed, &mut out);
            builder
                .try_push(back)
                .expect("an empty aggregate takes a record that fits alone");
        }
        pushed.push(record.clone());
    }
    finish(&mut builder, &mut pushed, &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_user_records_round_trip_through_aggregates(
        records in prop::collection::vec(user_record(), 1..40),
        max_size in prop_oneof![Just(51_200usize), 200usize..5_000, Just(1 << 20)],
        max_count in prop_oneof![Just(u32::MAX as usize), 1usize..8],
    ) {
        let limits = AggregateLimits { max_size, max_count };
        let mut read_back = Vec::new();
        for (entry, records) in pack(&records, limits) {
            let decoded = deaggregate(entry.data.clone(), &entry.partition_key).unwrap();
            prop_assert_eq!(decoded.len(), records.len());
            for (position, (got, sent)) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(got.sub_sequence_number, if entry.aggregated { position as u64 } else { 0 });
                if entry.aggregated {
                    prop_assert_eq!(got.explicit_hash_key.as_deref(), sent.explicit_hash_key());
                }
            }
            // The outer key routes the aggregate to its first record's hash key.
            prop_assert_eq!(&entry.partition_key, records[0].partition_key());
            prop_assert_eq!(entry.explicit_hash_key.as_deref(), records[0].explicit_hash_key());
            read_back.extend(decoded.into_iter().map(|r| (r.partition_key, r.data.to_vec())));
        }
        let sent: Vec<_> = records
            .iter()
            .map(|r| (r.partition_key().to_owned(), r.data().to_vec()))
            .collect();
        prop_assert_eq!(read_back, sent);
    }
}
