"""What decides how this machine's float kernels round (no klbelt imports here).

Two CPUs that both report torch's capability "AVX512" can still round
differently: oneDNN and MKL pick their matmul and softmax kernels by the ISA
extensions present (AMX tiles, AVX512-FP16, AVX512-BF16, VNNI) and by the
vendor's tuning tables. Bit-for-bit expectations therefore hold only where
:func:`float_kernel_signature` is equal; elsewhere compare within a tolerance.
"""

from __future__ import annotations

import platform
from pathlib import Path

#: the ISA extensions (as /proc/cpuinfo spells them) that oneDNN/MKL dispatch on
DISPATCH_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "avx512_fp16", "avx512_bf16", "avx512_vnni",
                  "avx_vnni", "avx512f", "avx2", "fma")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_description() -> dict:
    """Vendor, model and the dispatch-relevant ISA extensions of this CPU.

    ``{"vendor": "AuthenticAMD", "model": "AMD EPYC", "family": "25", "model_id": "17",
    "isa": ["avx2", "avx512_bf16", ...]}``; fields that cannot be read are ``""``.
    """
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"vendor": info.get("vendor_id", platform.machine()),
            "model": info.get("model name", platform.processor()),
            "family": info.get("cpu family", ""),
            "model_id": info.get("model", ""),
            "isa": sorted(flags & set(DISPATCH_FLAGS))}


def float_kernel_signature() -> dict:
    """Everything that changes how torch's CPU float kernels round on this machine.

    torch's version, its dispatch capability, native bf16 matmuls, and the CPU
    (vendor, model, family, ISA extensions). Equal signatures mean bit-equal
    results for the same program with the same thread count.
    """
    import torch

    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch builds
        bf16 = False
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_supported": bf16, "cpu": cpu_description()}


def cpu_name() -> str:
    """A short human name for this CPU with its bf16-relevant extensions, e.g. 'AMD EPYC (AVX512-BF16)'."""
    desc = cpu_description()
    shown = [f.upper().replace("_", "-") for f in ("amx_tile", "avx512_fp16", "avx512_bf16") if f in desc["isa"]]
    name = desc["model"] or desc["vendor"] or "unknown CPU"
    return f"{name} ({', '.join(shown)})" if shown else name
