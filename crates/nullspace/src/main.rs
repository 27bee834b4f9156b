//! The `nullspace` command line.

mod image;
mod machine;
mod progress;
mod server;
mod shell;
mod template;
mod template_export;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nullspace",
    version,
    about = "Container images to microVM sandbox templates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect, pull and import OCI images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Serve the template build API.
    Serve(Box<server::ServeArgs>),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(server::KeysCommand),
    /// Remove what nothing references: artifacts, snapshots, old logs, leftovers.
    Gc(server::GcArgs),
    /// Build and manage templates through the API ($NULLSPACE_API_URL, $NULLSPACE_API_KEY).
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// Create and drive machines through the API (restored from template
    /// snapshots; $NULLSPACE_API_URL, $NULLSPACE_API_KEY).
    #[command(subcommand, alias = "sandbox")]
    Machine(machine::MachineCommand),
}

fn main() -> ExitCode {
    // The raw matches are kept: `template build` applies step flags in
    // command-line order, which only they record.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Image(c) => image::run(c),
        Command::Serve(a) => server::serve(*a),
        Command::Keys(c) => server::keys(c),
        Command::Gc(a) => server::gc(a),
        Command::Template(c) => template::run(c, &matches),
        Command::Machine(c) => machine::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the library errors already name image, object and rule.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("error: {}", msg.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
