//! The CLI's `--input jsonl` format: one JSON object per line,
//! `{"partition_key": "...", "explicit_hash_key": "...", "data": "..."}`, with `explicit_hash_key`
//! optional and `data_base64` instead of `data` for binary data.

use base64::Engine;
use serde::Deserialize;

use crate::record::UserRecord;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Option<String>,
    data_base64: Option<String>,
}

/// Why a line is not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JsonlError(String);

/// Parses one line (without its line ending) into a record. The record is not validated here:
/// the producer's `put` does that and names the problem.
pub fn parse_line(line: &[u8]) -> Result<UserRecord, JsonlError> {
    let parsed: JsonRecord = serde_json::from_slice(line).map_err(|e| JsonlError(e.to_string()))?;
    let data = match (parsed.data, parsed.data_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| JsonlError(format!("data_base64 is not valid base64: {e}")))?,
        (Some(_), Some(_)) => {
            return Err(JsonlError(
                "give either data or data_base64, not both".into(),
            ))
        }
        (None, None) => return Err(JsonlError("missing field `data` (or `data_base64`)".into())),
    };
    Ok(UserRecord::from_parts(
        data.into(),
        parsed.partition_key,
        parsed.explicit_hash_key,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_binary_and_explicit_hash_keys() {
        let r = parse_line(br#"{"partition_key": "a", "data": "hi"}"#).unwrap();
        assert_eq!((r.partition_key(), &r.data()[..]), ("a", &b"hi"[..]));
        let r = parse_line(
            br#"{"partition_key": "b", "data_base64": "AAH/", "explicit_hash_key": "7"}"#,
        )
        .unwrap();
        assert_eq!(&r.data()[..], &[0, 1, 255]);
        assert_eq!(r.explicit_hash_key(), Some("7"));
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        for (line, says) in [
            (&br#"{"partition_key": "a"}"#[..], "missing field `data`"),
            (
                br#"{"partition_key": "a", "data": "x", "data_base64": "eA=="}"#,
                "not both",
            ),
            (
                br#"{"partition_key": "a", "data_base64": "!!"}"#,
                "not valid base64",
            ),
            (
                br#"{"partition_key": "a", "data": "x", "extra": 1}"#,
                "unknown field",
            ),
            (br#"{"data": "x"}"#, "partition_key"),
            (b"not json", "expected"),
            (b"", "EOF"),
        ] {
            let error = parse_line(line).unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        }
    }
}
