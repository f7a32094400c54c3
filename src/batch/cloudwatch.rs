//! CloudWatch PutMetricData, one namespace per helper.
//!
//! - **Limits:** 1,000 metric data per request and 1 MB per request. The SDK encodes requests in
//!   CBOR; a datum's size is estimated from its strings and numbers plus a fixed allowance per
//!   field, which over-counts a little rather than risk a refused request.
//! - **Checked before sending** (CloudWatch refuses the whole request otherwise): a metric name
//!   of 1 to 255 characters; at most 30 dimensions (a setting), each with a name of 1 to 255 and a
//!   value of 1 to 1,024 characters, no name twice; exactly one of `value`, `statistic_values`
//!   and `values`; finite values within CloudWatch's range (0, or magnitude 2^-360 to 2^360);
//!   at most 150 `values`, with as many `counts` if any; a complete statistic set with a positive
//!   sample count and minimum ≤ maximum; a storage resolution of 1 or 60.
//! - **Failures** are whole-request. Throttling and server errors are retried; a refusal that one
//!   bad datum can cause (`InvalidParameterValue` and the like) splits the request in halves
//!   until the bad datum fails alone, so its neighbours still land.

use std::collections::HashSet;

use aws_sdk_cloudwatch::config::retry::RetryConfig;
use aws_sdk_cloudwatch::types::MetricDatum;
use aws_sdk_cloudwatch::Client;

use super::{owned, BatchCall, BatchConfigError, Failure, ItemResult, Limits};

/// Metric data per PutMetricData.
pub const MAX_ITEMS: usize = 1000;
/// Bytes per PutMetricData request.
pub const MAX_BYTES: usize = 1_000_000;
/// Dimensions per metric.
pub const MAX_DIMENSIONS: usize = 30;
/// Values (and counts) per datum.
pub const MAX_VALUES: usize = 150;

/// PutMetricData into one namespace.
#[derive(Debug, Clone)]
pub struct PutMetricData {
    client: Client,
    namespace: String,
    max_dimensions: usize,
    limits: Limits,
}

impl PutMetricData {
    /// Fails if the namespace is not 1 to 255 characters or starts with `AWS/` (reserved).
    pub fn new(client: Client, namespace: impl Into<String>) -> Result<Self, BatchConfigError> {
        let namespace = namespace.into();
        if namespace.is_empty() || namespace.chars().count() > 255 || namespace.starts_with("AWS/")
        {
            return Err(BatchConfigError::new(
                "namespace",
                "must be 1 to 255 characters and not start with \"AWS/\"",
            ));
        }
        Ok(PutMetricData {
            client,
            namespace,
            max_dimensions: MAX_DIMENSIONS,
            limits: Limits {
                max_items: MAX_ITEMS,
                max_bytes: MAX_BYTES,
                max_item_bytes: MAX_BYTES,
            },
        })
    }

    /// Dimensions allowed per metric (1..=30).
    pub fn max_dimensions(mut self, max: usize) -> Result<Self, BatchConfigError> {
        if !(1..=MAX_DIMENSIONS).contains(&max) {
            return Err(BatchConfigError::new(
                "max_dimensions",
                format!("must be in 1..={MAX_DIMENSIONS}"),
            ));
        }
        self.max_dimensions = max;
        Ok(self)
    }

    pub fn limits(mut self, limits: Limits) -> Result<Self, BatchConfigError> {
        limits.validate(MAX_ITEMS)?;
        self.limits = limits;
        Ok(self)
    }
}

/// Whether CloudWatch accepts `value`: 0, or finite with magnitude in 2^-360..=2^360.
fn in_range(value: f64) -> bool {
    let magnitude = value.abs();
    value == 0.0
        || (magnitude.is_finite() && magnitude >= 2f64.powi(-360) && magnitude <= 2f64.powi(360))
}

/// Checks `datum` against CloudWatch's rules and estimates its encoded size.
fn check_datum(datum: &MetricDatum, max_dimensions: usize) -> Result<usize, String> {
    let name = datum.metric_name.as_deref().unwrap_or_default();
    if name.is_empty() || name.chars().count() > 255 {
        return Err("MetricName must be 1 to 255 characters".to_owned());
    }
    // CBOR: a few bytes of header per field, the field names, then the values.
    let mut size = 64 + name.len();
    let dimensions = datum.dimensions.as_deref().unwrap_or_default();
    if dimensions.len() > max_dimensions {
        return Err(format!(
            "{} dimensions, over the limit of {max_dimensions}",
            dimensions.len()
        ));
    }
    let mut names = HashSet::new();
    for dimension in dimensions {
        let key = dimension.name.as_deref().unwrap_or_default();
        let value = dimension.value.as_deref().unwrap_or_default();
        if key.is_empty() || key.chars().count() > 255 {
            return Err("a dimension name must be 1 to 255 characters".to_owned());
        }
        if value.is_empty() || value.chars().count() > 1024 {
            return Err(format!(
                "dimension {key:?} needs a value of 1 to 1,024 characters"
            ));
        }
        if !names.insert(key) {
            return Err(format!("dimension {key:?} appears twice"));
        }
        size += 24 + key.len() + value.len();
    }
    let forms = [
        datum.value.is_some(),
        datum.statistic_values.is_some(),
        datum.values.is_some(),
    ];
    if forms.iter().filter(|f| **f).count() != 1 {
        return Err("give exactly one of Value, StatisticValues and Values".to_owned());
    }
    if let Some(value) = datum.value {
        if !in_range(value) {
            return Err(format!("Value {value} is outside CloudWatch's range"));
        }
    }
    if let Some(set) = &datum.statistic_values {
        let (Some(count), Some(sum), Some(min), Some(max)) =
            (set.sample_count, set.sum, set.minimum, set.maximum)
        else {
            return Err("StatisticValues needs SampleCount, Sum, Minimum and Maximum".to_owned());
        };
        let positive = count > 0.0; // false for NaN too
        if !positive || ![count, sum, min, max].into_iter().all(in_range) || min > max {
            return Err("StatisticValues needs a positive SampleCount, values in range, and Minimum <= Maximum".to_owned());
        }
        size += 80;
    }
    if let Some(values) = &datum.values {
        if values.len() > MAX_VALUES {
            return Err(format!(
                "{} values, over the limit of {MAX_VALUES}",
                values.len()
            ));
        }
        if let Some(bad) = values.iter().find(|v| !in_range(**v)) {
            return Err(format!("value {bad} is outside CloudWatch's range"));
        }
        if let Some(counts) = &datum.counts {
            if counts.len() != values.len() {
                return Err("Counts must have as many entries as Values".to_owned());
            }
            if counts.iter().any(|c| !(c.is_finite() && *c >= 0.0)) {
                return Err("Counts must be finite and not negative".to_owned());
            }
        }
        size += 9 * (values.len() + datum.counts.as_ref().map_or(0, Vec::len));
    }
    if datum.storage_resolution.is_some_and(|r| r != 1 && r != 60) {
        return Err("StorageResolution must be 1 or 60".to_owned());
    }
    Ok(size)
}

impl BatchCall for PutMetricData {
    type Item = MetricDatum;
    type Output = ();

    fn limits(&self) -> Limits {
        self.limits
    }

    fn check(&self, datum: &MetricDatum) -> Result<usize, Failure> {
        check_datum(datum, self.max_dimensions)
            .map_err(|message| Failure::new("InvalidParameterValue", message, false))
    }

    async fn send(&self, page: &[&MetricDatum]) -> Result<Vec<ItemResult<()>>, Failure> {
        self.client
            .put_metric_data()
            .namespace(&self.namespace)
            .set_metric_data(Some(owned(page)))
            .customize()
            .config_override(
                aws_sdk_cloudwatch::Config::builder().retry_config(RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| Failure::from_sdk(&e))?;
        Ok(page.iter().map(|_| ItemResult::Done(())).collect())
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_cloudwatch::types::{Dimension, StatisticSet};

    use super::*;

    fn datum() -> aws_sdk_cloudwatch::types::builders::MetricDatumBuilder {
        MetricDatum::builder().metric_name("Latency")
    }

    #[test]
    fn a_datum_is_checked_by_cloudwatch_rules() {
        assert!(check_datum(&datum().value(1.5).build(), 30).is_ok());
        assert!(
            check_datum(&datum().build(), 30).is_err(),
            "no value at all"
        );
        assert!(
            check_datum(&datum().value(1.0).values(2.0).build(), 30).is_err(),
            "two forms"
        );
        assert!(check_datum(&datum().value(f64::NAN).build(), 30).is_err());
        assert!(check_datum(&datum().value(1e-200).build(), 30).is_err());
        assert!(
            check_datum(&MetricDatum::builder().value(1.0).build(), 30).is_err(),
            "no name"
        );
        let dimension = |n: &str, v: &str| Dimension::builder().name(n).value(v).build();
        let twice = datum()
            .value(1.0)
            .dimensions(dimension("a", "1"))
            .dimensions(dimension("a", "2"))
            .build();
        assert!(check_datum(&twice, 30).is_err());
        let mut many = datum().value(1.0);
        for i in 0..31 {
            many = many.dimensions(dimension(&format!("d{i}"), "v"));
        }
        assert!(check_datum(&many.build(), 30).is_err());
        let counts = datum().values(1.0).values(2.0).counts(1.0).build();
        assert!(
            check_datum(&counts, 30).is_err(),
            "counts must match values"
        );
        let set = StatisticSet::builder()
            .sample_count(2.0)
            .sum(3.0)
            .minimum(2.0)
            .maximum(1.0)
            .build();
        assert!(
            check_datum(&datum().statistic_values(set).build(), 30).is_err(),
            "min > max"
        );
        assert!(check_datum(&datum().value(1.0).storage_resolution(5).build(), 30).is_err());
    }
}
