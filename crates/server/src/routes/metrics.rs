//! `GET /metrics`: every `mlx_batch_*` metric in Prometheus text format.

use axum::{
    extract::State,
    http::{header, HeaderValue},
    response::IntoResponse,
};

use crate::{
    app::AppState,
    health::{liveness, readiness},
};

/// Renders the process's metrics, with `mlx_batch_live` and
/// `mlx_batch_ready` (1 or 0) as the health checks would answer now, so
/// that a scraper can alert on a replica that stays unready.
pub async fn handler(State(state): State<AppState>) -> impl IntoResponse {
    let health = state.engine.health();
    let policy = &state.config.health;
    let flag = |ok: bool| if ok { 1.0 } else { 0.0 };
    metrics::gauge!("mlx_batch_live").set(flag(liveness(&health, policy).is_ok()));
    metrics::gauge!("mlx_batch_ready").set(flag(readiness(&health, policy).is_ok()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
}
