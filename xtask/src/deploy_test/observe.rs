//! Reading what the test observes: a replica's `/metrics` text, HAProxy's
//! log lines and answers of Prometheus's HTTP API.
//!
//! These are pure functions over text, tested below on real samples, so a
//! failed deploy-test run points at the system, not at the parsing.

use std::collections::BTreeMap;

use anyhow::{bail, Context};

/// Labels of one series.
pub type Labels = BTreeMap<String, String>;

/// The sum of every sample of metric `name` in Prometheus text format whose
/// labels include all of `filter`.
pub fn sum_metric(text: &str, name: &str, filter: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(parse_sample)
        .filter(|(metric, labels, _)| {
            metric == name
                && filter
                    .iter()
                    .all(|(k, v)| labels.get(*k).is_some_and(|have| have == v))
        })
        .map(|(_, _, value)| value)
        .sum()
}

/// One sample line of the text format: `name{k="v",...} value`; comments,
/// blank lines and malformed lines give `None`.
fn parse_sample(line: &str) -> Option<(String, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series, Labels::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
    };
    Some((name.to_owned(), labels, value))
}

/// `k="v",k2="v2"` (values with `\"` and `\\` escapes).
fn parse_labels(mut rest: &str) -> Option<Labels> {
    let mut labels = Labels::new();
    loop {
        rest = rest.trim_start_matches(',');
        if rest.is_empty() {
            return Some(labels);
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => value.push(chars.next()?.1),
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = &after[end + 1..];
    }
}

/// One request as HAProxy logged it with the `log-format` of
/// deploy/haproxy.cfg (a unit test checks that they still agree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The replica that answered last (`<NOSRV>` when none did).
    pub server: String,
    /// The status sent to the client (`-1` when none was).
    pub status: i32,
    /// HAProxy's termination state, such as `----` (normal end) or `SD--`
    /// (the server went away while data flowed).
    pub termination: String,
    /// Retries before the request was answered.
    pub retries: u32,
    /// Whether a retry went to another replica (HAProxy writes `+N`).
    pub redispatched: bool,
    /// The x-request-id the replica received.
    pub request_id: String,
    /// The x-priority header, `-` when absent.
    pub priority: String,
}

impl LogLine {
    /// Parses one line; HAProxy's own notices (`[WARNING] ...`, `Server
    /// ... is DOWN`) and anything else give `None`.
    pub fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 13 || !fields[1].starts_with('[') {
            return None;
        }
        let (_, server) = fields[3].split_once('/')?;
        let status = fields[5].parse().ok()?;
        let retries = fields[8].rsplit('/').next()?;
        let redispatched = retries.starts_with('+');
        let retries = retries.trim_start_matches('+').parse().ok()?;
        let request_id = fields[10].strip_prefix("request_id=")?;
        let priority = fields[11].strip_prefix("priority=")?;
        Some(Self {
            server: server.to_owned(),
            status,
            termination: fields[7].to_owned(),
            retries,
            redispatched,
            request_id: request_id.to_owned(),
            priority: priority.to_owned(),
        })
    }
}

/// Every request line of an HAProxy log.
pub fn log_lines(log: &str) -> Vec<LogLine> {
    log.lines().filter_map(LogLine::parse).collect()
}

/// Whether `id` looks like the version 4 UUID that HAProxy's `uuid()`
/// makes: 8-4-4-4-12 hexadecimal digits.
pub fn is_uuid(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The samples of an instant-vector answer of `/api/v1/query`.
pub fn query_samples(answer: &serde_json::Value) -> anyhow::Result<Vec<(Labels, f64)>> {
    if answer["status"] != "success" {
        bail!("Prometheus answered {answer}");
    }
    let result = answer["data"]["result"]
        .as_array()
        .context("no data.result in Prometheus's answer")?;
    result
        .iter()
        .map(|sample| {
            let labels = sample["metric"]
                .as_object()
                .context("a sample without metric labels")?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let value = sample["value"][1]
                .as_str()
                .context("a sample without a value")?
                .parse()
                .context("a sample value that is not a number")?;
            Ok((labels, value))
        })
        .collect()
}

/// Percent-encodes `s` for a URL query parameter.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `log-format` that [`LogLine::parse`] reads.
    const HAPROXY_LOG_FORMAT: &str = "%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %tsc %ac/%fc/%bc/%sc/%rc %sq/%bq request_id=%[var(txn.request_id)] priority=%[var(txn.priority)] %{+Q}r";

    /// Lines HAProxy 2.6 wrote with deploy/haproxy.cfg: a normal answer, a
    /// stream whose replica was killed, a request retried on the other
    /// replica, and one of HAProxy's own notices.
    const LOG: &str = r#"127.0.0.1:44734 [07/Dec/2026:09:39:25.908] mlx_batch_api mlx_batch_replicas/replica1 0/0/0/319/319 200 450 ---- 1/1/0/0/0 0/0 request_id=1a7af4e2-dbf3-4875-ad65-59db92e7bdca priority=- "POST /v1/chat/completions HTTP/1.1"
127.0.0.1:46220 [07/Dec/2026:09:39:50.056] mlx_batch_api mlx_batch_replicas/replica2 0/0/0/277/13891 200 30948 SD-- 1/1/0/0/0 0/0 request_id=stream-b priority=high "POST /v1/chat/completions HTTP/1.1"
127.0.0.1:46230 [07/Dec/2026:09:39:51.001] mlx_batch_api mlx_batch_replicas/replica1 0/0/1/2000/2001 200 480 ---- 3/3/2/1/+1 0/0 request_id=p2-before-3 priority=- "POST /v1/chat/completions HTTP/1.1"
[WARNING]  (2812) : Server mlx_batch_replicas/replica2 is DOWN, reason: Layer4 connection problem, info: "Connection refused", check duration: 0ms. 1 active and 0 backup servers left. 0 sessions active, 0 requeued, 0 remaining in queue.
"#;

    #[test]
    fn haproxy_log_lines_give_server_status_termination_retries_and_ids() {
        let lines = log_lines(LOG);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0].server, "replica1");
        assert_eq!(lines[0].status, 200);
        assert_eq!((lines[0].retries, lines[0].redispatched), (0, false));
        assert!(is_uuid(&lines[0].request_id));
        assert_eq!(lines[1].termination, "SD--");
        assert_eq!(lines[1].request_id, "stream-b");
        assert_eq!(lines[1].priority, "high");
        assert_eq!((lines[2].retries, lines[2].redispatched), (1, true));
        assert_eq!(lines[2].server, "replica1");
    }

    #[test]
    fn the_parser_reads_the_log_format_that_the_shipped_config_writes() {
        let cfg = std::fs::read_to_string(
            crate::util::workspace_root()
                .join("deploy")
                .join("haproxy.cfg"),
        )
        .expect("deploy/haproxy.cfg is in the repository");
        let format = cfg
            .lines()
            .find_map(|line| line.trim().strip_prefix("log-format "))
            .expect("deploy/haproxy.cfg sets a log-format");
        assert_eq!(format.trim_matches('"'), HAPROXY_LOG_FORMAT);
    }

    #[test]
    fn metric_sums_filter_by_name_and_labels() {
        let text = "# TYPE mlx_batch_requests_finished_total counter\n\
            mlx_batch_requests_finished_total{reason=\"length\"} 12\n\
            mlx_batch_requests_finished_total{reason=\"stop\"} 3\n\
            mlx_batch_requests_finished_total_extra 100\n\
            mlx_batch_time_to_first_token_seconds_count{priority=\"high\"} 16\n\
            mlx_batch_time_to_first_token_seconds_count{priority=\"normal\"} 17\n\
            mlx_batch_ready 1\n\
            mlx_batch_odd{path=\"a\\\"b,c\"} 2\n";
        assert_eq!(
            sum_metric(text, "mlx_batch_requests_finished_total", &[]),
            15.0
        );
        assert_eq!(
            sum_metric(
                text,
                "mlx_batch_time_to_first_token_seconds_count",
                &[("priority", "high")]
            ),
            16.0
        );
        assert_eq!(sum_metric(text, "mlx_batch_ready", &[]), 1.0);
        assert_eq!(
            sum_metric(text, "mlx_batch_odd", &[("path", "a\"b,c")]),
            2.0
        );
        assert_eq!(sum_metric(text, "mlx_batch_missing", &[]), 0.0);
    }

    #[test]
    fn query_answers_become_labelled_samples() {
        let answer = serde_json::json!({
            "status": "success",
            "data": {"resultType": "vector", "result": [
                {"metric": {"__name__": "up", "instance": "127.0.0.1:1", "job": "mlx-batch"},
                 "value": [1_700_000_000.0, "0"]}
            ]}
        });
        let samples = query_samples(&answer).unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].0["instance"], "127.0.0.1:1");
        assert_eq!(samples[0].1, 0.0);
        assert!(query_samples(&serde_json::json!({"status": "error"})).is_err());
    }

    #[test]
    fn uuids_and_url_encoding() {
        assert!(is_uuid("7a2e53c6-aa1a-4ac9-907d-33138d2587e6"));
        assert!(!is_uuid("p1-3"));
        assert!(!is_uuid("7a2e53c6-aa1a-4ac9-907d-33138d2587eg"));
        assert_eq!(
            url_encode("up{job=\"mlx-batch\"} == 0"),
            "up%7Bjob%3D%22mlx-batch%22%7D%20%3D%3D%200"
        );
    }
}
