//! Start-up: the store, the responder, the router, the listeners (DESIGN: layout).
//!
//! The device listener runs each TLS handshake in its own task under a deadline, never
//! in the accept loop, so a slow client never delays another.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use edgedps_responder::{Responder, Settings, SledStore};

use crate::config::Config;
use crate::devcert;
use crate::router::Router;
use crate::session::{self, ListenerKind, Shared};
use crate::tls::{self, TlsStream};
use crate::Error;

/// A running edgedps; dropping it stops accepting connections.
pub struct Running {
    pub devices_addr: Option<SocketAddr>,
    pub local_addr: Option<SocketAddr>,
    pub operators_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    /// `[listeners.https]`: the DPS device API and MQTT over WebSocket.
    pub https_addr: Option<SocketAddr>,
    /// `[listeners.websocket]`: MQTT over WebSocket.
    pub websocket_addr: Option<SocketAddr>,
    /// The CA of the generated development certificate, when there is one.
    pub dev_ca: Option<PathBuf>,
    pub responder: Arc<Responder>,
    /// Persistent sessions whose client is away, and what their queues dropped.
    pub offline: Arc<session::offline::Registry>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: Arc<crate::shutdown::Shutdown>,
    /// Every listener's connections, and how many there may be: all given back once
    /// every connection has closed.
    connections: Arc<Semaphore>,
    max_connections: usize,
    shutdown_timeout: Duration,
}

/// How a [`Running::shutdown`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open when the timeout came (dropped with the process).
    pub left_open: usize,
    /// Whether the store's last flush succeeded.
    pub flushed: Result<(), String>,
}

impl Running {
    /// Shuts down gracefully (`shutdown.rs`): stops accepting, lets every session and
    /// request finish what it is doing and close, within `shutdown_timeout_seconds`,
    /// then flushes the store. Whatever is still open then is dropped.
    pub async fn shutdown(self) -> Stopped {
        let started = Instant::now();
        let deadline = started + self.shutdown_timeout;
        self.shutdown.start();
        // The flush gets the last tenth of the time (at most a second).
        let sessions_until = deadline - (self.shutdown_timeout / 10).min(Duration::from_secs(1));
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        let closed =
            tokio::time::timeout_at(sessions_until, self.connections.acquire_many(all)).await;
        let left_open = match closed {
            Ok(_) => 0,
            Err(_) => self
                .max_connections
                .saturating_sub(self.connections.available_permits()),
        };
        let flushed = match tokio::time::timeout_at(deadline, self.responder.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the store's flush did not finish in time".to_owned()),
        };
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            left_open,
            flushed = flushed.is_ok(),
            "shut down"
        );
        Stopped { left_open, flushed }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub async fn start(config: Config) -> Result<Running, Error> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::DataDir {
        path: config.data_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let store = SledStore::open(&config.data_dir.join("store"))?;
    let mut settings = Settings::new(config.id_scope.clone());
    settings.allocation_policy = config.default_allocation();
    settings.always_accept_then_poll = config.always_accept_then_poll;
    settings.retry_after_seconds = config.retry_after_seconds;
    settings.hubs = config.linked_hubs();
    settings.rate_limits = config.rate_limits();
    settings.max_admin_body = config.limits.max_enrollment_body_size;
    settings.hub = config.hub_settings();
    settings.certificate_authorities =
        crate::authorities::load(&config.certificate_authorities, &config.data_dir)?;
    settings.hub_credentials = config.hub_credentials.clone();
    settings.hub_answer_timeout = Duration::from_secs(config.cloud.hub_answer_timeout_seconds);
    settings.custom_allocation_timeout = Duration::from_millis(config.allocation.custom_timeout_ms);
    settings.custom_allocation_wait = Duration::from_millis(config.allocation.custom_wait_ms);
    let cloud = cloud_settings(&config)?;
    let responder = Arc::new(Responder::open(settings, Arc::new(store))?);

    // Every session may hold a link, and every offline session; plus the responder's
    // publisher and one passing link (an expiry, a purge).
    let router =
        Router::start(config.limits.max_connections + config.limits.max_offline_sessions + 2);
    let interest = Arc::new(crate::interest::Interest::default());
    // Events are kept for the status page only when there is one.
    let feed = config
        .http
        .as_ref()
        .map(|_| Arc::new(crate::feed::EventFeed::default()));
    let publisher = router
        .spawn_publisher(interest.clone(), feed.clone())
        .await?;
    let metrics = Arc::new(crate::metrics::Metrics::new(responder.clone()));
    // The local hub's twin records are retained in the router (`hub/twins/{id}`): put
    // back after a restart. One per device of the local hub.
    publisher.publish(responder.twin_records()?).await;

    // Custom allocators and the late registrations they complete.
    let allocators = Arc::new(crate::allocators::Allocators::new(
        publisher.clone(),
        interest.clone(),
        cloud.tls.clone(),
        config.allocation.webhook_max_answer_bytes,
    ));
    responder.attach(allocators.clone());
    let probes = crate::probe::run(
        responder.clone(),
        publisher.clone(),
        cloud.tls.clone(),
        crate::probe::ProbeSettings {
            interval: Duration::from_secs(config.allocation.probe_interval_seconds),
            samples: config.allocation.probe_samples,
            timeout: Duration::from_millis(config.allocation.probe_timeout_ms),
        },
    );
    let shared = Arc::new(Shared {
        allocators,
        responder: responder.clone(),
        router,
        publisher,
        limits: config.limits.clone(),
        owners: Arc::default(),
        saved: Arc::default(),
        offline: Arc::default(),
        connecting: tokio::sync::Mutex::new(()),
        interest,
        operators: Arc::new(crate::operators::Operators::new(&config.operators)),
        metrics: metrics.clone(),
        local_anonymous: config.listeners.local.as_ref().is_some_and(|l| l.anonymous),
        shutdown: Arc::default(),
    });
    // Cloud hubs learn of their devices through their outboxes, from the first moment.
    let supervisor = crate::cloud::supervise(responder.clone(), shared.publisher.clone(), cloud);
    let mut running = Running {
        devices_addr: None,
        local_addr: None,
        operators_addr: None,
        http_addr: None,
        https_addr: None,
        websocket_addr: None,
        dev_ca: None,
        responder,
        offline: shared.offline.clone(),
        tasks: vec![tokio::spawn(supervisor), tokio::spawn(probes)],
        shutdown: shared.shutdown.clone(),
        connections: Arc::new(Semaphore::new(config.limits.max_connections)),
        max_connections: config.limits.max_connections,
        shutdown_timeout: Duration::from_secs(config.shutdown_timeout_seconds),
    };

    // Metrics, health and the status page: first, so that `/readyz` says "not yet"
    // while the MQTT listeners are being bound.
    let http = match (&config.http, feed) {
        (Some(http), Some(feed)) => {
            let listener = bind("http", http.bind).await?;
            running.http_addr = listener.local_addr().ok();
            let state = Arc::new(crate::http::HttpState::new(
                running.responder.clone(),
                metrics.clone(),
                feed,
                shared.operators.clone(),
                config.id_scope.clone(),
            ));
            running
                .tasks
                .push(tokio::spawn(crate::http::serve(listener, state.clone())));
            tracing::info!(addr = ?running.http_addr, "HTTP listener (metrics, health, status page) ready");
            Some(state)
        }
        _ => None,
    };

    // One budget of connections for every listener.
    let connections = running.connections.clone();
    if let Some(devices) = &config.listeners.devices {
        let (cert, key) =
            server_identity(&devices.tls_cert, &devices.tls_key, &config, &mut running)?;
        let tls_config = tls::server_config(&cert, &key)?;
        let listener = bind("devices", devices.bind).await?;
        running.devices_addr = listener.local_addr().ok();
        tracing::info!(addr = ?running.devices_addr, "device listener (MQTT over TLS) ready");
        let accept = tls_accept_loop(
            listener,
            connections.clone(),
            tls_config,
            &config,
            shared.clone(),
            sessions_of(ListenerKind::Devices, shared.clone()),
        );
        running.tasks.push(tokio::spawn(accept));
    }
    // The DPS device API and MQTT over WebSocket (`[listeners.https]`), or MQTT over
    // WebSocket alone (`[listeners.websocket]`).
    for (name, listener, api) in [
        ("https", &config.listeners.https, true),
        ("websocket", &config.listeners.websocket, false),
    ] {
        let Some(listener) = listener else { continue };
        let (cert, key) = match (&listener.tls_cert, &listener.tls_key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ => {
                let devices = config.listeners.devices.as_ref();
                let cert = devices.and_then(|d| d.tls_cert.clone());
                let key = devices.and_then(|d| d.tls_key.clone());
                server_identity(&cert, &key, &config, &mut running)?
            }
        };
        let tls_config = tls::server_config(&cert, &key)?;
        let bound = bind(name, listener.bind).await?;
        let addr = bound.local_addr().ok();
        if api {
            running.https_addr = addr;
            tracing::info!(
                ?addr,
                "HTTPS listener (the DPS device API, MQTT over WebSocket at {}) ready",
                crate::websocket::PATH
            );
        } else {
            running.websocket_addr = addr;
            tracing::info!(
                ?addr,
                "WebSocket listener (MQTT over WebSocket at {}) ready",
                crate::websocket::PATH
            );
        }
        let app = crate::device_api::router(shared.clone(), api);
        let shutdown = shared.shutdown.clone();
        let accept = tls_accept_loop(
            bound,
            connections.clone(),
            tls_config,
            &config,
            shared.clone(),
            move |stream, chain, peer, slot| {
                crate::device_api::serve_connection(
                    stream,
                    chain,
                    peer,
                    app.clone(),
                    shutdown.clone(),
                    slot,
                )
            },
        );
        running.tasks.push(tokio::spawn(accept));
    }
    if let Some(operators) = &config.listeners.operators {
        let (cert, key) = server_identity(
            &operators.tls_cert,
            &operators.tls_key,
            &config,
            &mut running,
        )?;
        let tls_config = tls::operator_server_config(&cert, &key, operators.client_ca.as_deref())?;
        let listener = bind("operators", operators.bind).await?;
        running.operators_addr = listener.local_addr().ok();
        tracing::info!(addr = ?running.operators_addr, client_certificates = operators.client_ca.is_some(), "operator listener (MQTT over TLS, [[operators]] only) ready");
        let accept = tls_accept_loop(
            listener,
            connections.clone(),
            tls_config,
            &config,
            shared.clone(),
            sessions_of(ListenerKind::Operators, shared.clone()),
        );
        running.tasks.push(tokio::spawn(accept));
    }
    if let Some(local) = &config.listeners.local {
        let listener = bind("local", local.bind).await?;
        running.local_addr = listener.local_addr().ok();
        if local.anonymous {
            tracing::warn!(addr = ?running.local_addr, "local listener takes anonymous clients as admin operators ([listeners.local] anonymous = true): anyone who can reach it can change every enrollment");
        } else if !shared.operators.any() {
            tracing::warn!(addr = ?running.local_addr, "local listener takes no anonymous clients and no [[operators]] are configured: nobody can operate edgedps");
        }
        tracing::info!(addr = ?running.local_addr, anonymous = local.anonymous, "local listener (MQTT) ready");
        let shared = shared.clone();
        let accept = accept_loop(
            listener,
            connections.clone(),
            shared.shutdown.clone(),
            move |tcp, peer, slot| {
                session::serve(
                    tcp,
                    Vec::new(),
                    ListenerKind::Local,
                    peer,
                    shared.clone(),
                    slot,
                )
            },
        );
        running.tasks.push(tokio::spawn(accept));
    }
    if let Some(http) = http {
        http.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(running)
}

/// `[cloud]`: the TLS roots and deadlines of the hubs' service APIs.
fn cloud_settings(config: &Config) -> Result<crate::cloud::CloudSettings, Error> {
    let cloud = &config.cloud;
    let extra = match &cloud.trust_anchors_file {
        Some(path) => tls::read_certificates(path)?,
        None => Vec::new(),
    };
    let tls = crate::cloud::client::tls_config(&extra).map_err(|message| Error::InvalidConfig {
        key: "cloud.trust_anchors_file",
        message,
    })?;
    Ok(crate::cloud::CloudSettings {
        tls,
        request_timeout: Duration::from_secs(cloud.request_timeout_seconds.max(1)),
        max_retry: Duration::from_secs(cloud.max_retry_seconds.max(1)),
    })
}

/// A connection being served.
type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// MQTT sessions of a listener of `kind`, for [`tls_accept_loop`].
fn sessions_of(
    kind: ListenerKind,
    shared: Arc<Shared>,
) -> impl Fn(TlsStream, Vec<Vec<u8>>, SocketAddr, OwnedSemaphorePermit) -> Serving
       + Clone
       + Send
       + Sync
       + 'static {
    move |stream, chain, peer, slot| {
        Box::pin(session::serve(
            stream,
            chain,
            kind,
            peer,
            shared.clone(),
            slot,
        ))
    }
}

/// Accepts TLS connections: each handshake in its own task under one deadline, then
/// `serve` (an MQTT session, the HTTPS device API) in a task of its own.
fn tls_accept_loop<F, Fut>(
    listener: TcpListener,
    connections: Arc<Semaphore>,
    tls_config: Arc<rustls::ServerConfig>,
    config: &Config,
    shared: Arc<Shared>,
    serve: F,
) -> impl std::future::Future<Output = ()>
where
    F: Fn(TlsStream, Vec<Vec<u8>>, SocketAddr, OwnedSemaphorePermit) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let handshake = Duration::from_millis(config.limits.handshake_timeout_ms);
    let handshakes = Arc::new(Semaphore::new(config.limits.max_handshakes));
    accept_loop(
        listener,
        connections,
        shared.shutdown.clone(),
        move |tcp, peer, slot| {
            let tls_config = tls_config.clone();
            let shared = shared.clone();
            let handshakes = handshakes.clone();
            let serve = serve.clone();
            let shutdown = shared.shutdown.clone();
            let handshaking = async move {
                // One deadline for the whole handshake. The ClientHello is read before a
                // handshake slot is taken: a client that never sends one (slowloris)
                // holds a connection until the deadline, never a slot, so the slots
                // bound only the handshakes that cost CPU.
                let deadline = Instant::now() + handshake;
                let mut stream = match TlsStream::new(tcp, tls_config) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::error!(%peer, error = %e, "cannot start a TLS connection");
                        return;
                    }
                };
                match tokio::time::timeout_at(deadline, stream.read_client_hello()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake failed before the ClientHello");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "no TLS ClientHello within the handshake deadline; connection closed");
                        return;
                    }
                }
                // A storm queues here instead of starving the sessions already running.
                let Ok(Ok(permit)) =
                    tokio::time::timeout_at(deadline, handshakes.acquire_owned()).await
                else {
                    tracing::warn!(%peer, "no handshake slot within the deadline; connection closed");
                    return;
                };
                let started = Instant::now();
                let accepted = tokio::time::timeout_at(deadline, stream.handshake()).await;
                drop(permit);
                match accepted {
                    Ok(Ok(())) => {
                        shared.metrics.handshake(started.elapsed());
                        let chain = stream
                            .peer_certificates()
                            .iter()
                            .map(|c| c.as_ref().to_vec())
                            .collect();
                        // A task of its own: the handshake task's state is not carried
                        // for the life of the session (see BENCHMARKS.md, idle memory).
                        tokio::spawn(serve(stream, chain, peer, slot));
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            };
            async move {
                // A shutdown closes connections still in their handshake: they have
                // asked nothing yet, and they hold connection slots.
                tokio::select! {
                    () = handshaking => {}
                    () = shutdown.wait() => {}
                }
            }
        },
    )
}

/// A listener's certificate and key files: the configured ones, or the development
/// certificate (generated on first start; its CA noted in `running`).
fn server_identity(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    config: &Config,
    running: &mut Running,
) -> Result<(PathBuf, PathBuf), Error> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok((cert.clone(), key.clone())),
        _ => {
            let dev = devcert::ensure(&config.data_dir)?;
            running.dev_ca = Some(dev.ca.clone());
            Ok((dev.cert, dev.key))
        }
    }
}

async fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|e| Error::Bind {
        name,
        addr,
        reason: e.to_string(),
    })
}

/// Accepts connections until the shutdown starts; the listener then closes.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    connections: Arc<Semaphore>,
    shutdown: Arc<crate::shutdown::Shutdown>,
    on_connection: F,
) where
    F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.wait() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    // Full: refuse fast, the device retries.
                    tracing::warn!(%peer, "connection limit reached; connection refused");
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                tokio::spawn(on_connection(tcp, peer, permit));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
