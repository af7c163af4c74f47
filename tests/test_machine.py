"""klbelt._machine tells apart CPUs whose float kernels round differently."""

from __future__ import annotations

from klbelt import _machine

AMD = {"vendor_id": "AuthenticAMD", "model name": "AMD EPYC", "cpu family": "25", "model": "17",
       "flags": "fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni avx_vnni"}
INTEL = {"vendor_id": "GenuineIntel", "model name": "Intel(R) Xeon(R) Processor", "cpu family": "6", "model": "143",
         "flags": "fpu sse2 avx2 fma avx512f avx512_bf16 avx512_fp16 avx512_vnni amx_tile amx_bf16 amx_int8"}


def test_signature_tells_apart_two_cpus_that_torch_calls_the_same(monkeypatch):
    seen = []
    for info in (AMD, INTEL):
        monkeypatch.setattr(_machine, "_cpuinfo", lambda info=info: dict(info))
        seen.append(_machine.float_kernel_signature())
    amd, intel = seen
    # torch's own view is identical on both (the bug: the golden test compared bit for bit on the Xeon)
    assert {k: amd[k] for k in ("torch", "cpu_capability", "bf16_supported")} == \
           {k: intel[k] for k in ("torch", "cpu_capability", "bf16_supported")}
    assert amd != intel
    assert "amx_tile" in intel["cpu"]["isa"] and "avx512_fp16" in intel["cpu"]["isa"]
    assert "amx_tile" not in amd["cpu"]["isa"] and "avx512_bf16" in amd["cpu"]["isa"]
    assert "sse2" not in amd["cpu"]["isa"]  # only what oneDNN/MKL dispatch on
    monkeypatch.setattr(_machine, "_cpuinfo", lambda: dict(INTEL))
    assert _machine.cpu_name() == "Intel(R) Xeon(R) Processor (AMX-TILE, AVX512-FP16, AVX512-BF16)"


def test_signature_is_stable_on_one_machine():
    assert _machine.float_kernel_signature() == _machine.float_kernel_signature()


def test_cpuinfo_reads_only_the_first_processor(tmp_path, monkeypatch):
    text = "processor : 0\nvendor_id : AuthenticAMD\nflags : avx2\n\nprocessor : 1\nvendor_id : Other\nflags : amx_tile\n"
    real_path = _machine.Path
    monkeypatch.setattr(_machine, "Path", lambda p: tmp_path / "cpuinfo" if p == "/proc/cpuinfo" else real_path(p))
    (tmp_path / "cpuinfo").write_text(text)
    assert _machine._cpuinfo() == {"processor": "0", "vendor_id": "AuthenticAMD", "flags": "avx2"}
