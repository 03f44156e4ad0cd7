use tract_onnx::prelude::*;
fn main() -> TractResult<()> {
    let m = tract_onnx::onnx().model_for_path("/tmp/mmnb.onnx")?.into_optimized()?.into_runnable()?;
    let x: Vec<f32> = std::fs::read("/tmp/mmnb_x.bin")?.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let want: Vec<f32> = std::fs::read("/tmp/mmnb_y.bin")?.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let t = tract_ndarray::Array3::from_shape_vec((1, 3, 64), x)?.into_tensor();
    let y = m.run(tvec![t.into()])?;
    let y = y[0].to_plain_array_view::<f32>()?;
    let d = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("tract vs numpy max diff {d}");
    Ok(())
}
