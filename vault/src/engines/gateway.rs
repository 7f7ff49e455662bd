//! The gateway check, mounted at `gateway/` by default: producers registered by identity,
//! and `verify`, which a gateway calls to check a producer's signed request (freshness,
//! replay, tenant mapping). Every verdict is an audit event.

use std::sync::Arc;

use async_trait::async_trait;
use keyvault_api::gateway::{BatchVerdicts, Producer, Verdict, VerifyBatch, VerifyItem};

use super::EngineKind;
use crate::auth::revocation::{Identity, Revocations};
use crate::error::{Error, Result};
use crate::gateway::{Gateway, VERDICT_STATUSES, validate_identity};
use crate::logical::openapi::Answer;
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Operation, Params, Reply, Request, Route};
use crate::policy::Capability;
use crate::shared::Core;
use crate::transit::Transit;

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: "gateway",
        description: "Ed25519 request checks for gateways: producers, freshness, replay, tenant mapping",
        auth: false,
        routes: ROUTES,
    },
    fixed_at: None,
    once: true,
    takes_options: false,
    build: |core, _| Ok(Arc::new(GatewayEngine::new(core))),
};

fn identity(_: Operation, p: &mut Params) -> Result<()> {
    validate_identity(p.get("identity").unwrap_or_default())
}

const ROUTES: &[Route] = &[
    Route::new("producers", "list producers", &[OpSpec::list(Access::Needs(Capability::List))]),
    Route::new(
        "producers/{*identity}",
        "register (or replace), read, delete a producer",
        &[
            OpSpec::write(Access::CreateOrUpdate).body::<Producer>().answers(Answer::Empty),
            OpSpec::read(Access::Needs(Capability::Read)).data::<Producer>(),
            OpSpec::delete(Access::Needs(Capability::Delete)).answers(Answer::Empty),
        ],
    )
    .normalize(identity),
    // Records each nonce it accepts (replay protection), so it changes state; but that
    // state is only the replay cache, and every verdict is in the request's own audit
    // entry, written before the reply: the route declares `no_intent` (a check waits for
    // the nonces' flush and its entry's fsync, not for an intent's fsync first). A crash
    // between the two loses no verdict a client saw; at worst a nonce is consumed whose
    // verdict no one received.
    Route::new(
        "verify",
        "check one signed request (the reply's status is the verdict's) or a `batch`",
        &[OpSpec::write(Access::Needs(Capability::Verify))
            .no_intent()
            .body_either::<VerifyItem, VerifyBatch>()
            .data_either::<Verdict, BatchVerdicts>()
            .data_also_on(VERDICT_STATUSES)],
    ),
];

#[derive(Debug)]
pub struct GatewayEngine {
    gateway: Gateway,
    transit: Transit,
    revocations: Revocations,
}

impl GatewayEngine {
    fn new(core: &Arc<Core>) -> Self {
        GatewayEngine {
            gateway: Gateway::new(core.store.clone()).with_clock_offset(core.settings.tokens.max_clock_offset),
            transit: Transit::new(core.store.clone(), core.keys.clone(), core.names.clone()),
            revocations: Revocations::new(core.store.clone()),
        }
    }

    async fn verify(&self, req: &mut Request) -> Result<Reply> {
        let (items, batch) = if req.has_field("batch")? {
            let b: VerifyBatch = req.data()?;
            if b.batch.is_empty() {
                return Err(Error::invalid("an empty batch"));
            }
            (b.batch, true)
        } else {
            (vec![req.data::<VerifyItem>()?], false)
        };
        let verdicts = self.gateway.verify(&items, &self.transit, &self.revocations).await?;
        let caller = req.caller()?.claims.acc.clone();
        for v in &verdicts {
            crate::metrics::get().gateway_verdict(if v.valid { "valid" } else { v.reason.unwrap_or("refused") });
        }
        let events = verdicts
            .iter()
            .map(|v| {
                crate::audit::event(
                    "event",
                    serde_json::json!({
                        "event": if v.valid { "telemetry.accepted" } else { "telemetry.rejected" },
                        "request_id": req.request_id,
                        "producer": v.identity, "reason": v.reason, "key_id": v.key_id, "status": v.status,
                        "caller": caller,
                    }),
                )
            })
            .collect();
        // Written with the request's own entry, before the reply (one fsync for both).
        req.audit.lock().unwrap_or_else(|p| p.into_inner()).events = events;
        let view = |v: &crate::gateway::Verdict, with_status: bool| Verdict {
            valid: v.valid,
            reason: v.reason.map(str::to_owned),
            key_id: v.key_id.clone(),
            status: with_status.then_some(v.status),
        };
        if batch {
            return Reply::data(&BatchVerdicts { batch_results: verdicts.iter().map(|v| view(v, true)).collect() });
        }
        let v = &verdicts[0];
        Ok(Reply::data(&view(v, false))?.status(v.status))
    }
}

#[async_trait]
impl Engine for GatewayEngine {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        self.gateway.producer_raw(req.param("identity")).await
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        let identity = req.param("identity").to_owned();
        match (req.route.pattern, req.operation) {
            ("producers", _) => Reply::keys(self.gateway.list_producers().await?),
            ("producers/{*identity}", Operation::Write) => {
                let p: Producer = req.data()?;
                // A certificate the kill switch revoked cannot be pinned again: a
                // re-registration (a reconcile job's, say) would otherwise enable again a
                // producer the kill switch disabled, for its other pins. Restore the
                // certificate first (`sys/restore-identity`), or leave it out.
                if identity.starts_with("spiffe://")
                    && self.revocations.identity_state(&Identity::Spiffe(identity.clone())).await?.blocks_logins
                {
                    return Err(Error::invalid(format!(
                        "{identity} is revoked (kill switch): restore it before registering it again"
                    )));
                }
                for fp in &crate::gateway::validate_producer(p.clone())?.cert_sha256 {
                    if self.revocations.identity_state(&Identity::Certificate(fp.clone())).await?.blocks_logins {
                        return Err(Error::invalid(format!(
                            "certificate {fp} is revoked (kill switch): leave it out of cert_sha256, or restore it first"
                        )));
                    }
                }
                self.gateway.put_producer(&identity, p, req.existing.as_deref()).await?;
                Ok(Reply::empty())
            }
            ("producers/{*identity}", Operation::Read) => {
                let p = self.gateway.producer(&identity).await?;
                Reply::data(&p.ok_or_else(|| Error::NotFound(format!("no producer {identity}")))?)
            }
            ("producers/{*identity}", Operation::Delete) => {
                self.gateway.delete_producer(&identity).await?;
                Ok(Reply::empty())
            }
            ("verify", _) => self.verify(req).await,
            _ => Err(Error::UnsupportedOperation),
        }
    }
}
