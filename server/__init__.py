"""CAB-vLLM's OpenAI-compatible server: vLLM's async engine and OpenAI app with the CAB attention backend.

  cli.py      ``cab-serve``: vLLM's serve flags plus --sparsity / --policy / --rope-scaling; starts the engine
  app.py      build_cab_app: vLLM's app + the CAB request fields, OpenAI-schema API-key check, abort count
  fields.py   ``sparsity`` / ``attention_policy`` request fields -> vllm_xargs (pydantic; no vLLM import)
  vllm_api.py the vLLM entry points used (build_app, init_app_state, serve_http, ...), found per release
"""
