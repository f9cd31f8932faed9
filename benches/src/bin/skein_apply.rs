//! What applying one command costs as the replicated state grows, in process (no Raft, no
//! network): the state machine's cycle of taking the published state (a clone that shares every
//! map), applying one `CreateKey` (or one spend batch), and publishing it while the previous
//! version is still held by readers. Prints one JSON line per size.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use serde_json::json;
use skein_types::control::{
    Budget, BudgetPeriod, Command, ConfigExport, ControlState, Limits, Proposal, Scope, SpendItem,
    Team, VirtualKey,
};

#[derive(Parser)]
struct Args {
    /// Key counts to measure at, ascending.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,10000,100000,1000000"
    )]
    levels: Vec<usize>,
    /// Teams (keys are spread over them).
    #[arg(long, default_value_t = 100_000)]
    teams: usize,
    /// Commands applied per measurement.
    #[arg(long, default_value_t = 20_000)]
    commands: usize,
}

fn key(n: usize, teams: usize) -> VirtualKey {
    VirtualKey {
        id: format!("key-{n}"),
        name: format!("key-{n}"),
        hash: format!("{n:064x}"),
        prefix: "sk-skein-ab".to_owned(),
        owner: None,
        team: (teams > 0).then(|| format!("team-{}", n % teams)),
        models: Vec::new(),
        limits: Limits::default(),
        expires_at_ms: None,
        revoked: false,
        metadata: Default::default(),
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

fn proposal(command: Command) -> Proposal {
    Proposal {
        actor: "bench".to_owned(),
        at_ms: 1_795_305_600_000,
        command,
        create_only: false,
    }
}

fn main() {
    let args = Args::parse();
    let mut state = ControlState::default();
    let teams: Vec<Team> = (0..args.teams)
        .map(|n| Team {
            id: format!("team-{n}"),
            name: format!("Team {n}"),
            customer: None,
            models: Vec::new(),
            limits: Limits::default(),
            metadata: Default::default(),
        })
        .collect();
    let budgets: Vec<Budget> = (0..100)
        .map(|n| Budget {
            id: format!("budget-{n}"),
            scope: Scope::Key(format!("key-{n}")),
            limit_nanos: 1_000_000_000,
            period: BudgetPeriod::Lifetime,
            hard: true,
        })
        .collect();
    let mut version = 1;
    let mut keys = 0;
    for (point, level) in args.levels.iter().copied().enumerate() {
        // Fill up to the level with one import (teams, keys, budgets on the first keys).
        let config = ConfigExport {
            teams: teams.clone(),
            keys: (0..level).map(|n| key(n, args.teams)).collect(),
            budgets: if level >= 100 {
                budgets.clone()
            } else {
                Vec::new()
            },
            ..state.export()
        };
        version += 1;
        state.apply(version, &proposal(Command::Import { config }));
        keys = keys.max(level);
        let mut published = Arc::new(state.clone());
        // Keys created one command at a time, each on a fresh clone of the published state.
        let started = Instant::now();
        for n in 0..args.commands {
            let mut next = (*published).clone();
            version += 1;
            let created = key(1_000_000_000 + point * args.commands + n, args.teams);
            next.apply(version, &proposal(Command::CreateKey { key: created }));
            published = Arc::new(next);
        }
        let create_us = started.elapsed().as_secs_f64() * 1e6 / args.commands as f64;
        // Spend batches of 100 items on keys with budgets.
        let started = Instant::now();
        let batches = args.commands / 10;
        for n in 0..batches {
            let mut next = (*published).clone();
            version += 1;
            let items = (0..100)
                .map(|k| SpendItem {
                    key_id: format!("key-{k}"),
                    model: "m".to_owned(),
                    requests: 1,
                    input_tokens: 10,
                    output_tokens: 10,
                    cost_nanos: 1,
                })
                .collect();
            next.apply(
                version,
                &proposal(Command::RecordSpend {
                    node: 1,
                    seq: (point * batches + n + 1) as u64,
                    items,
                }),
            );
            published = Arc::new(next);
        }
        let spend_us = started.elapsed().as_secs_f64() * 1e6 / batches.max(1) as f64;
        state = (*published).clone();
        println!(
            "{}",
            json!({
                "label": "apply",
                "keys": state.keys.len(),
                "teams": state.teams.len(),
                "create_key_us": create_us,
                "spend_batch_of_100_us": spend_us,
            })
        );
    }
}
