//! The web faces of tally, served from the binary: the live dashboard (`/dashboard/`), the
//! embeddable vote widget (`/widget.js`) and its iframe page (`/embed/{poll}`).
//!
//! The files live in `dashboards/web/` at the top of the repository and are compiled in
//! (`include_bytes!`), with a content hash computed at build time: nothing is read from
//! disk or fetched from the network at run time, and the two-command start shows them.
//!
//! Caching: scripts and styles are served under a versioned path,
//! `/dashboard/assets/{hash}/{file}`, cached for a year (`immutable`) — a new build has new
//! hashes, so browsers never run a stale script against a new API. Pages and `/widget.js`
//! (whose address is the embedding contract, so it cannot carry a version) are revalidated
//! with their `ETag`: `no-cache` for pages, five minutes for the widget script, which is
//! fetched by every page view of every site that embeds a poll.
//!
//! Pages refer to each other and to the API by relative paths (`{{root}}`), so tally also
//! works behind a proxy that serves it under a path prefix.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::LazyLock;
use tally_core::problem::Problem;
use tally_service::http::ApiError;

/// FNV-1a, 64 bits: a content hash the compiler can compute, for cache-busting paths only
/// (nothing trusts it to detect tampering).
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

/// One file of `dashboards/web/`.
struct Asset {
    name: &'static str,
    bytes: &'static [u8],
    content_type: &'static str,
    hash: u64,
}

macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        asset!($name, $name, $content_type)
    };
    // A large vendored file is versioned by its release: hashing megabytes in const
    // evaluation is slow.
    ($file:literal, $name:literal, $content_type:expr, version = $version:literal) => {{
        const BYTES: &[u8] = include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../dashboards/web/",
            $file
        ));
        Asset {
            name: $name,
            bytes: BYTES,
            content_type: $content_type,
            hash: fnv1a(concat!($name, "@", $version).as_bytes()),
        }
    }};
    ($file:literal, $name:literal, $content_type:expr) => {{
        const BYTES: &[u8] = include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../dashboards/web/",
            $file
        ));
        Asset {
            name: $name,
            bytes: BYTES,
            content_type: $content_type,
            hash: fnv1a(BYTES),
        }
    }};
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

/// Served under `/dashboard/assets/{hash}/{name}`.
static VERSIONED: &[Asset] = &[
    asset!("app.js", JS),
    asset!("overview.js", JS),
    asset!("poll.js", JS),
    asset!("app.css", CSS),
    asset!("widget.css", CSS),
    asset!("icon.svg", "image/svg+xml"),
    // The API reference's renderer (see dashboards/web/vendor/README.md).
    asset!(
        "vendor/redoc.standalone.js",
        "redoc.standalone.js",
        JS,
        version = "3.0.1"
    ),
];

/// Pages and the widget script: templates whose `{{…}}` are filled once, at first use.
static INDEX: Asset = asset!("index.html", HTML);
static POLL: Asset = asset!("poll.html", HTML);
static EMBED: Asset = asset!("embed.html", HTML);
static WIDGET: Asset = asset!("widget.js", JS);
static DOCS: Asset = asset!("docs.html", HTML);

fn hash_text(hash: u64) -> String {
    format!("{hash:016x}")[..12].to_owned()
}

/// The versioned path of an asset, from the root of the site (no leading `/`).
fn versioned_path(asset: &Asset) -> String {
    format!("dashboard/assets/{}/{}", hash_text(asset.hash), asset.name)
}

/// A template filled in: `{{root}}` is the relative path from the page to the site root,
/// `{{asset:NAME}}` the versioned path of an asset (from the root).
struct Rendered {
    body: String,
    etag: String,
    content_type: &'static str,
}

fn render(template: &Asset, root: &str) -> Rendered {
    let mut body = String::from_utf8_lossy(template.bytes).replace("{{root}}", root);
    for asset in VERSIONED {
        body = body.replace(
            &format!("{{{{asset:{}}}}}", asset.name),
            &versioned_path(asset),
        );
    }
    debug_assert!(
        !body.contains("{{asset:"),
        "{} names an unknown asset",
        template.name
    );
    Rendered {
        etag: format!("\"{}\"", hash_text(fnv1a(body.as_bytes()))),
        body,
        content_type: template.content_type,
    }
}

static INDEX_PAGE: LazyLock<Rendered> = LazyLock::new(|| render(&INDEX, "../"));
static POLL_PAGE: LazyLock<Rendered> = LazyLock::new(|| render(&POLL, "../../"));
static EMBED_PAGE: LazyLock<Rendered> = LazyLock::new(|| render(&EMBED, "../"));
static WIDGET_SCRIPT: LazyLock<Rendered> = LazyLock::new(|| render(&WIDGET, ""));
static DOCS_PAGE: LazyLock<Rendered> = LazyLock::new(|| render(&DOCS, ""));

/// The dashboard's pages talk only to their own origin, run only their own scripts and may
/// not be framed (their admin buttons must not be clickjacked).
const DASHBOARD_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";
/// The embed page is made to be framed anywhere, and votes with the ingest service, which
/// may be on another origin.
const EMBED_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src *; frame-ancestors *; base-uri 'none'";

/// Redoc styles its elements inline, embeds its fonts and searches in a worker it makes from
/// a blob. `connect-src 'self'` also keeps it from sending telemetry to its vendor (Redoc 3
/// tries), and `img-src` its logo from a CDN: the reference works offline.
const DOCS_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; font-src 'self' data:; img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'";

fn matches_etag(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|given| {
            given
                .split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        })
}

fn respond(
    headers: &HeaderMap,
    page: &'static Rendered,
    cache_control: &'static str,
    policy: Option<&'static str>,
) -> Response {
    let mut response = if matches_etag(headers, &page.etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        page.body.clone().into_response()
    };
    let out = response.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(page.content_type),
    );
    out.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    if let Ok(etag) = HeaderValue::from_str(&page.etag) {
        out.insert(header::ETAG, etag);
    }
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Some(policy) = policy {
        out.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(policy),
        );
        out.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        );
    }
    if policy == Some(DASHBOARD_POLICY) {
        out.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    response
}

/// `GET /dashboard`: the overview lives at `/dashboard/` (its relative links need the `/`).
#[utoipa::path(get, path = "/dashboard", tag = "dashboard",
    responses(
        (status = 308, description = "to `/dashboard/`"),
    ))]
pub(crate) async fn dashboard_redirect() -> Response {
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, "dashboard/")],
    )
        .into_response()
}

/// `GET /dashboard/`: the campaign overview.
#[utoipa::path(get, path = "/dashboard/", tag = "dashboard",
    responses(
        (status = 200, description = "the campaign overview page", content_type = "text/html", body = String),
    ))]
pub(crate) async fn overview(headers: HeaderMap) -> Response {
    respond(&headers, &INDEX_PAGE, "no-cache", Some(DASHBOARD_POLICY))
}

/// `GET /dashboard/polls/{id}`: a poll's live page. The page reads the poll id from its own
/// address, so nothing of the request is written into the HTML.
#[utoipa::path(get, path = "/dashboard/polls/{id}", tag = "dashboard",
    params(("id" = String, Path, description = "the poll")),
    responses(
        (status = 200, description = "a poll's live page", content_type = "text/html", body = String),
    ))]
pub(crate) async fn poll_page(headers: HeaderMap) -> Response {
    respond(&headers, &POLL_PAGE, "no-cache", Some(DASHBOARD_POLICY))
}

/// `GET /embed/{poll}`: the widget alone on a page, for an `<iframe>`.
#[utoipa::path(get, path = "/embed/{poll}", tag = "dashboard",
    params(("poll" = String, Path, description = "the poll")),
    responses(
        (status = 200, description = "the widget alone on a page", content_type = "text/html", body = String),
    ))]
pub(crate) async fn embed_page(headers: HeaderMap) -> Response {
    respond(&headers, &EMBED_PAGE, "no-cache", Some(EMBED_POLICY))
}

/// `GET /docs`: the API reference, Redoc over `/openapi.json`.
pub(crate) async fn docs_page(headers: HeaderMap) -> Response {
    respond(&headers, &DOCS_PAGE, "no-cache", Some(DOCS_POLICY))
}

/// `GET /widget.js`: the embeddable widget.
#[utoipa::path(get, path = "/widget.js", tag = "dashboard",
    responses(
        (status = 200, description = "the embeddable widget", content_type = "text/javascript", body = String),
    ))]
pub(crate) async fn widget(headers: HeaderMap) -> Response {
    let mut response = respond(&headers, &WIDGET_SCRIPT, "public, max-age=300", None);
    // Pages of any origin load it with `<script src>`; `crossorigin` loads need this too.
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

/// `GET /dashboard/assets/{version}/{file}`. The current version is cached for a year. Any
/// other version (a page rendered by an older or newer replica during a rolling upgrade) gets
/// today's file, not cached, rather than a broken page.
#[utoipa::path(get, path = "/dashboard/assets/{version}/{file}", tag = "dashboard",
    params(("version" = String, Path, description = "the asset's content hash"), ("file" = String, Path, description = "the asset's name")),
    responses(
        (status = 200, description = "a dashboard asset (script, style sheet)", content_type = "text/plain", body = String),
        (status = 404, description = "`not-found`: no such asset", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn versioned(Path((version, file)): Path<(String, String)>) -> Response {
    let Some(asset) = VERSIONED.iter().find(|asset| asset.name == file) else {
        return ApiError(Problem::not_found(&format!("dashboard asset `{file}`"))).into_response();
    };
    let current = version == hash_text(asset.hash);
    let cache_control = if current {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut response = asset.bytes.into_response();
    let out = response.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    out.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The widget's stylesheet is loaded by pages of other origins.
    out.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_names_only_assets_that_exist() {
        for page in [&*INDEX_PAGE, &*POLL_PAGE, &*EMBED_PAGE, &*WIDGET_SCRIPT] {
            assert!(!page.body.contains("{{"), "an unfilled placeholder");
        }
        assert!(POLL_PAGE.body.contains("../../dashboard/assets/"));
        assert!(WIDGET_SCRIPT.body.contains("dashboard/assets/"));
    }

    #[test]
    fn a_change_of_content_is_a_new_version() {
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        assert_eq!(hash_text(fnv1a(b"a")).len(), 12);
    }
}
