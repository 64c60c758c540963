// TEMPORARY STUB (not committed): the real module comes from the outbox branch.
use std::time::Duration;
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OutboxConfig {
    #[arg(long = "webhook-allow", env = "SHOAL_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Vec<String>,
}
pub struct Outbox;
pub enum Attempt {
    Delivered,
    Retry(Duration),
    Failed,
}
impl Outbox {
    pub fn new(_cfg: &OutboxConfig, _r: &mut prometheus_client::registry::Registry) -> anyhow::Result<Self> {
        Ok(Outbox)
    }
    pub fn delivery_id(parts: &[&str]) -> String {
        parts.join("/")
    }
    pub fn check_url(&self, url: &str) -> Result<url::Url, String> {
        url.parse().map_err(|e: url::ParseError| e.to_string())
    }
    #[allow(clippy::too_many_arguments)]
    pub async fn attempt(
        &self,
        _w: &crate::ha::Writer,
        _d: &mut crate::api::delivery::Delivery,
        _body: &[u8],
        _secret: Option<&str>,
        _timeout: Duration,
        _max: i32,
        _now: k8s_openapi::jiff::Timestamp,
    ) -> Result<Attempt, crate::ha::WriteError> {
        Ok(Attempt::Failed)
    }
}
