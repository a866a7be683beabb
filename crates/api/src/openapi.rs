//! The OpenAPI 3.1 document of `/api/v1`, generated from the handlers' `#[utoipa::path]`
//! attributes and the wire types' schemas, served at `GET /api/v1/openapi.json`.
//!
//! Each route names the answers particular to it (403, 404, 409, …); the ones that follow from
//! a route's shape are added here ([`Shape`]): 400/415/421 everywhere, 401 where a token is
//! taken, and 413 where a JSON body is. The test below holds the document to the router's table
//! (`routes::V1_ROUTES`), so a route cannot go undocumented.

use crate::limits;
use crate::routes::{self, batch, clusters, ops, ready, users, vms};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use basphere_wire::Envelope;
use std::sync::LazyLock;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{self, RefOr, Required};
use utoipa::{Modify, OpenApi, ToResponse, ToSchema};

/// A successful answer: the prototype's envelope with the route's result in `data` (`errors`
/// is empty).
#[derive(ToSchema)]
pub struct Answer<T> {
    pub success: bool,
    pub message: String,
    pub data: T,
    pub errors: Vec<String>,
}

/// One Server-Sent Event of an event stream.
#[derive(ToSchema)]
pub struct StreamEvent {
    /// The event's sequence number (for `?after=` or `Last-Event-ID` on reconnect).
    pub id: Option<String>,
    /// Its kind: `queued`, `step_started`, `step_done`, …, `succeeded`, `failed`,
    /// `cancelled`; `truncated` first when a replay was cut short.
    pub event: Option<String>,
    /// Its JSON: an `Event`, or for `truncated` what was left out and what to do.
    pub data: String,
}

/// Declares the refusals every route draws from: each is the envelope with `success: false`,
/// `message` saying what went wrong and what to do, and `errors` one line per problem.
macro_rules! refusals {
    ($($(#[doc = $d:literal])* $(#[response($($r:tt)*)])? $name:ident,)+) => {$(
        $(#[doc = $d])*
        #[derive(ToResponse)]
        $(#[response($($r)*)])?
        pub struct $name(pub Envelope);
    )+};
}

refusals! {
    /// Bad input: a field of the wrong type or value (each named in `errors`), a bad path or
    /// query parameter, or a body that is not one JSON object.
    BadRequest,
    /// No valid credential: send `Authorization: Bearer <token>` with a live token.
    Unauthorized,
    /// Not allowed: the account is not active, the route needs an admin, or the request would
    /// exceed the quota (then `data` names the limit).
    Forbidden,
    /// No such thing, or not the caller's to see.
    NotFound,
    /// The thing is in a state that does not allow this now (a name taken, a request decided).
    Conflict,
    /// The request body is larger than 64 KiB.
    TooLarge,
    /// A request body (and any `Content-Type` sent) must be `application/json`.
    UnsupportedMediaType,
    /// The `Host` header names none of this server's names (`[server] allowed_hosts`).
    Misdirected,
    /// Well-formed input that cannot be acted on (a manifest's problems, each in `errors`).
    Unprocessable,
    /// Too many requests from this client, or too many open event streams; try again after
    /// `Retry-After` seconds.
    #[response(headers(("Retry-After" = u32, description = "Seconds to wait before trying again")))]
    TooManyRequests,
    /// The server cannot take this now (registrations closed, address pool full, reCAPTCHA
    /// unreachable); try again later.
    #[response(headers(("Retry-After" = u32, description = "Seconds to wait before trying again")))]
    Unavailable,
    /// Not built yet: clusters arrive with Stage 2.
    NotImplemented,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Basphere API",
        description = "Self-service VMs: users, registrations, key changes, tokens, VMs, \
            operations and batches. Every JSON answer is the envelope `{success, message, data, \
            errors}`. Lists take `?limit=&after=` and name the next page's `after` in the \
            `X-Next-After` header. On the Unix socket the kernel says who calls; over TCP a \
            bearer token does (`basphere token create`).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    servers((url = "/api/v1")),
    security(("bearer" = [])),
    modifiers(&Shape),
    paths(
        routes::health, ready::ready, serve,
        limits::register, limits::enroll,
        users::me, users::pending, users::pending_one, users::list, users::add, users::show,
        users::delete, users::approve, users::reject, users::disable, users::enable,
        users::set_quota, users::key_change, users::key_changes, users::key_changes_of,
        users::key_approve, users::key_reject, users::tokens, users::token_create,
        users::token_revoke, users::audit_page,
        vms::catalog, vms::list_page, vms::create, vms::show, vms::delete, vms::quota,
        vms::resources,
        ops::list, ops::show, ops::events, ops::events_all,
        batch::cancel, batch::retry, batch::apply, batch::plan, batch::show,
        clusters::list, clusters::create, clusters::quota, clusters::show, clusters::delete,
        clusters::kubeconfig, clusters::status,
    ),
    components(responses(
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, TooLarge, UnsupportedMediaType,
        Misdirected, Unprocessable, TooManyRequests, Unavailable, NotImplemented,
    )),
    tags(
        (name = "meta", description = "Health, readiness and this document"),
        (name = "users", description = "Registration, accounts and quotas"),
        (name = "keys", description = "SSH key changes"),
        (name = "tokens", description = "API tokens and enrollment"),
        (name = "audit", description = "The audit trail"),
        (name = "vms", description = "VMs, the catalog, quota and resources"),
        (name = "operations", description = "Operations (workflows) and their event streams"),
        (name = "batches", description = "Manifests planned and applied as batches"),
        (name = "clusters", description = "Clusters (Stage 2; not built yet)"),
    ),
)]
struct ApiDoc;

/// Adds what follows from each route's shape: the bearer scheme, 400/415/421 everywhere (the
/// checks every request passes), 401 wherever a token is taken, and 413 wherever a JSON body
/// is (which may be empty: it reads as `{}`).
struct Shape;

fn reference(name: &str) -> RefOr<openapi::Response> {
    RefOr::Ref(openapi::Ref::from_response_name(name))
}

impl Modify for Shape {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        for item in doc.paths.paths.values_mut() {
            for op in operations_mut(item) {
                let takes_token = op
                    .security
                    .as_ref()
                    .is_none_or(|reqs| reqs.iter().any(|r| *r != Default::default()));
                let mut add = |status: &str, name: &str| {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| reference(name));
                };
                // Every route: a NUL in the URL (`limits::refuse_nul`), a `Content-Type` other
                // than JSON (`limits::require_json`), a foreign `Host` (`limits::check_host`).
                add("400", "BadRequest");
                add("415", "UnsupportedMediaType");
                add("421", "Misdirected");
                if takes_token {
                    add("401", "Unauthorized");
                }
                if let Some(body) = op.request_body.as_mut() {
                    op.responses
                        .responses
                        .entry("413".into())
                        .or_insert_with(|| reference("TooLarge"));
                    // An empty body reads as `{}`.
                    body.required = Some(Required::False);
                }
            }
        }
    }
}

fn operations_mut(
    item: &mut openapi::PathItem,
) -> impl Iterator<Item = &mut openapi::path::Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// The document as JSON, built once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    let mut v = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
    camel_case_links(&mut v);
    v.to_string()
});

/// Names the fields of every response link as OpenAPI spells them (`operationId`, …): utoipa
/// 5 writes them in snake case.
fn camel_case_links(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    let responses = paths
        .values_mut()
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("responses").and_then(|r| r.as_object_mut()))
        .flat_map(|r| r.values_mut());
    for response in responses {
        let Some(links) = response.get_mut("links").and_then(|l| l.as_object_mut()) else {
            continue;
        };
        for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
            for (from, to) in [
                ("operation_id", "operationId"),
                ("operation_ref", "operationRef"),
                ("request_body", "requestBody"),
            ] {
                if let Some(v) = link.remove(from) {
                    link.insert(to.to_string(), v);
                }
            }
        }
    }
}

/// The OpenAPI 3.1 document of `/api/v1`.
fn document() -> openapi::OpenApi {
    ApiDoc::openapi()
}

/// `GET /openapi.json`: this API's OpenAPI 3.1 document (no authentication).
#[utoipa::path(
    get, path = "/openapi.json", tag = "meta", operation_id = "openapi",
    summary = "The OpenAPI 3.1 document of /api/v1",
    security(()),
    responses((status = 200, description = "This document", body = Object)),
)]
pub(crate) async fn serve() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

/// One operation of the document, as the portal's API page lists it.
#[derive(Debug, Clone)]
pub struct OperationInfo {
    /// `GET`, `POST`, …
    pub method: &'static str,
    /// The full path, `/api/v1/vms/{name}`.
    pub path: String,
    pub summary: String,
    pub tag: String,
    /// Whether it answers without a token.
    pub anonymous: bool,
    /// The status codes it answers with, in order.
    pub statuses: Vec<String>,
}

/// Every operation of the document, by path and then method.
pub fn operations() -> Vec<OperationInfo> {
    let doc = document();
    let base = doc
        .servers
        .as_ref()
        .and_then(|s| s.first())
        .map(|s| s.url.clone())
        .unwrap_or_default();
    let mut out = vec![];
    for (path, item) in &doc.paths.paths {
        let methods = [
            ("GET", &item.get),
            ("PUT", &item.put),
            ("POST", &item.post),
            ("DELETE", &item.delete),
            ("PATCH", &item.patch),
        ];
        for (method, op) in methods {
            let Some(op) = op else { continue };
            out.push(OperationInfo {
                method,
                path: format!("{base}{path}"),
                summary: op.summary.clone().unwrap_or_default(),
                tag: op
                    .tags
                    .as_ref()
                    .and_then(|t| t.first().cloned())
                    .unwrap_or_default(),
                anonymous: op
                    .security
                    .as_ref()
                    .is_some_and(|reqs| reqs.iter().any(|r| *r == Default::default())),
                statuses: op.responses.responses.keys().cloned().collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn documented() -> BTreeSet<(String, String)> {
        operations()
            .into_iter()
            .map(|o| (o.method.to_ascii_lowercase(), o.path))
            .collect()
    }

    fn routed() -> BTreeSet<(String, String)> {
        routes::V1_ROUTES
            .iter()
            .flat_map(|(path, methods)| {
                methods
                    .iter()
                    .map(move |m| (m.to_string(), format!("/api/v1{path}")))
            })
            .collect()
    }

    #[test]
    fn every_route_is_documented_and_every_operation_routed() {
        let (doc, router) = (documented(), routed());
        assert!(router.len() > 40, "the route table looks empty: {router:?}");
        let undocumented: Vec<_> = router.difference(&doc).collect();
        let unrouted: Vec<_> = doc.difference(&router).collect();
        assert!(
            undocumented.is_empty(),
            "routes without #[utoipa::path] (add it and list the handler in ApiDoc's paths): \
             {undocumented:?}"
        );
        assert!(
            unrouted.is_empty(),
            "documented operations no route serves: {unrouted:?}"
        );
    }

    #[test]
    fn operation_ids_are_unique_and_every_operation_is_summarized() {
        let doc = document();
        let mut ids = BTreeSet::new();
        for (path, item) in &doc.paths.paths {
            let ops = [&item.get, &item.put, &item.post, &item.delete, &item.patch];
            for op in ops.into_iter().flatten() {
                let id = op.operation_id.clone().unwrap_or_default();
                assert!(ids.insert(id.clone()), "operation id {id:?} twice ({path})");
                assert!(op.summary.is_some(), "{path} {id}: no summary");
            }
        }
    }

    #[test]
    fn token_routes_document_401_and_body_routes_their_refusals() {
        for o in operations() {
            let has = |s: &str| o.statuses.iter().any(|x| x == s);
            if !o.anonymous {
                assert!(has("401"), "{} {}: no 401", o.method, o.path);
            }
            if o.method == "POST" && o.path.ends_with("/vms") {
                for s in ["202", "400", "403", "413", "415"] {
                    assert!(has(s), "POST /vms lacks {s}: {:?}", o.statuses);
                }
            }
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_with_a_bearer_scheme() {
        let v: serde_json::Value = serde_json::from_str(&DOCUMENT).unwrap();
        assert_eq!(v["openapi"], "3.1.0");
        assert_eq!(v["servers"][0]["url"], "/api/v1");
        assert_eq!(
            v["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert_eq!(
            v["paths"]["/health"]["get"]["security"],
            serde_json::json!([{}])
        );
    }
}
