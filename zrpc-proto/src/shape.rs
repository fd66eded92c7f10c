//! Shapes: a language-neutral description of the MessagePack values a method
//! takes and returns, as `zrpc.describe` reports them (see
//! `docs/protocol.md`, "Service introspection").
//!
//! A shape says how a value is *encoded*, not which Rust type produced it:
//! a struct is a map with its field names as keys, a tuple an array, a unit
//! enum variant its name as a string, any other variant a one-entry map
//! `{variant: value}`, a newtype struct its inner value.
//!
//! On the wire a shape is a map with a `"kind"` key (`{"kind": "f64"}`,
//! `{"kind": "struct", "name": "Pair", "fields": [...]}`); its
//! [`Display`](std::fmt::Display) form is the one `zrpc list` shows:
//! `Pair { a: f64, b: f64 }`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a value is encoded. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Shape {
    /// Any MessagePack value (e.g. a dynamic `Value` parameter), or a type
    /// whose shape could not be derived.
    Any,
    /// `nil` (Rust `()`).
    Unit,
    /// A boolean.
    Bool,
    /// An integer that fits an `i8`.
    I8,
    /// An integer that fits an `i16`.
    I16,
    /// An integer that fits an `i32`.
    I32,
    /// An integer that fits an `i64`.
    I64,
    /// An integer that fits an `i128` (MessagePack carries 64 bits).
    I128,
    /// An integer that fits a `u8`.
    U8,
    /// An integer that fits a `u16`.
    U16,
    /// An integer that fits a `u32`.
    U32,
    /// An integer that fits a `u64`.
    U64,
    /// An integer that fits a `u128` (MessagePack carries 64 bits).
    U128,
    /// A 32-bit float.
    F32,
    /// A 64-bit float.
    F64,
    /// A string of one character.
    Char,
    /// A string.
    Str,
    /// A binary (`bin`) value.
    Bytes,
    /// `nil` or the value.
    Option {
        /// The shape of the value when present.
        some: Box<Shape>,
    },
    /// An array of values of one shape.
    Seq {
        /// Each element's shape.
        item: Box<Shape>,
    },
    /// An array of exactly `len` values of one shape.
    Array {
        /// Each element's shape.
        item: Box<Shape>,
        /// The number of elements.
        len: usize,
    },
    /// A map.
    Map {
        /// The keys' shape.
        key: Box<Shape>,
        /// The values' shape.
        value: Box<Shape>,
    },
    /// An array of values of the given shapes, in order.
    Tuple {
        /// The elements' shapes.
        items: Vec<Shape>,
    },
    /// A named struct, encoded as a map from field names to values.
    Struct {
        /// The type's name.
        name: String,
        /// Its fields, in order.
        fields: Vec<Field>,
    },
    /// A named tuple struct, encoded as an array.
    TupleStruct {
        /// The type's name.
        name: String,
        /// The elements' shapes.
        items: Vec<Shape>,
    },
    /// A named wrapper, encoded as the value it wraps.
    Newtype {
        /// The type's name.
        name: String,
        /// The wrapped value's shape.
        inner: Box<Shape>,
    },
    /// A named struct without fields, encoded as `nil`.
    UnitStruct {
        /// The type's name.
        name: String,
    },
    /// A named enum: a unit variant is encoded as its name (a string), any
    /// other as a one-entry map `{name: value}`.
    Enum {
        /// The type's name.
        name: String,
        /// Its variants, in order.
        variants: Vec<Variant>,
    },
    /// A named type described further out in the same shape (a recursive
    /// type refers to itself this way).
    Ref {
        /// The type's name.
        name: String,
    },
}

/// A field of a [`Shape::Struct`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    /// The field's name: its key in the map.
    pub name: String,
    /// The field's shape.
    pub shape: Shape,
}

/// A variant of a [`Shape::Enum`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// The variant's name.
    pub name: String,
    /// The shape of its value; absent for a unit variant (encoded as its
    /// name alone). A tuple variant's value is a [`Shape::Tuple`], a struct
    /// variant's a [`Shape::Struct`] named like the variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Shape>,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list(f: &mut fmt::Formatter<'_>, items: &[Shape]) -> fmt::Result {
            for (i, s) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{s}")?;
            }
            Ok(())
        }
        fn fields(f: &mut fmt::Formatter<'_>, fields: &[Field]) -> fmt::Result {
            f.write_str("{ ")?;
            for (i, field) in fields.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{}: {}", field.name, field.shape)?;
            }
            f.write_str(" }")
        }
        match self {
            Shape::Any => f.write_str("any"),
            Shape::Unit => f.write_str("()"),
            Shape::Bool => f.write_str("bool"),
            Shape::I8 => f.write_str("i8"),
            Shape::I16 => f.write_str("i16"),
            Shape::I32 => f.write_str("i32"),
            Shape::I64 => f.write_str("i64"),
            Shape::I128 => f.write_str("i128"),
            Shape::U8 => f.write_str("u8"),
            Shape::U16 => f.write_str("u16"),
            Shape::U32 => f.write_str("u32"),
            Shape::U64 => f.write_str("u64"),
            Shape::U128 => f.write_str("u128"),
            Shape::F32 => f.write_str("f32"),
            Shape::F64 => f.write_str("f64"),
            Shape::Char => f.write_str("char"),
            Shape::Str => f.write_str("str"),
            Shape::Bytes => f.write_str("bytes"),
            Shape::Option { some } => write!(f, "Option<{some}>"),
            Shape::Seq { item } => write!(f, "[{item}]"),
            Shape::Array { item, len } => write!(f, "[{item}; {len}]"),
            Shape::Map { key, value } => write!(f, "{{{key}: {value}}}"),
            Shape::Tuple { items } => {
                f.write_str("(")?;
                list(f, items)?;
                f.write_str(")")
            }
            Shape::Struct { name, fields: fs } if fs.is_empty() => write!(f, "{name} {{}}"),
            Shape::Struct { name, fields: fs } => {
                write!(f, "{name} ")?;
                fields(f, fs)
            }
            Shape::TupleStruct { name, items } => {
                write!(f, "{name}(")?;
                list(f, items)?;
                f.write_str(")")
            }
            Shape::Newtype { name, inner } => write!(f, "{name}({inner})"),
            Shape::UnitStruct { name } | Shape::Ref { name } => f.write_str(name),
            Shape::Enum { name, variants } => {
                write!(f, "enum {name} {{ ")?;
                for (i, v) in variants.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" | ")?;
                    }
                    f.write_str(&v.name)?;
                    match &v.value {
                        None => {}
                        Some(Shape::Tuple { items }) => {
                            f.write_str("(")?;
                            list(f, items)?;
                            f.write_str(")")?;
                        }
                        // A struct variant (a newtype variant of a struct
                        // of the variant's name is encoded the same way).
                        Some(Shape::Struct { name, fields: fs }) if *name == v.name => {
                            f.write_str(" ")?;
                            fields(f, fs)?;
                        }
                        Some(other) => write!(f, "({other})")?,
                    }
                }
                f.write_str(" }")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_display_like_rust_and_round_trip_through_msgpack() {
        let pair = Shape::Struct {
            name: "Pair".into(),
            fields: vec![
                Field {
                    name: "a".into(),
                    shape: Shape::F64,
                },
                Field {
                    name: "b".into(),
                    shape: Shape::Option {
                        some: Box::new(Shape::Seq {
                            item: Box::new(Shape::Str),
                        }),
                    },
                },
            ],
        };
        assert_eq!(pair.to_string(), "Pair { a: f64, b: Option<[str]> }");
        let e = Shape::Enum {
            name: "CalcError".into(),
            variants: vec![
                Variant {
                    name: "DivisionByZero".into(),
                    value: None,
                },
                Variant {
                    name: "Overflow".into(),
                    value: Some(Shape::Struct {
                        name: "Overflow".into(),
                        fields: vec![Field {
                            name: "limit".into(),
                            shape: Shape::U32,
                        }],
                    }),
                },
                Variant {
                    name: "Other".into(),
                    value: Some(Shape::Str),
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "enum CalcError { DivisionByZero | Overflow { limit: u32 } | Other(str) }"
        );
        for s in [pair, e, Shape::Any, Shape::Unit] {
            let bytes = rmp_serde::to_vec_named(&s).expect("encode");
            let back: Shape = rmp_serde::from_slice(&bytes).expect("decode");
            assert_eq!(back, s);
        }
    }
}
