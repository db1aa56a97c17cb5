//! The `[http]` listener, from a test: requests with or without basic authentication,
//! and metrics parsed with a Prometheus text-format parser (`prometheus-parse`).

use std::io::Read;

/// An HTTP answer.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `method url`, as `name:password` when given; blocking (use from `spawn_blocking`).
pub fn http_blocking(method: &str, url: &str, auth: Option<(&str, &str)>) -> HttpAnswer {
    use base64::Engine;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let request = ureq::http::Request::builder().method(method).uri(url);
    let request = match auth {
        Some((name, password)) => {
            let pair =
                base64::engine::general_purpose::STANDARD.encode(format!("{name}:{password}"));
            request.header("Authorization", format!("Basic {pair}"))
        }
        None => request,
    };
    let request = request.body(()).expect("request");
    let mut response = agent.run(request).expect("HTTP answer");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut body = String::new();
    response
        .body_mut()
        .as_reader()
        .read_to_string(&mut body)
        .expect("body");
    HttpAnswer {
        status: response.status().as_u16(),
        content_type,
        body,
    }
}

/// [`http_blocking`] off the runtime's threads.
pub async fn http(method: &str, url: &str, auth: Option<(&str, &str)>) -> HttpAnswer {
    let (method, url) = (method.to_owned(), url.to_owned());
    let auth = auth.map(|(n, p)| (n.to_owned(), p.to_owned()));
    tokio::task::spawn_blocking(move || {
        http_blocking(
            &method,
            &url,
            auth.as_ref().map(|(n, p)| (n.as_str(), p.as_str())),
        )
    })
    .await
    .expect("request task")
}

/// The metrics at `url`, parsed.
pub async fn scrape(url: &str, auth: Option<(&str, &str)>) -> prometheus_parse::Scrape {
    let answer = http("GET", url, auth).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let lines = answer.body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text format")
}

/// The value of the sample `name` whose labels include `labels` (0 when there is none).
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}
