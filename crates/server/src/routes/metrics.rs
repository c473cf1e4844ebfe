//! `GET /metrics`: every `mlx_batch_*` metric in Prometheus text format.

use axum::{
    extract::State,
    http::{header, HeaderValue},
    response::IntoResponse,
};

use crate::app::AppState;

/// Renders the process's metrics.
pub async fn handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
}
