//! The client side of the local API: [`NodeClient`] talks to the node running on a store,
//! which it finds through the `node.json` that node publishes ([`NodeInfo`]).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{AddRequest, ApiError, FetchBody, FetchLine, ModelInfo};
use crate::discovery::PeerInfo;

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
            let msg = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| status.to_string());
            Err(ClientError::Node(msg))
        }
    }
}
