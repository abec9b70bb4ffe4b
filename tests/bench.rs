//! The benchmark harness (bench/run.sh) works from this checkout: a tiny run of every scenario with the
//! debug binaries, in which no call may fail. Its figures mean nothing and nothing here is timed; speed is
//! measured by `bench/run.sh` itself (BENCHMARKS.md).

use std::{path::Path, process::Command};

#[test]
fn a_tiny_benchmark_run_measures_every_scenario_without_a_failed_call() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_chat-token-service"))
        .parent()
        .expect("the binary is in a directory");
    for example in ["loadgen", "bench_baseline", "ivschat_stub"] {
        assert!(
            bin_dir.join("examples").join(example).exists(),
            "examples/{example}.rs is not built (cargo test builds the examples; else `cargo build --examples`)"
        );
    }
    let output = Command::new("bench/run.sh")
        .arg("--quick")
        .env("BENCH_BIN_DIR", bin_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cannot run bench/run.sh");
    let table = String::from_utf8_lossy(&output.stdout);
    // loadgen exits non-zero on any failed call, and bench/run.sh with it.
    assert!(
        output.status.success(),
        "bench/run.sh --quick failed:\n{table}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for scenario in [
        "baseline: bare tonic",
        "embedded defaults",
        "production policy + 3 memory limits",
        "20,000 entities",
        "bound to the end user (RS256)",
        "10,000 rooms × 1,000 callers",
        "REST door, HTTP/1.1 keep-alive",
        "REST door, h2c",
        "REST door, HTTP/1.1, SigV4-signed",
        "REST door, h2c, SigV4-signed",
        "production policy + 3 Redis limits",
        "IVS stub straight through aws-sdk",
        "through the service",
        "distinct users, 1 per-user limit",
        "exec to SERVING",
    ] {
        assert!(table.contains(scenario), "no {scenario:?} row in:\n{table}");
    }
    // The server's CPU per call is measured for the baseline row, so every row has its CPU ratio.
    let baseline = table
        .lines()
        .find(|l| l.starts_with("baseline: bare tonic"))
        .unwrap();
    assert!(
        table.contains("CPU µs/call") && baseline.trim_end().ends_with("1.00"),
        "no CPU per call for the baseline in:\n{table}"
    );
}
