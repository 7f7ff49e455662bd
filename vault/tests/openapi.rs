//! The OpenAPI document (docs/openapi.yaml) is the code's: every operation declares what
//! it takes and answers, and the committed file is what `keyvault openapi` generates.

use keyvault::logical::Operation;
use keyvault::logical::openapi;

#[test]
fn every_operation_of_every_engine_declares_its_reply_and_every_write_its_body() {
    for kind in keyvault::engines::KINDS {
        for route in kind.info.routes {
            for op in route.ops {
                let what = format!("{} {:?} {}", kind.info.name, route.pattern, op.operation.name());
                assert!(op.reply.is_declared(), "{what}: no reply declared");
                if matches!(op.operation, Operation::Write | Operation::Patch) {
                    assert!(op.body.is_some(), "{what}: no body declared");
                }
            }
        }
    }
}

/// docs/openapi.yaml is generated, never edited: regenerate it with
/// `cargo run -p keyvault -- openapi > docs/openapi.yaml`.
#[test]
fn the_committed_document_is_the_generated_one() {
    let table = keyvault::service::describe_mounts(&keyvault::config::default_mounts()).unwrap();
    let generated = openapi::yaml(&table).unwrap();
    let committed = include_str!("../../docs/openapi.yaml");
    assert!(
        generated == committed,
        "docs/openapi.yaml is not what `keyvault openapi` generates: run \
         `cargo run -p keyvault -- openapi > docs/openapi.yaml` and commit it"
    );
    // Every route of the default mounts is in it, with its schemas resolvable.
    let doc: serde_json::Value = serde_json::to_value(openapi::document(&table)).unwrap();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let text = serde_json::to_string(&doc).unwrap();
    for r in text.split("#/components/schemas/").skip(1) {
        let name = r.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "{name} is referred to but not defined");
    }
}
