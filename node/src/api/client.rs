//! The client side of the local API: [`NodeClient`] talks to the node running on a store,
//! which it finds through the `node.json` that node publishes ([`NodeInfo`]).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{
    fleet::FleetView,
    lifecycle::{ModelsBody, PinBody},
    AddRequest, ApiError, FetchBody, FetchLine, ModelInfo,
};
use crate::{
    discovery::PeerInfo,
    store::{
        lifecycle::{GcReport, Removed},
        verify::VerifyReport,
    },
};

/// What a running node publishes in `MESH_HOME/node.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's process id.
    pub pid: u32,
    /// Its QUIC address.
    pub listen: SocketAddr,
    /// Its local API address.
    pub api: Option<SocketAddr>,
    /// Bearer token for the API's mutating calls.
    pub token: String,
}

impl NodeInfo {
    /// The file a node running on `home` publishes.
    pub fn path(home: &Path) -> PathBuf {
        home.join("node.json")
    }

    /// Reads `node.json`, if a node published one.
    pub fn read(home: &Path) -> Option<Self> {
        let bytes = std::fs::read(Self::path(home)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// A client for a node running on the same store.
#[derive(Clone, Debug)]
pub struct NodeClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// A failed API call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The node did not answer.
    #[error("the node's local API at {0} does not answer: {1}")]
    Unreachable(String, reqwest::Error),
    /// The node answered with an error.
    #[error("{0}")]
    Node(String),
    /// The node answered with an error that has its own exit code.
    #[error("{message}")]
    Failed {
        /// The one-line error.
        message: String,
        /// The exit code.
        code: u8,
        /// A hint, if any.
        hint: Option<String>,
    },
}

impl NodeClient {
    /// A client for the node running on `home`, if one published its API and answers.
    pub async fn discover(home: &Path) -> Option<Self> {
        let info = NodeInfo::read(home)?;
        let api = info.api?;
        let client = Self {
            base: format!("http://{api}"),
            token: info.token,
            http: reqwest::Client::new(),
        };
        let health = client
            .http
            .get(format!("{}/health", client.base))
            .send()
            .await;
        health.ok()?.error_for_status().ok()?;
        Some(client)
    }

    /// `POST /v1/add`.
    pub async fn add(&self, req: &AddRequest) -> Result<ModelInfo, ClientError> {
        let resp = self
            .http
            .post(format!("{}/v1/add", self.base))
            .bearer_auth(&self.token)
            .json(req)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        Self::json(resp).await
    }

    /// `GET /v1/status`: version, listen address and counters.
    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/status", self.base))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        Self::json(resp).await
    }

    /// `GET /v1/peers`.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/peers", self.base))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        Self::json(resp).await
    }

    /// `POST /v1/fetch`: runs a fetch in the node, calling `on_line` for each line it streams.
    pub async fn fetch(
        &self,
        body: &FetchBody,
        mut on_line: impl FnMut(FetchLine),
    ) -> Result<(), ClientError> {
        let mut resp = self
            .http
            .post(format!("{}/v1/fetch", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        if !resp.status().is_success() {
            return Self::json::<serde_json::Value>(resp).await.map(|_| ());
        }
        let mut buf = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| ClientError::Node(format!("the node's fetch stream broke: {e}")))?
        {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let line = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Node(format!("bad line from the node: {e}")))?;
                on_line(line);
            }
        }
        Ok(())
    }

    /// `POST /v1/rm`.
    pub async fn rm(&self, models: &[String]) -> Result<Vec<Removed>, ClientError> {
        let body = ModelsBody {
            models: models.to_vec(),
        };
        self.post("/v1/rm", &body).await
    }

    /// `POST /v1/gc`.
    pub async fn gc(&self) -> Result<GcReport, ClientError> {
        self.post("/v1/gc", &()).await
    }

    /// `POST /v1/verify`.
    pub async fn verify(&self, models: &[String]) -> Result<VerifyReport, ClientError> {
        let body = ModelsBody {
            models: models.to_vec(),
        };
        self.post("/v1/verify", &body).await
    }

    /// `POST /v1/pin`.
    pub async fn pin(&self, model: &str, pin: bool) -> Result<ModelInfo, ClientError> {
        let body = PinBody {
            model: model.to_string(),
            pin,
        };
        self.post("/v1/pin", &body).await
    }

    /// `GET /v1/fleet`: what the fleet page shows.
    pub async fn fleet(&self) -> Result<FleetView, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/fleet", self.base))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        Self::json(resp).await
    }

    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        Self::json(resp).await
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Result<Vec<ModelInfo>, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/models", self.base))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        Self::json(resp).await
    }

    async fn json<T: for<'de> Deserialize<'de>>(resp: reqwest::Response) -> Result<T, ClientError> {
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Node(e.to_string()))?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Node(e.to_string()))
        } else {
            match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(ApiError {
                    error,
                    code: Some(code),
                    hint,
                }) => Err(ClientError::Failed {
                    message: error,
                    code,
                    hint,
                }),
                Ok(e) => Err(ClientError::Node(e.error)),
                Err(_) => Err(ClientError::Node(status.to_string())),
            }
        }
    }
}
