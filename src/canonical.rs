//! A serde `Serializer` that writes nothing and fails on the first thing a codec cannot
//! encode faithfully: a map (whose encoding depends on its iteration order, which a
//! key must not) or, for JSON, a NaN or infinite float (JSON has no such numbers;
//! serde_json would write `null`, a value that no longer decodes).

use std::fmt;

use serde::ser::{self, Serialize};

#[derive(Debug)]
pub(crate) enum Found {
    Map,
    NonFinite(f64),
    Other(String),
}

impl Found {
    pub(crate) fn message(&self) -> String {
        match self {
            Found::Map => "this codec refuses keys that contain a map: a map's encoding depends \
                           on its iteration order; use the Json codec for such keys"
                .into(),
            Found::NonFinite(f) => format!(
                "JSON cannot hold the float {f}; use a binary codec (Postcard) or store it \
                 another way (an Option, a string)"
            ),
            Found::Other(m) => m.clone(),
        }
    }
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for Found {}

impl ser::Error for Found {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Found::Other(msg.to_string())
    }
}

/// Walks a value; fails on a map if `maps`, on a NaN or infinite float if `floats`.
#[derive(Clone, Copy)]
pub(crate) struct MapFinder {
    pub(crate) maps: bool,
    pub(crate) floats: bool,
}

impl MapFinder {
    /// For JSON keys: both.
    pub(crate) const JSON_KEY: MapFinder = MapFinder {
        maps: true,
        floats: true,
    };
    /// For JSON values: floats only.
    pub(crate) const JSON_VALUE: MapFinder = MapFinder {
        maps: false,
        floats: true,
    };
    /// For binary keys: maps only.
    #[cfg(any(feature = "postcard", test))]
    pub(crate) const BINARY_KEY: MapFinder = MapFinder {
        maps: true,
        floats: false,
    };

    fn float(self, f: f64) -> R {
        if self.floats && !f.is_finite() {
            Err(Found::NonFinite(f))
        } else {
            Ok(())
        }
    }
}

type R = Result<(), Found>;

macro_rules! accept {
    ($($name:ident($ty:ty)),* $(,)?) => {
        $(fn $name(self, _: $ty) -> R { Ok(()) })*
    };
}

impl ser::Serializer for MapFinder {
    type Ok = ();
    type Error = Found;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    accept!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

    fn serialize_f32(self, v: f32) -> R {
        self.float(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> R {
        self.float(v)
    }
    fn serialize_none(self) -> R {
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> R {
        value.serialize(self)
    }
    fn serialize_unit(self) -> R {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _: &'static str, v: &T) -> R {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        v: &T,
    ) -> R {
        v.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self, Found> {
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, Found> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, Found> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Found> {
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self, Found> {
        if self.maps {
            Err(Found::Map)
        } else {
            Ok(self)
        }
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, Found> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Found> {
        Ok(self)
    }
}

macro_rules! compound {
    ($($trait:ident :: $method:ident),* $(,)?) => {
        $(impl ser::$trait for MapFinder {
            type Ok = ();
            type Error = Found;
            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
                value.serialize(*self)
            }
            fn end(self) -> R {
                Ok(())
            }
        })*
    };
}

impl ser::SerializeMap for MapFinder {
    type Ok = ();
    type Error = Found;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> R {
        key.serialize(*self)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
        value.serialize(*self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

compound!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

macro_rules! named_compound {
    ($($trait:ident),* $(,)?) => {
        $(impl ser::$trait for MapFinder {
            type Ok = ();
            type Error = Found;
            fn serialize_field<T: ?Sized + Serialize>(&mut self, _: &'static str, value: &T) -> R {
                value.serialize(*self)
            }
            fn end(self) -> R {
                Ok(())
            }
        })*
    };
}

named_compound!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn finds_nested_maps_and_bad_floats() {
        assert!((1, "a", vec![Some(2u8)], 1.5)
            .serialize(MapFinder::JSON_KEY)
            .is_ok());
        let nested = vec![(1, BTreeMap::from([(1, 2)]))];
        assert!(matches!(
            nested.serialize(MapFinder::JSON_KEY),
            Err(Found::Map)
        ));
        assert!(nested.serialize(MapFinder::JSON_VALUE).is_ok());
        let nan = BTreeMap::from([("x", vec![f64::NAN])]);
        assert!(matches!(
            nan.serialize(MapFinder::JSON_VALUE),
            Err(Found::NonFinite(_))
        ));
        assert!(Some(f32::INFINITY)
            .serialize(MapFinder::JSON_VALUE)
            .is_err());
        assert!(f64::NAN.serialize(MapFinder::BINARY_KEY).is_ok());
    }
}
