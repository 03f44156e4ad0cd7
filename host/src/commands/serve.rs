//! `slm serve`: picks the HTTP component (native or portable) and runs [`crate::serve`] on the
//! models.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;

use crate::cli::Global;
use crate::commands::{HTTP_FILE, HTTP_PORTABLE_FILE};
use crate::registry::ModelRegistry;
use crate::runtime::find_component;

pub fn serve(
    g: &Global,
    registry: ModelRegistry,
    listen: SocketAddr,
    portable: bool,
) -> Result<()> {
    let file = if portable {
        HTTP_PORTABLE_FILE
    } else {
        HTTP_FILE
    };
    let component = find_component(g.component.as_deref(), file)?;
    crate::serve::serve(crate::serve::ServeOptions {
        listen,
        component: &component,
        registry: Arc::new(registry),
    })
}
