//! A small blocking client of the API (ureq), used by the tests and `v2l-bench serve`, and a
//! worked example of the protocol: submit a multipart form, follow the events, download.

use std::io::{BufRead, BufReader};
use std::time::Duration;

/// A multipart form being built.
#[derive(Default, Clone)]
pub struct Form {
    parts: Vec<(String, Option<String>, Vec<u8>)>,
}

impl Form {
    pub fn new() -> Form {
        Form::default()
    }

    pub fn text(mut self, name: &str, value: impl ToString) -> Form {
        self.parts
            .push((name.into(), None, value.to_string().into_bytes()));
        self
    }

    pub fn file(mut self, name: &str, bytes: Vec<u8>) -> Form {
        self.parts.push((name.into(), Some(name.into()), bytes));
        self
    }

    /// `(content type, body)`: the request as it goes on the wire.
    pub fn encode(&self) -> (String, Vec<u8>) {
        let boundary = "v2l-form-boundary-7d1c9e3a5b";
        let mut body = Vec::new();
        for (name, file, bytes) in &self.parts {
            body.extend(format!("--{boundary}\r\n").as_bytes());
            match file {
                Some(f) => body.extend(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                None => body.extend(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            body.extend(bytes);
            body.extend(b"\r\n");
        }
        body.extend(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    }
}

/// A response: status, body, and the `Retry-After` header if any.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub retry_after: Option<String>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Why a client request failed before an HTTP status came back.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {source}")]
    Http { url: String, source: ureq::Error },
    #[error("{0}")]
    Job(String),
}

/// A small blocking client of the server's API (tests, `v2l-bench serve`).
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

const BODY_LIMIT: u64 = 1 << 30;

impl Client {
    /// A client of the server at `base` (`http://127.0.0.1:8080`).
    pub fn new(base: &str, token: Option<String>) -> Client {
        // v2l-serve closes a kept-alive connection that sends no request within its
        // --header-timeout (10 s by default): a pooled connection idle that long would be reset
        // under the next request (a POST is not retried), so pooled connections expire first.
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .max_idle_age(Duration::from_millis(500))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    fn reply(
        &self,
        url: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Reply, ClientError> {
        let err = |source| ClientError::Http {
            url: url.to_string(),
            source,
        };
        let mut r = r.map_err(err)?;
        let retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_vec()
            .map_err(err)?;
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    pub fn get(&self, path: &str) -> Result<Reply, ClientError> {
        let url = format!("{}{path}", self.base);
        self.reply(&url, self.auth(self.agent.get(&url)).call())
    }

    pub fn delete(&self, path: &str) -> Result<Reply, ClientError> {
        let url = format!("{}{path}", self.base);
        self.reply(&url, self.auth(self.agent.delete(&url)).call())
    }

    pub fn post(&self, path: &str, form: &Form) -> Result<Reply, ClientError> {
        let url = format!("{}{path}", self.base);
        let (ct, body) = form.encode();
        let req = self.auth(self.agent.post(&url)).header("Content-Type", ct);
        self.reply(&url, req.send(&body[..]))
    }

    /// Follows `/v1/videos/{id}/events` until the `end` event; returns every event's data.
    pub fn events(&self, id: &str) -> Result<Vec<serde_json::Value>, ClientError> {
        let url = format!("{}/v1/videos/{id}/events", self.base);
        let err = |source| ClientError::Http {
            url: url.clone(),
            source,
        };
        let r = self.auth(self.agent.get(&url)).call().map_err(err)?;
        let mut out = Vec::new();
        let mut event = String::new();
        for line in BufReader::new(r.into_body().into_reader()).lines() {
            let line = line.map_err(|e| err(ureq::Error::Io(e)))?;
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                out.push(serde_json::from_str(d).unwrap_or(serde_json::Value::Null));
                if event == "end" {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Polls a job until it ends (or `timeout`); returns its final record.
    pub fn wait(&self, id: &str, timeout: Duration) -> Result<serde_json::Value, ClientError> {
        let started = std::time::Instant::now();
        loop {
            let j = self.get(&format!("/v1/videos/{id}"))?.json();
            if matches!(
                j.get("state").and_then(|v| v.as_str()),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return Ok(j);
            }
            if started.elapsed() > timeout {
                return Err(ClientError::Job(format!(
                    "job {id} still {} after {timeout:?}",
                    j.get("state").unwrap_or(&serde_json::Value::Null)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Submits a video job, follows its events to the end and downloads the mp4:
    /// `(job record, mp4 bytes)`.
    pub fn generate(
        &self,
        form: &Form,
        timeout: Duration,
    ) -> Result<(serde_json::Value, Vec<u8>), ClientError> {
        let r = self.post("/v1/videos", form)?;
        if r.status != 202 {
            return Err(ClientError::Job(format!(
                "POST /v1/videos: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )));
        }
        let id = r
            .json()
            .get("id")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        // The events stream ends the moment the job does; polling is the fallback.
        if self.events(&id).is_err() {
            self.wait(&id, timeout)?;
        }
        let job = self.wait(&id, timeout)?;
        if job.get("state").and_then(|v| v.as_str()) != Some("succeeded") {
            return Err(ClientError::Job(format!("job {id}: {job}")));
        }
        let video = self.get(&format!("/v1/videos/{id}/content"))?;
        Ok((job, video.body))
    }
}
