"""Compile every Triton kernel of klbelt for an H100/H200 (sm_90) on a machine without a GPU.

Run by tests/test_triton_kernels.py in a process without TRITON_INTERPRET (the interpreter never
compiles, so it cannot see what only the GPU compiler rejects). Launch configurations are the ones
klbelt.kl._triton uses on CUDA. Prints one line per kernel with ptxas' register count.
"""

import os
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from klbelt.kl import _triton
from klbelt.kl import _triton_kernels as K

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_for_sm90(fn, types: dict, constexprs: dict, num_warps: int) -> str:
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=TARGET,
                            options={"num_warps": num_warps})
    usage = "registers: cuobjdump not found"
    if os.path.exists(CUOBJDUMP):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"klbelt_{os.getpid()}.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        out = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True).stdout
        os.remove(path)
        usage = " ".join(next((ln for ln in out.splitlines() if "REG:" in ln), "").split()[:2])
    return usage


def main(dtypes) -> int:
    for dt in dtypes:
        p = "*" + dt
        row = dict(V="i32", inv_temp="fp32")
        kernels = [
            (K._logprob_fwd_kernel, dict(row, X=p, T="*i64", OUT="*fp32", C="*fp32", LOGS="*fp32", stride_x="i32"),
             dict(BLOCK_V=_triton.LOGPROB_BLOCK_V), _triton.ROW_NUM_WARPS),
            (K._logprob_bwd_kernel, dict(row, X=p, T="*i64", C="*fp32", LOGS="*fp32", G="*fp32", DX=p, stride_x="i32",
                                         stride_dx="i32"), dict(BLOCK_V=_triton.LOGPROB_BLOCK_V), _triton.ROW_NUM_WARPS),
            (K._kl_fwd_kernel, dict(row, A=p, B=p, KL="*fp32", CA="*fp32", LSA="*fp32", CB="*fp32", LSB="*fp32",
                                    stride_a="i32", stride_b="i32"), dict(BLOCK_V=_triton.KL_BLOCK_V), _triton.ROW_NUM_WARPS),
        ]
        for need_a, need_b in ((True, False), (True, True)):
            kernels.append((K._kl_bwd_kernel, dict(row, A=p, B=p, CA="*fp32", LSA="*fp32", CB="*fp32", LSB="*fp32",
                                                   KL="*fp32", G="*fp32", DA=p, DB=p, stride_a="i32", stride_b="i32",
                                                   stride_da="i32", stride_db="i32"),
                            dict(NEED_A=need_a, NEED_B=need_b, BLOCK_V=_triton.KL_BLOCK_V), _triton.ROW_NUM_WARPS))
        head = dict(H=p, W=p, Bias=p, RH=p, RW=p, RBias=p, Blocked="*i8", T="*i64", N="i32", V="i32", K="i32", KR="i32",
                    stride_h="i32", stride_w="i32", stride_rh="i32", stride_rw="i32", inv_temp="fp32", cols_per_split="i32")
        common = dict(HAS_BIAS=True, HAS_BLOCKED=True, IEEE=dt == "fp32", DOT_F32=False, **_triton.HEAD_BLOCKS)
        for is_kl in (False, True):
            kernels.append((K._head_fwd_kernel, dict(head, PMA="*fp32", PSA="*fp32", PX="*fp32", PMB="*fp32",
                                                     PSB="*fp32", PZT="*fp32"),
                            dict(IS_KL=is_kl, HAS_RBIAS=is_kl, **common), _triton.HEAD_NUM_WARPS))
        for is_kl, target_first in ((False, True), (True, True), (True, False)):
            kernels.append((K._head_bwd_kernel, dict(head, ROWA="*fp32", ROWB="*fp32", ROWC="*fp32", ROWD="*fp32",
                                                     KLV="*fp32", G="*fp32", DH="*fp32", DW="*fp32", DB="*fp32",
                                                     v_begin="i32", v_end="i32"),
                            dict(IS_KL=is_kl, TARGET_FIRST=target_first, HAS_RBIAS=is_kl, NEED_H=True, NEED_W=True,
                                 NEED_B=True, **common), _triton.HEAD_NUM_WARPS))
        for need_h in (True, False):  # the two passes of set_head_backward("bounded")
            kernels.append((K._head_bwd_kernel, dict(head, ROWA="*fp32", ROWB="*fp32", ROWC="*fp32", ROWD="*fp32",
                                                     KLV="*fp32", G="*fp32", DH="*fp32", DW="*fp32", DB="*fp32",
                                                     v_begin="i32", v_end="i32"),
                            dict(IS_KL=True, TARGET_FIRST=True, HAS_RBIAS=True, NEED_H=need_h, NEED_W=not need_h,
                                 NEED_B=not need_h, **common), _triton.HEAD_NUM_WARPS))
        for fn, types, constexprs, warps in kernels:
            usage = compile_for_sm90(fn, types, constexprs, warps)
            flags = {k: v for k, v in constexprs.items() if not k.startswith("BLOCK")}
            print(f"compiled {fn.__name__} {dt} {flags}: {usage}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or ["bf16", "fp32"]))
