"""The stream of sampled inference exchanges: the contract between the gateway, which writes it, and the
monitors, which read it. It lives here, below the deployer, so that monitoring never imports the deployer
(the gateway imports it from here); importing it loads nothing else (no Django).

Each entry's fields: model, version, triton_model, status, latency_ms, ts, request, request_head,
response_head, response (and, for a shadow copy, shadow_version, shadow_triton_model, shadow_status,
shadow_latency_ms, shadow_response)."""

SAMPLES_STREAM = "gateway:samples"
