//! A serde `Serializer` that writes nothing and fails on the first map it meets: the
//! check behind binary codecs that refuse keys whose encoding depends on map order.

use std::fmt;

use serde::ser::{self, Serialize};

#[derive(Debug)]
pub(crate) struct FoundMap(String);

impl fmt::Display for FoundMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FoundMap {}

impl ser::Error for FoundMap {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        FoundMap(msg.to_string())
    }
}

/// Walks a value; fails if it contains a map.
pub(crate) struct MapFinder;

type R = Result<(), FoundMap>;

macro_rules! accept {
    ($($name:ident($ty:ty)),* $(,)?) => {
        $(fn $name(self, _: $ty) -> R { Ok(()) })*
    };
}

impl ser::Serializer for MapFinder {
    type Ok = ();
    type Error = FoundMap;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = ser::Impossible<(), FoundMap>;
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
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

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
    fn serialize_seq(self, _: Option<usize>) -> Result<Self, FoundMap> {
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, FoundMap> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, FoundMap> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, FoundMap> {
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, FoundMap> {
        Err(FoundMap(
            "this codec refuses keys that contain a map: a map's encoding depends on its \
             iteration order; use the Json codec for such keys"
                .into(),
        ))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, FoundMap> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, FoundMap> {
        Ok(self)
    }
}

macro_rules! compound {
    ($($trait:ident :: $method:ident),* $(,)?) => {
        $(impl ser::$trait for MapFinder {
            type Ok = ();
            type Error = FoundMap;
            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
                value.serialize(MapFinder)
            }
            fn end(self) -> R {
                Ok(())
            }
        })*
    };
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
            type Error = FoundMap;
            fn serialize_field<T: ?Sized + Serialize>(&mut self, _: &'static str, value: &T) -> R {
                value.serialize(MapFinder)
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
    fn finds_nested_maps_only() {
        assert!((1, "a", vec![Some(2u8)]).serialize(MapFinder).is_ok());
        let nested = vec![(1, BTreeMap::from([(1, 2)]))];
        assert!(nested.serialize(MapFinder).is_err());
    }
}
