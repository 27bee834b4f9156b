//! The `nullspace` command line.

mod image;
mod progress;
mod server;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Serve(server::ServeArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(server::KeysCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Image(c) => image::run(c),
        Command::Serve(a) => server::serve(a),
        Command::Keys(c) => server::keys(c),
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
