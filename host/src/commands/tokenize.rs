//! `slm tokenize`: the token ids of a text as a JSON array.

use anyhow::Result;

use crate::commands::app::App;
use crate::commands::errors;

pub fn tokenize(app: &App, model: Option<&str>, text: &str) -> Result<()> {
    let model = app.model(model)?;
    let (mut store, g) = app.instance()?;
    let ids = g
        .edge_slm_generator()
        .call_tokenize(&mut store, Some(&model), text)
        .map_err(errors::trap)?
        .map_err(|e| app.guest_error(e))?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
