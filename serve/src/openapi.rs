//! The OpenAPI 3.1 document served at `/openapi.json`, written by hand next to the handlers it
//! describes (a snapshot test keeps changes to it deliberate).

use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn id_param(what: &str) -> Value {
    json!([{"name": "id", "in": "path", "required": true, "description": what, "schema": {"type": "string"}}])
}

pub fn document() -> Value {
    let bad = error_response("A bad field: `error.field` names it.");
    let not_found = error_response("No such id.");
    let full = json!({
        "description": "The queue is full; retry after `Retry-After` seconds.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    });
    let job = json!({"description": "The job.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}});
    let lora_created = json!({"description": "The LoRA's id.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LoraId"}}}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "v2l-serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "First frame + prompt + reference clip (or LoRA) → video, on an exported CogVideoX engine. Jobs are asynchronous: submit, follow the events, download the mp4. Predicted LoRAs are cached by content hash; `/v1/*` takes `Authorization: Bearer <token>` when the server has a token."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["kind", "message"], "properties": {
                    "kind": {"type": "string", "description": "Stable: bad_field, bad_request, too_large, not_found, not_ready, already_ended, queue_full, shutting_down, unauthorized, method_not_allowed, prediction_failed, internal."},
                    "field": {"type": "string", "description": "The request field at fault."},
                    "message": {"type": "string"}}}}},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "string"},
                    "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    "step": {"type": "integer"}, "steps": {"type": "integer"}, "progress": {"type": "number"},
                    "created_at": {"type": "number"}, "started_at": {"type": ["number", "null"]}, "finished_at": {"type": ["number", "null"]},
                    "timings": {"type": "object", "additionalProperties": {"type": "number"}, "description": "Stage → milliseconds."},
                    "error": {"type": ["object", "null"], "properties": {"kind": {"type": "string"}, "message": {"type": "string"}}},
                    "lora_id": {"type": ["string", "null"]}, "lora_cached": {"type": ["boolean", "null"]},
                    "params": {"type": "object"}, "content_url": {"type": "string"}}},
                "Accepted": {"type": "object", "properties": {"id": {"type": "string"}, "state": {"const": "queued"}, "status_url": {"type": "string"}, "events_url": {"type": "string"}, "content_url": {"type": "string"}}},
                "LoraId": {"type": "object", "properties": {"lora_id": {"type": "string"}, "cached": {"type": "boolean"}, "url": {"type": "string"}}},
                "VideoForm": {"type": "object", "required": ["image"], "properties": {
                    "image": {"type": "string", "format": "binary", "description": "First frame: PNG, JPEG, WebP (or a video: its first frame). Resized to height × width."},
                    "reference": {"type": "string", "format": "binary", "description": "A reference clip (mp4, mov, mkv, webm, avi, gif): its predicted LoRA (cached)."},
                    "lora_id": {"type": "string", "description": "A LoRA stored on this server."},
                    "lora": {"type": "string", "format": "binary", "description": "A LoRA file (diffusers/PEFT, kohya or ComfyUI safetensors)."},
                    "lora_scale": {"type": "number", "default": 1.0, "description": "The LoRA's multiplier; for `reference`, upstream's LoRA weight."},
                    "prompt": {"type": "string"},
                    "prompt_embeds": {"type": "string", "format": "binary", "description": "safetensors with `prompt_embeds` and `negative_prompt_embeds`, float32 [1, L, D]."},
                    "negative_prompt": {"type": "string", "default": ""},
                    "max_sequence_length": {"type": "integer", "description": "Prompt tokens (default: the DiT's)."},
                    "frames": {"type": "integer", "description": "1 + 4k (default: the engine's)."},
                    "height": {"type": "integer"}, "width": {"type": "integer"},
                    "steps": {"type": "integer", "default": 50}, "guidance": {"type": "number", "default": 6.0},
                    "seed": {"type": "integer", "default": 0}, "fps": {"type": "integer", "default": 8}}},
                "LoraForm": {"type": "object", "properties": {
                    "reference": {"type": "string", "format": "binary"},
                    "lora": {"type": "string", "format": "binary"},
                    "lora_scale": {"type": "number", "default": 1.0},
                    "height": {"type": "integer"}, "width": {"type": "integer"}}}
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/videos": {"post": {
                "summary": "Submit a video job.",
                "requestBody": {"required": true, "content": {"multipart/form-data": {"schema": {"$ref": "#/components/schemas/VideoForm"}}}},
                "responses": {
                    "202": {"description": "Queued.", "headers": {"Location": {"schema": {"type": "string"}}}, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
                    "400": bad, "404": not_found, "413": error_response("The body is larger than --max-upload-mb."), "429": full, "503": error_response("Shutting down.")}}},
            "/v1/videos/{id}": {
                "get": {"summary": "A job's state, progress, timings and error.", "parameters": id_param("job id"), "responses": {"200": job, "404": not_found}},
                "delete": {"summary": "Cancel a job: a queued one at once, a running one after its current denoising step.", "parameters": id_param("job id"),
                    "responses": {"200": {"description": "Cancelled."}, "202": {"description": "Cancelling."}, "404": not_found, "409": error_response("Already ended.")}}},
            "/v1/videos/{id}/events": {"get": {"summary": "Server-sent events: `progress` with {state, step, steps} as the job moves, then one `end`.", "parameters": id_param("job id"),
                "responses": {"200": {"description": "An event stream.", "content": {"text/event-stream": {}}}, "404": not_found}}},
            "/v1/videos/{id}/content": {"get": {"summary": "The video (H.264 mp4).", "parameters": id_param("job id"),
                "responses": {"200": {"description": "The mp4.", "content": {"video/mp4": {}}}, "404": not_found, "409": error_response("Not finished.")}}},
            "/v1/loras": {"post": {
                "summary": "A reference clip's predicted LoRA (waits for the prediction), or an uploaded LoRA file: its id.",
                "requestBody": {"required": true, "content": {"multipart/form-data": {"schema": {"$ref": "#/components/schemas/LoraForm"}}}},
                "responses": {"200": {"description": "Already stored.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LoraId"}}}}, "201": lora_created, "400": bad, "413": error_response("Too large."), "429": full}}},
            "/v1/loras/{id}": {"get": {"summary": "The LoRA as a diffusers/PEFT safetensors file.", "parameters": id_param("lora id"),
                "responses": {"200": {"description": "safetensors", "content": {"application/octet-stream": {}}}, "404": not_found}}},
            "/healthz": {"get": {"summary": "Liveness.", "security": [], "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {"get": {"summary": "Readiness: 503 while shutting down or with a full queue.", "security": [], "responses": {"200": {"description": "Ready."}, "503": {"description": "Not taking jobs."}}}},
            "/metrics": {"get": {"summary": "Prometheus text: queue depth, stage latency histograms, LoRA cache hits and bytes, errors by kind.", "security": [], "responses": {"200": {"description": "Metrics.", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document.", "security": [], "responses": {"200": {"description": "OpenAPI 3.1."}}}}
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    #[test]
    fn the_document_is_stable() {
        let doc = super::document();
        insta::assert_snapshot!(serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
}
