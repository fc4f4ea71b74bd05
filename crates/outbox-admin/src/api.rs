//! The routes: JSON under `/api`, the dashboard's files at `/`.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use outbox_core::DeadFilter;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::ops::{self, Selection};
use crate::problem::Problem;
use crate::{AdminState, Error, assets, auth};

/// Largest request body: a selection of a few thousand ids.
const BODY_LIMIT: usize = 256 * 1024;
const DEFAULT_PAGE: usize = 50;
/// Relays that reported within this long are listed, unless the request says otherwise.
const DEFAULT_WITHIN: u64 = 60;
const MAX_WITHIN: u64 = 7 * 24 * 3600;

type ApiResult = Result<Response, Problem>;

/// The admin API and the dashboard, to be mounted with `Router::nest_service("/admin", …)`
/// (the page's links are relative, so any prefix works).
pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/status", get(status))
        .route("/dead", get(dead_list))
        .route("/dead/retry", post(dead_retry))
        .route("/dead/purge", post(dead_purge))
        .route("/dead/{id}", get(dead_show).delete(dead_purge_one))
        .route("/dead/{id}/retry", post(dead_retry_one))
        .route("/relays", get(relays))
        .route("/topics/paused", get(paused))
        .route("/topics/{topic}/pause", post(pause))
        .route("/topics/{topic}/resume", post(resume))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        // Open: the page asks it whether to prompt for a token before it calls anything.
        .route("/auth", get(auth_info));
    Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::script))
        .route("/style.css", get(assets::style))
        .nest("/api", api)
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "Not found", "no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn auth_info(State(state): State<AdminState>) -> Response {
    Json(json!({ "token_required": state.token.is_some() })).into_response()
}

async fn status(State(state): State<AdminState>) -> ApiResult {
    let counts = ops::status(state.store.as_ref()).await?;
    let paused = state.store.paused_topics().await.map_err(Error::from)?;
    let relay = state.stats.as_ref().map(|s| {
        let r = s.report();
        json!({
            "claimed": r.claimed,
            "delivered": r.delivered,
            "retried": r.retried,
            "dead": r.dead,
            "released": r.released,
        })
    });
    let mut body = serde_json::to_value(&counts).map_err(|e| Error::BadRequest(e.to_string()))?;
    body["paused_topics"] = json!(paused);
    body["relay"] = json!(relay);
    body["time"] = json!(chrono::Utc::now());
    Ok(Json(body).into_response())
}

/// The filter fields a list, retry or purge may take. (Each request type spells them out:
/// serde's `flatten` would lose `deny_unknown_fields` and the typing of query strings.)
#[derive(Debug, Default)]
struct FilterParams {
    topic: Option<String>,
    message_type: Option<String>,
    key: Option<String>,
    error: Option<String>,
    /// A duration such as `30m` or `7d`.
    older_than: Option<String>,
}

impl FilterParams {
    fn into_filter(self) -> Result<DeadFilter, Error> {
        let older_than = self
            .older_than
            .as_deref()
            .map(|s| {
                humantime::parse_duration(s).map_err(|e| {
                    Error::BadRequest(format!("older_than {s:?} is not a duration (30m, 7d): {e}"))
                })
            })
            .transpose()?;
        let blank = |v: Option<String>| v.filter(|s| !s.is_empty());
        Ok(DeadFilter {
            ids: None,
            topic: blank(self.topic),
            message_type: blank(self.message_type),
            key: blank(self.key),
            error: blank(self.error),
            older_than,
        })
    }
}

macro_rules! filter_params {
    ($(#[$meta:meta])* struct $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            topic: Option<String>,
            #[serde(rename = "type")]
            message_type: Option<String>,
            key: Option<String>,
            error: Option<String>,
            older_than: Option<String>,
            $($field: $ty,)*
        }

        impl $name {
            fn filter(&mut self) -> FilterParams {
                FilterParams {
                    topic: self.topic.take(),
                    message_type: self.message_type.take(),
                    key: self.key.take(),
                    error: self.error.take(),
                    older_than: self.older_than.take(),
                }
            }
        }
    };
}

filter_params! {
    /// The query of a list: a filter and a keyset page.
    struct ListParams {
        after: Option<Uuid>,
        limit: Option<usize>,
    }
}

async fn dead_list(
    State(state): State<AdminState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult {
    let Query(mut p) = params?;
    let filter = p.filter().into_filter()?;
    let page = ops::dead_list(
        state.store.as_ref(),
        &filter,
        p.after,
        p.limit.unwrap_or(DEFAULT_PAGE),
    )
    .await?;
    Ok(Json(page).into_response())
}

async fn dead_show(
    State(state): State<AdminState>,
    id: Result<Path<Uuid>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    Ok(Json(ops::dead_show(state.store.as_ref(), id).await?).into_response())
}

async fn dead_retry_one(
    State(state): State<AdminState>,
    id: Result<Path<Uuid>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let r = ops::dead_retry(state.store.as_ref(), &Selection::Ids(vec![id])).await?;
    if r.retried == 0 {
        return Err(Error::NotFound(id).into());
    }
    Ok(Json(r).into_response())
}

async fn dead_purge_one(
    State(state): State<AdminState>,
    id: Result<Path<Uuid>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    if ops::dead_purge(state.store.as_ref(), &Selection::Ids(vec![id])).await? == 0 {
        return Err(Error::NotFound(id).into());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

filter_params! {
    /// The body of a bulk retry or purge: ids, a filter, or `"all": true`.
    struct SelectionBody {
        ids: Option<Vec<Uuid>>,
        all: Option<bool>,
    }
}

impl SelectionBody {
    fn into_selection(mut self) -> Result<Selection, Error> {
        let mut filter = self.filter().into_filter()?;
        let filtered = filter != DeadFilter::default();
        match (self.ids, self.all.unwrap_or(false), filtered) {
            (Some(ids), false, false) if !ids.is_empty() => Ok(Selection::Ids(ids)),
            (Some(ids), false, true) if !ids.is_empty() => {
                filter.ids = Some(ids);
                Ok(Selection::Matching(filter))
            }
            (Some(_), false, _) => Err(Error::BadRequest("ids is empty".into())),
            (None, true, false) => Ok(Selection::All),
            (_, true, _) => Err(Error::BadRequest(
                "all: true selects every dead letter; it takes no ids or filter".into(),
            )),
            (None, false, true) => Ok(Selection::Matching(filter)),
            (None, false, false) => Err(Error::BadRequest(
                "say which dead letters: ids, a filter (topic, type, key, error, older_than) or all: true"
                    .into(),
            )),
        }
    }
}

async fn dead_retry(
    State(state): State<AdminState>,
    body: Result<Json<SelectionBody>, JsonRejection>,
) -> ApiResult {
    let Json(body) = body?;
    let selection = body.into_selection()?;
    Ok(Json(ops::dead_retry(state.store.as_ref(), &selection).await?).into_response())
}

async fn dead_purge(
    State(state): State<AdminState>,
    body: Result<Json<SelectionBody>, JsonRejection>,
) -> ApiResult {
    let Json(body) = body?;
    let selection = body.into_selection()?;
    let purged = ops::dead_purge(state.store.as_ref(), &selection).await?;
    Ok(Json(json!({ "purged": purged })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayParams {
    /// Seconds.
    within: Option<u64>,
}

async fn relays(
    State(state): State<AdminState>,
    params: Result<Query<RelayParams>, QueryRejection>,
) -> ApiResult {
    let Query(p) = params?;
    let within = p.within.unwrap_or(DEFAULT_WITHIN);
    if !(1..=MAX_WITHIN).contains(&within) {
        return Err(Error::BadRequest(format!(
            "within must be between 1 and {MAX_WITHIN} seconds"
        ))
        .into());
    }
    let relays = state
        .store
        .relays(Duration::from_secs(within))
        .await
        .map_err(Error::from)?;
    Ok(Json(relays).into_response())
}

async fn paused(State(state): State<AdminState>) -> ApiResult {
    let topics = state.store.paused_topics().await.map_err(Error::from)?;
    Ok(Json(topics).into_response())
}

/// Topic names are the store's to keep; only an empty or absurd one is refused here.
fn check_topic(topic: &str) -> Result<(), Error> {
    if topic.trim().is_empty() || topic.len() > 255 {
        return Err(Error::BadRequest(
            "a topic is 1 to 255 bytes and not blank".into(),
        ));
    }
    Ok(())
}

async fn pause(
    State(state): State<AdminState>,
    topic: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(topic) = topic?;
    check_topic(&topic)?;
    let changed = state.store.pause_topic(&topic).await.map_err(Error::from)?;
    Ok(Json(json!({ "topic": topic, "paused": true, "changed": changed })).into_response())
}

async fn resume(
    State(state): State<AdminState>,
    topic: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(topic) = topic?;
    check_topic(&topic)?;
    let changed = state
        .store
        .resume_topic(&topic)
        .await
        .map_err(Error::from)?;
    Ok(Json(json!({ "topic": topic, "paused": false, "changed": changed })).into_response())
}
