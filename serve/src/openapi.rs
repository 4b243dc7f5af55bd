//! The OpenAPI 3.1 document served at `/openapi.json`, written by hand next to the handlers it
//! describes (a snapshot test keeps changes to it deliberate).

use serde_json::{json, Value};

use crate::config::{EngineFacts, RequestLimits};

/// What the document states about this server: its auth and the bounds its checks apply, so
/// a schema-valid request is one the server can take and generated clients send good ones.
pub struct Described<'a> {
    /// `--token-file` given: `/v1/*` needs a bearer token and may answer 401.
    pub token: bool,
    pub limits: &'a RequestLimits,
    pub facts: &'a EngineFacts,
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn id_param(what: &str) -> Value {
    json!([{"name": "id", "in": "path", "required": true, "description": what, "schema": {"type": "string"}}])
}

pub fn document(d: &Described) -> Value {
    let (limits, facts) = (d.limits, d.facts);
    let side = |default: Option<usize>| {
        let mut v = json!({"type": "integer", "minimum": facts.multiple, "multipleOf": facts.multiple,
            "maximum": (limits.pixels / facts.multiple.max(1)) / facts.multiple.max(1) * facts.multiple.max(1),
            "description": format!("A multiple of {} (8 × the DiT's patch size); height × width at most {} (--max-pixels).", facts.multiple, limits.pixels)});
        if let (Some(x), Some(o)) = (default, v.as_object_mut()) {
            o.insert("default".into(), json!(x));
        }
        v
    };
    let mut frames = json!({"type": "integer", "minimum": 1, "maximum": limits.frames,
        "description": format!("1 + 4k, at most {} (--max-frames).", limits.frames)});
    if let (Some(f), Some(o)) = (facts.default_frames, frames.as_object_mut()) {
        o.insert("default".into(), json!(f));
    }
    // Defaults and the sampler names from the runtime's request contract, not spelled here.
    let job_error_kinds: Vec<&str> = crate::store::JobErrorKind::ALL
        .iter()
        .map(|k| k.name())
        .collect();
    let defaults = v2l_runtime::request::Settings::default();
    let samplers: Vec<&str> = v2l_runtime::pipeline::Sampler::ALL
        .iter()
        .map(|s| s.name())
        .collect();
    let steps = json!({"type": "integer", "minimum": 1, "maximum": limits.steps.min(facts.scheduler_steps), "default": defaults.steps});
    let bad = error_response("A bad field: `error.field` names it.");
    let page_params = [
        json!({"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}),
        json!({"name": "after", "in": "query", "required": false, "description": "The `next` of the page before: a place that holds when items are added or deleted.", "schema": {"type": "string", "pattern": "^[0-9a-f]{48}$"}}),
    ];
    let not_found = error_response("No such id.");
    let full = json!({
        "description": "The queue is full; retry after `Retry-After` seconds.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    });
    let job = json!({"description": "The job.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}});
    let timeout = error_response("The body did not arrive within --body-timeout.");
    let lora_links = json!({"GetLora": {"operationId": "getLora", "parameters": {"id": "$response.body#/lora_id"}}});
    let lora_created = json!({"description": "The LoRA's id.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LoraId"}}}, "links": lora_links});
    let next = json!({"type": ["string", "null"], "description": "`after` for the next page; null on the last."});
    let job_list = json!({"type": "object", "required": ["videos", "total", "limit", "next"], "properties": {
        "videos": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
        "total": {"type": "integer", "description": "Jobs matching, in all pages."},
        "limit": {"type": "integer"}, "next": next}});
    let lora_list = json!({"type": "object", "required": ["loras", "total", "limit", "next"], "properties": {
        "loras": {"type": "array", "items": {"type": "object", "required": ["lora_id", "bytes", "last_used"], "properties": {
            "lora_id": {"type": "string"}, "bytes": {"type": "integer"},
            "last_used": {"type": "number", "description": "Unix seconds: when a request last named it (a job, an upload, a download)."},
            "url": {"type": "string"}}}},
        "total": {"type": "integer"}, "limit": {"type": "integer"}, "next": next}});
    let list_videos = json!({
        "operationId": "listVideos",
        "summary": "The video jobs, newest first, each as getVideo gives it: ended ones until --keep-jobs and --keep-hours delete them.",
        "parameters": [
            {"name": "state", "in": "query", "required": false, "schema": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]}},
            page_params[0].clone(), page_params[1].clone()],
        "responses": {"200": {"description": "A page of jobs.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobList"}}}}, "400": bad.clone()}});
    let list_loras = json!({
        "operationId": "listLoras",
        "summary": "The stored LoRAs, most recently used first (the least recently used are deleted first, beyond --keep-loras and --keep-lora-mb).",
        "parameters": [page_params[0].clone(), page_params[1].clone()],
        "responses": {"200": {"description": "A page of LoRAs.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LoraList"}}}}, "400": bad.clone()}});
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "v2l-serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "First frame + prompt + reference clip (or LoRA) → video, on a v2l engine (text alone → video on a Wan T2V engine). Jobs are asynchronous: submit, follow the events, download the mp4. Predicted LoRAs are cached by content hash; `/v1/*` takes `Authorization: Bearer <token>` when the server has a token."
        },
        "components": {
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["kind", "message"], "properties": {
                    "kind": {"type": "string", "description": "Stable: bad_field, bad_request, too_large, not_found, not_ready, queue_full, shutting_down, no_worker, unauthorized, forbidden_host, forbidden_origin, method_not_allowed, prediction_failed, internal."},
                    "field": {"type": "string", "description": "The request field at fault."},
                    "message": {"type": "string"}}}}},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "string"},
                    "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    "step": {"type": "integer"}, "steps": {"type": "integer"}, "progress": {"type": "number"},
                    "created_at": {"type": "number"}, "started_at": {"type": ["number", "null"]}, "finished_at": {"type": ["number", "null"]},
                    "timings": {"type": "object", "additionalProperties": {"type": "number"}, "description": "Stage → milliseconds."},
                    "error": {"type": ["object", "null"], "properties": {"kind": {"type": "string", "enum": job_error_kinds}, "message": {"type": "string"}}},
                    "lora_id": {"type": ["string", "null"]}, "lora_cached": {"type": ["boolean", "null"]},
                    "params": {"type": "object"}, "content_url": {"type": "string"}}},
                "Accepted": {"type": "object", "properties": {"id": {"type": "string"}, "state": {"const": "queued"}, "status_url": {"type": "string"}, "events_url": {"type": "string"}, "content_url": {"type": "string"}}},
                "Event": {"type": "object", "required": ["data"], "properties": {"event": {"enum": ["progress", "end"]}, "data": {"type": "string", "description": "JSON: {state, step, steps}."}}},
                "Cancel": {"type": "object", "required": ["id", "state"], "properties": {"id": {"type": "string"}, "state": {"enum": ["cancelled", "cancelling", "deleted"]}}},
                "Ready": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}, "queue_depth": {"type": "integer"}, "running": {"type": "integer"}}},
                "LoraId": {"type": "object", "properties": {"lora_id": {"type": "string"}, "cached": {"type": "boolean"}, "url": {"type": "string"}}},
                "VideoForm": {"type": "object", "required": ["image"],
                    "oneOf": [{"required": ["prompt"]}, {"required": ["prompt_embeds"]}],
                    "not": {"anyOf": [{"required": ["reference", "lora_id"]}, {"required": ["reference", "lora"]}, {"required": ["lora_id", "lora"]}]},
                    "description": "`prompt` or `prompt_embeds` (not both); at most one of `reference`, `lora_id`, `lora`.",
                    "properties": {
                    "image": {"type": "string", "contentMediaType": "application/octet-stream", "description": "First frame: PNG, JPEG, WebP (or a video: its first frame). Resized to height × width."},
                    "reference": {"type": "string", "contentMediaType": "application/octet-stream", "description": "A reference clip (mp4, mov, mkv, webm, avi, gif), or a safetensors file with a `reference_u8` tensor [frames, height, width, 3] as `v2l-run --reference` takes: its predicted LoRA (cached)."},
                    "lora_id": {"type": "string", "pattern": "^[0-9a-f]{32}$", "description": "A LoRA stored on this server."},
                    "lora": {"type": "string", "contentMediaType": "application/octet-stream", "description": "A LoRA file (diffusers/PEFT, kohya or ComfyUI safetensors)."},
                    "lora_scale": {"type": "number", "default": defaults.lora_scale, "description": "The LoRA's multiplier; for `reference`, upstream's LoRA weight, which is also its alpha (alpha = weight²), so within ±1000 there. Finite, within ±1e4."},
                    "prompt": {"type": "string", "description": "At most 16 KiB of UTF-8."},
                    "prompt_embeds": {"type": "string", "contentMediaType": "application/octet-stream", "description": "safetensors with `prompt_embeds` and `negative_prompt_embeds`, float32 [1, L, D]."},
                    "negative_prompt": {"type": "string", "default": ""},
                    "max_sequence_length": {"type": "integer", "minimum": 1, "maximum": facts.text_sequence_length.max(1), "description": "Prompt tokens (default: the DiT's)."},
                    "frames": frames,
                    "height": side(facts.default_height), "width": side(facts.default_width),
                    "steps": steps.clone(), "guidance": {"type": "number", "default": defaults.guidance, "description": "Finite, within ±1e4."},
                    "seed": {"type": "integer", "minimum": 0, "maximum": u64::MAX, "default": 0}, "fps": {"type": "integer", "minimum": 1, "maximum": 240, "default": 8},
                    "scheduler": {"type": "string", "enum": samplers, "description": "A CogVideoX engine's sampler: `ddim` (diffusers' DDIMScheduler, VideoX-Fun's DDIM_Origin), `cogvideox-ddim` or `dpm` (CogVideoXDPMScheduler; its step noise comes from `seed`). Default: the engine's; Wan engines take none."},
                    "cache": {"type": "string", "pattern": "^first-block:[0-9.eE+-]+$", "description": "Step caching, off by default: `first-block:THRESHOLD` is diffusers' First Block Cache (the DiT's blocks after the first run only when the first block's output moved by more than THRESHOLD since they last ran). CogVideoX and Wan engines."}}},
                "LoraForm": {"type": "object",
                    "oneOf": [{"required": ["reference"]}, {"required": ["lora"]}],
                    "description": "`reference` (a clip to predict from) or `lora` (a file to store): exactly one.",
                    "properties": {
                    "reference": {"type": "string", "contentMediaType": "application/octet-stream"},
                    "lora": {"type": "string", "contentMediaType": "application/octet-stream"},
                    "lora_scale": {"type": "number", "default": 1.0, "minimum": -1000, "maximum": 1000, "description": "For `reference`: upstream's LoRA weight, also the LoRA's alpha (alpha = weight²)."},
                    "height": side(facts.default_height), "width": side(facts.default_width)}}
            }
        },
        "paths": {
            "/v1/videos": {"post": {
                "operationId": "createVideo",
                "summary": "Submit a video job.",
                "requestBody": {"required": true, "content": {"multipart/form-data": {"schema": {"$ref": "#/components/schemas/VideoForm"}}}},
                "responses": {
                    "202": {"description": "Queued.", "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
                        "links": {
                            "GetVideo": {"operationId": "getVideo", "parameters": {"id": "$response.body#/id"}},
                            "CancelVideo": {"operationId": "cancelVideo", "parameters": {"id": "$response.body#/id"}},
                            "VideoEvents": {"operationId": "videoEvents", "parameters": {"id": "$response.body#/id"}},
                            "VideoContent": {"operationId": "videoContent", "parameters": {"id": "$response.body#/id"}}}},
                    "400": bad, "404": not_found, "408": timeout.clone(), "413": error_response("The body is larger than --max-upload-mb."), "429": full, "503": error_response("Shutting down.")}}},
            "/v1/videos/{id}": {
                "get": {"operationId": "getVideo", "summary": "A job's state, progress, timings and error.", "parameters": id_param("job id"), "responses": {"200": job, "404": not_found}},
                "delete": {"operationId": "cancelVideo", "summary": "Cancel a job: a queued one at once (state `cancelled`), a running one after its current denoising step, or frame batch of its reference clip's encode or its decode (`cancelling`, then `cancelled`). An ended job is deleted with its files and its result (`deleted`; then 404). A job's decoded inputs are removed when it ends, whatever the outcome.", "parameters": id_param("job id"),
                    "responses": {"200": {"description": "Cancelled, or deleted.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Cancel"}}}},
                        "202": {"description": "Cancelling.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Cancel"}}}},
                        "404": not_found}}},
            "/v1/videos/{id}/events": {"get": {"operationId": "videoEvents", "summary": "Server-sent events: `progress` with {state, step, steps} as the job moves, then one `end`.", "parameters": id_param("job id"),
                "responses": {"200": {"description": "An event stream.", "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/Event"}}}}, "404": not_found}}},
            "/v1/videos/{id}/content": {"get": {"operationId": "videoContent", "summary": "The video (H.264 mp4).", "parameters": id_param("job id"),
                "responses": {"200": {"description": "The mp4.", "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}}, "404": not_found, "409": error_response("Not finished.")}}},
            "/v1/loras": {"post": {
                "operationId": "createLora",
                "summary": "A reference clip's predicted LoRA (waits for the prediction), or an uploaded LoRA file: its id.",
                "requestBody": {"required": true, "content": {"multipart/form-data": {"schema": {"$ref": "#/components/schemas/LoraForm"}}}},
                "responses": {"200": {"description": "Already stored.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LoraId"}}}, "links": lora_links.clone()},
                    "201": lora_created, "400": bad, "408": timeout, "413": error_response("Too large."), "429": full,
                    "500": error_response("The prediction failed."), "503": error_response("Shutting down.")}}},
            "/v1/loras/{id}": {"get": {"operationId": "getLora", "summary": "The LoRA as a diffusers/PEFT safetensors file.", "parameters": id_param("lora id"),
                "responses": {"200": {"description": "safetensors", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}, "404": not_found}},
                "delete": {"operationId": "deleteLora", "summary": "Delete a stored LoRA: its file and its cache entry; later requests naming it get 404. The server also deletes the least recently used beyond --keep-loras and --keep-lora-mb.", "parameters": id_param("lora id"),
                    "responses": {"200": {"description": "Deleted.", "content": {"application/json": {"schema": {"type": "object", "required": ["lora_id", "state"], "properties": {"lora_id": {"type": "string"}, "state": {"const": "deleted"}}}}}},
                        "404": not_found, "409": error_response("A queued or running job uses it.")}}},
            "/healthz": {"get": {"operationId": "health", "summary": "Liveness.", "responses": {"200": {"description": "Alive.", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/readyz": {"get": {"operationId": "ready", "summary": "Readiness: 503 while shutting down, with no worker left running, with a full queue, or while the state directory cannot take writes.",
                "responses": {"200": {"description": "Ready.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ready"}}}},
                    "503": {"description": "Not taking jobs.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ready"}}}}}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus text: queue depth, stage latency histograms, LoRA cache hits and bytes, errors by kind.", "responses": {"200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.", "responses": {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {"type": "object"}}}}}}}
        }
    });
    // Outside the one `json!` above, which is at the macro's recursion limit.
    doc["components"]["schemas"]["JobList"] = job_list;
    doc["components"]["schemas"]["LoraList"] = lora_list;
    doc["paths"]["/v1/videos"]["get"] = list_videos;
    doc["paths"]["/v1/loras"]["get"] = list_loras;
    if !facts.pipeline.takes_image() {
        // A text-to-video engine (Wan T2V) takes no first frame, and refuses one.
        let form = doc
            .pointer_mut("/components/schemas/VideoForm")
            .and_then(|f| f.as_object_mut());
        if let Some(form) = form {
            form.insert("required".into(), json!([]));
            if let Some(props) = form.get_mut("properties").and_then(|p| p.as_object_mut()) {
                props.remove("image");
            }
        }
    }
    // Every route checks the `Host` (and a browser's `Origin`) before anything else.
    let forbidden = error_response(
        "The `Host` names another server (not an IP address, `localhost` or an --allow-host name), or a browser request from another origin came without the token of --token-file.",
    );
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for op in paths
            .values_mut()
            .filter_map(|o| o.as_object_mut())
            .flat_map(|ops| ops.values_mut())
        {
            if let Some(r) = op.get_mut("responses").and_then(|r| r.as_object_mut()) {
                r.insert("403".into(), forbidden.clone());
            }
        }
    }
    if d.token {
        // Only `/v1/*` is guarded; probes, metrics and this document stay open.
        let unauthorized = error_response("No or a wrong `Authorization: Bearer <token>`.");
        if let Some(c) = doc.get_mut("components").and_then(|c| c.as_object_mut()) {
            c.insert(
                "securitySchemes".into(),
                json!({"bearer": {"type": "http", "scheme": "bearer"}}),
            );
        }
        if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
            for (path, ops) in paths.iter_mut() {
                let Some(ops) = ops.as_object_mut() else {
                    continue;
                };
                for op in ops.values_mut().filter_map(|o| o.as_object_mut()) {
                    if path.starts_with("/v1/") {
                        op.insert("security".into(), json!([{"bearer": []}]));
                        let responses = op.get_mut("responses").and_then(|r| r.as_object_mut());
                        if let Some(r) = responses {
                            r.insert("401".into(), unauthorized.clone());
                        }
                    }
                }
            }
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn facts() -> EngineFacts {
        EngineFacts {
            fixed_size: None,
            key: "k".into(),
            default_frames: Some(17),
            default_height: Some(64),
            default_width: Some(64),
            multiple: 16,
            text_embed_dim: 32,
            text_sequence_length: 16,
            has_text_encoder: true,
            has_hypernet: true,
            scheduler_steps: 1000,
            modules: vec![],
            targets: vec![],
            pipeline: v2l_contracts::PipelineKind::CogvideoxI2v,
        }
    }

    #[test]
    fn the_document_is_stable() {
        let (limits, facts) = (RequestLimits::default(), facts());
        let doc = document(&Described {
            token: false,
            limits: &limits,
            facts: &facts,
        });
        insta::assert_snapshot!(serde_json::to_string_pretty(&doc).unwrap_or_default());
    }

    #[test]
    fn security_and_401_appear_only_with_a_token() {
        let (limits, facts) = (RequestLimits::default(), facts());
        let open = document(&Described {
            token: false,
            limits: &limits,
            facts: &facts,
        });
        assert!(!open.to_string().contains("bearer"));
        let guarded = document(&Described {
            token: true,
            limits: &limits,
            facts: &facts,
        });
        let post = &guarded["paths"]["/v1/videos"]["post"];
        assert_eq!(post["security"], json!([{"bearer": []}]));
        assert!(post["responses"]["401"].is_object());
        assert!(guarded["paths"]["/healthz"]["get"]
            .get("security")
            .is_none());
    }
}
