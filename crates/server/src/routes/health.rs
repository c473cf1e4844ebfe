//! `GET /health`: whether the engine loop, not just the HTTP layer, is
//! alive.

use axum::{extract::State, http::StatusCode, Json};
use serde::Serialize;

use crate::{app::AppState, service::ServiceHealth};

/// The health report.
#[derive(Debug, Serialize)]
pub struct HealthReport {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// The model being served.
    pub model: String,
    /// The engine's state.
    pub engine: ServiceHealth,
}

/// 200 while the engine runs and takes requests, 503 once it has stopped
/// or is shutting down (so that load balancers stop sending work).
pub async fn handler(State(state): State<AppState>) -> (StatusCode, Json<HealthReport>) {
    let engine = state.engine.health();
    let (code, status) = if engine.alive && !engine.shutting_down {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    (
        code,
        Json(HealthReport {
            status,
            model: state.model.id().to_owned(),
            engine,
        }),
    )
}
