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
//!
//! The same wrappers count the values decoded (every `deserialize_*` call
//! but those of options, newtypes and field names, which make nothing of
//! their own) and stop past [`max_values`]: each value can become tens of
//! bytes of memory for one byte on the wire (an `rmpv::Value`, an empty
//! `String` or `Vec`), so 16 MiB of nils decoded into `Vec<rmpv::Value>`
//! would take hundreds of megabytes.

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

/// The environment variable that sets [`max_values`] (`0`: no bound).
pub const MAX_VALUES_ENV: &str = "ZRPC_MAX_PAYLOAD_VALUES";

/// The default of [`max_values`]: 4,194,304. A payload within the default
/// message size (16 MiB) whose values take 4 bytes or more on average
/// never reaches it; one of more, smaller values is mostly bytes sent as
/// an array of integers (send those as `Blob` or `serde_bytes`: one value)
/// or a payload made to take memory.
pub const DEFAULT_MAX_VALUES: usize = 4 << 20;

/// The most values one payload decodes into in the Rust libraries (0: no
/// bound): `$ZRPC_MAX_PAYLOAD_VALUES`, read once, else
/// [`DEFAULT_MAX_VALUES`]. A value that is not a number is logged (a
/// warning) and the default used.
pub fn max_values() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| match std::env::var(MAX_VALUES_ENV) {
        Err(_) => DEFAULT_MAX_VALUES,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(
                value = %v,
                default = DEFAULT_MAX_VALUES,
                "{MAX_VALUES_ENV} is not a number of values; using the default"
            );
            DEFAULT_MAX_VALUES
        }),
    })
}

/// The message of the error a decode of too many values fails with.
pub fn too_many_values(max: usize) -> String {
    format!(
        "the payload holds more than {max} values (a bound on what one payload may allocate, \
         set by ${MAX_VALUES_ENV} where the payload is decoded; send bytes as Blob or \
         serde_bytes, one value)"
    )
}

/// The levels entered and not yet left, and the values decoded, shared by
/// the wrappers of one decode.
#[derive(Debug)]
pub struct Levels {
    depth: Cell<usize>,
    values: Cell<usize>,
    /// `usize::MAX` for no bound.
    max_values: usize,
}

impl Default for Levels {
    /// Counting against [`MAX_DEPTH`] and [`max_values`].
    fn default() -> Self {
        Levels::with_max_values(max_values())
    }
}

impl Levels {
    /// Counting against [`MAX_DEPTH`] and at most `max_values` values (0:
    /// no bound).
    pub fn with_max_values(max_values: usize) -> Self {
        Levels {
            depth: Cell::new(0),
            values: Cell::new(0),
            max_values: if max_values == 0 {
                usize::MAX
            } else {
                max_values
            },
        }
    }

    /// Enters one level, a value of its own if `value`; fails past
    /// [`MAX_DEPTH`] or past the bound on values.
    fn enter<E: de::Error>(&self, value: bool) -> Result<Leave<'_>, E> {
        let n = self.depth.get();
        if n >= MAX_DEPTH {
            return Err(E::custom(TOO_DEEP));
        }
        if value {
            let v = self.values.get() + 1;
            if v > self.max_values {
                return Err(E::custom(too_many_values(self.max_values)));
            }
            self.values.set(v);
        }
        self.depth.set(n + 1);
        Ok(Leave(self))
    }
}

/// Leaves the level when dropped (also on an error or a panic).
struct Leave<'a>(&'a Levels);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.depth.set(self.0.depth.get().saturating_sub(1));
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

/// One `deserialize_*` method: enter a level (a value of its own if
/// `$value`), forward with the visitor wrapped.
macro_rules! forward {
    ($value:literal: $($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $name<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
            let _leave = self.levels.enter::<D::Error>($value)?;
            self.inner.$name($($arg,)* Wrap::new(visitor, self.levels))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Limited<'_, D> {
    type Error = D::Error;

    forward! { true:
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
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_ignored_any();
    }

    // Levels that make nothing of their own: an option's, a newtype's
    // (their value counts), a field name's.
    forward! { false:
        deserialize_option();
        deserialize_newtype_struct(name: &'static str);
        deserialize_identifier();
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
        let _leave = self.levels.enter::<A::Error>(true)?;
        self.inner
            .newtype_variant_seed(Wrap::new(seed, self.levels))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let _leave = self.levels.enter::<A::Error>(true)?;
        self.inner
            .tuple_variant(len, Wrap::new(visitor, self.levels))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let _leave = self.levels.enter::<A::Error>(true)?;
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

    /// `decode_payload`'s decode, with `max` values at most.
    fn decode_with<T: serde::de::DeserializeOwned>(
        max: usize,
        bytes: &[u8],
    ) -> Result<T, rmp_serde::decode::Error> {
        let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
        T::deserialize(Limited::new(&mut de, &Levels::with_max_values(max)))
    }

    /// An array of `n` nils.
    fn nils(n: usize) -> Vec<u8> {
        let mut v = vec![0xdd];
        v.extend_from_slice(&u32::try_from(n).expect("n").to_be_bytes());
        v.resize(v.len() + n, 0xc0);
        v
    }

    #[test]
    fn values_past_the_bound_are_refused() {
        // The array and 999 nils are 1,000 values; one more is too many.
        let ok = decode_with::<Vec<rmpv::Value>>(1000, &nils(999)).expect("at the bound");
        assert_eq!(ok.len(), 999);
        let err = decode_with::<Vec<rmpv::Value>>(1000, &nils(1000))
            .expect_err("past the bound")
            .to_string();
        assert!(err.contains(&too_many_values(1000)), "{err}");
        assert!(err.contains("more than 1000 values"), "{err}");
        // The same bytes as one `bin` are one value.
        let mut bin = vec![0xc5, 0x13, 0x88];
        bin.resize(3 + 5000, 7);
        let b: rmpv::Value = decode_with(1000, &bin).expect("one value");
        assert_eq!(b.as_slice().map(<[u8]>::len), Some(5000));
        // Nested: counted across the arrays, not per array.
        let mut nested = vec![0x93];
        for _ in 0..3 {
            nested.extend_from_slice(&nils(400));
        }
        assert!(decode_with::<Vec<Vec<()>>>(1000, &nested).is_err());
        assert_eq!(
            decode_with::<Vec<Vec<()>>>(2000, &nested)
                .expect("under a higher bound")
                .len(),
            3
        );
        // 0: no bound.
        assert_eq!(
            decode_with::<Vec<()>>(0, &nils(5000))
                .expect("no bound")
                .len(),
            5000
        );
    }

    #[test]
    fn options_newtypes_and_field_names_make_no_value_of_their_own() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Rec {
            a: Option<u32>,
            b: Id,
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Id(u32);
        // A struct and its two field values: 3 values a record, whatever
        // the options, newtypes and names around them.
        let recs: Vec<std::collections::BTreeMap<&str, u32>> = (0..100)
            .map(|i| [("a", i), ("b", i)].into_iter().collect())
            .collect();
        let bytes = rmp_serde::to_vec_named(&recs).expect("encode");
        assert_eq!(
            decode_with::<Vec<Rec>>(301, &bytes)
                .expect("1 + 100 x 3 values")
                .len(),
            100
        );
        assert!(decode_with::<Vec<Rec>>(300, &bytes).is_err());
    }

    #[test]
    fn the_default_bound_is_the_documented_one() {
        if std::env::var_os(MAX_VALUES_ENV).is_none() {
            assert_eq!(max_values(), DEFAULT_MAX_VALUES);
        }
        assert_eq!(DEFAULT_MAX_VALUES, 4_194_304);
        assert!(too_many_values(7).contains(MAX_VALUES_ENV));
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
