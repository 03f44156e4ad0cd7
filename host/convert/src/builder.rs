//! An ONNX graph under construction: nodes and initializers, named as scripts/slmconv names
//! them (`{hint}_{n}` from one counter), so the two converters write the same graph.

use tract_onnx::pb;

/// ONNX element types we write.
#[derive(Clone, Copy)]
pub enum Elem {
    F32 = 1,
    U8 = 2,
    I8 = 3,
    I64 = 7,
    F16 = 10,
}

/// A node attribute (ONNX sorts none; scripts/slmconv's helper writes them sorted by name).
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
}

#[derive(Default)]
pub struct Builder {
    pub nodes: Vec<pb::NodeProto>,
    pub initializers: Vec<pb::TensorProto>,
    n: usize,
}

impl Builder {
    pub fn name(&mut self, hint: &str) -> String {
        self.n += 1;
        format!("{hint}_{}", self.n)
    }

    /// An initializer: `dims` and the values' little-endian bytes.
    pub fn constant(&mut self, hint: &str, elem: Elem, dims: &[usize], raw: Vec<u8>) -> String {
        let name = self.name(hint);
        self.initializers.push(pb::TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: elem as i32,
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    pub fn f32s(&mut self, hint: &str, dims: &[usize], values: &[f32]) -> String {
        self.constant(
            hint,
            Elem::F32,
            dims,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    pub fn f32(&mut self, hint: &str, value: f32) -> String {
        self.f32s(hint, &[], &[value])
    }

    /// int64 constants named `c_{n}`, as scripts/slmconv's `i64()`; a scalar for `[]` dims.
    pub fn i64s(&mut self, dims: &[usize], values: &[i64]) -> String {
        self.constant(
            "c",
            Elem::I64,
            dims,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    pub fn i64(&mut self, value: i64) -> String {
        self.i64s(&[], &[value])
    }

    pub fn list(&mut self, values: &[i64]) -> String {
        self.i64s(&[values.len()], values)
    }

    /// A node with one output named after `hint` (or the op); returns the output.
    pub fn op(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        hint: Option<&str>,
        attrs: Vec<(&str, Attr)>,
    ) -> String {
        let output = self.name(&hint.map_or_else(|| op_type.to_lowercase(), String::from));
        self.node(op_type, "", inputs, &[&output], attrs);
        output
    }

    /// A node with outputs named by the caller (graph outputs).
    pub fn node(
        &mut self,
        op_type: &str,
        domain: &str,
        inputs: &[&str],
        outputs: &[&str],
        mut attrs: Vec<(&str, Attr)>,
    ) {
        let name = self.name(op_type);
        attrs.sort_by(|a, b| a.0.cmp(b.0));
        let attribute = attrs
            .into_iter()
            .map(|(name, attr)| match attr {
                Attr::Int(i) => pb::AttributeProto {
                    name: name.into(),
                    r#type: 2,
                    i,
                    ..Default::default()
                },
                Attr::Ints(ints) => pb::AttributeProto {
                    name: name.into(),
                    r#type: 7,
                    ints,
                    ..Default::default()
                },
            })
            .collect();
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op_type.into(),
            domain: domain.into(),
            attribute,
            ..Default::default()
        });
    }
}

/// A graph input or output: a tensor of `elem` with named (symbolic) or fixed dimensions.
pub fn value_info(name: &str, elem: Elem, dims: &[Dim]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Named(s) => dimension::Value::DimParam(s.to_string()),
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
            }),
            ..Default::default()
        })
        .collect();
    let tensor = pb::type_proto::Tensor {
        elem_type: elem as i32,
        shape: Some(pb::TensorShapeProto { dim }),
    };
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(tensor)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub enum Dim {
    Named(&'static str),
    Fixed(usize),
}
