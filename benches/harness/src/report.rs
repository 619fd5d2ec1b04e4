//! The harness's tables, as markdown: each flavour's medians per runner,
//! then each flavour above the floor, per test.

use crate::compile::{Build, FILES, Figures};
use crate::{Options, Sample};

/// One runner at one `-j`: each flavour's samples, in the options' order.
pub(crate) type Row = (&'static str, usize, Vec<Vec<Sample>>);

pub(crate) fn print(options: &Options, rows: &[Row]) {
    print_runs(options, rows);
    if options.flavours.contains(&"floor") {
        print_above_floor(options, rows);
    }
}

fn tests(sample: &Sample) -> f64 {
    (sample.passed + sample.failed).max(1) as f64
}

/// Wall time and test processes' and server's CPU time of a sample, per
/// test, in ms.
fn per_test(sample: &Sample) -> [f64; 3] {
    let tests = tests(sample);
    [
        sample.wall.as_secs_f64(),
        sample.tests.cpu.as_secs_f64(),
        sample.server_cpu.as_secs_f64(),
    ]
    .map(|seconds| seconds * 1000.0 / tests)
}

fn print_runs(options: &Options, rows: &[Row]) {
    println!(
        "\n{} tests per flavour in {} binaries, max_connections = 100, medians of {} runs\n",
        options.tests, options.binaries, options.runs
    );
    println!(
        "| runner | -j | flavour | wall (s) | each run (s) | CPU per test: test process (ms) | server (ms) | all client processes (ms) | test processes | after run (s) | helper at the server (s) | failed | peak conns | refused | conns opened/test | leftover dbs | retired dbs (each run) |"
    );
    println!("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (runner, jobs, samples) in rows {
        let mut walls = std::collections::HashMap::new();
        for (flavour, runs) in options.flavours.iter().zip(samples) {
            let wall = median(runs.iter().map(|s| s.wall.as_secs_f64()).collect());
            walls.insert(*flavour, wall);
            let worst = |f: fn(&Sample) -> f64| runs.iter().map(f).fold(0.0, f64::max);
            let of = |f: fn(&Sample) -> f64| median(runs.iter().map(f).collect());
            let each: Vec<String> = runs
                .iter()
                .map(|s| format!("{:.2}", s.wall.as_secs_f64()))
                .collect();
            println!(
                "| {runner} | {jobs} | {flavour} | {wall:.2} | {} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {} | {} | {:.1} | {} | {} |",
                each.join(" / "),
                of(|s| per_test(s)[1]),
                of(|s| per_test(s)[2]),
                of(|s| s.client_cpu.as_secs_f64() * 1000.0 / tests(s)),
                of(|s| s.tests.processes as f64),
                of(|s| s.after.as_secs_f64()),
                of(|s| s.helper_sessions.as_secs_f64()),
                worst(|s| s.failed as f64),
                worst(|s| s.peak as f64),
                worst(|s| s.refusals as f64),
                of(|s| s.connections as f64 / tests(s)),
                worst(|s| s.leftover as f64),
                runs.iter()
                    .map(|s| s.retired.to_string())
                    .collect::<Vec<_>>()
                    .join(" / "),
            );
        }
        let ratio = |a: &str, b: &str| match (walls.get(a), walls.get(b)) {
            (Some(a), Some(b)) => format!("{:.2}", a / b),
            _ => "-".to_owned(),
        };
        println!(
            "| {runner} | {jobs} | **ratios** | pgtest/plain {}, sqlx/pgtest {}, sqlx/pgtestsqlx {} | | | | | | | | | | | | | |",
            ratio("pgtest", "plain"),
            ratio("sqlx", "pgtest"),
            ratio("sqlx", "pgtestsqlx")
        );
        // Wall time above plain's, spread over the tests.
        let overhead: Vec<String> = options
            .flavours
            .iter()
            .filter(|flavour| !matches!(**flavour, "plain" | "floor"))
            .filter_map(|flavour| {
                let above = walls.get(flavour)? - walls.get("plain")?;
                Some(format!(
                    "{flavour} {:+.1}",
                    above * 1000.0 / options.tests as f64
                ))
            })
            .collect();
        if !overhead.is_empty() {
            println!(
                "| {runner} | {jobs} | **ms per test above plain** | {} | | | | | | | | | | | | |",
                overhead.join(", ")
            );
        }
    }
}

/// Each flavour above the floor, per test: wall time, the test processes'
/// CPU time and the server's. Runs are paired (a run of every flavour,
/// then the next), so each figure is the median of the run-by-run
/// differences and ratios: a machine whose speed drifts between runs moves
/// both sides of a pair alike.
fn print_above_floor(options: &Options, rows: &[Row]) {
    println!(
        "\nAbove the floor (one connection per test, no pool), per test, medians of the paired runs' differences\n"
    );
    println!(
        "| runner | -j | flavour | wall above the floor (ms) | test process CPU (ms) | floor's (ms) | above the floor (ms) | / floor | server CPU above the floor (ms) | test process + server CPU above the floor (ms) |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for (runner, jobs, samples) in rows {
        let Some(floor) = options
            .flavours
            .iter()
            .position(|flavour| *flavour == "floor")
            .map(|index| &samples[index])
        else {
            continue;
        };
        let floor_cpu = median(floor.iter().map(|s| per_test(s)[1]).collect());
        for (flavour, runs) in options.flavours.iter().zip(samples) {
            if *flavour == "floor" {
                continue;
            }
            let pairs: Vec<([f64; 3], [f64; 3])> = runs
                .iter()
                .zip(floor)
                .map(|(run, floor)| (per_test(run), per_test(floor)))
                .collect();
            let above = |i: usize| median(pairs.iter().map(|(a, f)| a[i] - f[i]).collect());
            let ratio = median(pairs.iter().map(|(a, f)| a[1] / f[1]).collect());
            let both = median(
                pairs
                    .iter()
                    .map(|(a, f)| a[1] + a[2] - f[1] - f[2])
                    .collect(),
            );
            println!(
                "| {runner} | {jobs} | {flavour} | {:+.1} | {:.1} | {floor_cpu:.1} | {:+.1} | {ratio:.2} | {:+.1} | {both:+.1} |",
                above(0),
                median(runs.iter().map(|s| per_test(s)[1]).collect()),
                above(1),
                above(2),
            );
        }
    }
}

/// The compile-time table: medians of `runs` builds and rebuilds per
/// file, and each attribute against `#[sqlx::test]` (the third file), as
/// it is and above the bodies alone (the last).
pub(crate) fn print_compile(figures: &Figures, runs: usize) {
    println!(
        "\nCompile time, {} tests per file in one test binary, `cargo test --no-run` (dev profile, incremental), medians of {runs} runs; CPU is cargo's and the compiler's\n",
        figures.tests
    );
    println!(
        "| tests written with | build (s) | CPU (s) | rebuild after editing one test (s) | CPU (s) | MIR per test (KiB) | test binary (MiB) | / `#[sqlx::test]`: build CPU, rebuild CPU, MIR | above the bodies alone, / `#[sqlx::test]`'s | each run: build / rebuild (s) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|---|---|");
    let of = |builds: &[Build], f: fn(&Build) -> f64| median(builds.iter().map(f).collect());
    let figures_of = |index: usize| {
        let builds = &figures.builds[index];
        [
            of(builds, |b| b.build_wall.as_secs_f64()),
            of(builds, |b| b.build_cpu.as_secs_f64()),
            of(builds, |b| b.rebuild_wall.as_secs_f64()),
            of(builds, |b| b.rebuild_cpu.as_secs_f64()),
            figures.mir_bytes[index] as f64 / 1024.0 / figures.tests.max(1) as f64,
            of(builds, |b| b.binary_bytes as f64 / 1024.0 / 1024.0),
        ]
    };
    let sqlx = figures_of(2);
    let body = figures_of(FILES.len() - 1);
    for (index, (_, name)) in FILES.iter().enumerate() {
        let [build, build_cpu, rebuild, rebuild_cpu, mir, binary] = figures_of(index);
        let each: Vec<String> = figures.builds[index]
            .iter()
            .map(|b| {
                format!(
                    "{:.1} / {:.1}",
                    b.build_wall.as_secs_f64(),
                    b.rebuild_wall.as_secs_f64()
                )
            })
            .collect();
        let ratios = |of: [f64; 6], base: [f64; 6]| {
            [1, 3, 4]
                .map(|i| format!("{:.2}", (of[i] - base[i]) / (sqlx[i] - base[i])))
                .join(", ")
        };
        let (raw, above) = if index == FILES.len() - 1 {
            (String::new(), String::new())
        } else {
            let of = figures_of(index);
            (ratios(of, [0.0; 6]), ratios(of, body))
        };
        println!(
            "| {name} | {build:.1} | {build_cpu:.1} | {rebuild:.1} | {rebuild_cpu:.1} | {mir:.1} | {binary:.1} | {raw} | {above} | {} |",
            each.join("; ")
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}
