//! A small client for the Prometheus HTTP query API (/api/v1/query, /api/v1/query_range), as spoken by Prometheus, Thanos, Mimir and VictoriaMetrics: auth, CA, per-query timeouts, typed errors.

use std::{collections::BTreeMap, io::Read, path::PathBuf, sync::Arc, time::Duration};

use serde::Deserialize;

/// Answers larger than this are refused rather than buffered: a fleet query that big means
/// a selector matched far more than cacheprobe exports.
const MAX_ANSWER_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PromError {
    #[error("cannot reach Prometheus at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("Prometheus at {url} did not answer within {timeout_s} s")]
    Timeout { url: String, timeout_s: u64 },
    #[error("Prometheus at {url} refused the credentials (HTTP {status}): check --basic-auth-user and the password, or --bearer-token-file")]
    AuthRefused { url: String, status: u16 },
    #[error("{url} does not look like a Prometheus query API ({detail})")]
    NotPrometheus { url: String, detail: String },
    #[error("Prometheus rejected the query {query:?}: {error_type}: {error}")]
    Query {
        query: String,
        error_type: String,
        error: String,
    },
    #[error("Prometheus' answer is larger than {} MiB", MAX_ANSWER_BYTES >> 20)]
    TooLarge,
}

/// One element of an instant vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// One series of a range query.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub points: Vec<(u64, f64)>,
}

impl Series {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// A query's result plus the warnings the server attached (Thanos and Mimir report partial
/// answers from unreachable stores this way).
#[derive(Debug, Clone, Default)]
pub struct Answer<T> {
    pub data: T,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub enum Auth {
    #[default]
    None,
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub url: String,
    pub auth: Auth,
    pub ca_file: Option<PathBuf>,
    /// Per query, connect included.
    pub timeout: Duration,
}

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
    timeout: Duration,
}

#[derive(Deserialize)]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    warnings: Vec<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct RawSample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

#[derive(Deserialize)]
struct RawSeries {
    metric: BTreeMap<String, String>,
    values: Vec<(f64, String)>,
}

fn number(text: &str) -> f64 {
    // Prometheus writes "NaN", "+Inf", "-Inf"; Rust's parser accepts "NaN", "inf", "+inf".
    match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().unwrap_or(f64::NAN),
    }
}

/// Parses a /api/v1/query answer body (also used by the detectors' tests on recorded answers).
pub fn parse_vector(url: &str, query: &str, body: &str) -> Result<Answer<Vec<Sample>>, PromError> {
    let (data, warnings) = envelope(url, query, body)?;
    let samples: Vec<RawSample> = match data.result_type.as_str() {
        "vector" => serde_json::from_value(data.result).map_err(|err| not_prom(url, err))?,
        // A scalar query answers [t, "v"]: treat it as one unlabelled sample.
        "scalar" => {
            let value: (f64, String) =
                serde_json::from_value(data.result).map_err(|err| not_prom(url, err))?;
            vec![RawSample {
                metric: BTreeMap::new(),
                value,
            }]
        }
        other => {
            return Err(PromError::NotPrometheus {
                url: url.to_string(),
                detail: format!("an instant query answered a {other:?}"),
            })
        }
    };
    Ok(Answer {
        data: samples
            .into_iter()
            .map(|raw| Sample {
                labels: raw.metric,
                value: number(&raw.value.1),
            })
            .collect(),
        warnings,
    })
}

/// Parses a /api/v1/query_range answer body.
pub fn parse_matrix(url: &str, query: &str, body: &str) -> Result<Answer<Vec<Series>>, PromError> {
    let (data, warnings) = envelope(url, query, body)?;
    if data.result_type != "matrix" {
        return Err(PromError::NotPrometheus {
            url: url.to_string(),
            detail: format!("a range query answered a {:?}", data.result_type),
        });
    }
    let series: Vec<RawSeries> =
        serde_json::from_value(data.result).map_err(|err| not_prom(url, err))?;
    Ok(Answer {
        data: series
            .into_iter()
            .map(|raw| Series {
                labels: raw.metric,
                points: raw
                    .values
                    .into_iter()
                    .map(|(t, v)| (t as u64, number(&v)))
                    .collect(),
            })
            .collect(),
        warnings,
    })
}

/// Exemplars of one series, from /api/v1/query_exemplars.
#[derive(Debug, Clone, PartialEq)]
pub struct ExemplarSeries {
    pub labels: BTreeMap<String, String>,
    pub exemplars: Vec<Exemplar>,
}

impl ExemplarSeries {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Exemplar {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    /// Unix seconds.
    pub timestamp: f64,
}

#[derive(Deserialize)]
struct ExemplarEnvelope {
    status: String,
    #[serde(default)]
    data: Option<Vec<RawExemplarSeries>>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    warnings: Vec<String>,
}

#[derive(Deserialize)]
struct RawExemplarSeries {
    #[serde(rename = "seriesLabels")]
    series_labels: BTreeMap<String, String>,
    #[serde(default)]
    exemplars: Vec<RawExemplar>,
}

#[derive(Deserialize)]
struct RawExemplar {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    value: String,
    timestamp: f64,
}

/// Parses a /api/v1/query_exemplars answer body.
pub fn parse_exemplars(
    url: &str,
    query: &str,
    body: &str,
) -> Result<Answer<Vec<ExemplarSeries>>, PromError> {
    let envelope: ExemplarEnvelope =
        serde_json::from_str(body).map_err(|_| PromError::NotPrometheus {
            url: url.to_string(),
            detail: format!("the answer is not Prometheus JSON: {:?}", excerpt(body)),
        })?;
    match envelope.status.as_str() {
        "success" => Ok(Answer {
            data: envelope
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|raw| ExemplarSeries {
                    labels: raw.series_labels,
                    exemplars: raw
                        .exemplars
                        .into_iter()
                        .map(|e| Exemplar {
                            labels: e.labels,
                            value: number(&e.value),
                            timestamp: e.timestamp,
                        })
                        .collect(),
                })
                .collect(),
            warnings: envelope.warnings,
        }),
        "error" => Err(PromError::Query {
            query: query.to_string(),
            error_type: envelope.error_type.unwrap_or_default(),
            error: envelope.error.unwrap_or_default(),
        }),
        status => Err(PromError::NotPrometheus {
            url: url.to_string(),
            detail: format!("status {status:?} without data"),
        }),
    }
}

fn not_prom(url: &str, err: impl std::fmt::Display) -> PromError {
    PromError::NotPrometheus {
        url: url.to_string(),
        detail: format!("unexpected answer: {err}"),
    }
}

fn envelope(url: &str, query: &str, body: &str) -> Result<(Data, Vec<String>), PromError> {
    let envelope: Envelope = serde_json::from_str(body).map_err(|_| PromError::NotPrometheus {
        url: url.to_string(),
        detail: format!("the answer is not Prometheus JSON: {:?}", excerpt(body)),
    })?;
    match (envelope.status.as_str(), envelope.data) {
        ("success", Some(data)) => Ok((data, envelope.warnings)),
        ("error", _) => Err(PromError::Query {
            query: query.to_string(),
            error_type: envelope.error_type.unwrap_or_default(),
            error: envelope.error.unwrap_or_default(),
        }),
        (status, _) => Err(PromError::NotPrometheus {
            url: url.to_string(),
            detail: format!("status {status:?} without data"),
        }),
    }
}

fn excerpt(body: &str) -> String {
    let line = body.trim().lines().next().unwrap_or("");
    line.chars().take(60).collect()
}

/// Reads a PEM bundle into a rustls root store.
fn root_store(path: &PathBuf) -> anyhow::Result<rustls::RootCertStore> {
    use anyhow::Context as _;
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read --ca-file {}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.with_context(|| format!("--ca-file {} is not PEM", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("--ca-file {}: unusable certificate", path.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "--ca-file {} holds no certificate",
        path.display()
    );
    Ok(roots)
}

impl Client {
    pub fn new(options: &ClientOptions) -> anyhow::Result<Client> {
        let base = options.url.trim_end_matches('/').to_string();
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "--prometheus {base:?} must start with http:// or https://"
        );
        let mut builder = ureq::AgentBuilder::new()
            .timeout(options.timeout)
            .user_agent(concat!("cacheprobe/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &options.ca_file {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(root_store(ca)?)
                .with_no_client_auth();
            builder = builder.tls_config(Arc::new(config));
        }
        let authorization = match &options.auth {
            Auth::None => None,
            Auth::Basic { user, password } => {
                use base64::Engine as _;
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                Some(format!("Basic {token}"))
            }
            Auth::Bearer(token) => Some(format!("Bearer {token}")),
        };
        Ok(Client {
            agent: builder.build(),
            base,
            authorization,
            timeout: options.timeout,
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn post(&self, path: &str, form: &[(&str, &str)]) -> Result<String, PromError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.post(&url);
        if let Some(auth) = &self.authorization {
            request = request.set("Authorization", auth);
        }
        let response = match request.send_form(form) {
            Ok(response) => response,
            Err(ureq::Error::Status(status, response)) => {
                if status == 401 || status == 403 {
                    return Err(PromError::AuthRefused {
                        url: self.base.clone(),
                        status,
                    });
                }
                // Prometheus answers bad queries with 400/422 and a JSON error: keep its words.
                let body = read_body(response)?;
                if let Ok(envelope) = serde_json::from_str::<Envelope>(&body) {
                    if envelope.status == "error" {
                        return Err(PromError::Query {
                            query: form.first().map_or("", |f| f.1).to_string(),
                            error_type: envelope.error_type.unwrap_or_default(),
                            error: envelope.error.unwrap_or_default(),
                        });
                    }
                }
                return Err(PromError::NotPrometheus {
                    url: self.base.clone(),
                    detail: format!("HTTP {status} for {path}: {:?}", excerpt(&body)),
                });
            }
            Err(ureq::Error::Transport(transport)) => {
                let detail = transport.to_string();
                let io_timeout = std::error::Error::source(&transport)
                    .and_then(|e| e.downcast_ref::<std::io::Error>())
                    .is_some_and(|e| {
                        matches!(
                            e.kind(),
                            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                        )
                    });
                let timed_out = io_timeout || detail.contains("timed out");
                return Err(if timed_out {
                    PromError::Timeout {
                        url: self.base.clone(),
                        timeout_s: self.timeout.as_secs(),
                    }
                } else {
                    PromError::Unreachable {
                        url: self.base.clone(),
                        detail,
                    }
                });
            }
        };
        read_body(response)
    }

    /// An instant query evaluated at `at` (unix seconds).
    pub fn query(&self, query: &str, at: u64) -> Result<Answer<Vec<Sample>>, PromError> {
        let time = at.to_string();
        let body = self.post("/api/v1/query", &[("query", query), ("time", &time)])?;
        tracing::debug!(query, bytes = body.len(), "prometheus query");
        parse_vector(&self.base, query, &body)
    }

    /// A range query over [start, end] every `step_s`.
    pub fn query_range(
        &self,
        query: &str,
        start: u64,
        end: u64,
        step_s: u64,
    ) -> Result<Answer<Vec<Series>>, PromError> {
        let (start, end, step) = (start.to_string(), end.to_string(), step_s.to_string());
        let body = self.post(
            "/api/v1/query_range",
            &[
                ("query", query),
                ("start", &start),
                ("end", &end),
                ("step", &step),
            ],
        )?;
        tracing::debug!(query, bytes = body.len(), "prometheus range query");
        parse_matrix(&self.base, query, &body)
    }

    /// The exemplars of the series `query` selects over [start, end] (Prometheus keeps them
    /// only with `--enable-feature=exemplar-storage`; without it the answer is empty).
    pub fn query_exemplars(
        &self,
        query: &str,
        start: u64,
        end: u64,
    ) -> Result<Answer<Vec<ExemplarSeries>>, PromError> {
        let (start, end) = (start.to_string(), end.to_string());
        let body = self.post(
            "/api/v1/query_exemplars",
            &[("query", query), ("start", &start), ("end", &end)],
        )?;
        tracing::debug!(query, bytes = body.len(), "prometheus exemplar query");
        parse_exemplars(&self.base, query, &body)
    }
}

fn read_body(response: ureq::Response) -> Result<String, PromError> {
    let mut body = String::new();
    let read = response
        .into_reader()
        .take(MAX_ANSWER_BYTES + 1)
        .read_to_string(&mut body);
    match read {
        Ok(n) if n as u64 > MAX_ANSWER_BYTES => Err(PromError::TooLarge),
        Ok(_) => Ok(body),
        // Invalid UTF-8 or a connection cut mid-answer: not something a query API does.
        Err(err) => Err(PromError::Unreachable {
            url: String::new(),
            detail: format!("the answer broke off: {err}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exemplars() {
        let body = r#"{"status":"success","data":[{"seriesLabels":{"__name__":"x_bucket","instance":"h1:19150","le":"0.25"},"exemplars":[{"labels":{"request_id":"00ff"},"value":"0.2","timestamp":1700000000.5}]}]}"#;
        let answer = parse_exemplars("u", "q", body).unwrap();
        assert_eq!(answer.data.len(), 1);
        assert_eq!(answer.data[0].label("instance"), "h1:19150");
        let exemplar = &answer.data[0].exemplars[0];
        assert_eq!(exemplar.labels["request_id"], "00ff");
        assert_eq!((exemplar.value, exemplar.timestamp), (0.2, 1_700_000_000.5));
        let empty = parse_exemplars("u", "q", r#"{"status":"success","data":[]}"#).unwrap();
        assert!(empty.data.is_empty());
        assert!(matches!(
            parse_exemplars(
                "u",
                "q",
                r#"{"status":"error","errorType":"bad_data","error":"x"}"#
            ),
            Err(PromError::Query { .. })
        ));
        assert!(matches!(
            parse_exemplars("u", "q", "404 page not found"),
            Err(PromError::NotPrometheus { .. })
        ));
    }

    #[test]
    fn parses_vectors_matrices_and_errors() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"instance":"a:19150","server":"10.0.0.1:11211"},"value":[1700000000.5,"0.25"]},
            {"metric":{"instance":"b:19150"},"value":[1700000000.5,"NaN"]},
            {"metric":{},"value":[1700000000.5,"+Inf"]}]},
            "warnings":["store b unreachable"]}"#;
        let answer = parse_vector("http://p", "q", body).unwrap();
        assert_eq!(answer.data.len(), 3);
        assert_eq!(answer.data[0].label("server"), "10.0.0.1:11211");
        assert_eq!(answer.data[0].value, 0.25);
        assert!(answer.data[1].value.is_nan());
        assert_eq!(answer.data[2].value, f64::INFINITY);
        assert_eq!(answer.warnings, vec!["store b unreachable".to_string()]);

        let body = r#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"instance":"a"},"values":[[100,"1"],[160,"2"]]}]}}"#;
        let answer = parse_matrix("http://p", "q", body).unwrap();
        assert_eq!(answer.data[0].points, vec![(100, 1.0), (160, 2.0)]);

        let body = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#;
        let err = parse_vector("http://p", "su(", body).unwrap_err();
        assert!(err.to_string().contains("parse error at char 3"), "{err}");

        let err = parse_vector("http://p", "q", "<html>hello</html>").unwrap_err();
        assert!(
            err.to_string()
                .contains("does not look like a Prometheus query API"),
            "{err}"
        );
        let err = parse_matrix(
            "http://p",
            "q",
            r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("range query answered"), "{err}");
    }
}
