//! The [`Shape`] of a Rust type, for `zrpc.describe`, derived from its
//! `Deserialize` implementation with `serde-reflection` (which feeds the
//! implementation a tracing deserializer and records what it asks for):
//! no derive or trait beyond serde's is needed on user types.
//!
//! Tracing cannot follow a type that deserializes through
//! `deserialize_any` (a dynamic `Value`, an untagged enum) or that
//! validates what it reads; such a type, or the part of it that could not
//! be traced, is [`Shape::Any`]. Only types that implement
//! `DeserializeOwned` can be traced; a return type that implements only
//! `Serialize` has no shape (the macro picks this at compile time, see
//! `__private::ShapeOf`).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_reflection::{ContainerFormat, Format, Named, Tracer, TracerConfig, VariantFormat};
use zrpc_proto::shape::{Field, Shape, Variant};

/// How often the type is traced again, at most, to walk through the
/// variants of the enums nested in it (one pass per variant).
const MAX_PASSES: usize = 256;

/// How many times tracing starts over, learning each time which nested
/// enums need more passes.
const MAX_ATTEMPTS: usize = 8;

/// The shape of `T`'s encoding, or [`Shape::Any`] if it cannot be traced.
pub fn shape_of<T: DeserializeOwned>() -> Shape {
    // serde-reflection walks the variants of the traced type itself, but
    // those of an enum nested in it only when told that enum's name, which
    // a first attempt reports as missing variants.
    let mut nested_enums: Vec<String> = Vec::new();
    for _ in 0..MAX_ATTEMPTS {
        let Some((tracer, format)) = trace::<T>(&nested_enums) else {
            return Shape::Any;
        };
        match tracer.registry() {
            Ok(registry) => return convert(&format, &registry, &mut Vec::new()),
            Err(serde_reflection::Error::MissingVariants(names)) => {
                let known = nested_enums.len();
                for n in names {
                    if !nested_enums.contains(&n) {
                        nested_enums.push(n);
                    }
                }
                if nested_enums.len() == known {
                    break;
                }
            }
            Err(_) => return Shape::Any,
        }
    }
    // Still incomplete: what could be traced (enums may lack variants).
    match trace::<T>(&nested_enums) {
        Some((tracer, format)) => convert(&format, &tracer.registry_unchecked(), &mut Vec::new()),
        None => Shape::Any,
    }
}

/// Traces `T`, then again while one of `nested_enums` has variants left.
fn trace<T: DeserializeOwned>(nested_enums: &[String]) -> Option<(Tracer, Format)> {
    let mut tracer = Tracer::new(TracerConfig::default());
    let (format, _) = tracer.trace_simple_type::<T>().ok()?;
    for _ in 0..MAX_PASSES {
        let mut again = false;
        for name in nested_enums {
            again |= tracer.check_incomplete_enum(name).is_some();
        }
        if !again {
            break;
        }
        tracer.trace_simple_type::<T>().ok()?;
    }
    Some((tracer, format))
}

type Registry = BTreeMap<String, ContainerFormat>;

/// `format` as a shape; named types are expanded from `registry`, except
/// one already being expanded (`open`), which becomes a [`Shape::Ref`].
fn convert(format: &Format, registry: &Registry, open: &mut Vec<String>) -> Shape {
    let boxed = |f: &Format, open: &mut Vec<String>| Box::new(convert(f, registry, open));
    match format {
        Format::Variable(_) => Shape::Any,
        Format::TypeName(name) => named(name, registry, open),
        Format::Unit => Shape::Unit,
        Format::Bool => Shape::Bool,
        Format::I8 => Shape::I8,
        Format::I16 => Shape::I16,
        Format::I32 => Shape::I32,
        Format::I64 => Shape::I64,
        Format::I128 => Shape::I128,
        Format::U8 => Shape::U8,
        Format::U16 => Shape::U16,
        Format::U32 => Shape::U32,
        Format::U64 => Shape::U64,
        Format::U128 => Shape::U128,
        Format::F32 => Shape::F32,
        Format::F64 => Shape::F64,
        Format::Char => Shape::Char,
        Format::Str => Shape::Str,
        Format::Bytes => Shape::Bytes,
        Format::Option(f) => Shape::Option {
            some: boxed(f, open),
        },
        Format::Seq(f) => Shape::Seq {
            item: boxed(f, open),
        },
        Format::Map { key, value } => Shape::Map {
            key: boxed(key, open),
            value: boxed(value, open),
        },
        Format::Tuple(fs) => Shape::Tuple {
            items: list(fs, registry, open),
        },
        Format::TupleArray { content, size } => Shape::Array {
            item: boxed(content, open),
            len: *size,
        },
    }
}

fn list(formats: &[Format], registry: &Registry, open: &mut Vec<String>) -> Vec<Shape> {
    formats.iter().map(|f| convert(f, registry, open)).collect()
}

fn fields(named: &[Named<Format>], registry: &Registry, open: &mut Vec<String>) -> Vec<Field> {
    named
        .iter()
        .map(|n| Field {
            name: n.name.clone(),
            shape: convert(&n.value, registry, open),
        })
        .collect()
}

fn named(name: &str, registry: &Registry, open: &mut Vec<String>) -> Shape {
    if open.iter().any(|n| n == name) {
        return Shape::Ref { name: name.into() };
    }
    let Some(container) = registry.get(name) else {
        return Shape::Any;
    };
    open.push(name.to_owned());
    let name = name.to_owned();
    let shape = match container {
        ContainerFormat::UnitStruct => Shape::UnitStruct { name },
        ContainerFormat::NewTypeStruct(f) => Shape::Newtype {
            name,
            inner: Box::new(convert(f, registry, open)),
        },
        ContainerFormat::TupleStruct(fs) => Shape::TupleStruct {
            name,
            items: list(fs, registry, open),
        },
        ContainerFormat::Struct(fs) => Shape::Struct {
            name,
            fields: fields(fs, registry, open),
        },
        ContainerFormat::Enum(variants) => Shape::Enum {
            variants: variants
                .values()
                .map(|v| Variant {
                    name: v.name.clone(),
                    value: match &v.value {
                        VariantFormat::Unit => None,
                        VariantFormat::Variable(_) => Some(Shape::Any),
                        VariantFormat::NewType(f) => Some(convert(f, registry, open)),
                        VariantFormat::Tuple(fs) => Some(Shape::Tuple {
                            items: list(fs, registry, open),
                        }),
                        VariantFormat::Struct(fs) => Some(Shape::Struct {
                            name: v.name.clone(),
                            fields: fields(fs, registry, open),
                        }),
                    },
                })
                .collect(),
            name,
        },
    };
    open.pop();
    shape
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::HashMap;

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Pair {
        a: f64,
        b: Option<Vec<String>>,
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Op {
        Add(Pair),
        Neg { x: i32 },
        Nop,
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Job {
        op: Op,
        tags: HashMap<String, u8>,
        next: Option<Box<Job>>,
        raw: serde_bytes::ByteBuf,
        pos: (u16, bool),
    }

    #[test]
    fn shapes_of_structs_enums_and_recursive_types() {
        assert_eq!(
            shape_of::<Pair>().to_string(),
            "Pair { a: f64, b: Option<[str]> }"
        );
        assert_eq!(
            shape_of::<Job>().to_string(),
            "Job { op: enum Op { Add(Pair { a: f64, b: Option<[str]> }) | Neg { x: i32 } | Nop }, \
             tags: {str: u8}, next: Option<Job>, raw: bytes, pos: (u16, bool) }"
        );
        assert_eq!(shape_of::<u64>(), Shape::U64);
        assert_eq!(shape_of::<()>(), Shape::Unit);
        // A dynamic value has no fixed shape.
        assert_eq!(shape_of::<rmpv::Value>(), Shape::Any);
    }
}
