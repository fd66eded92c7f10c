//! A depth limit on decoding, counted at every level serde recurses into.
//!
//! rmp-serde bounds the nesting of arrays, maps and ext values (1,024
//! levels), but not the levels its other entry points recurse through: an
//! enum variant (`{"Neg": ...}`, five bytes a level of a recursive
//! `enum Expr { Neg(Box<Expr>), .. }`), a newtype struct, an `Option`. A
//! caller's 500 KB argument of such levels overflowed a service's stack
//! (the whole process aborts, and the broker re-delivers the call to the
//! restarted service), and for `struct Chain(Option<Box<Chain>>)` the one
//! byte `01` recursed for ever: `deserialize_option` peeks a marker that is
//! not nil and recurses without consuming it (red-team pass 9).
//!
//! [`Limited`] wraps a deserializer and every deserializer, visitor, seed
//! and access it hands to the type being decoded, and counts the levels
//! entered and not yet left: one more for each `deserialize_*` call on a
//! nested value. Past [`MAX_DEPTH`] the decode fails with an error instead
//! of recursing further. The wrappers only forward (borrowed strings and
//! bytes stay borrowed, `is_human_readable` is the inner one's).

use std::cell::Cell;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// The deepest nesting decoded: levels of arrays, maps, enum variants,
/// newtypes and options together. A debug build on a 2 MiB thread (a tokio
/// worker's) overflowed its stack at 700 levels of arrays decoded into
/// `rmpv::Value` before this limit existed; 256 leaves it room.
pub const MAX_DEPTH: usize = 256;

/// The message of the error a decode too deep fails with.
pub const TOO_DEEP: &str =
    "depth limit exceeded: the value nests arrays, maps, enum variants, options or newtypes more than 256 levels deep";

/// The levels entered and not yet left, shared by the wrappers of one
/// decode.
#[derive(Debug, Default)]
pub struct Levels(Cell<usize>);

impl Levels {
    /// Enters one level; fails past [`MAX_DEPTH`].
    fn enter<E: de::Error>(&self) -> Result<Leave<'_>, E> {
        let n = self.0.get();
        if n >= MAX_DEPTH {
            return Err(E::custom(TOO_DEEP));
        }
        self.0.set(n + 1);
        Ok(Leave(self))
    }
}

/// Leaves the level when dropped (also on an error or a panic).
struct Leave<'a>(&'a Levels);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0 .0.set(self.0 .0.get().saturating_sub(1));
    }
}

/// A deserializer whose nested values are counted against [`MAX_DEPTH`]
/// (see the module docs).
pub struct Limited<'l, D> {
    inner: D,
    levels: &'l Levels,
}

impl<'l, D> Limited<'l, D> {
    /// Wraps `inner`; `levels` counts for the whole decode.
    pub fn new(inner: D, levels: &'l Levels) -> Self {
        Limited { inner, levels }
    }
}

/// A visitor, seed or access wrapped so that what it hands on is counted.
struct Wrap<'l, T> {
    inner: T,
    levels: &'l Levels,
}

impl<'l, T> Wrap<'l, T> {
    fn new(inner: T, levels: &'l Levels) -> Self {
        Wrap { inner, levels }
    }
}

/// One `deserialize_*` method: enter a level, forward with the visitor
/// wrapped.
macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $name<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
            let _leave = self.levels.enter::<D::Error>()?;
            self.inner.$name($($arg,)* Wrap::new(visitor, self.levels))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Limited<'_, D> {
    type Error = D::Error;

    forward! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// Visitor methods that only forward.
macro_rules! visit_plain {
    ($($name:ident($ty:ty);)*) => {$(
        fn $name<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.inner.$name(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    visit_plain! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Limited::new(d, self.levels))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner
            .visit_newtype_struct(Limited::new(d, self.levels))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(Wrap::new(seq, self.levels))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(Wrap::new(map, self.levels))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(Wrap::new(data, self.levels))
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Wrap<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Limited::new(d, self.levels))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.inner.next_element_seed(Wrap::new(seed, self.levels))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(Wrap::new(seed, self.levels))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.next_value_seed(Wrap::new(seed, self.levels))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, 'l, A: EnumAccess<'de>> EnumAccess<'de> for Wrap<'l, A> {
    type Error = A::Error;
    type Variant = Wrap<'l, A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.inner.variant_seed(Wrap::new(seed, self.levels))?;
        Ok((value, Wrap::new(variant, self.levels)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        // A level of its own: the variant's value may not go through a
        // `deserialize_*` of ours (rmp-serde decodes it in place).
        let _leave = self.levels.enter::<A::Error>()?;
        self.inner
            .newtype_variant_seed(Wrap::new(seed, self.levels))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let _leave = self.levels.enter::<A::Error>()?;
        self.inner
            .tuple_variant(len, Wrap::new(visitor, self.levels))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let _leave = self.levels.enter::<A::Error>()?;
        self.inner
            .struct_variant(fields, Wrap::new(visitor, self.levels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode_payload;
    use serde::Deserialize;

    /// A recursive type whose levels are enum variants, not arrays or maps.
    #[derive(Debug, Deserialize, PartialEq)]
    enum Expr {
        Lit(i64),
        Neg(Box<Expr>),
    }

    /// A newtype around an option of itself: `01` recursed for ever.
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Chain(Option<Box<Chain>>);

    /// `n` levels of `{"Neg": ...}` around `{"Lit": 7}`.
    fn negs(n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.extend_from_slice(b"\x81\xa3Neg");
        }
        v.extend_from_slice(b"\x81\xa3Lit\x07");
        v
    }

    /// `n` nested one-element arrays around nil.
    fn arrays(n: usize) -> Vec<u8> {
        let mut v = vec![0x91; n];
        v.push(0xc0);
        v
    }

    /// Runs `f` on a thread with a tokio worker's stack (2 MiB): in a debug
    /// build (the tests') a decode near the limit must fit in it.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(f)
            .expect("spawn")
            .join()
            .expect("the decode overflowed or panicked")
    }

    #[test]
    fn deep_enum_variants_are_refused_not_recursed_into() {
        let err = on_small_stack(|| {
            decode_payload::<Expr>(&negs(100_000))
                .expect_err("too deep")
                .to_string()
        });
        assert!(err.contains(TOO_DEEP), "{err}");
        // Two levels a variant with a value (the enum, the value), three
        // for the innermost `{"Lit": 7}` (the enum, the value, the i64):
        // 126 `Neg`s are 255 levels, 127 are 257.
        let ok = on_small_stack(|| decode_payload::<Expr>(&negs(MAX_DEPTH / 2 - 2)));
        assert!(ok.is_ok(), "{ok:?}");
        assert!(decode_payload::<Expr>(&negs(MAX_DEPTH / 2 - 1)).is_err());
        assert_eq!(
            decode_payload::<Expr>(&negs(1)).ok(),
            Some(Expr::Neg(Box::new(Expr::Lit(7))))
        );
    }

    #[test]
    fn the_message_names_the_limit() {
        assert!(
            TOO_DEEP.contains(&format!(" {MAX_DEPTH} levels")),
            "{TOO_DEEP}"
        );
    }

    #[test]
    fn an_option_that_does_not_consume_its_marker_cannot_recurse_for_ever() {
        let err = on_small_stack(|| {
            decode_payload::<Chain>(b"\x01")
                .expect_err("too deep")
                .to_string()
        });
        assert!(err.contains(TOO_DEEP), "{err}");
    }

    #[test]
    fn values_up_to_the_limit_decode_on_a_small_stack() {
        // 255 arrays and the nil inside them: 256 levels.
        let v = on_small_stack(|| decode_payload::<rmpv::Value>(&arrays(MAX_DEPTH - 1)).is_ok());
        assert!(v);
        let err = on_small_stack(|| {
            decode_payload::<rmpv::Value>(&arrays(MAX_DEPTH))
                .expect_err("one level too deep")
                .to_string()
        });
        assert!(err.contains(TOO_DEEP), "{err}");
        // The levels are left again: a wide value of shallow parts decodes.
        let mut wide = vec![0xdc, 0x03, 0xe8];
        for _ in 0..1000 {
            wide.extend_from_slice(&arrays(100));
        }
        let wide = decode_payload::<Vec<rmpv::Value>>(&wide).expect("wide and shallow");
        assert_eq!(wide.len(), 1000);
    }
}
