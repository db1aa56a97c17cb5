//! The status page in headless Chromium: the counts of a known state, a live event after
//! a registration, counts that follow, a registration looked up, and no secret on the
//! page. A screenshot is kept as a test artifact in `target/test-artifacts/`.

use std::time::Duration;

use edgedps::config::HttpConfig;
use edgedps_tests::browser::Browser;
use edgedps_tests::*;
use fantoccini::Locator;

/// The text of the element `css` once it equals `want` (within `limit`), or what it was.
async fn text_becomes(browser: &Browser, css: &str, want: &str, limit: Duration) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let text = match browser.client.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.trim() == want || tokio::time::Instant::now() > deadline {
            return text.trim().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_state_and_follows_registrations_live() {
    let server = Server::start_with(|config| {
        config.http = Some(HttpConfig {
            bind: "127.0.0.1:0".parse().expect("addr"),
        });
    })
    .await;
    let base = format!("http://{}", server.running.http_addr.expect("HTTP"));

    // A known state: a group with two registered devices, one individual enrollment
    // never registered.
    let mut operator = server.operator().await;
    let outcomes = server
        .register_group_devices(&mut operator, "page", 2)
        .await;
    assert!(outcomes.iter().all(|o| o.status == 200));
    let individual_key = operator.enroll("page-solo").await;

    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{base}/"))
        .await
        .expect("page opens");
    let second = Duration::from_secs(1);
    for (css, want) in [
        ("#count-enrollments", "1"),
        ("#count-enrollment-groups", "1"),
        ("#count-registrations-assigned", "2"),
        ("#count-registrations-disabled", "0"),
        ("#count-live-sessions", "0"),
        ("#hubs tr[data-hub='hub-a.example.net'] .devices", "2"),
    ] {
        assert_eq!(
            text_becomes(&browser, css, want, second).await,
            want,
            "{css}"
        );
    }
    // The registrations so far are among the events.
    let registered = "li.event[data-topic='dps/events/registrations/page-0']";
    assert!(browser.client.find(Locator::Css(registered)).await.is_ok());

    // The event stream is open; a new registration appears without a reload.
    browser
        .client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("body[data-live='true']"))
        .await
        .expect("the page follows events live");
    let outcome = edgedps_device::register(&server.device("page-solo", sas(&individual_key)), None)
        .await
        .expect("registers");
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    let live = browser
        .client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(
            "#events li.event[data-topic='dps/events/registrations/page-solo']",
        ))
        .await
        .expect("the registration's event appears live");
    let summary = live.text().await.expect("text");
    assert!(summary.contains("outcome=assigned"), "{summary}");
    assert!(
        summary.contains("assignedHub=hub-a.example.net"),
        "{summary}"
    );
    // The counts follow: the page asks every five seconds, for counts at most five
    // seconds old.
    let limit = Duration::from_secs(15);
    assert_eq!(
        text_becomes(&browser, "#count-registrations-assigned", "3", limit).await,
        "3"
    );

    let shot = browser.client.screenshot().await.expect("screenshot");
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    std::fs::write(artifacts.join("status-page.png"), &shot).expect("screenshot written");
    assert!(shot.starts_with(b"\x89PNG"), "a PNG");

    // No key on the page, ever.
    let source = browser.client.source().await.expect("source");
    assert!(!source.contains(&individual_key), "a key on the page");

    // A registration looked up, and one that does not exist.
    browser
        .client
        .goto(&format!("{base}/?registration=page-1"))
        .await
        .expect("lookup");
    let record = browser
        .client
        .find(Locator::Css("#registration"))
        .await
        .expect("the record")
        .text()
        .await
        .expect("text");
    let record: serde_json::Value = serde_json::from_str(&record).expect("JSON record");
    assert_eq!(record["registrationId"], "page-1");
    assert_eq!(record["status"], "assigned");
    browser
        .client
        .goto(&format!("{base}/?registration=nobody-here"))
        .await
        .expect("lookup");
    let missing = browser
        .client
        .find(Locator::Css("#registration-missing"))
        .await
        .expect("says so")
        .text()
        .await
        .expect("text");
    assert!(missing.contains("nobody-here"), "{missing}");
    browser
        .client
        .clone()
        .close()
        .await
        .expect("session closes");
}
