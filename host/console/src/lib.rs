//! pde's read-only web console (`pde serve`) and its self-contained HTML
//! audit report (`pde report --html FILE`).
//!
//! - [`docs`]: the documents behind the pages, read through the engine's
//!   own queries; the CLI's `--output json` of `status`, `history` and
//!   `plugin list` is built here too, so the two say the same;
//! - [`policy`]: a policy's history, approvals and the diff of two
//!   versions' rules; the deployment timeline and its inline SVG;
//! - [`server`]: the axum server, its token and its background live read;
//! - [`report`]: the one-file report.
//!
//! Templates (askama) and the stylesheet are compiled into the binary; no
//! page loads anything from anywhere, and none needs a script.

#[cfg(test)]
mod contrast;
pub mod docs;
pub mod policy;
pub mod report;
pub mod server;
mod views;

pub use views::overview_html;

pub use report::{Report, ReportError, ReportOptions};
pub use server::{ServeConfig, ServeError, serve, serve_blocking};
