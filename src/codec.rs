//! Codecs: how keys and values become the bytes stored in the table.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::canonical::{Found, MapFinder};
use crate::error::BoxError;

/// Whether a codec's output is text (stored in a text column) or bytes (a binary one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// UTF-8 text: `TEXT` columns. Encoders must return valid UTF-8.
    Text,
    /// Arbitrary bytes: `BLOB`, `BYTEA`, `LONGBLOB`/`VARBINARY` columns.
    Binary,
}

/// Turns a `T` into bytes for the table and back.
///
/// A key codec must be *canonical*: keys that are equal must always encode to the same
/// bytes, or one key could become two rows. [`encode_key`](Codec::encode_key) is what
/// the map calls for keys; a codec that cannot guarantee canonical bytes for some key
/// refuses it there with an error.
pub trait Codec<T>: Send + Sync {
    /// Text or binary: decides the column type.
    fn format(&self) -> Format;

    /// Appends the encoding of `value` to `out`.
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), BoxError>;

    /// Appends the canonical encoding of a key to `out`; by default [`encode`](Codec::encode).
    fn encode_key(&self, key: &T, out: &mut Vec<u8>) -> Result<(), BoxError> {
        self.encode(key, out)
    }

    /// Decodes what [`encode`](Codec::encode) wrote.
    fn decode(&self, bytes: &[u8]) -> Result<T, BoxError>;

    /// Whether unequal keys always encode to different bytes, so that the map need not
    /// decode every key it writes to check it (it does for codecs that say `false`, the
    /// default: JSON writes `None` and `Some(())` alike).
    fn keys_distinct(&self) -> bool {
        false
    }

    /// For a slice ([`Builder::prefix`](crate::Builder::prefix)): the bytes that begin
    /// the encoding of every key that is a string starting with `prefix`, and of no
    /// other key, so that the slice is one range of the table's key column. `None`
    /// (the default) when the codec's encodings of such keys do not share a beginning;
    /// a slice is then refused at open.
    fn string_prefix(&self, prefix: &str) -> Option<Vec<u8>> {
        let _ = prefix;
        None
    }
}

/// The default codec: JSON text, human readable, through serde.
///
/// Keys are encoded canonically, so equal keys always give the same text: a struct's
/// fields come in declaration order, as serde writes them, and the entries of a map
/// inside a key are written sorted, whatever order the map iterates in. Values are
/// written as serde writes them.
///
/// ```
/// use write_thru_hash::{Codec, Json};
/// let mut out = Vec::new();
/// Codec::<(String, i32)>::encode(&Json, &("a".to_string(), 1), &mut out).unwrap();
/// assert_eq!(out, br#"["a",1]"#);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: Serialize + DeserializeOwned> Codec<T> for Json {
    fn format(&self) -> Format {
        Format::Text
    }

    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), BoxError> {
        // serde_json writes a NaN as `null`, which would not decode back: refuse it.
        value
            .serialize(MapFinder::JSON_VALUE)
            .map_err(|e| e.message())?;
        serde_json::to_writer(out, value).map_err(Into::into)
    }

    fn encode_key(&self, key: &T, out: &mut Vec<u8>) -> Result<(), BoxError> {
        // Without a map inside, serde's output is canonical as it is (struct fields come
        // in declaration order). With one, going through `Value`, whose objects are
        // sorted maps, makes the text independent of the order the map iterates in.
        match key.serialize(MapFinder::JSON_KEY) {
            Ok(()) => serde_json::to_writer(out, key).map_err(Into::into),
            Err(Found::Map) => {
                key.serialize(MapFinder::JSON_VALUE)
                    .map_err(|e| e.message())?;
                let value = serde_json::to_value(key)?;
                serde_json::to_writer(out, &value).map_err(Into::into)
            }
            Err(e) => Err(e.message().into()),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, BoxError> {
        serde_json::from_slice(bytes).map_err(Into::into)
    }

    fn keys_distinct(&self) -> bool {
        // serde_json writes unequal strings, integers, booleans and characters as
        // unequal texts; other types may collide (`None` and `Some(())` are both
        // `null`), and are checked by reading each key back.
        matches!(
            std::any::type_name::<T>(),
            "alloc::string::String"
                | "bool"
                | "char"
                | "i8"
                | "i16"
                | "i32"
                | "i64"
                | "i128"
                | "isize"
                | "u8"
                | "u16"
                | "u32"
                | "u64"
                | "u128"
                | "usize"
        )
    }

    fn string_prefix(&self, prefix: &str) -> Option<Vec<u8>> {
        // A JSON string is `"`, then each character as it is or escaped, each alone:
        // the strings that start with `prefix` are the texts that start with this.
        let mut text = serde_json::to_vec(prefix).ok()?;
        text.pop();
        Some(text)
    }
}

/// Stores `String`s as they are, in a text column: the codec for a table whose
/// keys or values are plain text, such as one written by the Racket original with
/// string keys and values.
///
/// ```
/// use write_thru_hash::{Codec, Text};
/// let mut out = Vec::new();
/// Text.encode(&"héllo".to_string(), &mut out).unwrap();
/// assert_eq!(out, "héllo".as_bytes());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Text;

impl Codec<String> for Text {
    fn format(&self) -> Format {
        Format::Text
    }

    fn encode(&self, value: &String, out: &mut Vec<u8>) -> Result<(), BoxError> {
        out.extend_from_slice(value.as_bytes());
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<String, BoxError> {
        Ok(std::str::from_utf8(bytes)?.to_owned())
    }

    fn keys_distinct(&self) -> bool {
        true
    }

    fn string_prefix(&self, prefix: &str) -> Option<Vec<u8>> {
        Some(prefix.as_bytes().to_vec())
    }
}

/// Stores `Vec<u8>`s as they are, in a binary column.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bytes;

impl Codec<Vec<u8>> for Bytes {
    fn format(&self) -> Format {
        Format::Binary
    }

    fn encode(&self, value: &Vec<u8>, out: &mut Vec<u8>) -> Result<(), BoxError> {
        out.extend_from_slice(value);
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, BoxError> {
        Ok(bytes.to_vec())
    }

    fn keys_distinct(&self) -> bool {
        true
    }
}

/// The compact binary codec: [postcard](https://docs.rs/postcard), a maintained serde
/// format with a stable, documented wire format. Feature `postcard`.
///
/// Keys that contain a map are refused: postcard writes a map in the order it
/// iterates, which is not canonical.
///
/// ```
/// use write_thru_hash::{Codec, Postcard};
/// let mut out = Vec::new();
/// Codec::<u32>::encode(&Postcard, &300, &mut out).unwrap();
/// assert_eq!(out, [0xac, 0x02]);
/// ```
#[cfg(feature = "postcard")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Postcard;

#[cfg(feature = "postcard")]
impl<T: Serialize + DeserializeOwned> Codec<T> for Postcard {
    fn format(&self) -> Format {
        Format::Binary
    }

    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), BoxError> {
        let taken = std::mem::take(out);
        *out = postcard::to_extend(value, taken)?;
        Ok(())
    }

    fn encode_key(&self, key: &T, out: &mut Vec<u8>) -> Result<(), BoxError> {
        key.serialize(MapFinder::BINARY_KEY)
            .map_err(|e| e.message())?;
        self.encode(key, out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, BoxError> {
        let (value, rest) = postcard::take_from_bytes(bytes)?;
        if !rest.is_empty() {
            return Err(format!("{} bytes left over after the value", rest.len()).into());
        }
        Ok(value)
    }
}

type EncodeFn<T> = dyn Fn(&T, &mut Vec<u8>) -> Result<(), BoxError> + Send + Sync;
type DecodeFn<T> = dyn Fn(&[u8]) -> Result<T, BoxError> + Send + Sync;

/// A codec built from two closures, as the Racket original's `#:serializer` and
/// `#:deserializer`.
///
/// ```
/// use write_thru_hash::{Codec, FnCodec};
/// // Store numbers as decimal text.
/// let codec = FnCodec::text(|n: &i64| n.to_string(), |s: &str| s.parse::<i64>());
/// let mut out = Vec::new();
/// codec.encode(&42, &mut out).unwrap();
/// assert_eq!(out, b"42");
/// assert_eq!(codec.decode(b"42").unwrap(), 42);
/// ```
pub struct FnCodec<T> {
    format: Format,
    encode: Arc<EncodeFn<T>>,
    decode: Arc<DecodeFn<T>>,
}

impl<T> Clone for FnCodec<T> {
    fn clone(&self) -> Self {
        FnCodec {
            format: self.format,
            encode: Arc::clone(&self.encode),
            decode: Arc::clone(&self.decode),
        }
    }
}

impl<T> fmt::Debug for FnCodec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnCodec")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl<T> FnCodec<T> {
    /// A text codec: `serialize` gives the text stored, `deserialize` reads it back.
    pub fn text<E>(
        serialize: impl Fn(&T) -> String + Send + Sync + 'static,
        deserialize: impl Fn(&str) -> Result<T, E> + Send + Sync + 'static,
    ) -> Self
    where
        E: Into<BoxError>,
    {
        FnCodec {
            format: Format::Text,
            encode: Arc::new(move |v, out| {
                out.extend_from_slice(serialize(v).as_bytes());
                Ok(())
            }),
            decode: Arc::new(move |bytes| {
                deserialize(std::str::from_utf8(bytes)?).map_err(Into::into)
            }),
        }
    }

    /// A binary codec: `serialize` gives the bytes stored, `deserialize` reads them back.
    pub fn binary<E>(
        serialize: impl Fn(&T) -> Vec<u8> + Send + Sync + 'static,
        deserialize: impl Fn(&[u8]) -> Result<T, E> + Send + Sync + 'static,
    ) -> Self
    where
        E: Into<BoxError>,
    {
        FnCodec {
            format: Format::Binary,
            encode: Arc::new(move |v, out| {
                out.extend_from_slice(&serialize(v));
                Ok(())
            }),
            decode: Arc::new(move |bytes| deserialize(bytes).map_err(Into::into)),
        }
    }
}

impl<T> Codec<T> for FnCodec<T> {
    fn format(&self) -> Format {
        self.format
    }

    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), BoxError> {
        (self.encode)(value, out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, BoxError> {
        (self.decode)(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    fn key<T: Serialize + DeserializeOwned>(codec: &impl Codec<T>, v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        codec.encode_key(v, &mut out).unwrap();
        out
    }

    #[test]
    fn json_trusts_only_keys_it_cannot_write_alike() {
        assert!(Codec::<String>::keys_distinct(&Json));
        assert!(Codec::<u64>::keys_distinct(&Json));
        assert!(!Codec::<Option<()>>::keys_distinct(&Json));
        assert!(!Codec::<f64>::keys_distinct(&Json));
        assert!(!Codec::<(String, i32)>::keys_distinct(&Json));
    }

    #[test]
    fn json_keys_are_canonical_whatever_the_map_order() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for i in 0..50 {
            a.insert(format!("k{i}"), i);
        }
        for i in (0..50).rev() {
            b.insert(format!("k{i}"), i);
        }
        assert_eq!(key(&Json, &a), key(&Json, &b));
        let sorted: BTreeMap<_, _> = a.iter().collect();
        assert_eq!(key(&Json, &a), serde_json::to_vec(&sorted).unwrap());
    }

    #[test]
    fn json_refuses_floats_it_cannot_hold() {
        let mut out = Vec::new();
        let err = Codec::<Vec<f64>>::encode(&Json, &vec![1.0, f64::NAN], &mut out).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
        assert!(Codec::<f32>::encode(&Json, &f32::NEG_INFINITY, &mut out).is_err());
        assert!(Codec::<f64>::encode(&Json, &1.5, &mut out).is_ok());
        let key = BTreeMap::from([("k".to_string(), f64::INFINITY)]);
        assert!(Json.encode_key(&key, &mut out).is_err());
    }

    #[test]
    fn json_scalars_round_trip() {
        assert_eq!(key(&Json, &"a\"b".to_string()), br#""a\"b""#);
        assert_eq!(key(&Json, &-5i64), b"-5");
        let v: String = Json.decode(br#""a\"b""#).unwrap();
        assert_eq!(v, "a\"b");
    }

    #[cfg(feature = "postcard")]
    #[test]
    fn postcard_refuses_map_keys_and_round_trips() {
        let mut out = Vec::new();
        let m: BTreeMap<u8, u8> = [(1, 2)].into();
        assert!(Postcard.encode_key(&m, &mut out).is_err());
        let k = (String::from("x"), vec![1u8, 2], Some(3i64));
        let bytes = key(&Postcard, &k);
        let back: (String, Vec<u8>, Option<i64>) = Postcard.decode(&bytes).unwrap();
        assert_eq!(back, k);
        assert!(Codec::<u8>::decode(&Postcard, &[1, 2]).is_err());
    }

    #[test]
    fn fn_codec_reports_bad_utf8() {
        let c = FnCodec::text(
            |s: &String| s.clone(),
            |s: &str| Ok::<_, BoxError>(s.to_owned()),
        );
        assert!(c.decode(&[0xff]).is_err());
    }
}
