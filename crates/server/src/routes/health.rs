//! `GET /health` (liveness) and `GET /health/ready` (readiness); see
//! [`crate::health`] for what each means.

use axum::{extract::State, http::StatusCode, Json};
use serde::Serialize;

use crate::{
    app::AppState,
    health::{liveness, readiness, Unhealthy},
    service::ServiceHealth,
};

/// The body of both checks.
#[derive(Debug, Serialize)]
pub struct HealthReport {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// Why the check fails: `engine_stopped`, `step_failures`, `stalled`,
    /// `loading`, `draining` or `shedding`; absent when it passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The model being served.
    pub model: String,
    /// The engine's state.
    pub engine: ServiceHealth,
}

fn report(
    state: &AppState,
    engine: ServiceHealth,
    verdict: Result<(), Unhealthy>,
) -> (StatusCode, Json<HealthReport>) {
    let (code, status, reason) = match verdict {
        Ok(()) => (StatusCode::OK, "ok", None),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            Some(why.as_str()),
        ),
    };
    (
        code,
        Json(HealthReport {
            status,
            reason,
            model: state.model.id().to_owned(),
            engine,
        }),
    )
}

/// Liveness: 200 while the engine works, 503 with the reason when its
/// thread is gone, steps keep failing or it has stalled.
pub async fn live(State(state): State<AppState>) -> (StatusCode, Json<HealthReport>) {
    let engine = state.engine.health();
    let verdict = liveness(&engine, &state.config.health);
    report(&state, engine, verdict)
}

/// Readiness: 200 when new work is accepted; 503 with the reason while
/// loading, draining or shedding, or when not live.
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<HealthReport>) {
    let engine = state.engine.health();
    let verdict = readiness(&engine, &state.config.health);
    report(&state, engine, verdict)
}
