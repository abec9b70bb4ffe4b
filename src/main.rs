//! The `chat-token-service` binary: parse flags, load the config, start logging, build, bind, serve.

use std::{io::Read, path::PathBuf, process::ExitCode, time::Duration};

use chat_token_service::{
    app,
    config::{Config, LogFormat, Mode, service_link_variables},
    issuer::local::{KeySource, generate_key},
    server::{self, TOKEN_SERVICE_NAME},
    telemetry,
    transport::probe::Probe,
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

    /// The same as `serve --dev`.
    #[arg(long)]
    dev: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (the default).
    Serve {
        /// Development mode, to try the service out: the development policy, the `header` identity and
        /// anonymous callers are allowed on any listen_addr (CTS_LISTEN_ADDR=0.0.0.0:50051 in a
        /// container), and start-up warns what it trusts. Never where others can connect.
        #[arg(long)]
        dev: bool,
    },
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
    /// Ask this host's server, as the configuration describes it, whether it serves (gRPC health, over
    /// its TLS): exit 0 when SERVING, 1 when not or unreachable, 2 on a usage or configuration error.
    /// For Docker and compose HEALTHCHECKs.
    Health {
        /// The health-checked service; "" for the server as a whole.
        #[arg(long, default_value = TOKEN_SERVICE_NAME)]
        service: String,
        /// The longest the whole check may take: connecting, the handshake, the call.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// Exit status of a usage or configuration error of `health`, apart from "not healthy" (1).
const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match (cli.check_config, cli.dev, cli.command) {
        (false, false, command) => command.unwrap_or(Command::Serve { dev: false }),
        (true, false, None | Some(Command::Check)) => Command::Check,
        (false, true, None | Some(Command::Serve { .. })) => Command::Serve { dev: true },
        (true, _, _) => {
            eprintln!(
                "chat-token-service: --check-config is the `check` subcommand; give one or the other"
            );
            return ExitCode::from(USAGE_ERROR);
        }
        (false, true, Some(_)) => {
            eprintln!(
                "chat-token-service: --dev is `serve --dev`; it goes with no other subcommand"
            );
            return ExitCode::from(USAGE_ERROR);
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
        Command::Health { service, timeout } => health(cli.config, &service, timeout),
        Command::Serve { dev } => {
            keep_large_blocks_mapped();
            let runtime = tokio::runtime::Runtime::new().expect("cannot start the tokio runtime");
            // SIGHUP's default action ends the process. Take it over before anything else, so a reload
            // signal that arrives while the config loads (or in a configuration with nothing to reload)
            // is handled, never fatal. The handler stays installed for the life of the process.
            let hangups = {
                let _runtime = runtime.enter();
                signal(SignalKind::hangup()).expect("cannot install the SIGHUP handler")
            };
            let mode = if dev { Mode::Development } else { Mode::Serve };
            report(runtime.block_on(serve(cli.config, cli.log_format, mode, hangups)))
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

/// Fixes glibc's mmap threshold at its initial 128 KiB, unless the environment sets it.
///
/// glibc raises the threshold (up to 32 MiB) each time a mapped block is freed. The in-process rate
/// limiter's tables grow by doubling (2 MiB a shard at a million users), so after the first growth the
/// next tables came from the heap, and the holes the old ones left stayed resident: peak RSS at
/// 1,000,000 users 60.4 and 61.9 MiB against 57.2 and 56.7 MiB with the threshold fixed (the load of
/// `bench/run.sh`'s RSS row, one build run both ways), at no measurable CPU cost. Blocks of 128 KiB or more are then always mapped,
/// and given back when freed; a call's own allocations are far smaller.
fn keep_large_blocks_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold"));
        if !tuned {
            // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            }
        }
    }
}

async fn serve(
    config_file: Option<PathBuf>,
    log_format: Option<LogFormat>,
    mode: Mode,
    hangups: Signal,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load_for(config_file.as_deref(), mode)?;
    let telemetry = telemetry::init(log_format.unwrap_or(config.log_format))?;
    warn_of_service_links();
    if mode == Mode::Development {
        warn_of_development_mode(&config);
    }
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

/// Names the Kubernetes service-link variables the configuration left out: never silently.
fn warn_of_service_links() {
    let links = service_link_variables();
    if !links.is_empty() {
        tracing::warn!(
            variables = ?links,
            "ignoring environment variables that Kubernetes injects for Services named cts…: they are \
             service links, not settings (set enableServiceLinks: false on the pod to drop them)"
        );
    }
}

/// Says what development mode trusts, loudly.
fn warn_of_development_mode(config: &Config) {
    let addr = config.listen_addr;
    let trusts = config.trusts_any_client();
    if trusts.is_empty() {
        tracing::warn!(
            "development mode (--dev): this configuration believes nothing a client says of itself, so \
             --dev changes nothing"
        );
    } else {
        tracing::warn!(
            "DEVELOPMENT MODE (--dev): every client that can reach {addr} is trusted: {}. For trying \
             the service out only, never where others can connect",
            trusts.join("; ")
        );
    }
}

/// `health`: 0 when the configured server reports `service` SERVING, 1 when not or unreachable, 2 when
/// the configuration cannot be used. Loads the configuration as the server does, but checks nothing that
/// only serving needs (the health command serves nothing): a server in development mode passes too.
fn health(config_file: Option<PathBuf>, service: &str, timeout: Duration) -> ExitCode {
    let probe = Config::load_for(config_file.as_deref(), Mode::Development)
        .map_err(|e| e.to_string())
        .and_then(|config| Probe::new(&config).map_err(|e| e.to_string()));
    let probe = match probe {
        Ok(probe) => probe,
        Err(error) => {
            eprintln!("chat-token-service health: {error}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    let shown = if service.is_empty() {
        "the server"
    } else {
        service
    };
    match runtime.block_on(probe.check(service, timeout)) {
        Ok(()) => {
            println!("{shown} on {}: SERVING", probe.addr());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("chat-token-service health: {error}");
            ExitCode::FAILURE
        }
    }
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
