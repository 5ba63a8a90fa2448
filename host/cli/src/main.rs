//! The `pde` command line. Parsing and printing only: every decision is made
//! by the `pde` library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
