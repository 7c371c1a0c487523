//! The OpenAPI document at `/openapi.json`: OpenAPI 3.1, naming exactly the routes the
//! routers serve (a route added without documentation fails here), and describing the
//! bodies the routes really answer with.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use common::{Answer, Harness, ADMIN_KEY, ANALYST_KEY, SECRET};
use serde_json::{json, Value};
use tally_query::openapi::{document, Document, Votes};
use tower::ServiceExt;

/// Every route of standalone (query, ingest and the routes every service has), as
/// `METHOD path`. CORS preflights (`OPTIONS`) are left out of the document.
const ROUTES: &[&str] = &[
    "POST /v1/polls",
    "GET /v1/polls",
    "GET /v1/polls/{id}",
    "PUT /v1/polls/{id}",
    "PATCH /v1/polls/{id}",
    "DELETE /v1/polls/{id}",
    "POST /v1/polls/{id}/close",
    "POST /v1/polls/{id}/reopen",
    "POST /v1/polls/{id}/tokens",
    "GET /v1/polls/{id}/results",
    "GET /v1/polls/{id}/ballot",
    "GET /v1/polls/{id}/breakdown",
    "GET /v1/polls/{id}/timeseries",
    "GET /v1/polls/{id}/export",
    "POST /v1/sql",
    "GET /v1/polls/{id}/live",
    "GET /v1/live",
    "GET /dashboard",
    "GET /dashboard/",
    "GET /dashboard/polls/{id}",
    "GET /dashboard/assets/{version}/{file}",
    "GET /widget.js",
    "GET /embed/{poll}",
    "GET /openapi.json",
    "GET /docs",
    "POST /v1/polls/{id}/votes",
    "POST /v1/votes:batch",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
];

fn harness() -> Harness {
    Harness::with_config(|config| {
        config.openapi = Some(Document(document(tally_ingest::openapi(), Votes::Here)));
    })
}

/// The ingest router on the harness's store.
fn ingest(h: &Harness) -> axum::Router {
    ingest_with(h, tally_ingest::limits::LimitConfig::default())
}

/// The ingest router on the harness's store, with `limits`.
fn ingest_with(h: &Harness, limits: tally_ingest::limits::LimitConfig) -> axum::Router {
    let tasks = tally_service::Tasks::new();
    let ingest = tally_ingest::Ingest::new(
        tally_ingest::Deps {
            log: h.store.log.clone(),
            registry: h.store.registry.clone(),
            warehouse: None,
        },
        tally_ingest::Config {
            secret: SECRET.to_vec(),
            limits,
            ..Default::default()
        },
        &tasks,
    )
    .unwrap();
    // The tasks (poll cache) must outlive the test's requests.
    std::mem::forget(tasks);
    tally_ingest::router(Arc::clone(&ingest))
}

async fn served_document(h: &Harness) -> Value {
    let answer = h.get("/openapi.json", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    serde_json::from_slice(&answer.body).unwrap()
}

fn documented_routes(doc: &Value) -> BTreeSet<String> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            if ["get", "put", "post", "delete", "patch", "options", "head"]
                .contains(&method.as_str())
            {
                routes.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    routes
}

/// The paths the routers' sources register with `.route("…"`, so a route added to a
/// router without a line in [`ROUTES`] (and so without documentation) fails the test.
fn routes_in_sources() -> BTreeSet<String> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut paths = BTreeSet::new();
    for file in [
        "query/src/lib.rs",
        "ingest/src/lib.rs",
        "service/src/http/health.rs",
    ] {
        let source = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        for (at, _) in source.match_indices(".route(") {
            let rest = source[at + ".route(".len()..].trim_start();
            let Some(rest) = rest.strip_prefix('"') else {
                continue;
            };
            paths.insert(rest[..rest.find('"').unwrap()].to_owned());
        }
    }
    paths
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_names_every_route_the_routers_serve() {
    let h = harness();
    let doc = served_document(&h).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());

    let listed: BTreeSet<String> = ROUTES.iter().map(|r| r.to_string()).collect();
    let documented = documented_routes(&doc);
    let undocumented: Vec<_> = listed.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&listed).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "routes without documentation: {undocumented:?}; documented but not served: {unknown:?}"
    );

    let listed_paths: BTreeSet<String> = ROUTES
        .iter()
        .map(|r| r.split_once(' ').unwrap().1.to_owned())
        .collect();
    assert_eq!(
        routes_in_sources(),
        listed_paths,
        "the routers' paths and the documented ones differ"
    );

    // Each listed route is served: the router answers it with something other than
    // the unknown-route and unknown-method problems.
    let ingest = ingest(&h);
    for route in ROUTES {
        let (method, path) = route.split_once(' ').unwrap();
        let uri = path
            .replace("{id}", "no-such-poll")
            .replace("{poll}", "no-such-poll")
            .replace("{version}", "v")
            .replace("{file}", "app.js");
        let uri = if uri == "/v1/live" {
            "/v1/live?polls=no-such-poll".to_owned()
        } else {
            uri
        };
        let request = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(&uri)
            .body(Body::empty())
            .unwrap();
        let router = if path.ends_with("/votes") || path.starts_with("/v1/votes") {
            ingest.clone()
        } else {
            h.router.clone()
        };
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("/problems/no-route") && !text.contains("/problems/method-not-allowed"),
            "{route} is not served: {status} {text}"
        );
    }
}

/// Every operation that documents `429` answers it once its client address has spent its
/// request quota, whatever router or layer serves it: a route registered where the
/// per-address guard does not reach (`guard::protect` wraps only the routes a router has
/// when it is called; cross-origin routes are guarded by `cors::guarded`) fails here.
#[tokio::test]
async fn every_route_documenting_429_is_behind_the_per_address_guard() {
    use axum::extract::ConnectInfo;
    let once = tally_service::limits::Rate::parse("1/min").unwrap();
    let h = Harness::with_config(|config| {
        config.openapi = Some(Document(document(tally_ingest::openapi(), Votes::Here)));
        config.rate_per_ip = once;
    });
    let ingest = ingest_with(
        &h,
        tally_ingest::limits::LimitConfig {
            per_ip: once,
            ..Default::default()
        },
    );
    h.ab_poll("p", "live").await;
    let doc = served_document(&h).await;
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if !operation["responses"]["429"].is_object() {
                continue;
            }
            checked += 1;
            // Each operation from an address of its own, so each starts with a full quota.
            let peer: std::net::SocketAddr =
                format!("10.0.{}.{}:40000", checked / 200, checked % 200 + 1)
                    .parse()
                    .unwrap();
            let uri = path.replace("{id}", "p").replace("{poll}", "p")
                + if path == "/v1/live" { "?polls=p" } else { "" };
            let router = if path.starts_with("/v1/polls/{id}/votes") || path == "/v1/votes:batch" {
                ingest.clone()
            } else {
                h.router.clone()
            };
            let mut statuses = Vec::new();
            for _ in 0..2 {
                let mut request = Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(&uri)
                    .body(Body::empty())
                    .unwrap();
                request.extensions_mut().insert(ConnectInfo(peer));
                let answer = router.clone().oneshot(request).await.unwrap();
                statuses.push(answer.status().as_u16());
            }
            assert_ne!(
                statuses[0], 429,
                "{method} {path}: the first request is within the quota"
            );
            assert_eq!(
                statuses[1], 429,
                "{method} {path} documents 429 but the second request from one address got {}",
                statuses[1]
            );
        }
    }
    let v1 = ROUTES
        .iter()
        .filter(|route| route.contains(" /v1/"))
        .count();
    assert_eq!(checked, v1, "every /v1 operation is checked");
}

#[tokio::test]
async fn every_route_names_its_security_and_problem_responses() {
    let h = harness();
    let doc = served_document(&h).await;
    let schemes = &doc["components"]["securitySchemes"]["api_key"];
    assert_eq!(schemes["type"], "http");
    assert_eq!(schemes["scheme"], "bearer");
    let description = doc["components"]["schemas"]["Problem"]["description"]
        .as_str()
        .unwrap();
    for slug in [
        "already-voted",
        "poll-closed",
        "invalid-field",
        "rate-limited",
        "unavailable",
        "sql-not-allowed",
        "results-hidden",
    ] {
        assert!(
            description.contains(&format!("`{slug}`")),
            "{slug} is not listed"
        );
    }
    // Admin routes need the admin role; the public vote route needs nothing.
    let create = &doc["paths"]["/v1/polls"]["post"];
    assert_eq!(create["security"], json!([{"api_key": ["admin"]}]));
    assert!(doc["paths"]["/v1/polls/{id}/votes"]["post"]["security"].is_null());
    let batch = &doc["paths"]["/v1/votes:batch"]["post"];
    assert_eq!(batch["security"], json!([{"api_key": ["ingest", "admin"]}]));
    // Every /v1 operation names its problem+json answers.
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/") {
            continue;
        }
        for (method, operation) in item.as_object().unwrap() {
            let problems = operation["responses"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(status, response)| {
                    status.starts_with('4')
                        && response["content"]["application/problem+json"].is_object()
                })
                .count();
            assert!(problems > 0, "{method} {path} names no problem response");
            // The answers every guarded route shares, and those of every keyed route.
            let responses = &operation["responses"];
            for status in ["429", "503"] {
                assert!(
                    responses[status].is_object(),
                    "{method} {path} lacks {status}"
                );
            }
            if operation["security"].is_array() {
                for status in ["401", "403"] {
                    assert!(
                        responses[status].is_object(),
                        "{method} {path} lacks {status}"
                    );
                }
            }
        }
    }
    let live = &doc["paths"]["/v1/polls/{id}/live"]["get"]["responses"]["200"]["content"];
    assert!(live["text/event-stream"].is_object(), "{live}");
    let many = &doc["paths"]["/v1/live"]["get"]["responses"]["200"]["content"];
    assert!(many["text/event-stream"].is_object(), "{many}");
}

#[tokio::test]
async fn the_distributed_document_sends_votes_to_the_ingest_service() {
    let doc =
        serde_json::to_value(document(tally_ingest::openapi(), Votes::IngestService)).unwrap();
    let servers = &doc["paths"]["/v1/polls/{id}/votes"]["servers"];
    assert_eq!(servers[0]["url"], "{ingest}", "{servers}");
    assert!(doc["paths"]["/v1/polls"]["servers"].is_null());
    assert!(doc["info"]["description"]
        .as_str()
        .unwrap()
        .contains("ingest service"));
}

#[tokio::test]
async fn the_reference_page_loads_the_vendored_renderer_against_the_document() {
    let h = harness();
    let page = h.get("/docs", None).await;
    assert_eq!(page.status, StatusCode::OK);
    let html = page.text();
    assert!(html.contains(r#"spec-url="openapi.json""#), "{html}");
    // Redoc 3's bundle uses `import.meta`: as a classic script it fails and the page is blank.
    assert!(html.contains(r#"<script type="module""#), "{html}");
    let policy = page.header("content-security-policy").unwrap();
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    let end = html.find("/redoc.standalone.js").unwrap() + "/redoc.standalone.js".len();
    let start = html[..end].rfind('"').unwrap() + 1;
    let script = &html[start..end];
    assert!(script.ends_with("/redoc.standalone.js"), "{script}");
    let bundle = h.get(&format!("/{script}"), None).await;
    assert_eq!(bundle.status, StatusCode::OK);
    assert!(bundle.body.len() > 1_000_000, "the Redoc bundle is served");
    assert!(bundle
        .header("cache-control")
        .unwrap()
        .contains("immutable"));
}

/// Resolves `#/components/schemas/…` references.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.rsplit('/').next().unwrap();
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// A small JSON Schema check, enough for tally's documents: `$ref`, `type` (with `null`),
/// `properties`, `required`, `items`, `additionalProperties`, `oneOf`/`anyOf`/`allOf`,
/// `enum`. Returns what does not fit, with its JSON path. `strict`: an object's fields must
/// be documented (the parts of an `allOf` are checked without it, against the whole).
fn check(
    doc: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    strict: bool,
    errors: &mut Vec<String>,
) {
    let schema = resolve(doc, schema);
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema[key].as_array() {
            let fits = options.iter().any(|option| {
                let mut inner = Vec::new();
                check(doc, option, value, at, strict, &mut inner);
                inner.is_empty()
            });
            if !fits {
                errors.push(format!("{at}: fits none of {key}"));
            }
            return;
        }
    }
    if let Some(parts) = schema["allOf"].as_array() {
        for part in parts {
            check(doc, part, value, at, false, errors);
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            errors.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() {
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let fits = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
        if !fits {
            errors.push(format!("{at}: a {actual}, documented as {types:?}"));
            return;
        }
    }
    if let Value::Object(fields) = value {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap();
            if !fields.contains_key(name) {
                errors.push(format!("{at}.{name}: required, missing"));
            }
        }
        let properties = schema["properties"].as_object();
        // The fields an object may have: its own and those of its `allOf` parts.
        let mut documented: Vec<&String> = properties.into_iter().flat_map(|p| p.keys()).collect();
        for part in schema["allOf"].as_array().into_iter().flatten() {
            let part = resolve(doc, part);
            documented.extend(
                part["properties"]
                    .as_object()
                    .into_iter()
                    .flat_map(|p| p.keys()),
            );
        }
        for (name, field) in fields {
            match properties.and_then(|p| p.get(name)) {
                Some(property) => {
                    check(doc, property, field, &format!("{at}.{name}"), true, errors)
                }
                None => match &schema["additionalProperties"] {
                    Value::Bool(false) => {
                        errors.push(format!("{at}.{name}: not a documented field"))
                    }
                    Value::Object(_) => check(
                        doc,
                        &schema["additionalProperties"],
                        field,
                        &format!("{at}.{name}"),
                        true,
                        errors,
                    ),
                    _ if strict && !documented.is_empty() && !documented.contains(&name) => {
                        errors.push(format!("{at}.{name}: not a documented field"))
                    }
                    _ => {}
                },
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check(doc, item_schema, item, &format!("{at}[{i}]"), true, errors);
        }
    }
}

/// Checks `answer` against the documented response of `method path` for its status.
fn conforms(doc: &Value, method: &str, path: &str, answer: &Answer) {
    let responses = &doc["paths"][path][method]["responses"];
    let response = &responses[answer.status.as_str()];
    assert!(
        response.is_object(),
        "{method} {path}: status {} is not documented",
        answer.status
    );
    let content_type = answer.header("content-type").unwrap();
    let media = &response["content"][content_type];
    assert!(
        media.is_object(),
        "{method} {path}: {content_type} is not documented for {}",
        answer.status
    );
    let body: Value = serde_json::from_slice(&answer.body).unwrap();
    let mut errors = Vec::new();
    check(doc, &media["schema"], &body, "$", true, &mut errors);
    assert!(
        errors.is_empty(),
        "{method} {path} {}: {errors:?}\n{body}",
        answer.status
    );
}

#[tokio::test]
async fn the_routes_answers_fit_their_documented_schemas() {
    let h = harness();
    let doc = served_document(&h).await;
    let definition = json!({"id": "colours", "title": "Colours", "question": "Which?",
        "kind": "single", "campaign": "spring",
        "options": [{"id": "red", "label": "Red"}, {"id": "blue", "label": "Blue"}]});
    let mut errors = Vec::new();
    check(
        &doc,
        &doc["paths"]["/v1/polls"]["post"]["requestBody"]["content"]["application/json"]["schema"],
        &definition,
        "$",
        true,
        &mut errors,
    );
    assert!(errors.is_empty(), "the example definition: {errors:?}");

    let created = h
        .admin(Method::POST, "/v1/polls", Some(definition.clone()))
        .await;
    conforms(&doc, "post", "/v1/polls", &created);
    let again = h.admin(Method::POST, "/v1/polls", Some(definition)).await;
    conforms(&doc, "post", "/v1/polls", &again);
    conforms(
        &doc,
        "get",
        "/v1/polls",
        &h.admin(Method::GET, "/v1/polls", None).await,
    );
    conforms(
        &doc,
        "get",
        "/v1/polls/{id}",
        &h.admin(Method::GET, "/v1/polls/colours", None).await,
    );
    conforms(
        &doc,
        "get",
        "/v1/polls/{id}",
        &h.admin(Method::GET, "/v1/polls/nope", None).await,
    );
    conforms(
        &doc,
        "patch",
        "/v1/polls/{id}",
        &h.admin(
            Method::PATCH,
            "/v1/polls/colours",
            Some(json!({"title": "Colours!", "closes_at": null})),
        )
        .await,
    );
    conforms(
        &doc,
        "post",
        "/v1/polls/{id}/tokens",
        &h.admin(
            Method::POST,
            "/v1/polls/colours/tokens",
            Some(json!({"voter_id": "u-1"})),
        )
        .await,
    );

    // A vote through ingest, then the query routes that read it.
    let vote = Request::builder()
        .method(Method::POST)
        .uri("/v1/polls/colours/votes")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"voter_id": "u-1", "choice": "red", "segment": {"country": "DE"}}).to_string(),
        ))
        .unwrap();
    let response = ingest(&h).oneshot(vote).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let accepted = Answer {
        status,
        headers,
        body,
        stream: None,
    };
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text());
    conforms(&doc, "post", "/v1/polls/{id}/votes", &accepted);

    conforms(
        &doc,
        "get",
        "/v1/polls/{id}/results",
        &h.get("/v1/polls/colours/results", None).await,
    );
    conforms(
        &doc,
        "get",
        "/v1/polls/{id}/ballot",
        &h.get("/v1/polls/colours/ballot", None).await,
    );
    conforms(
        &doc,
        "get",
        "/v1/polls/{id}/breakdown",
        &h.get("/v1/polls/colours/breakdown?by=country", Some(ANALYST_KEY))
            .await,
    );
    conforms(
        &doc,
        "get",
        "/v1/polls/{id}/timeseries",
        &h.get("/v1/polls/colours/timeseries?step=1m", Some(ANALYST_KEY))
            .await,
    );
    conforms(
        &doc,
        "get",
        "/v1/polls/{id}/breakdown",
        &h.get(
            "/v1/polls/colours/breakdown?by=shoe-size",
            Some(ANALYST_KEY),
        )
        .await,
    );
    conforms(
        &doc,
        "get",
        "/v1/polls/{id}/breakdown",
        &h.get("/v1/polls/colours/breakdown", None).await,
    );
    conforms(
        &doc,
        "post",
        "/v1/polls/{id}/close",
        &h.call(
            Method::POST,
            "/v1/polls/colours/close",
            Some(ADMIN_KEY),
            None,
        )
        .await,
    );
    conforms(
        &doc,
        "delete",
        "/v1/polls/{id}",
        &h.call(Method::DELETE, "/v1/polls/colours", Some(ADMIN_KEY), None)
            .await,
    );
    conforms(&doc, "get", "/readyz", &h.get("/readyz", None).await);
    conforms(&doc, "get", "/healthz", &h.get("/healthz", None).await);
}
