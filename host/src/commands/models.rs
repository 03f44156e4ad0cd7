//! `slm models`: the models of the models directory, as a table (name, context, vocabulary, chat
//! template).

use anyhow::Result;

use crate::commands::app::App;
use crate::commands::errors;

pub fn models(app: &App) -> Result<()> {
    let (mut store, g) = app.instance()?;
    let models = g
        .edge_slm_generator()
        .call_list_models(&mut store)
        .map_err(errors::trap)?
        .map_err(|e| app.guest_error(e))?;
    let names = app.rt.registry.names();
    let models: Vec<_> = models
        .into_iter()
        .filter(|m| names.contains(&m.name))
        .collect();
    if models.is_empty() {
        eprintln!(
            "no models in {} (run scripts/setup, or pass --models DIR)",
            app.rt.registry.dir().display()
        );
        return Ok(());
    }
    let w = models
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("{:w$}  {:>7}  {:>6}  chat", "name", "context", "vocab");
    for m in models {
        println!(
            "{:w$}  {:>7}  {:>6}  {}",
            m.name,
            m.context_length,
            m.vocab_size,
            if m.has_chat_template { "yes" } else { "no" }
        );
    }
    Ok(())
}
