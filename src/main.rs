//! The `chat-token-service` binary: parse flags, load the config, start logging, build, bind, serve.

use std::{io::Read, path::PathBuf, process::ExitCode};

use chat_token_service::{
    app,
    config::{Config, LogFormat},
    issuer::local::{KeySource, generate_key},
    server, telemetry,
};
use clap::{Parser, Subcommand};
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
};

/// Mints Amazon IVS Chat tokens for internal callers over gRPC.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file; `CTS_*` environment variables override it. Before or after the
    /// subcommand.
    #[arg(long, global = true, env = "CTS_CONFIG")]
    config: Option<PathBuf>,

    /// Log line format; overrides the config's `log_format`.
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,

    /// The same as the `check` subcommand.
    #[arg(long)]
    check_config: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (the default).
    Serve,
    /// Load and check the configuration, policies, entities, keys and TLS files without serving or
    /// connecting anywhere; print what would run and exit 0, or name every problem and exit 1.
    Check,
    /// Print a new random local-issuer key (PASERK k4.local) for a key set file or CTS_LOCAL_ISSUER__KEY.
    GenerateKey,
    /// Verify a local-issuer token with the configured keys and print its claims as JSON.
    VerifyToken {
        /// The token, or `-` to read it from standard input (keeps it out of shell history).
        token: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match (cli.check_config, cli.command) {
        (false, command) => command.unwrap_or(Command::Serve),
        (true, None | Some(Command::Check)) => Command::Check,
        (true, Some(_)) => {
            eprintln!(
                "chat-token-service: --check-config is the `check` subcommand; give one or the other"
            );
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Check => match app::check(cli.config.as_deref()) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for problem in problems {
                    eprintln!("chat-token-service: {problem}");
                }
                ExitCode::FAILURE
            }
        },
        Command::GenerateKey => {
            println!("{}", generate_key());
            ExitCode::SUCCESS
        }
        Command::VerifyToken { token } => report(verify_token(cli.config, &token)),
        Command::Serve => {
            let runtime = tokio::runtime::Runtime::new().expect("cannot start the tokio runtime");
            // SIGHUP's default action ends the process. Take it over before anything else, so a reload
            // signal that arrives while the config loads (or in a configuration with nothing to reload)
            // is handled, never fatal. The handler stays installed for the life of the process.
            let hangups = {
                let _runtime = runtime.enter();
                signal(SignalKind::hangup()).expect("cannot install the SIGHUP handler")
            };
            report(runtime.block_on(serve(cli.config, cli.log_format, hangups)))
        }
    }
}

fn report(result: Result<(), Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("chat-token-service: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    config_file: Option<PathBuf>,
    log_format: Option<LogFormat>,
    hangups: Signal,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(config_file.as_deref())?;
    let telemetry = telemetry::init(log_format.unwrap_or(config.log_format))?;
    tokio::spawn(log_hangups(hangups, app::reloaded_on_hangup(&config)));
    let result = serve_with(&config).await;
    telemetry.shutdown();
    result
}

async fn serve_with(config: &Config) -> Result<(), Box<dyn std::error::Error>> {
    // Before anything can serve: from here on SIGTERM and SIGINT start a graceful shutdown.
    let shutdown = shutdown_signal();
    let app = app::build(config).await?;
    let listener = TcpListener::bind(config.listen_addr)
        .await
        .map_err(|e| format!("cannot listen on {} (listen_addr): {e}", config.listen_addr))?;
    server::run(listener, app, shutdown).await?;
    Ok(())
}

/// Says, for every SIGHUP, what it reloads.
async fn log_hangups(mut hangups: Signal, reloaded: Vec<&'static str>) {
    while hangups.recv().await.is_some() {
        if reloaded.is_empty() {
            tracing::info!(
                "SIGHUP received: nothing to reload (no policy, TLS, key set or SigV4 credentials \
                 files); still serving"
            );
        } else {
            tracing::info!(reloading = ?reloaded, "SIGHUP received: reloading");
        }
    }
}

/// Completes on the first SIGTERM (Kubernetes, systemd) or SIGINT (Ctrl-C).
///
/// The handlers are installed when this is called, not when the future is first polled: the server
/// accepts connections on other threads before its shutdown future is polled, and a SIGTERM in between
/// would otherwise take its default action and kill the process mid-call.
fn shutdown_signal() -> impl Future<Output = ()> {
    let mut term = signal(SignalKind::terminate()).expect("cannot install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("cannot install the SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

fn verify_token(
    config_file: Option<PathBuf>,
    token: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(config_file.as_deref())?;
    let source = app::key_source(&config.local_issuer);
    if let KeySource::Ephemeral = source {
        return Err(
            "no local issuer key configured: set local_issuer.keys_file or CTS_LOCAL_ISSUER__KEY"
                .into(),
        );
    }
    let keys = source.load()?;
    let token = if token == "-" {
        let mut buf = String::new();
        std::io::stdin().read_to_string(&mut buf)?;
        buf.trim().to_owned()
    } else {
        token.to_owned()
    };
    let claims = keys.verify(&token)?;
    // The names VerifyChatToken's response gives these claims.
    let json = serde_json::json!({
        "token_id": claims.token_id,
        "room_identifier": claims.room.as_str(),
        "user_id": claims.user_id.expose(),
        "capabilities": claims.capabilities.iter().map(|c| c.ivs_name()).collect::<Vec<_>>(),
        "attributes": claims.attributes.expose(),
        "issued_time": rfc3339(claims.issued_at),
        "token_expiration_time": rfc3339(claims.token_expires_at),
        "session_expiration_time": rfc3339(claims.session_expires_at),
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

fn rfc3339(at: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}
