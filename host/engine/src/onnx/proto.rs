//! Reading the ONNX protobuf without holding the file twice.
//!
//! tract's own reader maps (or reads) the whole file and decodes it, which copies every tensor:
//! for a moment the process holds the file and the decoded protobuf, twice the model. Here the
//! decoder pulls the file through a 1 MiB window instead, so the peak is the decoded protobuf
//! alone (whose int8 weights then move, uncopied, into the int8 matmuls).
//!
//! A tensor's `raw_data` is read straight into its `Vec<u8>`: prost reads a bytes field through
//! `Buf::copy_to_bytes` and then copies that into the vector, which for a moment held Gemma 3's
//! 168 MB embedding table twice (the load's peak memory).
//!
//! Each initializer is also handed, as it is decoded, to an [`Initializers`] sink, which may keep
//! it or take it (the Q4_1 weights are packed as their tensors arrive, so the decoded protobuf
//! never holds them all: [`super::nbits::NBitsStream`]).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};
use tract_onnx::pb;
use tract_onnx::prelude::TractResult;
use tract_onnx::tract_core::internal::format_err;

const WINDOW: usize = 1 << 20;

/// A `Buf` over a reader: a window of the stream, refilled as the decoder advances.
struct ReadBuf<R: Read> {
    reader: R,
    window: Vec<u8>,
    pos: usize,
    end: usize,
    /// Bytes not yet consumed, the window's included.
    left: usize,
    error: Option<std::io::Error>,
}

impl<R: Read> ReadBuf<R> {
    fn new(reader: R, len: usize) -> ReadBuf<R> {
        let mut b = ReadBuf {
            reader,
            window: vec![0; WINDOW.min(len.max(1))],
            pos: 0,
            end: 0,
            left: len,
            error: None,
        };
        b.refill();
        b
    }

    fn refill(&mut self) {
        self.pos = 0;
        self.end = 0;
        if self.left == 0 {
            return;
        }
        let want = self.window.len().min(self.left);
        loop {
            match self.reader.read(&mut self.window[..want]) {
                Ok(0) => {
                    self.fail(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file ended early",
                    ));
                    return;
                }
                Ok(n) => {
                    self.end = n;
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// Ends the stream: the decoder sees no more bytes and stops with an error.
    fn fail(&mut self, e: std::io::Error) {
        self.error = Some(e);
        self.left = 0;
        self.pos = 0;
        self.end = 0;
    }
}

impl<R: Read> Buf for ReadBuf<R> {
    fn remaining(&self) -> usize {
        self.left
    }

    fn chunk(&self) -> &[u8] {
        &self.window[self.pos..self.end]
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 && self.left > 0 {
            let step = cnt.min(self.end - self.pos);
            self.pos += step;
            self.left -= step;
            cnt -= step;
            if self.pos == self.end {
                self.refill();
            }
        }
    }
}

/// Where decoded initializers go.
pub trait Initializers: Send + Sync {
    /// Receives an initializer of `graph`, whose nodes are decoded by now (files written by onnx
    /// put them first). Keeps it (`graph.initializer.push(t)`) or takes it.
    fn take(&mut self, graph: &mut pb::GraphProto, t: pb::TensorProto);
}

/// Keeps every initializer in the graph.
pub struct KeepAll;

impl Initializers for KeepAll {
    fn take(&mut self, graph: &mut pb::GraphProto, t: pb::TensorProto) {
        graph.initializer.push(t);
    }
}

/// Field numbers of onnx.proto.
const MODEL_GRAPH: u32 = 7;
const GRAPH_INITIALIZER: u32 = 5;
const TENSOR_RAW_DATA: u32 = 9;

/// A message being decoded by prost, one of whose fields (number [`Self::TAG`]) it decodes
/// itself ([`Intercept::merge_tag`]); [`Intercepted`] makes it a [`Message`].
trait Intercept: Send + Sync {
    type Inner: Message + std::fmt::Debug;
    const TAG: u32;

    fn inner(&self) -> &Self::Inner;

    fn inner_mut(&mut self) -> &mut Self::Inner;

    fn merge_tag(
        &mut self,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError>;
}

struct Intercepted<T>(T);

impl<T: Intercept> std::fmt::Debug for Intercepted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.inner().fmt(f)
    }
}

impl<T: Intercept> Message for Intercepted<T> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.0.inner().encode_raw(buf)
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == T::TAG {
            self.0.merge_tag(wire_type, buf, ctx)
        } else {
            self.0.inner_mut().merge_field(tag, wire_type, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        self.0.inner().encoded_len()
    }

    fn clear(&mut self) {
        self.0.inner_mut().clear()
    }
}

/// A `ModelProto` being decoded, its graph's initializers sent to a sink.
struct ModelStream<'a> {
    model: pb::ModelProto,
    sink: &'a mut dyn Initializers,
}

impl Intercept for ModelStream<'_> {
    type Inner = pb::ModelProto;
    const TAG: u32 = MODEL_GRAPH;

    fn inner(&self) -> &pb::ModelProto {
        &self.model
    }

    fn inner_mut(&mut self) -> &mut pb::ModelProto {
        &mut self.model
    }

    fn merge_tag(
        &mut self,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let graph = self.model.graph.get_or_insert_with(Default::default);
        let mut stream = Intercepted(GraphStream {
            graph,
            sink: &mut *self.sink,
        });
        prost::encoding::message::merge(wire_type, &mut stream, buf, ctx)
    }
}

/// The graph of a [`ModelStream`].
struct GraphStream<'a, 'b> {
    graph: &'a mut pb::GraphProto,
    sink: &'b mut dyn Initializers,
}

impl Intercept for GraphStream<'_, '_> {
    type Inner = pb::GraphProto;
    const TAG: u32 = GRAPH_INITIALIZER;

    fn inner(&self) -> &pb::GraphProto {
        self.graph
    }

    fn inner_mut(&mut self) -> &mut pb::GraphProto {
        self.graph
    }

    fn merge_tag(
        &mut self,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut t = Intercepted(TensorStream(pb::TensorProto::default()));
        prost::encoding::message::merge(wire_type, &mut t, buf, ctx)?;
        self.sink.take(self.graph, t.0 .0);
        Ok(())
    }
}

/// prost's own error for a field longer than the rest of the buffer (a truncated file; the
/// reader's error says which). prost offers no other way to make one.
#[allow(deprecated)]
fn underflow() -> DecodeError {
    DecodeError::new("buffer underflow")
}

/// A tensor of a [`GraphStream`], its `raw_data` read in one copy.
struct TensorStream(pb::TensorProto);

impl Intercept for TensorStream {
    type Inner = pb::TensorProto;
    const TAG: u32 = TENSOR_RAW_DATA;

    fn inner(&self) -> &pb::TensorProto {
        &self.0
    }

    fn inner_mut(&mut self) -> &mut pb::TensorProto {
        &mut self.0
    }

    fn merge_tag(
        &mut self,
        wire_type: WireType,
        buf: &mut impl Buf,
        _ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        prost::encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
        let len = prost::encoding::decode_varint(buf)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= buf.remaining())
            .ok_or_else(underflow)?;
        let raw = &mut self.0.raw_data;
        raw.clear();
        raw.reserve_exact(len);
        while raw.len() < len {
            let chunk = buf.chunk();
            let n = chunk.len().min(len - raw.len());
            if n == 0 {
                return Err(underflow());
            }
            raw.extend_from_slice(&chunk[..n]);
            buf.advance(n);
        }
        Ok(())
    }
}

fn decode(buf: impl Buf, sink: &mut dyn Initializers) -> Result<pb::ModelProto, DecodeError> {
    let mut stream = Intercepted(ModelStream {
        model: pb::ModelProto::default(),
        sink,
    });
    stream.merge(buf)?;
    Ok(stream.0.model)
}

/// Decodes the ONNX file at `path`, streaming it; initializers go to `sink`.
pub fn read_path(path: &Path, sink: &mut dyn Initializers) -> TractResult<pb::ModelProto> {
    let file = File::open(path).map_err(|e| format_err!("opening {}: {e}", path.display()))?;
    let len = file.metadata()?.len() as usize;
    let mut buf = ReadBuf::new(file, len);
    let decoded = decode(&mut buf, sink);
    if let Some(e) = buf.error.take() {
        return Err(format_err!("reading {}: {e}", path.display()));
    }
    Ok(decoded?)
}

/// Decodes an ONNX model held in memory (no intermediate copy of the bytes).
pub fn read_bytes(bytes: &[u8], sink: &mut dyn Initializers) -> TractResult<pb::ModelProto> {
    Ok(decode(bytes, sink)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out at most 3 bytes per call, to cross every boundary.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(3).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn streamed_decode_equals_decode_from_memory() {
        let mut m = pb::ModelProto {
            producer_name: "x".repeat(5000),
            ir_version: 8,
            ..Default::default()
        };
        m.graph = Some(pb::GraphProto {
            name: "g".into(),
            initializer: vec![pb::TensorProto {
                name: "w".into(),
                dims: vec![3000],
                data_type: 3,
                raw_data: (0..3000).map(|i| i as u8).collect(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let bytes = m.encode_to_vec();
        let mut buf = ReadBuf::new(Trickle(&bytes), bytes.len());
        let streamed = decode(&mut buf, &mut KeepAll).unwrap();
        assert_eq!(streamed, m);
        assert_eq!(read_bytes(&bytes, &mut KeepAll).unwrap(), m);
        // A truncated stream ends the decode (which may stop cleanly at a field boundary) and
        // records the error that `read_path` reports: no panic, no silent success.
        let mut short = ReadBuf::new(Trickle(&bytes[..bytes.len() / 2]), bytes.len());
        let _ = decode(&mut short, &mut KeepAll);
        assert_eq!(
            short.error.as_ref().map(|e| e.kind()),
            Some(std::io::ErrorKind::UnexpectedEof)
        );
    }
}
