//! shoal: a highly available Kubernetes workflow operator.
//!
//! Layout (see docs/architecture.md):
//! - [`api`]: the custom resource types and their admission rules;
//! - [`core`]: pure logic with no kube client (spec checks, DAG planning, schedule math);
//! - [`outbox`]: the effects outbox (webhook deliveries: ids, signing, retries, egress policy);
//! - [`metrics`]: controller-runtime's, client-go's and the process's metrics, and exemplars;
//! - [`operator`]: the `shoal run` process (health, metrics, controllers);
//! - [`telemetry`]: logs (text or JSON) and OpenTelemetry traces with deterministic ids;
//! - [`dev`]: the local control plane used by `shoal dev`, the tests and the load tests.

pub mod api;
pub mod controllers;
pub mod core;
pub mod dev;
pub mod ha;
pub mod loadtest;
pub mod metrics;
pub mod operator;
pub mod outbox;
pub mod telemetry;
