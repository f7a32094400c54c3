//! DynamoDB BatchWriteItem and BatchGetItem, one table per helper.
//!
//! - **BatchWriteItem:** 25 put or delete requests per call, 16 MiB per call, 400 KB per item
//!   (sized by DynamoDB's rule: attribute names plus values). `UnprocessedItems` are retried
//!   with backoff. With [`key_attributes`](BatchWriteItem::key_attributes) set and
//!   [`BatchOptions::deduplicate`](super::BatchOptions::deduplicate) on, two writes to one key
//!   keep the later one (DynamoDB refuses a batch that writes a key twice). Without it, such a
//!   batch is split until the two writes go in different requests, and they may land in either
//!   order.
//! - **BatchGetItem:** 100 keys per call; `UnprocessedKeys` are retried with backoff. Each key's
//!   answer is `Some(item)` or `None` (no such item); keys fetched before a later request failed
//!   keep their answers. When a projection is set, the key attributes are added to it, because
//!   they are how an answer is matched to its key.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, WriteRequest};
use aws_sdk_dynamodb::Client;

use super::{owned, BatchCall, BatchConfigError, Failure, ItemResult, Keep, Limits};

/// Requests per BatchWriteItem.
pub const MAX_WRITE_ITEMS: usize = 25;
/// Keys per BatchGetItem.
pub const MAX_GET_KEYS: usize = 100;
/// Bytes per item (400 KB).
pub const MAX_ITEM_BYTES: usize = 400 * 1024;
/// Bytes per BatchWriteItem request.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// An item, or a key: attribute name → value.
pub type Item = HashMap<String, AttributeValue>;

/// The size DynamoDB counts for an attribute value (its name is counted by the caller).
pub fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(s) => s.len(),
        // Numbers take about one byte per two digits, plus one; the text length bounds it.
        AttributeValue::N(n) => n.len().div_ceil(2) + 1,
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(set) | AttributeValue::Ns(set) => set.iter().map(String::len).sum(),
        AttributeValue::Bs(set) => set.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::L(list) => 3 + list.iter().map(|v| 1 + value_size(v)).sum::<usize>(),
        AttributeValue::M(map) => {
            3 + map
                .iter()
                .map(|(k, v)| 1 + k.len() + value_size(v))
                .sum::<usize>()
        }
        _ => 0,
    }
}

/// The size DynamoDB counts for an item or key: names plus values.
pub fn item_size(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

/// A canonical text of `item`'s values of `names`, for matching and de-duplication; `None` if
/// one is missing.
fn key_text(item: &Item, names: &[String]) -> Option<String> {
    let mut text = String::new();
    for name in names {
        match item.get(name)? {
            // DynamoDB answers with numbers in its own form ("1" for "01.0").
            AttributeValue::N(n) => {
                let _ = write!(text, "{name}=N:{};", canonical_number(n));
            }
            // Debug of a string or binary value is unambiguous and stable within a process.
            value => {
                let _ = write!(text, "{name}={value:?};");
            }
        }
    }
    Some(text)
}

/// A decimal number without a sign on zero, leading zeros or trailing fraction zeros.
fn canonical_number(n: &str) -> String {
    let (negative, digits) = match n.trim().strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, n.trim().trim_start_matches('+')),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let whole = whole.trim_start_matches('0');
    let fraction = fraction.trim_end_matches('0');
    let mut out = String::new();
    if negative && !(whole.is_empty() && fraction.is_empty()) {
        out.push('-');
    }
    out.push_str(if whole.is_empty() { "0" } else { whole });
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(fraction);
    }
    out
}

/// BatchWriteItem to one table.
#[derive(Debug, Clone)]
pub struct BatchWriteItem {
    client: Client,
    table: String,
    key_attributes: Vec<String>,
    limits: Limits,
}

impl BatchWriteItem {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        BatchWriteItem {
            client,
            table: table.into(),
            key_attributes: Vec::new(),
            limits: Limits {
                max_items: MAX_WRITE_ITEMS,
                max_bytes: MAX_REQUEST_BYTES,
                max_item_bytes: MAX_ITEM_BYTES,
            },
        }
    }

    /// The table's key attributes (partition key, then sort key if any), for de-duplication.
    pub fn key_attributes<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.key_attributes = names.into_iter().map(Into::into).collect();
        self
    }

    pub fn limits(mut self, limits: Limits) -> Result<Self, BatchConfigError> {
        limits.validate(MAX_WRITE_ITEMS)?;
        self.limits = limits;
        Ok(self)
    }
}

impl BatchCall for BatchWriteItem {
    type Item = WriteRequest;
    type Output = ();

    fn limits(&self) -> Limits {
        self.limits
    }

    fn check(&self, request: &WriteRequest) -> Result<usize, Failure> {
        let invalid = |message: &str| Err(Failure::new("ValidationException", message, false));
        match (&request.put_request, &request.delete_request) {
            (Some(put), None) if !put.item.is_empty() => Ok(item_size(&put.item)),
            (None, Some(delete)) if !delete.key.is_empty() => Ok(item_size(&delete.key)),
            (Some(_), None) => invalid("a PutRequest with an empty item"),
            (None, Some(_)) => invalid("a DeleteRequest with an empty key"),
            _ => invalid("a WriteRequest needs exactly one of PutRequest and DeleteRequest"),
        }
    }

    async fn send(&self, page: &[&WriteRequest]) -> Result<Vec<ItemResult<()>>, Failure> {
        let output = self
            .client
            .batch_write_item()
            .request_items(&self.table, owned(page))
            .customize()
            .config_override(
                aws_sdk_dynamodb::Config::builder().retry_config(RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| Failure::from_sdk(&e))?;
        let mut results: Vec<ItemResult<()>> = page.iter().map(|_| ItemResult::Done(())).collect();
        let unprocessed = output.unprocessed_items().and_then(|u| u.get(&self.table));
        let mut unmatched = false;
        for request in unprocessed.into_iter().flatten() {
            // The first still-successful equal request of the page is the one not applied.
            let position = page.iter().zip(&results).position(|(sent, result)| {
                *sent == request && matches!(result, ItemResult::Done(_))
            });
            match position {
                Some(position) => {
                    results[position] = ItemResult::Failed(Failure::new(
                        "UnprocessedItems",
                        "DynamoDB left the write unprocessed",
                        true,
                    ))
                }
                None => unmatched = true,
            }
        }
        if unmatched {
            // An unprocessed write that matches none sent (DynamoDB wrote it back in another
            // form): which one it was is unknown, so none counts as applied. Writes are
            // idempotent; the retry sends them again.
            fail_unconfirmed(&mut results, |done| matches!(done, ItemResult::Done(())));
        }
        Ok(results)
    }

    fn dedup_key(&self, request: &WriteRequest) -> Option<String> {
        if self.key_attributes.is_empty() {
            return None;
        }
        let values = match (&request.put_request, &request.delete_request) {
            (Some(put), _) => &put.item,
            (None, Some(delete)) => &delete.key,
            (None, None) => return None,
        };
        key_text(values, &self.key_attributes)
    }

    fn keep(&self) -> Keep {
        Keep::Last
    }
}

/// BatchGetItem from one table. An item is a key (attribute name → value).
#[derive(Debug, Clone)]
pub struct BatchGetItem {
    client: Client,
    table: String,
    consistent_read: Option<bool>,
    projection: Option<String>,
    names: Option<HashMap<String, String>>,
    limits: Limits,
}

impl BatchGetItem {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        BatchGetItem {
            client,
            table: table.into(),
            consistent_read: None,
            projection: None,
            names: None,
            limits: Limits {
                max_items: MAX_GET_KEYS,
                // The 16 MiB limit is on the answer, which DynamoDB enforces with UnprocessedKeys.
                max_bytes: usize::MAX,
                max_item_bytes: MAX_ITEM_BYTES,
            },
        }
    }

    pub fn consistent_read(mut self, consistent: bool) -> Self {
        self.consistent_read = Some(consistent);
        self
    }

    /// A projection expression, and the attribute names it uses (`#name` → name).
    pub fn projection(
        mut self,
        expression: impl Into<String>,
        names: HashMap<String, String>,
    ) -> Self {
        self.projection = Some(expression.into());
        self.names = (!names.is_empty()).then_some(names);
        self
    }

    pub fn limits(mut self, limits: Limits) -> Result<Self, BatchConfigError> {
        limits.validate(MAX_GET_KEYS)?;
        self.limits = limits;
        Ok(self)
    }

    fn request(&self, page: &[&Item], key_names: &[String]) -> Result<KeysAndAttributes, Failure> {
        let mut projection = self.projection.clone();
        let mut names = self.names.clone();
        if let Some(expression) = projection.as_mut() {
            // Key attributes the projection leaves out are added, so that answers can be
            // matched to keys; one it names already is not (DynamoDB refuses overlapping paths).
            let projected = projected_attributes(expression, names.as_ref());
            let names = names.get_or_insert_with(HashMap::new);
            for (i, name) in key_names.iter().enumerate() {
                if projected.contains(name) {
                    continue;
                }
                let placeholder = format!("#batchkey{i}");
                let _ = write!(expression, ", {placeholder}");
                names.insert(placeholder, name.clone());
            }
        }
        KeysAndAttributes::builder()
            .set_keys(Some(owned(page)))
            .set_consistent_read(self.consistent_read)
            .set_projection_expression(projection)
            .set_expression_attribute_names(names)
            .build()
            .map_err(|e| Failure::new("ValidationException", e.to_string(), false))
    }
}

/// The top-level attributes a projection expression names (`#name` placeholders resolved):
/// `"pk, #n.sub, tags[0]"` names `pk`, what `#n` stands for, and `tags`.
fn projected_attributes(
    expression: &str,
    names: Option<&HashMap<String, String>>,
) -> HashSet<String> {
    expression
        .split(',')
        .filter_map(|path| {
            let first = path.trim().split(['.', '[']).next()?.trim();
            match first.strip_prefix('#') {
                Some(_) => names.and_then(|n| n.get(first)).cloned(),
                None => Some(first.to_owned()),
            }
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// Turns the results `unconfirmed` picks into transient failures, to be sent again.
fn fail_unconfirmed<O>(
    results: &mut [ItemResult<O>],
    unconfirmed: impl Fn(&ItemResult<O>) -> bool,
) {
    for result in results.iter_mut().filter(|r| unconfirmed(r)) {
        *result = ItemResult::Failed(Failure::new(
            "UnmatchedAnswer",
            "an answer entry matched no item sent, so this item's outcome is not known",
            true,
        ));
    }
}

impl BatchCall for BatchGetItem {
    type Item = Item;
    /// The item, or `None` when the table has no item with that key.
    type Output = Option<Item>;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn check(&self, key: &Item) -> Result<usize, Failure> {
        if key.is_empty() || key.len() > 2 {
            return Err(Failure::new(
                "ValidationException",
                "a key has one attribute (partition key) or two (and sort key)",
                false,
            ));
        }
        Ok(item_size(key))
    }

    async fn send(&self, page: &[&Item]) -> Result<Vec<ItemResult<Option<Item>>>, Failure> {
        let mut key_names: Vec<String> = page[0].keys().cloned().collect();
        key_names.sort();
        let output = self
            .client
            .batch_get_item()
            .request_items(&self.table, self.request(page, &key_names)?)
            .customize()
            .config_override(
                aws_sdk_dynamodb::Config::builder().retry_config(RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| Failure::from_sdk(&e))?;
        let position_of: HashMap<String, Vec<usize>> =
            page.iter()
                .enumerate()
                .fold(HashMap::new(), |mut map, (position, key)| {
                    if let Some(text) = key_text(key, &key_names) {
                        map.entry(text).or_default().push(position);
                    }
                    map
                });
        let mut results: Vec<ItemResult<Option<Item>>> =
            page.iter().map(|_| ItemResult::Done(None)).collect();
        let mut unmatched = false;
        let found = output.responses().and_then(|r| r.get(&self.table));
        for item in found.into_iter().flatten() {
            let positions = key_text(item, &key_names).and_then(|t| position_of.get(&t));
            unmatched |= positions.is_none();
            for &position in positions.into_iter().flatten() {
                results[position] = ItemResult::Done(Some(item.clone()));
            }
        }
        let unprocessed = output.unprocessed_keys().and_then(|u| u.get(&self.table));
        for key in unprocessed.into_iter().flat_map(|k| &k.keys) {
            let positions = key_text(key, &key_names).and_then(|t| position_of.get(&t));
            unmatched |= positions.is_none();
            for &position in positions.into_iter().flatten() {
                results[position] = ItemResult::Failed(Failure::new(
                    "UnprocessedKeys",
                    "DynamoDB left the key unprocessed",
                    true,
                ));
            }
        }
        if unmatched {
            // An item or unprocessed key that matches no key sent: a key without an item may be
            // that one, so none is reported missing; the retry asks again.
            fail_unconfirmed(&mut results, |done| matches!(done, ItemResult::Done(None)));
        }
        Ok(results)
    }

    fn dedup_key(&self, key: &Item) -> Option<String> {
        let mut names: Vec<String> = key.keys().cloned().collect();
        names.sort();
        key_text(key, &names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline_client() -> Client {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .build();
        Client::from_conf(config)
    }

    #[test]
    fn a_projection_names_each_key_attribute_once() {
        let key: Item = HashMap::from([
            ("pk".to_owned(), AttributeValue::S("a".to_owned())),
            ("sk".to_owned(), AttributeValue::N("1".to_owned())),
        ]);
        let key_names = ["pk".to_owned(), "sk".to_owned()];
        let cases = [
            // (expression, its names, key attributes the request must add)
            ("pk, price", vec![], vec!["sk"]),
            ("#k, price", vec![("#k", "pk")], vec!["sk"]),
            ("price, sk , pk", vec![], vec![]),
            ("price", vec![], vec!["pk", "sk"]),
            ("pkx, tags[0], #s.inner", vec![("#s", "sk")], vec!["pk"]),
        ];
        for (expression, names, added) in cases {
            let names: HashMap<String, String> = names
                .into_iter()
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .collect();
            let call = BatchGetItem::new(offline_client(), "t").projection(expression, names);
            let request = call.request(&[&key], &key_names).expect("request");
            let written = request.projection_expression().expect("projection");
            let placeholders = request
                .expression_attribute_names()
                .cloned()
                .unwrap_or_default();
            let projected = projected_attributes(written, Some(&placeholders));
            for name in ["pk", "sk"] {
                assert!(projected.contains(name), "{expression} -> {written}");
            }
            let extra: Vec<&str> = placeholders
                .iter()
                .filter(|(placeholder, _)| placeholder.starts_with("#batchkey"))
                .map(|(_, name)| name.as_str())
                .collect();
            let mut extra = extra;
            extra.sort_unstable();
            assert_eq!(extra, added, "{expression} -> {written}");
        }
    }

    #[test]
    fn sizes_follow_dynamodb_rules() {
        let item: Item = HashMap::from([
            ("pk".to_owned(), AttributeValue::S("abc".to_owned())),
            ("n".to_owned(), AttributeValue::N("12345".to_owned())),
            ("ok".to_owned(), AttributeValue::Bool(true)),
        ]);
        assert_eq!(item_size(&item), 2 + 3 + 1 + 4 + 2 + 1);
        let nested = AttributeValue::M(HashMap::from([(
            "a".to_owned(),
            AttributeValue::S("xy".to_owned()),
        )]));
        assert_eq!(value_size(&nested), 3 + 1 + 1 + 2);
    }

    #[test]
    fn key_text_tells_keys_apart_and_needs_every_attribute() {
        let key = |pk: &str, sk: &str| -> Item {
            HashMap::from([
                ("pk".to_owned(), AttributeValue::S(pk.to_owned())),
                ("sk".to_owned(), AttributeValue::N(sk.to_owned())),
            ])
        };
        let names = ["pk".to_owned(), "sk".to_owned()];
        assert_eq!(
            key_text(&key("a", "1"), &names),
            key_text(&key("a", "1"), &names)
        );
        assert_ne!(
            key_text(&key("a", "1"), &names),
            key_text(&key("a", "2"), &names)
        );
        assert_eq!(key_text(&key("a", "1"), &["missing".to_owned()]), None);
        assert_eq!(
            key_text(&key("a", "01.50"), &names),
            key_text(&key("a", "1.5"), &names)
        );
        assert_eq!(canonical_number("-0.0"), "0");
        assert_eq!(canonical_number("-007"), "-7");
    }
}
