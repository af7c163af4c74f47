"""The Triton kernels of ``_triton`` (see its docstring), plain Triton code.

Imported only through ``_triton.kernels()``. Under ``TRITON_INTERPRET=1`` (set
before Triton is imported) ``@triton.jit`` makes these the interpreter's
functions, which run on CPU tensors: the test suite runs exactly the code the
GPU compiles.
"""

import triton
import triton.language as tl


@triton.jit
def _lane_fold(m, s, x):
    """Fold ``x`` into per-lane running maxima ``m`` and sums ``s = sum exp(. - m)`` with one exp per element.

    e = exp(-|x - m|): where x is the lane's new maximum the old sum is rescaled by e and x adds 1,
    else x adds e. -inf entries add 0 (also where the lane has seen only -inf so far).
    Returns the new (m, s), e and whether x was the new maximum.
    """
    up = x > m
    e = tl.exp(tl.where(up, m - x, x - m))
    e = tl.where(x == float("-inf"), 0.0, e)
    return tl.maximum(m, x), tl.where(up, s * e + 1.0, s + e), e, up


@triton.jit
def _logprob_fwd_kernel(X, T, OUT, C, LOGS, V, stride_x, inv_temp, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(X + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        m, s, _, _ = _lane_fold(m, s, x)
    c = tl.max(m, axis=0)
    c_safe = tl.where(c == float("-inf"), 0.0, c)
    log_s = tl.log(tl.sum(s * tl.exp(m - c_safe), axis=0))
    t = tl.load(T + row)
    xt = tl.load(X + row * stride_x + t).to(tl.float32) * inv_temp
    tl.store(OUT + row, (xt - c) - log_s)
    tl.store(C + row, c)
    tl.store(LOGS + row, log_s)


@triton.jit
def _logprob_bwd_kernel(X, T, C, LOGS, G, DX, V, stride_x, stride_dx, inv_temp, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    c = tl.load(C + row)
    log_s = tl.load(LOGS + row)
    gs = tl.load(G + row) * inv_temp
    t = tl.load(T + row)
    # the chosen entry: g*s*(1 - p_t) = -g*s*expm1(log p_t), expm1 by its series near 0
    lpt = (tl.load(X + row * stride_x + t).to(tl.float32) * inv_temp - c) - log_s
    em1 = tl.where(tl.abs(lpt) < 1e-3, lpt * (1.0 + lpt * (0.5 + lpt / 6.0)), tl.exp(lpt) - 1.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        inside = cols < V
        x = tl.load(X + row * stride_x + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        d = tl.where(cols == t, -gs * em1, -gs * tl.exp((x - c) - log_s))
        tl.store(DX + row * stride_dx + cols, d.to(DX.dtype.element_ty), mask=inside)


@triton.jit
def _kl_fwd_kernel(A, B, KL, CA, LSA, CB, LSB, V, stride_a, stride_b, inv_temp, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    ma = tl.full([BLOCK_V], float("-inf"), tl.float32)
    mb = tl.full([BLOCK_V], float("-inf"), tl.float32)
    sa = tl.zeros([BLOCK_V], tl.float32)
    sb = tl.zeros([BLOCK_V], tl.float32)
    w = tl.zeros([BLOCK_V], tl.float32)  # sum exp(a - ma) * (a - b), rescaled with sa
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        inside = cols < V
        a = tl.load(A + row * stride_a + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        b = tl.load(B + row * stride_b + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        ma, sa, e, up = _lane_fold(ma, sa, a)  # two exps per pair of entries, the minimum
        w = tl.where(up, w * e + (a - b), w + tl.where(e > 0, e * (a - b), 0.0))
        mb, sb, _, _ = _lane_fold(mb, sb, b)
    ca = tl.max(ma, axis=0)
    cb = tl.max(mb, axis=0)
    ra = tl.exp(ma - tl.where(ca == float("-inf"), 0.0, ca))
    rb = tl.exp(mb - tl.where(cb == float("-inf"), 0.0, cb))
    s_a = tl.sum(sa * ra, axis=0)
    log_sa = tl.log(s_a)
    log_sb = tl.log(tl.sum(sb * rb, axis=0))
    # KL = sum p (a - b) - lse_a + lse_b, lse = c + log_s; c_a - c_b kept apart from the log-sums
    kl = (tl.sum(w * ra, axis=0) / s_a - (ca - cb)) - log_sa + log_sb
    tl.store(KL + row, kl)
    tl.store(CA + row, ca)
    tl.store(LSA + row, log_sa)
    tl.store(CB + row, cb)
    tl.store(LSB + row, log_sb)


@triton.jit
def _kl_bwd_kernel(
    A, B, CA, LSA, CB, LSB, KL, G, DA, DB, V, stride_a, stride_b, stride_da, stride_db, inv_temp,
    NEED_A: tl.constexpr, NEED_B: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    ca = tl.load(CA + row)
    lsa = tl.load(LSA + row)
    cb = tl.load(CB + row)
    lsb = tl.load(LSB + row)
    kl = tl.load(KL + row)
    gs = tl.load(G + row) * inv_temp
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        inside = cols < V
        a = tl.load(A + row * stride_a + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        b = tl.load(B + row * stride_b + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        logp = (a - ca) - lsa
        logq = (b - cb) - lsb
        p = tl.exp(logp)
        if NEED_A:
            ga = gs * tl.where(p > 0, p * (logp - logq - kl), 0.0)
            tl.store(DA + row * stride_da + cols, ga.to(DA.dtype.element_ty), mask=inside)
        if NEED_B:
            gb = gs * (tl.exp(logq) - p)
            tl.store(DB + row * stride_db + cols, gb.to(DB.dtype.element_ty), mask=inside)


@triton.jit
def _head_tile(H, W, Bias, Blocked, rows, cols, N, V, K, stride_h, stride_w, inv_temp,
               HAS_BIAS: tl.constexpr, HAS_BLOCKED: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(h W^T + b) * s`` for one ``[BLOCK_M, BLOCK_V]`` tile in fp32; -inf outside V and at blocked ids."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        h = tl.load(H + rows[:, None] * stride_h + kk[None, :], mask=(rows[:, None] < N) & (kk[None, :] < K), other=0.0)
        w = tl.load(W + cols[:, None].to(tl.int64) * stride_w + kk[None, :], mask=(cols[:, None] < V) & (kk[None, :] < K), other=0.0)
        if DOT_F32:  # the interpreter's bf16/fp16 dot is wrong; products of bf16/fp16 values are exact in fp32
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE or DOT_F32:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temp
    dead = cols >= V
    if HAS_BLOCKED:
        dead = dead | (tl.load(Blocked + cols, mask=cols < V, other=0) != 0)
    return tl.where(dead[None, :], float("-inf"), z)


@triton.jit
def _online(m, s, z):
    """Fold tile ``z`` [M, V] into running row max ``m`` and sum ``s``; also return the rescale and exp(z - m)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(z - m_safe[:, None])
    return m_new, s * alpha + tl.sum(e, axis=1), alpha, e


@triton.jit
def _head_fwd_kernel(
    H, W, Bias, RH, RW, RBias, Blocked, T, PMA, PSA, PX, PMB, PSB, PZT,
    N, V, K, KR, stride_h, stride_w, stride_rh, stride_rw, inv_temp, cols_per_split,
    IS_KL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr, HAS_BLOCKED: tl.constexpr,
    IEEE: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per (row block, vocabulary range): partial max/sum of the policy (and reference) and the cross sum.

    logprob: PX = sum exp(z - m) z (entropy), PZT = z at the token (0 elsewhere, summed over ranges).
    kl (a = first argument of the KL, b = second): PX = sum exp(a - m_a) (a - b).
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    ma = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sa = tl.zeros([BLOCK_M], tl.float32)
    x = tl.zeros([BLOCK_M], tl.float32)
    mb = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sb = tl.zeros([BLOCK_M], tl.float32)
    zt = tl.zeros([BLOCK_M], tl.float32)
    if not IS_KL:
        t = tl.load(T + rows64, mask=row_ok, other=-1)
    v_start = split * cols_per_split
    v_stop = tl.minimum(v_start + cols_per_split, V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cols = tl.where(cols < v_stop, cols, V)  # past this range: treated as outside V
        za = _head_tile(H, W, Bias, Blocked, rows64, cols, N, V, K, stride_h, stride_w, inv_temp,
                        HAS_BIAS, HAS_BLOCKED, IEEE, DOT_F32, BLOCK_M, BLOCK_V, BLOCK_K)
        if IS_KL:
            zb = _head_tile(RH, RW, RBias, Blocked, rows64, cols, N, V, KR, stride_rh, stride_rw, inv_temp,
                            HAS_RBIAS, HAS_BLOCKED, IEEE, DOT_F32, BLOCK_M, BLOCK_V, BLOCK_K)
            ma, sa, alpha, e = _online(ma, sa, za)
            x = x * alpha + tl.sum(tl.where(e > 0, e * (za - zb), 0.0), axis=1)
            mb, sb, _, _ = _online(mb, sb, zb)
        else:
            ma, sa, alpha, e = _online(ma, sa, za)
            x = x * alpha + tl.sum(tl.where(e > 0, e * za, 0.0), axis=1)
            zt += tl.sum(tl.where(cols[None, :] == t[:, None], za, 0.0), axis=1)
    out = split * N + rows64
    tl.store(PMA + out, ma, mask=row_ok)
    tl.store(PSA + out, sa, mask=row_ok)
    tl.store(PX + out, x, mask=row_ok)
    if IS_KL:
        tl.store(PMB + out, mb, mask=row_ok)
        tl.store(PSB + out, sb, mask=row_ok)
    else:
        tl.store(PZT + out, zt, mask=row_ok)


@triton.jit
def _head_bwd_kernel(
    H, W, Bias, RH, RW, RBias, Blocked, T, ROWA, ROWB, ROWC, ROWD, KLV, G, DH, DW, DB,
    N, V, K, KR, stride_h, stride_w, stride_rh, stride_rw, inv_temp, cols_per_split, v_begin, v_end,
    IS_KL: tl.constexpr, TARGET_FIRST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr,
    HAS_BLOCKED: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    IEEE: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """G = dL/dz of the target's tile, recomputed exactly; DH += G W, DW += G^T h, DB += sum_rows G (fp32, atomic).

    The target is the side (H, W, Bias) whose gradient is wanted: the policy, or for the KL the
    reference (launched with the sides swapped); RH, RW, RBias the KL's other side. TARGET_FIRST: the
    target is the KL's first argument. Columns ``[v_begin, v_end)`` only, split over ``program_id(1)``;
    DW holds rows ``v_begin..v_end`` of the weight gradient, DH the N rows given (DB is whole). ROWA,
    ROWB: the policy's (logprob) or first argument's (kl) c and log_s; ROWC, ROWD the second's.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    ca = tl.load(ROWA + rows64, mask=row_ok, other=0.0)
    lsa = tl.load(ROWB + rows64, mask=row_ok, other=0.0)
    gs = tl.load(G + rows64, mask=row_ok, other=0.0) * inv_temp
    if IS_KL:
        cb = tl.load(ROWC + rows64, mask=row_ok, other=0.0)
        lsb = tl.load(ROWD + rows64, mask=row_ok, other=0.0)
        kl = tl.load(KLV + rows64, mask=row_ok, other=0.0)
    else:
        t = tl.load(T + rows64, mask=row_ok, other=-1)
    ks = tl.arange(0, BLOCK_K)
    v_start = v_begin + split * cols_per_split
    v_stop = tl.minimum(v_start + cols_per_split, v_end)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cols = tl.where(cols < v_stop, cols, V)
        z = _head_tile(H, W, Bias, Blocked, rows64, cols, N, V, K, stride_h, stride_w, inv_temp,
                       HAS_BIAS, HAS_BLOCKED, IEEE, DOT_F32, BLOCK_M, BLOCK_V, BLOCK_K)
        if IS_KL:
            zr = _head_tile(RH, RW, RBias, Blocked, rows64, cols, N, V, KR, stride_rh, stride_rw, inv_temp,
                            HAS_RBIAS, HAS_BLOCKED, IEEE, DOT_F32, BLOCK_M, BLOCK_V, BLOCK_K)
            if TARGET_FIRST:  # d KL(p||q) / d a = p (log p - log q - KL)
                logp = (z - ca[:, None]) - lsa[:, None]
                logq = (zr - cb[:, None]) - lsb[:, None]
                p = tl.exp(logp)
                gz = tl.where(p > 0, p * (logp - logq - kl[:, None]), 0.0)
            else:  # d KL(p||q) / d b = q - p, the target is b
                gz = tl.exp((z - cb[:, None]) - lsb[:, None]) - tl.exp((zr - ca[:, None]) - lsa[:, None])
        else:
            p = tl.exp((z - ca[:, None]) - lsa[:, None])
            gz = tl.where(cols[None, :] == t[:, None], 1.0, 0.0) - p
        gz = gz * gs[:, None]
        gz = tl.where(row_ok[:, None] & (z > float("-inf")), gz, 0.0)
        if NEED_B:
            tl.atomic_add(DB + cols, tl.sum(gz, axis=0), mask=cols < V)
        if DOT_F32:  # interpreter: fp32 tiles; its fp32 -> bf16 cast truncates (Triton 3.9), the GPU's rounds
            if H.dtype.element_ty == tl.bfloat16:  # to nearest even: done here on the bits, as the GPU does
                bits = gz.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                gzc = bits.to(tl.float32, bitcast=True)
            else:
                gzc = gz.to(H.dtype.element_ty).to(tl.float32)
        else:
            gzc = gz.to(H.dtype.element_ty)  # rounded to the input dtype, as the unfused path's dL/dz
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            if NEED_H:
                w = tl.load(W + cols[:, None].to(tl.int64) * stride_w + kk[None, :], mask=(cols[:, None] < V) & (kk[None, :] < K), other=0.0)
                if DOT_F32:
                    w = w.to(tl.float32)
                if IEEE or DOT_F32:
                    dh = tl.dot(gzc, w, input_precision="ieee")
                else:
                    dh = tl.dot(gzc, w)
                tl.atomic_add(DH + rows64[:, None] * K + kk[None, :], dh, mask=row_ok[:, None] & (kk[None, :] < K))
            if NEED_W:
                h = tl.load(H + rows64[:, None] * stride_h + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
                if DOT_F32:
                    h = h.to(tl.float32)
                if IEEE or DOT_F32:
                    dw = tl.dot(tl.trans(gzc), h, input_precision="ieee")
                else:
                    dw = tl.dot(tl.trans(gzc), h)
                tl.atomic_add(DW + (cols[:, None] - v_begin).to(tl.int64) * K + kk[None, :], dw, mask=(cols[:, None] < V) & (kk[None, :] < K))


