//! `cacheprobe diagnose --prometheus URL`: reads credentials, runs the fleet detectors against the query API and prints the report; exit 0 clean, 1 findings, 2 could not run or partial.

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;

use crate::{
    clock::unix_now,
    diagnose::render,
    fleet::{
        self,
        prom::{Auth, Client, ClientOptions},
        FleetThresholds, Scope,
    },
};

/// The environment variable holding the basic-auth password when no file is given.
pub const PASSWORD_ENV: &str = "CACHEPROBE_PROMETHEUS_PASSWORD";

#[derive(Debug, Clone)]
pub struct FleetArgs {
    pub url: String,
    pub since: Duration,
    pub at: Option<u64>,
    pub service: Option<String>,
    pub json: bool,
    pub basic_auth_user: Option<String>,
    pub basic_auth_password_file: Option<PathBuf>,
    pub bearer_token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub query_timeout: Duration,
}

fn read_secret(path: &PathBuf, what: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    // Files written by `echo` end in a newline that is not part of the secret.
    let secret = text.trim_end_matches(['\n', '\r']).to_string();
    anyhow::ensure!(
        !secret.is_empty(),
        "the {what} file {} is empty",
        path.display()
    );
    Ok(secret)
}

fn auth(args: &FleetArgs) -> anyhow::Result<Auth> {
    match (&args.basic_auth_user, &args.bearer_token_file) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give either --basic-auth-user or --bearer-token-file, not both")
        }
        (Some(user), None) => {
            let password = match &args.basic_auth_password_file {
                Some(path) => read_secret(path, "password")?,
                None => std::env::var(PASSWORD_ENV).with_context(|| {
                    format!(
                        "--basic-auth-user needs a password: --basic-auth-password-file FILE or the {PASSWORD_ENV} environment variable"
                    )
                })?,
            };
            Ok(Auth::Basic {
                user: user.clone(),
                password,
            })
        }
        (None, Some(path)) => Ok(Auth::Bearer(read_secret(path, "bearer token")?)),
        (None, None) => {
            anyhow::ensure!(
                args.basic_auth_password_file.is_none(),
                "--basic-auth-password-file needs --basic-auth-user"
            );
            Ok(Auth::None)
        }
    }
}

/// Runs the fleet diagnosis and writes the report to `out`. Partial results are printed and
/// then returned as an error, so the exit code (2) says the report is incomplete.
pub fn fleet_to(args: &FleetArgs, out: &mut dyn Write, colour: bool) -> anyhow::Result<ExitCode> {
    let client = Client::new(&ClientOptions {
        url: args.url.clone(),
        auth: auth(args)?,
        ca_file: args.ca_file.clone(),
        timeout: args.query_timeout,
    })?;
    let now = unix_now();
    let scope = Scope {
        at: args.at.unwrap_or(now),
        window_s: args.since.as_secs().max(60),
        service: args.service.clone(),
    };
    let outcome = fleet::run(&client, scope, &FleetThresholds::default(), now)?;
    let rendered = if args.json {
        let mut json = render::json(&outcome.report);
        json.push('\n');
        json
    } else {
        render::text(&outcome.report, render::TextOptions { colour })
    };
    out.write_all(rendered.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write the report")?;
    if outcome.partial {
        anyhow::bail!(
            "partial results: some queries failed or Prometheus answered partially (see the notes marked PARTIAL); findings may be missing"
        );
    }
    Ok(if outcome.report.findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn fleet(args: &FleetArgs) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal as _;
    let stdout = std::io::stdout();
    let colour = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    fleet_to(args, &mut stdout.lock(), colour)
}
