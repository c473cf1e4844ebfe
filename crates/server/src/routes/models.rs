//! `GET /v1/models` and `GET /v1/models/{id}`.

use axum::{
    extract::{Path, State},
    Json,
};

use crate::{
    app::AppState,
    openai::{
        errors::{ApiError, ApiResult},
        types::{ModelCard, ModelList},
    },
};

fn card(state: &AppState) -> ModelCard {
    ModelCard {
        id: state.model.id().to_owned(),
        object: "model",
        created: state.started_at_unix,
        owned_by: "mlx-batch",
    }
}

/// Lists the one model this server serves.
pub async fn list(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![card(&state)],
    })
}

/// Describes one model, or 404.
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<ModelCard> {
    if id == state.model.id() {
        Ok(Json(card(&state)))
    } else {
        Err(ApiError::model_not_found(&id))
    }
}
