//! The OpenAPI document of the HTTP API (docs/openapi.yaml), generated from what the
//! engines declare: every route of the mount table, each operation's access, its body
//! and query types (the `keyvault-api` types, whose schemas `utoipa` derives) and what a
//! success answers. `keyvault openapi` prints it; a test fails when the committed file
//! differs. Nothing here is written by hand per endpoint: a route that is added with its
//! [`OpSpec`] declarations is in the document.
//!
//! How Vault's HTTP conventions map onto OpenAPI (see docs/api.md):
//! - `GET` reads; a listing is `GET <path>/?list=true` (the `LIST` method is not
//!   expressible in OpenAPI), on the path with a trailing slash;
//! - a write is `POST` (`PUT` is the same operation and is not listed twice);
//! - `PATCH` takes a JSON merge patch (`application/merge-patch+json`);
//! - replies are Vault's envelope (`request_id`, `lease_id`, `renewable`,
//!   `lease_duration`, `data`, `warnings`), a login's reply carries `auth`; an operation
//!   that answers nothing answers 204, or 200 with the envelope when it has warnings
//!   (fields of the body that no endpoint reads are named there, not refused);
//! - every error is `{"errors": [...]}`.

use std::collections::BTreeMap;

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{AllOfBuilder, ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Paths, Ref, RefOr, Required,
    ResponseBuilder,
};

use super::mounts::MountTable;
use super::{Access, OpSpec, Operation, Route};

/// The schemas a [`SchemaFn`] needs in the document's components, by name.
pub type Schemas = Vec<(String, RefOr<Schema>)>;

/// A type's schema: a reference to it, with it and what it refers to added to the
/// components.
pub type SchemaFn = fn(&mut Schemas) -> RefOr<Schema>;

/// [`SchemaFn`] of a `keyvault-api` type.
pub fn schema_of<T: utoipa::ToSchema>(deps: &mut Schemas) -> RefOr<Schema> {
    T::schemas(deps);
    let name = T::name();
    deps.push((name.to_string(), T::schema()));
    RefOr::Ref(Ref::from_schema_name(name))
}

/// [`SchemaFn`] of either of two `keyvault-api` types (one item or a batch).
pub fn either<A: utoipa::ToSchema, B: utoipa::ToSchema>(deps: &mut Schemas) -> RefOr<Schema> {
    let a = schema_of::<A>(deps);
    let b = schema_of::<B>(deps);
    utoipa::openapi::schema::OneOfBuilder::new().item(a).item(b).into()
}

/// [`SchemaFn`] of an object with the members of two `keyvault-api` types (a role: its
/// token settings and its method's own fields).
pub fn both<A: utoipa::ToSchema, B: utoipa::ToSchema>(deps: &mut Schemas) -> RefOr<Schema> {
    let a = schema_of::<A>(deps);
    let b = schema_of::<B>(deps);
    AllOfBuilder::new().item(a).item(b).into()
}

/// [`SchemaFn`] of a list of capability names.
pub fn capability_names(_: &mut Schemas) -> RefOr<Schema> {
    ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String)).into()
}

/// [`SchemaFn`] of any JSON object (a secret's fields, as they were written).
pub fn any_object(_: &mut Schemas) -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Object).description(Some("Any JSON object (the secret's fields).")).into()
}

/// What an operation answers when it succeeds.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// Not declared: a route table mistake (a test finds every one).
    Undeclared,
    /// 204, no body (200 with the envelope when the request had warnings).
    Empty,
    /// 200, the envelope with this `data`.
    Data(SchemaFn),
    /// 200, the envelope with `data` any JSON object (a secret's value, as written) and
    /// the secret's `metadata` beside it.
    AnyData,
    /// 200 with `data` or 204 with nothing (e.g. a delete that reports what it removed).
    DataOrEmpty(SchemaFn),
    /// 200, the envelope with `{"keys": [...]}`; 404 when there is nothing to list
    /// (Vault's convention).
    Keys,
    /// 200, this body without the envelope.
    Bare(SchemaFn),
    /// This body without the envelope, with 200 when all is well and 503 when not
    /// (`sys/health`).
    Health(SchemaFn),
    /// 200, the envelope with `data` a map of names to `T` (mounts, capabilities).
    Map(SchemaFn),
    /// 200, the envelope with `data: null` and a `wrap_info` beside it (response wrapping).
    Wrapped,
    /// 200, a reply wrapped earlier, as it was (any JSON).
    Unwrapped,
    /// 200, plain text (the Prometheus metrics).
    Text,
    /// 200, the envelope with a token in `auth` (a login, a new or renewed token).
    Auth,
}

impl Answer {
    pub fn is_declared(&self) -> bool {
        !matches!(self, Answer::Undeclared)
    }
}

/// What a path parameter's segments may hold (docs/api.md): no control character and no
/// encoded `/` (and not `.` or `..`, which a pattern without look-ahead cannot say).
const SEGMENT_PATTERN: &str = "^[^\\x00-\\x1F\\x7F-\\x9F/]+$";

/// The header every request with a token carries (Vault's; `Authorization: Bearer` is
/// accepted too).
pub const TOKEN_SCHEME: &str = "token";

/// The OpenAPI document of a mount table.
pub fn document(table: &MountTable) -> OpenApi {
    let mut schemas: Schemas = Vec::new();
    let mut paths = Paths::new();
    let routes = table.each_route();
    for (mount, route) in &routes {
        for spec in route.ops {
            let (path, method, mut op) = operation(mount, route, spec, &mut schemas);
            add_links(&mut op, mount, route, spec, &routes);
            paths.add_path_operation(path, vec![method], op);
        }
    }
    // Shapes every operation shares.
    schemas.push(("ErrorBody".into(), error_body().into()));
    schemas.push(("Envelope".into(), envelope_base().into()));
    let error = ResponseBuilder::new()
        .description("An error: the reasons, never a secret.")
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
        .build();
    let by_name: BTreeMap<String, RefOr<Schema>> = schemas.into_iter().collect();
    let components = ComponentsBuilder::new()
        .schemas_from_iter(by_name)
        .response("Error", error)
        .security_scheme(
            TOKEN_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Vault-Token",
                "A KeyVault token (`Authorization: Bearer <token>` is accepted as well).",
            ))),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("KeyVault HTTP API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Generated by `keyvault openapi` from the engines' route declarations and the \
                     keyvault-api types; do not edit by hand. Paths are relative to /v1. It describes \
                     the default mounts. Conventions (Vault's): PUT is the same as POST; a listing is \
                     also the LIST method; a body of `null` is `{}`; fields no endpoint reads are named \
                     in the reply's `warnings`. See docs/api.md.",
                ))
                .build(),
        )
        .servers(Some([utoipa::openapi::Server::new("/v1")]))
        .paths(paths)
        .components(Some(components))
        .build()
}

/// The document as YAML.
pub fn yaml(table: &MountTable) -> Result<String, String> {
    let text = document(table).to_yaml().map_err(|e| format!("OpenAPI as YAML: {e}"))?;
    Ok(camel_case_links(&text))
}

/// utoipa 5.5 writes a Link object's `operationId` as `operation_id` (its struct lacks
/// the rename the other objects have); OpenAPI tools read only `operationId`. Renamed in
/// the lines of `links:` blocks only: a schema property of that name is left alone.
fn camel_case_links(yaml: &str) -> String {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut links_at: Option<usize> = None;
    let mut out = String::with_capacity(yaml.len());
    for line in yaml.lines() {
        let i = indent(line);
        if links_at.is_some_and(|at| i <= at && !line.trim().is_empty()) {
            links_at = None;
        }
        match links_at {
            Some(at) if i == at + 4 && line.trim_start().starts_with("operation_id:") => {
                out.push_str(&line.replacen("operation_id:", "operationId:", 1));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
        if line.trim() == "links:" {
            links_at = Some(i);
        }
    }
    out
}

fn operation(
    mount: &str,
    route: &Route,
    spec: &OpSpec,
    schemas: &mut Schemas,
) -> (String, HttpMethod, utoipa::openapi::path::Operation) {
    let mut segments: Vec<String> = Vec::new();
    let mut params = Vec::new();
    let full = format!("{mount}{}", route.pattern);
    for seg in full.trim_end_matches('/').split('/') {
        let name = seg.strip_prefix("{*").or_else(|| seg.strip_prefix('{')).and_then(|n| n.strip_suffix('}'));
        match name {
            Some(n) => {
                let many = seg.starts_with("{*");
                params.push(
                    ParameterBuilder::new()
                        .name(n)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .description(Some(if many {
                            "One or more path segments (`/` separated)."
                        } else {
                            "One path segment."
                        }))
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)).pattern(Some(
                            match route.names {
                                Some(names) if !many && (n == "name" || n == "user") => names,
                                _ => SEGMENT_PATTERN,
                            },
                        ))))
                        .build(),
                );
                segments.push(format!("{{{n}}}"));
            }
            None => segments.push(seg.to_owned()),
        }
    }
    let mut path = format!("/{}", segments.join("/"));
    let method = match spec.operation {
        Operation::Read => HttpMethod::Get,
        Operation::List => {
            path.push('/');
            params.push(
                ParameterBuilder::new()
                    .name("list")
                    .parameter_in(ParameterIn::Query)
                    .required(Required::True)
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["true"]))))
                    .build(),
            );
            HttpMethod::Get
        }
        Operation::Write => HttpMethod::Post,
        Operation::Delete => HttpMethod::Delete,
        Operation::Patch => HttpMethod::Patch,
    };
    if let Some(query) = spec.query {
        let reference = query(schemas);
        for (name, schema, required) in object_fields(&reference, schemas) {
            params.push(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Query)
                    .required(if required { Required::True } else { Required::False })
                    .schema(Some(schema))
                    .build(),
            );
        }
    }
    let id = operation_id(spec.operation, mount, route);
    let mut op = OperationBuilder::new()
        .operation_id(Some(id))
        .summary(Some(route.summary))
        .tag(mount.trim_end_matches('/'))
        .parameters((!params.is_empty()).then_some(params));
    if let Some(body) = spec.body {
        let content_type =
            if spec.operation == Operation::Patch { "application/merge-patch+json" } else { "application/json" };
        let schema = body(schemas);
        // No body is `{}` (Vault's): required only when `{}` lacks a member it needs.
        let required = object_fields(&schema, schemas).iter().any(|(_, _, required)| *required);
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(if required { Required::True } else { Required::False }))
                .content(content_type, ContentBuilder::new().schema(Some(schema)).build())
                .build(),
        ));
    }
    match spec.access {
        Access::Public | Access::Login | Access::LoginByRole => {}
        Access::Telemetry => {
            op = op
                .security(SecurityRequirement::new(TOKEN_SCHEME, Vec::<String>::new()))
                .security(SecurityRequirement::default());
        }
        _ => op = op.security(SecurityRequirement::new(TOKEN_SCHEME, Vec::<String>::new())),
    }
    // Client errors (400 bad input, 401/403 for a token, 404, 405, 409, 413, 415, 429)
    // and 503 (sealed, storage or token unavailable) all carry the error body.
    for status in ["4XX", "503"] {
        op = op.response(status, RefOr::Ref(Ref::new("#/components/responses/Error")));
    }
    // A status that answers either the error body or the success's envelope (a gateway
    // verdict, a deleted version) replaces the range.
    if let (Answer::Data(f), false) = (spec.reply, spec.data_also_on.is_empty()) {
        let either: RefOr<Schema> = utoipa::openapi::schema::OneOfBuilder::new()
            .item(enveloped("data", f(schemas)))
            .item(Ref::from_schema_name("ErrorBody"))
            .into();
        for status in spec.data_also_on {
            let response = ResponseBuilder::new()
                .description("The envelope with `data` as a success has it, or an error.")
                .content("application/json", json(either.clone()))
                .build();
            op = op.response(*status, response);
        }
    }
    // After the errors: a success that documents 503 (health) replaces it.
    for (status, response) in success(spec, schemas) {
        op = op.response(status, response);
    }
    (path, method, op.build())
}

/// `read_transit_keys_name`: unique per operation.
fn operation_id(operation: Operation, mount: &str, route: &Route) -> String {
    let full = format!("{mount}{}", route.pattern);
    format!("{}_{}", operation.name(), full.trim_end_matches('/').replace(['{', '}', '*'], "").replace(['/', '-'], "_"))
}

/// The names of a route's path parameters.
fn path_params(route: &Route) -> Vec<&'static str> {
    route
        .pattern
        .split('/')
        .filter_map(|seg| seg.strip_prefix("{*").or_else(|| seg.strip_prefix('{')).and_then(|n| n.strip_suffix('}')))
        .collect()
}

/// OpenAPI links from a write to what can follow it on the object it named (for stateful
/// testing, e.g. schemathesis): the reads, deletes and patches of its own path, and every
/// operation of the routes authorized on it (a transit key's encrypt, sign, rotate...).
/// Each passes the write's path parameters on.
fn add_links(
    op: &mut utoipa::openapi::path::Operation,
    mount: &str,
    route: &Route,
    spec: &OpSpec,
    routes: &[(String, &'static Route)],
) {
    let params = path_params(route);
    if spec.operation != Operation::Write || params.is_empty() {
        return;
    }
    let mut targets: Vec<(String, String)> = Vec::new();
    for (m, r) in routes {
        let same = m == mount && std::ptr::eq(*r, route);
        let on_it = m == mount && r.policy == Some(route.pattern) && path_params(r).iter().all(|p| params.contains(p));
        for next in r.ops {
            let wanted = if same {
                matches!(next.operation, Operation::Read | Operation::Delete | Operation::Patch)
            } else {
                on_it && next.operation != Operation::List
            };
            if wanted {
                let id = operation_id(next.operation, m, r);
                targets.push((id.clone(), id));
            }
        }
    }
    if targets.is_empty() {
        return;
    }
    for response in op.responses.responses.values_mut() {
        let RefOr::T(response) = response else { continue };
        for (name, id) in &targets {
            let mut link = utoipa::openapi::link::LinkBuilder::new().operation_id(id.clone());
            for p in &params {
                link = link.parameter(*p, format!("$request.path.{p}"));
            }
            response.links.insert(name.clone(), RefOr::T(link.build()));
        }
    }
}

/// The members of an object schema (followed through its reference): name, schema,
/// required.
fn object_fields(schema: &RefOr<Schema>, schemas: &Schemas) -> Vec<(String, RefOr<Schema>, bool)> {
    let resolved = match schema {
        RefOr::Ref(r) => {
            let name = r.ref_location.rsplit('/').next().unwrap_or_default();
            schemas.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone())
        }
        RefOr::T(_) => Some(schema.clone()),
    };
    match resolved {
        Some(RefOr::T(Schema::Object(o))) => {
            o.properties.iter().map(|(name, s)| (name.clone(), s.clone(), o.required.contains(name))).collect()
        }
        _ => Vec::new(),
    }
}

fn json(schema: impl Into<RefOr<Schema>>) -> utoipa::openapi::Content {
    ContentBuilder::new().schema(Some(schema)).build()
}

/// The envelope with this `data` (or `auth`).
fn enveloped(member: &str, schema: RefOr<Schema>) -> Schema {
    AllOfBuilder::new()
        .item(Ref::from_schema_name("Envelope"))
        .item(ObjectBuilder::new().schema_type(Type::Object).property(member, schema).required(member))
        .into()
}

fn success(spec: &OpSpec, schemas: &mut Schemas) -> Vec<(&'static str, utoipa::openapi::Response)> {
    let ok = |description: &str, content: Option<(&str, utoipa::openapi::Content)>| {
        let mut r = ResponseBuilder::new().description(description);
        if let Some((ty, c)) = content {
            r = r.content(ty, c);
        }
        r.build()
    };
    let warnings_only = || {
        ok(
            "Done, with warnings (the envelope, `data` null).",
            Some(("application/json", json(enveloped("data", ObjectBuilder::new().schema_type(Type::Null).into())))),
        )
    };
    match spec.reply {
        Answer::Undeclared => Vec::new(),
        Answer::Empty => vec![("204", ok("Done.", None)), ("200", warnings_only())],
        Answer::Data(f) => {
            vec![("200", ok("Success.", Some(("application/json", json(enveloped("data", f(schemas)))))))]
        }
        Answer::AnyData => {
            vec![("200", ok("Success.", Some(("application/json", json(enveloped("data", any_object(schemas)))))))]
        }
        Answer::DataOrEmpty(f) => vec![
            ("200", ok("Success.", Some(("application/json", json(enveloped("data", f(schemas))))))),
            ("204", ok("Done, nothing to report.", None)),
        ],
        Answer::Keys => vec![(
            "200",
            ok(
                "The names found (404 when there are none, as in Vault).",
                Some(("application/json", json(enveloped("data", schema_of::<keyvault_api::KeyList>(schemas))))),
            ),
        )],
        Answer::Bare(f) => vec![("200", ok("Success.", Some(("application/json", json(f(schemas))))))],
        Answer::Health(f) => {
            let body = f(schemas);
            vec![
                ("200", ok("All is well.", Some(("application/json", json(body.clone()))))),
                ("503", ok("Something is not (the body says what).", Some(("application/json", json(body))))),
            ]
        }
        Answer::Map(f) => {
            let map: Schema =
                ObjectBuilder::new().schema_type(Type::Object).additional_properties(Some(f(schemas))).into();
            vec![("200", ok("Success.", Some(("application/json", json(enveloped("data", map.into()))))))]
        }
        Answer::Wrapped => {
            let wrap = schema_of::<keyvault_api::sys::WrapInfo>(schemas);
            vec![("200", ok("The reply, wrapped.", Some(("application/json", json(enveloped("wrap_info", wrap))))))]
        }
        Answer::Unwrapped => vec![(
            "200",
            ok(
                "The wrapped reply, as it was.",
                Some(("application/json", json(ObjectBuilder::new().schema_type(Type::Object)))),
            ),
        )],
        Answer::Text => {
            vec![("200", ok("Plain text.", Some(("text/plain", json(ObjectBuilder::new().schema_type(Type::String))))))]
        }
        Answer::Auth => vec![(
            "200",
            ok(
                "A token, in the envelope's `auth`.",
                Some(("application/json", json(enveloped("auth", schema_of::<keyvault_api::auth::Auth>(schemas))))),
            ),
        )],
    }
}

fn error_body() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("errors", ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String)))
        .required("errors")
        .into()
}

/// Vault's reply envelope without `data` (each operation adds its own).
fn envelope_base() -> Schema {
    let string = || ObjectBuilder::new().schema_type(Type::String);
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("request_id", string())
        .property("lease_id", string())
        .property("renewable", ObjectBuilder::new().schema_type(Type::Boolean))
        .property("lease_duration", ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
        .property(
            "warnings",
            ArrayBuilder::new()
                .items(string())
                .description(Some("What the server did not do as asked (e.g. fields it ignored).")),
        )
        .required("request_id")
        .required("lease_id")
        .required("renewable")
        .required("lease_duration")
        .into()
}
