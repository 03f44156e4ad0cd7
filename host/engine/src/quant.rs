//! Keeps int8 weights int8: an ONNX rewrite and a tract op.
//!
//! An int8 export writes each weight as `MatMul(x, Cast(Q int8) * scale)` (optionally with a
//! `Transpose` of the dequantized weight, as a tied LM head does). Left to itself, tract folds
//! the constant `Cast * Mul` into an f32 weight: four times the bytes, read on every token.
//! Before tract parses the model we replace such a `MatMul` by an `SlmQMatMul` node whose
//! weights (the int8 values and the scales, moved out of the protobuf) wait in a registry the
//! node's builder reads; tract then runs it as [`QMatMul`], whose kernels widen the int8 values
//! in registers ([`crate::qkernel`]). The `Cast`, `Mul` and initializers that fed only rewritten
//! nodes are dropped. Nothing else changes: the result is the same product (up to the order of
//! the additions) and the ONNX file stays what ONNX Runtime runs.
//!
//! Q4_1 weights (`com.microsoft` `MatMulNBits`, 4 bits, blocks of 32, with zero points) become
//! the same `SlmQMatMul` node, run on [`Q4Weights`] ([`crate::q4kernel`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use half::f16;

use crate::q4kernel::{Q4Weights, QBLOCK};
use crate::q8kernel::Q8Weights;
use crate::qkernel::{Layout, QWeights};

const OP: &str = "SlmQMatMul";
const GATHER: &str = "SlmQGather";

thread_local! {
    /// Weights of the rewritten nodes, by key, while tract parses the rewritten protobuf.
    static PENDING: RefCell<HashMap<String, Packed>> = RefCell::new(HashMap::new());
}

/// Registers the op builder that turns rewritten nodes into [`QMatMul`].
pub fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert(OP, build);
    onnx.op_register.insert(GATHER, build_gather);
}

/// Runs `f` (the parse of a protobuf rewritten by [`rewrite`]) with `weights` available to it.
pub fn with_weights<R>(weights: HashMap<String, Packed>, f: impl FnOnce() -> R) -> R {
    PENDING.with(|p| *p.borrow_mut() = weights);
    let r = f();
    PENDING.with(|p| p.borrow_mut().clear());
    r
}

/// The weight of a rewritten product, in one of the packed formats.
#[derive(Clone)]
pub enum Packed {
    Int8(Arc<QWeights>),
    Q4_1(Arc<Q4Weights>),
    /// The tied LM head of a Q4_1 model: int8, with activations rounded as the Q4_1 products.
    Q8Head(Arc<Q8Weights>),
}

impl Packed {
    fn k(&self) -> usize {
        match self {
            Packed::Int8(w) => w.k,
            Packed::Q4_1(w) => w.k,
            Packed::Q8Head(w) => w.k,
        }
    }

    fn n(&self) -> usize {
        match self {
            Packed::Int8(w) => w.n,
            Packed::Q4_1(w) => w.n,
            Packed::Q8Head(w) => w.n,
        }
    }

    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        match self {
            Packed::Int8(w) => w.matmul(x, m, y),
            Packed::Q4_1(w) => w.matmul(x, m, y),
            Packed::Q8Head(w) => w.matmul(x, m, y),
        }
    }

    /// Whether its output channels are rows of a table (a tied embedding reads them back).
    fn is_table(&self) -> bool {
        match self {
            Packed::Int8(w) => w.layout == Layout::NK,
            Packed::Q8Head(_) => true,
            Packed::Q4_1(_) => false,
        }
    }

    fn copy_column(&self, c: usize, out: &mut [i8]) {
        match self {
            Packed::Int8(w) => w.copy_column(c, out),
            Packed::Q8Head(w) => w.copy_column(c, out),
            Packed::Q4_1(_) => unreachable!("checked by is_table"),
        }
    }

    fn same(&self, other: &Packed) -> bool {
        match (self, other) {
            (Packed::Int8(a), Packed::Int8(b)) => Arc::ptr_eq(a, b),
            (Packed::Q4_1(a), Packed::Q4_1(b)) => Arc::ptr_eq(a, b),
            (Packed::Q8Head(a), Packed::Q8Head(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Packed::Int8(w) => w.fmt(f),
            Packed::Q4_1(w) => w.fmt(f),
            Packed::Q8Head(w) => w.fmt(f),
        }
    }
}

fn pending_weights(node: &pb::NodeProto) -> TractResult<Packed> {
    let key = node
        .attribute
        .iter()
        .find(|a| a.name == "weights")
        .map(|a| String::from_utf8_lossy(&a.s).to_string())
        .context("SlmQMatMul without a weights key")?;
    PENDING
        .with(|p| p.borrow().get(&key).cloned())
        .with_context(|| format!("{}: no weights {key}", node.op_type))
}

fn build(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((
        expand(QMatMulExpansion {
            w: pending_weights(node)?,
        }),
        vec![],
    ))
}

fn build_gather(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let w = match pending_weights(node)? {
        w @ Packed::Int8(_) | w @ Packed::Q8Head(_) if w.is_table() => w,
        _ => bail!("{GATHER} needs an int8 table of rows (a transposed MatMul weight)"),
    };
    Ok((expand(QGatherExpansion { w }), vec![]))
}

/// The inference-time face of [`QGather`]: `ids [..] -> rows [.., K]`, int8.
#[derive(Debug, Clone)]
struct QGatherExpansion {
    w: Packed,
}

impl Expansion for QGatherExpansion {
    fn name(&self) -> StaticName {
        GATHER.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, i8::datum_type())?;
        s.equals(inputs[0].rank.bex() + 1, outputs[0].rank.bex())?;
        let k = self.w.k().to_dim();
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            for ax in 0..rank {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            s.equals(&outputs[0].shape[rank], k.clone())
        })?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, QGather { w: self.w.clone() }, &[inputs[0]])
    }
}

/// Rows of an int8 table (ONNX `Gather` on axis 0) read from the weights of a [`QMatMul`].
#[derive(Clone)]
pub struct QGather {
    pub w: Packed,
}

impl std::fmt::Debug for QGather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QGather({:?})", self.w)
    }
}

impl PartialEq for QGather {
    fn eq(&self, other: &Self) -> bool {
        self.w.same(&other.w)
    }
}
impl Eq for QGather {}

impl Op for QGather {
    fn name(&self) -> StaticName {
        GATHER.into()
    }

    op_as_typed_op!();
}

impl EvalOp for QGather {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let ids = inputs[0].cast_to::<i64>()?;
        let plain = ids.try_as_plain_ram()?;
        let ids: &[i64] = plain.as_slice()?;
        let (rows, k) = (self.w.n() as i64, self.w.k());
        let mut shape: TVec<usize> = inputs[0].shape().into();
        shape.push(k);
        let mut out = vec![0i8; ids.len() * k];
        for (i, &id) in ids.iter().enumerate() {
            let r = if id < 0 { id + rows } else { id };
            ensure!(
                (0..rows).contains(&r),
                "{GATHER}: index {id} out of 0..{rows}"
            );
            // A row of the table is an output channel of the head: a column of its panels.
            self.w.copy_column(r as usize, &mut out[i * k..(i + 1) * k]);
        }
        Ok(tvec!(Tensor::from_shape(&shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for QGather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        shape.push(self.w.k().to_dim());
        Ok(tvec!(i8::fact(shape)))
    }

    as_op!();
}

/// The inference-time face of [`QMatMul`]: `x [.., K] -> y [.., N]`, f32.
#[derive(Debug, Clone)]
struct QMatMulExpansion {
    w: Packed,
}

impl Expansion for QMatMulExpansion {
    fn name(&self) -> StaticName {
        OP.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, &inputs[0].rank)?;
        let (k, n) = (self.w.k().to_dim(), self.w.n().to_dim());
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            for ax in 0..rank - 1 {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            s.equals(&inputs[0].shape[rank - 1], k.clone())?;
            s.equals(&outputs[0].shape[rank - 1], n.clone())
        })?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, QMatMul { w: self.w.clone() }, &[inputs[0]])
    }
}

/// `y = x @ dequant(W)`: x f32 `[.., K]`, y f32 `[.., N]`, W int8 with per-channel scales or
/// Q4_1 blocks.
#[derive(Clone)]
pub struct QMatMul {
    pub w: Packed,
}

impl QMatMul {
    pub fn is_q4_1(&self) -> bool {
        matches!(self.w, Packed::Q4_1(_))
    }

    pub fn is_q8_head(&self) -> bool {
        matches!(self.w, Packed::Q8Head(_))
    }
}

impl std::fmt::Debug for QMatMul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatMul({:?})", self.w)
    }
}

impl PartialEq for QMatMul {
    fn eq(&self, other: &Self) -> bool {
        self.w.same(&other.w)
    }
}
impl Eq for QMatMul {}

impl Op for QMatMul {
    fn name(&self) -> StaticName {
        OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.w)])
    }

    op_as_typed_op!();
}

impl EvalOp for QMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let shape = x.shape();
        let (k, n) = (self.w.k(), self.w.n());
        ensure!(
            shape.last() == Some(&k),
            "{OP}: input shape {shape:?}, K={k}"
        );
        let m = x.len() / k;
        let mut out_shape: TVec<usize> = shape.into();
        *out_shape.last_mut().unwrap() = n;
        let plain = x.try_as_plain_ram()?;
        let xs: &[f32] = plain.as_slice()?;
        // SAFETY: every element is written by the matmul.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let ys: &mut [f32] = view.as_slice_mut()?;
            self.w.matmul(xs, m, ys);
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for QMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        ensure!(!shape.is_empty(), "{OP} needs a rank >= 1 input");
        *shape.last_mut().unwrap() = self.w.n().to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let rows: TDim = inputs[0].shape.iter().rev().skip(1).product();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            rows * (self.w.k() * self.w.n())
        )))
    }

    as_op!();
}

// ---- the protobuf rewrite ----

const FLOAT: i32 = 1;
const INT8: i32 = 3;

/// Values of an initializer held in the file (not external data), by element type.
fn init_i8(t: &pb::TensorProto) -> Option<Vec<u8>> {
    if t.data_type != INT8 || t.data_location == Some(1) {
        return None;
    }
    let len: i64 = t.dims.iter().product();
    if !t.raw_data.is_empty() {
        return (t.raw_data.len() as i64 == len).then(|| t.raw_data.clone());
    }
    (t.int32_data.len() as i64 == len)
        .then(|| t.int32_data.iter().map(|&v| v as i8 as u8).collect())
}

pub(crate) fn init_f32(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != FLOAT || t.data_location == Some(1) {
        return None;
    }
    let len: i64 = t.dims.iter().product();
    if !t.raw_data.is_empty() {
        if t.raw_data.len() as i64 != len * 4 {
            return None;
        }
        return Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    (t.float_data.len() as i64 == len).then(|| t.float_data.clone())
}

fn init_i64(t: &pb::TensorProto) -> Option<Vec<i64>> {
    if t.data_type != 7 || t.data_location == Some(1) {
        return None;
    }
    if !t.raw_data.is_empty() {
        return Some(
            t.raw_data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        );
    }
    Some(t.int64_data.clone())
}

pub(crate) fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// A weight found behind a MatMul: the int8 initializer, the scales and their layout.
struct Found {
    q_init: String,
    /// Nodes that only served this weight (Cast, Mul, Unsqueeze, Transpose), candidates for removal.
    k: usize,
    n: usize,
    layout: Layout,
    scale: Vec<f32>,
}

/// Replaces `MatMul(x, [Transpose](Cast(Q int8) * scale))` and Q4_1 `MatMulNBits(x, ...)` by
/// `SlmQMatMul(x)` nodes, their weights by key in `weights`, for [`with_weights`]. Patterns that do
/// not fit exactly are left to tract.
/// `weights` may already hold those of [`Q4Stream`]; the new ones are added.
pub fn rewrite(proto: &mut pb::ModelProto, weights: &mut HashMap<String, Packed>) {
    let Some(graph) = proto.graph.as_mut() else {
        return;
    };
    rewrite_q4_1(graph, weights);
    // A Q4_1 model already rounds activations to 8 bits per block: its int8 LM head does too.
    let head_q8 = weights.values().any(|w| matches!(w, Packed::Q4_1(_)));
    rewrite_int8(graph, weights, head_q8);
}

fn weights_attribute(key: &str) -> Vec<pb::AttributeProto> {
    vec![pb::AttributeProto {
        name: "weights".into(),
        r#type: pb::attribute_proto::AttributeType::String as i32,
        s: key.as_bytes().to_vec(),
        ..Default::default()
    }]
}

fn rewrite_int8(graph: &mut pb::GraphProto, weights: &mut HashMap<String, Packed>, head_q8: bool) {
    let producer: HashMap<String, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect();
    let inits: HashMap<String, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();

    let find = |b: &str| -> Option<Found> {
        let node = |name: &str| producer.get(name).map(|&i| &graph.node[i]);
        let init = |name: &str| inits.get(name).map(|&i| &graph.initializer[i]);
        let mut b = b.to_string();
        let mut transposed = false;
        if let Some(t) = node(&b).filter(|n| n.op_type == "Transpose") {
            let perm = attr(t, "perm").map(|a| a.ints.clone());
            if !(perm.is_none() || perm == Some(vec![1, 0])) {
                return None;
            }
            transposed = true;
            b = t.input[0].clone();
        }
        let mul = node(&b).filter(|n| n.op_type == "Mul" && n.input.len() == 2)?;
        let (cast, scale_name) = [(0, 1), (1, 0)].iter().find_map(|&(c, s)| {
            node(&mul.input[c])
                .filter(|n| n.op_type == "Cast")
                .map(|n| (n, mul.input[s].clone()))
        })?;
        if attr(cast, "to").map(|a| a.i) != Some(FLOAT as i64) {
            return None;
        }
        let q = init(&cast.input[0])?;
        if q.data_type != INT8 || q.dims.len() != 2 || q.data_location == Some(1) {
            return None;
        }
        let (rows, cols) = (q.dims[0] as usize, q.dims[1] as usize);
        // The scale's broadcast shape: an initializer, or an Unsqueeze of one.
        let (scale, scale_dims) = if let Some(s) = init(&scale_name) {
            (init_f32(s)?, s.dims.clone())
        } else {
            let u = node(&scale_name).filter(|n| n.op_type == "Unsqueeze")?;
            let s = init(&u.input[0])?;
            if s.dims.len() != 1 {
                return None;
            }
            let axes = match u.input.get(1) {
                Some(a) => init_i64(init(a)?)?,
                None => attr(u, "axes")?.ints.clone(),
            };
            let dims = match axes.as_slice() {
                [-1] | [1] => vec![s.dims[0], 1],
                [0] | [-2] => vec![1, s.dims[0]],
                _ => return None,
            };
            (init_f32(s)?, dims)
        };
        // Per column of Q ([C] or [1, C]) or per row ([R, 1]).
        let per_column = scale_dims == [cols as i64] || scale_dims == [1, cols as i64];
        let per_row = scale_dims == [rows as i64, 1];
        match (transposed, per_column, per_row) {
            // x @ (Q * s): K = rows, N = cols, a scale per output column.
            (false, true, _) => Some(Found {
                q_init: q.name.clone(),
                k: rows,
                n: cols,
                layout: Layout::KN,
                scale,
            }),
            // x @ (Q * s)^T: K = cols, N = rows, a scale per output row.
            (true, _, true) => Some(Found {
                q_init: q.name.clone(),
                k: cols,
                n: rows,
                layout: Layout::NK,
                scale,
            }),
            _ => None,
        }
    };

    let mut rewrites = vec![];
    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type == "MatMul" && node.domain.is_empty() && node.input.len() == 2 {
            if let Some(found) = find(&node.input[1]) {
                rewrites.push((i, found));
            }
        }
    }
    if rewrites.is_empty() {
        return;
    }
    let mut pending = vec![];
    for (i, found) in rewrites {
        let key = format!("{}#{}", found.q_init, i);
        let node = &mut graph.node[i];
        node.op_type = OP.to_string();
        node.domain = String::new();
        node.input.truncate(1);
        node.attribute = weights_attribute(&key);
        pending.push((key, found));
    }
    // A Gather of rows from an int8 table that a rewritten NK MatMul also reads (a tied
    // embedding) reads the rows from the same weights: the table is held once.
    let tables: HashMap<String, String> = pending
        .iter()
        .filter(|(_, f)| f.layout == Layout::NK)
        .map(|(key, f)| (f.q_init.clone(), key.clone()))
        .collect();
    for node in graph.node.iter_mut() {
        let axis = attr(node, "axis").map(|a| a.i).unwrap_or(0);
        if node.op_type == "Gather" && node.domain.is_empty() && node.input.len() == 2 && axis == 0
        {
            if let Some(key) = tables.get(&node.input[0]) {
                node.op_type = GATHER.to_string();
                node.input.remove(0);
                node.attribute = weights_attribute(key);
            }
        }
    }
    let used = remove_dead_nodes(graph);
    // An int8 initializer nothing else reads any more is moved out of the protobuf (no copy);
    // one that stays (a tied embedding table, which a Gather also reads) is copied.
    let mut uses: HashMap<String, usize> = HashMap::new();
    for (_, found) in &pending {
        *uses.entry(found.q_init.clone()).or_default() += 1;
    }
    for (key, found) in pending {
        let t = &mut graph.initializer[inits[&found.q_init]];
        let values = if !used.contains(&found.q_init)
            && uses[&found.q_init] == 1
            && !t.raw_data.is_empty()
        {
            std::mem::take(&mut t.raw_data)
        } else {
            init_i8(t).expect("checked int8 initializer")
        };
        let (values, scale) = if head_q8 && found.layout == Layout::NK {
            match Q8Weights::from_rows(found.k, found.n, values, found.scale) {
                Ok(w) => {
                    weights.insert(key, Packed::Q8Head(Arc::new(w)));
                    continue;
                }
                Err(back) => back,
            }
        } else {
            (values, found.scale)
        };
        let packed = QWeights::new(found.k, found.n, found.layout, values, scale)
            .map(|w| Packed::Int8(Arc::new(w)));
        if let Ok(w) = packed {
            weights.insert(key, w);
        }
    }
    graph.initializer.retain(|t| used.contains(&t.name));
}

const UINT8: i32 = 2;

/// Replaces `MatMulNBits` nodes (4 bits, blocks of 32, no `g_idx` or bias) whose scales and
/// offsets are float16 values (as Q4_1 stores them) by `SlmQMatMul` on [`Q4Weights`]. Zero
/// points: float (`m = -zp * d`), packed 4-bit, or absent (8).
fn rewrite_q4_1(graph: &mut pb::GraphProto, weights: &mut HashMap<String, Packed>) {
    // Readers of each initializer: one that only its MatMulNBits reads is freed as soon as that
    // node's weight is packed, so the load never holds a layer's weights twice over.
    let mut readers: HashMap<String, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *readers.entry(i.clone()).or_default() += 1;
        }
    }
    let outputs: std::collections::HashSet<&str> =
        graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut rewritten = false;
    for i in 0..graph.node.len() {
        let w = {
            let inits: HashMap<&str, &pb::TensorProto> = graph
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect();
            q4_1_weight(&graph.node[i], &inits)
        };
        let Some(w) = w else { continue };
        let node = &mut graph.node[i];
        let freed: Vec<String> = node.input[1..]
            .iter()
            .filter(|n| readers.get(*n) == Some(&1) && !outputs.contains(n.as_str()))
            .cloned()
            .collect();
        let key = format!("{}#q4_1#{i}", node.input[1]);
        node.op_type = OP.to_string();
        node.domain = String::new();
        node.input.truncate(1);
        node.attribute = weights_attribute(&key);
        weights.insert(key, Packed::Q4_1(Arc::new(w)));
        for t in graph
            .initializer
            .iter_mut()
            .filter(|t| freed.contains(&t.name))
        {
            *t = pb::TensorProto {
                name: std::mem::take(&mut t.name),
                ..Default::default()
            };
        }
        rewritten = true;
    }
    if rewritten {
        let used = remove_dead_nodes(graph);
        graph.initializer.retain(|t| used.contains(&t.name));
    }
}

/// Packs Q4_1 `MatMulNBits` weights while the protobuf is decoded: a node's 4-bit values, scales
/// and zero points are held until the last of them arrives, then packed and dropped, so the
/// decoded protobuf never holds more than one product's weights (the load's peak memory is the
/// packed model, not the file). Nodes it cannot pack keep their initializers, for [`rewrite`].
#[derive(Default)]
pub struct Q4Stream {
    /// Candidate nodes and their initializer inputs (found once the nodes are decoded).
    candidates: Option<Vec<Candidate>>,
    /// Initializer name -> candidate.
    index: HashMap<String, usize>,
    /// Packed weights, by the output name of their node.
    packed: HashMap<String, Packed>,
}

struct Candidate {
    node: pb::NodeProto,
    needed: usize,
    held: Vec<pb::TensorProto>,
}

impl crate::proto::Initializers for Q4Stream {
    fn take(&mut self, graph: &mut pb::GraphProto, t: pb::TensorProto) {
        let candidates = self.candidates.get_or_insert_with(|| {
            let mut readers: HashMap<&str, usize> = HashMap::new();
            for n in &graph.node {
                for i in &n.input {
                    *readers.entry(i.as_str()).or_default() += 1;
                }
            }
            let mut found = vec![];
            for n in graph.node.iter().filter(|n| {
                n.op_type == "MatMulNBits" && n.domain == "com.microsoft" && !n.output.is_empty()
            }) {
                let inits: Vec<&String> = n
                    .input
                    .iter()
                    .skip(1)
                    .take(3)
                    .filter(|i| !i.is_empty())
                    .collect();
                if inits.len() >= 2 && inits.iter().all(|i| readers.get(i.as_str()) == Some(&1)) {
                    for i in inits.iter() {
                        self.index.insert((*i).clone(), found.len());
                    }
                    found.push(Candidate {
                        node: n.clone(),
                        needed: inits.len(),
                        held: vec![],
                    });
                }
            }
            found
        });
        let Some(&c) = self.index.get(&t.name) else {
            graph.initializer.push(t);
            return;
        };
        let cand = &mut candidates[c];
        cand.held.push(t);
        if cand.held.len() < cand.needed {
            return;
        }
        let inits: HashMap<&str, &pb::TensorProto> =
            cand.held.iter().map(|t| (t.name.as_str(), t)).collect();
        match q4_1_weight(&cand.node, &inits) {
            Some(w) => {
                self.packed
                    .insert(cand.node.output[0].clone(), Packed::Q4_1(Arc::new(w)));
                cand.held.clear();
            }
            None => graph.initializer.append(&mut cand.held),
        }
    }
}

impl Q4Stream {
    /// Rewrites the packed nodes of the decoded `proto` into `SlmQMatMul` and returns their
    /// weights (for [`with_weights`]); initializers still held go back to the graph.
    pub fn finish(self, proto: &mut pb::ModelProto) -> HashMap<String, Packed> {
        let mut weights = HashMap::new();
        let Some(graph) = proto.graph.as_mut() else {
            return weights;
        };
        for mut c in self.candidates.unwrap_or_default() {
            graph.initializer.append(&mut c.held);
        }
        let mut packed = self.packed;
        for node in graph.node.iter_mut() {
            if node.op_type != "MatMulNBits" || node.output.is_empty() {
                continue;
            }
            if let Some(w) = packed.remove(&node.output[0]) {
                let key = format!("{}#q4_1", node.output[0]);
                node.op_type = OP.to_string();
                node.domain = String::new();
                node.input.truncate(1);
                node.attribute = weights_attribute(&key);
                weights.insert(key, w);
            }
        }
        weights
    }
}

/// A 4-bit `MatMulNBits` (blocks of 32, no `g_idx` or bias) read from its initializers:
/// value(c, k) = scale * (q - zero) per block.
struct NBits<'a> {
    k: usize,
    n: usize,
    /// `[N][K/32][16]`, two values per byte, low nibble first.
    raw: &'a [u8],
    scale: Vec<f32>,
    zero: Vec<f32>,
}

impl NBits<'_> {
    fn q(&self, c: usize, kk: usize) -> u8 {
        self.raw[c * self.k / 2 + kk / 2] >> (4 * (kk % 2)) & 15
    }
}

fn nbits<'a>(
    node: &pb::NodeProto,
    inits: &HashMap<&str, &'a pb::TensorProto>,
) -> Option<NBits<'a>> {
    if node.op_type != "MatMulNBits" || node.domain != "com.microsoft" {
        return None;
    }
    let int = |name: &str| attr(node, name).map(|a| a.i);
    let (k, n) = (int("K")? as usize, int("N")? as usize);
    if int("bits") != Some(4)
        || int("block_size") != Some(QBLOCK as i64)
        || k % QBLOCK != 0
        || node.input.len() < 3
    {
        return None;
    }
    if node.input.iter().skip(4).any(|i| !i.is_empty()) {
        return None; // g_idx or bias
    }
    let kb = k / QBLOCK;
    let b = inits.get(node.input[1].as_str())?;
    if b.data_type != UINT8 || b.data_location == Some(1) || b.raw_data.len() != n * kb * QBLOCK / 2
    {
        return None;
    }
    let scale = init_f32(inits.get(node.input[2].as_str())?)?;
    let zero: Vec<f32> = match node.input.get(3).filter(|z| !z.is_empty()) {
        None => vec![8.0; n * kb],
        Some(z) => {
            let z = inits.get(z.as_str())?;
            if let Some(f) = init_f32(z) {
                f
            } else if z.data_type == UINT8
                && z.data_location != Some(1)
                && z.raw_data.len() == n * kb.div_ceil(2)
            {
                // Two 4-bit zero points per byte, low nibble first, each row padded to whole bytes.
                (0..n * kb)
                    .map(|i| {
                        (z.raw_data[(i / kb) * kb.div_ceil(2) + (i % kb) / 2] >> (4 * (i % kb % 2))
                            & 15) as f32
                    })
                    .collect()
            } else {
                return None;
            }
        }
    };
    (scale.len() == n * kb && zero.len() == n * kb).then_some(NBits {
        k,
        n,
        raw: &b.raw_data,
        scale,
        zero,
    })
}

fn q4_1_weight(node: &pb::NodeProto, inits: &HashMap<&str, &pb::TensorProto>) -> Option<Q4Weights> {
    let w = nbits(node, inits)?;
    // Held as float16: only when that is exact (to f32 rounding), as for a Q4_1 export.
    let exact_f16 = |v: f32| {
        let h = f16::from_f32(v);
        ((h.to_f32() - v).abs() <= 1e-5 * v.abs()).then_some(h)
    };
    let d: Vec<f16> = w
        .scale
        .iter()
        .map(|&s| exact_f16(s))
        .collect::<Option<_>>()?;
    let m: Vec<f16> = w
        .scale
        .iter()
        .zip(&w.zero)
        .map(|(&s, &z)| exact_f16(-z * s))
        .collect::<Option<_>>()?;
    Q4Weights::from_nbits(w.k, w.n, w.raw, &d, &m).ok()
}

/// Replaces every 4-bit `MatMulNBits` by a `MatMul` on its dequantized f32 weight, for front ends
/// that do not run it (tract's own import has no zero points; the GPU plan runs f32 weights).
pub fn dequantize_nbits(proto: &mut pb::ModelProto) {
    let Some(graph) = proto.graph.as_mut() else {
        return;
    };
    let mut dense = vec![];
    {
        let inits: HashMap<&str, &pb::TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        for (i, node) in graph.node.iter().enumerate() {
            if let Some(w) = nbits(node, &inits) {
                let kb = w.k / QBLOCK;
                let mut kn = vec![0u8; w.k * w.n * 4];
                for c in 0..w.n {
                    for kk in 0..w.k {
                        let (s, z) = (w.scale[c * kb + kk / QBLOCK], w.zero[c * kb + kk / QBLOCK]);
                        let v = s * (w.q(c, kk) as f32 - z);
                        kn[(kk * w.n + c) * 4..][..4].copy_from_slice(&v.to_le_bytes());
                    }
                }
                dense.push((i, w.k, w.n, kn));
            }
        }
    }
    for (i, k, n, raw) in dense {
        let name = format!("{}_dequantized", graph.node[i].input[1]);
        let node = &mut graph.node[i];
        node.op_type = "MatMul".into();
        node.domain = String::new();
        node.input.truncate(1);
        node.input.push(name.clone());
        node.attribute.clear();
        graph.initializer.push(pb::TensorProto {
            name,
            dims: vec![k as i64, n as i64],
            data_type: FLOAT,
            raw_data: raw,
            ..Default::default()
        });
    }
    let used = remove_dead_nodes(graph);
    graph.initializer.retain(|t| used.contains(&t.name));
}

/// Drops nodes whose outputs nobody reads; returns the names still read (by nodes or as outputs).
pub(crate) fn remove_dead_nodes(graph: &mut pb::GraphProto) -> std::collections::HashSet<String> {
    loop {
        let mut used: std::collections::HashSet<String> = std::collections::HashSet::new();
        for n in &graph.node {
            used.extend(n.input.iter().cloned());
        }
        used.extend(graph.output.iter().map(|o| o.name.clone()));
        let before = graph.node.len();
        graph.node.retain(|n| {
            n.output.is_empty() || n.output.iter().any(|o| !o.is_empty() && used.contains(o))
        });
        if graph.node.len() == before {
            return used;
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn f32_tensor(name: &str, v: &[f32]) -> pb::TensorProto {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        pb::TensorProto {
            name: name.into(),
            dims: vec![v.len() as i64],
            data_type: FLOAT,
            raw_data: raw,
            ..Default::default()
        }
    }

    /// `y = MatMulNBits(x)` with K = 64, N = 3, scales `scale`, float zero points.
    fn nbits_model(scale: f32) -> Vec<u8> {
        let (k, n) = (64usize, 3usize);
        let node = pb::NodeProto {
            op_type: "MatMulNBits".into(),
            domain: "com.microsoft".into(),
            input: vec!["x".into(), "b".into(), "s".into(), "zp".into()],
            output: vec!["y".into()],
            attribute: [("K", k), ("N", n), ("bits", 4), ("block_size", 32)]
                .iter()
                .map(|(name, v)| pb::AttributeProto {
                    name: (*name).into(),
                    i: *v as i64,
                    r#type: 2,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let b = pb::TensorProto {
            name: "b".into(),
            dims: vec![n as i64, 2, 16],
            data_type: UINT8,
            raw_data: (0..n * k / 2).map(|i| (i * 37 % 256) as u8).collect(),
            ..Default::default()
        };
        let graph = pb::GraphProto {
            node: vec![node],
            initializer: vec![
                b,
                f32_tensor("s", &[scale; 6]),
                f32_tensor("zp", &[8.0; 6]),
                f32_tensor("other", &[1.0; 4]),
            ],
            ..Default::default()
        };
        pb::ModelProto {
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn q4_1_weights_are_packed_while_decoding() {
        let mut stream = Q4Stream::default();
        let mut proto = crate::proto::read_bytes(&nbits_model(0.5), &mut stream).unwrap();
        // Only the tensor that no packed node reads was kept in the protobuf.
        let kept: Vec<&str> = proto
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(kept, ["other"]);
        let weights = stream.finish(&mut proto);
        assert_eq!(weights.len(), 1);
        let node = &proto.graph.as_ref().unwrap().node[0];
        assert_eq!((node.op_type.as_str(), node.input.len()), (OP, 1));
    }

    #[test]
    fn weights_it_cannot_pack_stay_in_the_protobuf() {
        // A scale that float16 does not hold exactly: left to tract, every initializer kept.
        let mut stream = Q4Stream::default();
        let mut proto = crate::proto::read_bytes(&nbits_model(0.1), &mut stream).unwrap();
        assert!(stream.finish(&mut proto).is_empty());
        let graph = proto.graph.as_ref().unwrap();
        assert_eq!(graph.initializer.len(), 4);
        assert_eq!(graph.node[0].op_type, "MatMulNBits");
    }
}
