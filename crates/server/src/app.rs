//! The router and the state every handler shares.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    extract::{DefaultBodyLimit, Request},
    middleware::{self, Next},
    response::Response,
    routing::{get, post},
    Extension, Router,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

use crate::{
    connections::{self, ConnectionLimits},
    health::HealthPolicy,
    openai::extract::{BodyDeadline, BodyLimit, DEFAULT_BODY_LIMIT},
    request_id,
    routes::{self, chat, completions, health, models},
    service::GenerationService,
    text_model::TextModel,
};

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A request still waiting in the queue this long after it arrived ends
    /// with a 504; `None` waits forever.
    pub request_timeout: Option<Duration>,
    /// The largest request body accepted, in bytes.
    pub body_limit: usize,
    /// When the engine counts as not live.
    pub health: HealthPolicy,
    /// A request body must have arrived this long after its headers, or
    /// the request gets 408 and its connection is closed.
    pub body_read_timeout: Duration,
    /// A streamed response whose client has not read for this long (its
    /// buffer full) is cancelled.
    pub stream_stall_timeout: Duration,
    /// Timeouts and the cap of the connection layer.
    pub connections: ConnectionLimits,
    /// The temperature of requests that give none (OpenAI's default is 1).
    pub default_temperature: f32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            request_timeout: None,
            body_limit: DEFAULT_BODY_LIMIT,
            health: HealthPolicy::default(),
            body_read_timeout: Duration::from_secs(10),
            stream_stall_timeout: Duration::from_secs(15),
            connections: ConnectionLimits::default(),
            default_temperature: 1.0,
        }
    }
}

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The batching engine.
    pub engine: Arc<dyn GenerationService>,
    /// The served model's text side.
    pub model: Arc<dyn TextModel>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// HTTP settings.
    pub config: ServerConfig,
    /// Unix seconds when the server started, reported as the model's
    /// creation time.
    pub started_at_unix: u64,
}

impl AppState {
    /// State for a server over `engine` and `model`.
    pub fn new(
        engine: Arc<dyn GenerationService>,
        model: Arc<dyn TextModel>,
        metrics: PrometheusHandle,
        config: ServerConfig,
    ) -> Self {
        Self {
            engine,
            model,
            metrics,
            config,
            started_at_unix: routes::unix_now(),
        }
    }
}

/// Every route, with OpenAI-shaped errors for unknown ones and a body limit
/// enforced before any parsing.
pub fn router(state: AppState) -> Router {
    let limit = state.config.body_limit;
    // Probes are polled every second or so by load balancers and scrapers:
    // they are counted but not traced, so the log keeps to requests.
    let probes = Router::new()
        .route("/health", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(routes::metrics::handler));
    Router::new()
        .route("/v1/chat/completions", post(chat::handler))
        .route("/v1/completions", post(completions::handler))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::get))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(Extension(BodyLimit(limit)))
        .layer(Extension(BodyDeadline(state.config.body_read_timeout)))
        .layer(TraceLayer::new_for_http())
        .merge(probes)
        .layer(middleware::from_fn(count_requests))
        .layer(middleware::from_fn(request_id::identify))
        .with_state(state)
}

/// Counts responses by route and status.
async fn count_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    metrics::counter!(
        "mlx_batch_server_http_responses_total",
        "route" => route,
        "status" => response.status().as_u16().to_string(),
    )
    .increment(1);
    response
}

/// Serves `state` on `listener` until `shutdown` completes, then lets the
/// requests in flight finish (see [`connections`] for the limits applied to
/// each connection).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limits = state.config.connections;
    connections::serve(listener, router(state), limits, shutdown).await?;
    Ok(())
}
