"""PIM, the Prompt-token Interaction Module (Eqs. 5-10): the op ``pim`` / ``pim_packed`` here, the
``nn.Module`` ``PromptTokenInteraction`` in ``avpt_kernels.modules``. This docstring is the one
account of the algorithm and its costs; the kernels' docstrings give their shapes.

Files: ``forward`` and ``backward`` (the Triton kernels), ``dots`` (exact and split tile
products), ``weights`` (``PIMParams``, the packed layout, the legacy names, the sizes the Triton
path takes), ``launch`` (``Layout``: tiles, grids and buffers; the launch sequences), ``op``
(checks, dispatch, custom ops, autograd, the public entry points), ``configs`` (the AOT list),
``reference`` (the torch ground truth), ``spec`` (inputs, the traffic floor and model: this
op's entry in ``avpt_kernels.ops.OPS``).

``pim(z[B,T,D], p[B,K,D], params, num_heads) -> (z_out[B,T,D], p_tilde[B,K,D])``

Triton path: project first, attend in the A-space. Every pass is GEMM-shaped over all rows of
the batch (token rows MZ = B*T, prompt rows MP = B*K) or one program per (image, head) over
[T, head width] fp32 tiles; no atomics, no zero-fills, no host syncs. With A = H*dh:

Forward, 5 launches (grids with the sm_90 tiles, ``launch.PROJ`` etc.; Ampere-class GPUs take
narrower ones, ``launch.SM80``; grid and traffic at the model shape B=32, T=197, D=768, K=6, H=4, dh=16,
G=16 in bf16; "row" = one fp32 [B*T, A] stream, 1.6 MB):
  1. ``_project_kernel``  X = Z [Wq; Wv; W'k]^T + [bq; bv; 0] -> [MZ, 3A] fp32 and
     K1 = P Wk^T + bk [MP, A]: 1-D grid over (BM-row tile, 64-column tile), each program all
     three weights from one read of its Z tile, 203 programs; reads Z (9.7 MB), writes X
     (4.8 MB); 2*MZ*D*3A*3 = 5.6 GFLOP (three-part dots).
     b'k drops out: it shifts a prompt->token softmax row (over T) by one constant.
  2. ``_t2p_attn_kernel`` per (image, head), 128 programs: S1 = softmax over K of scale Q1 K1^T,
     msg = S1^T V1 (/ T for t2p_reduce="mean") [MP, A]; reads Q1, V1 (3.2 MB).
  3. ``_prompt_kernel``   per (16 prompt rows, 32 D columns), 288 programs: p_tilde = P + msg
     Wo^T + bo (stored in P's dtype and in fp32), and per D tile the partial sums of q2, v2 and
     the gate's two halves (W1 [mean_k p_tilde, z_0]); ~1 MB.
  4. ``_p2t_attn_kernel`` per (image, head), 128 programs: q2, v2 (the partials summed in a
     fixed order), the gate alpha (head 0), S2 = softmax over T of scale q2 K2^T (two passes:
     max and sum, then probabilities) and o2 = S2^T v2 -> [MZ, A] fp32; reads K2 (1.6 MB),
     writes o2 (1.6 MB), the softmax statistics, and S2 when ``return_attn``.
  5. ``_output_kernel``   per (64 token rows, 64 D columns), 1188 programs:
     z_out = Z + alpha (o2 W'o^T + b'o); reads Z, o2, writes z_out (21 MB).
  => 3 Z-sized streams + 8 rows: ~42 MB, 13 us at the H100's 3.35 TB/s.

Backward, 9 launches, every weight gradient a fixed-order sum (deterministic on a GPU):
  1. ``_grad_o2_kernel``   (16 token rows, 64-column steps) 394 programs: dO2 = alpha dY W'o,
     and per row the gate's dalpha = o2 . dY W'o + dY . b'o.
  2. ``_p2t_attn_bwd_kernel`` per (image, head), two passes over T: dS2 = v2 dO2^T, dv2 = S2 dO2,
     delta = rowsum(S2 dS2) (from the same dS2 values as dL2, so a saturated row gives exactly
     0, as torch's softmax backward does), then dL2 = S2 (dS2 - delta), dq2 = scale dL2 K2,
     dK2 = scale dL2^T q2 (-> dX's last A columns); head 0: the gate back to dpre.
  3. ``_prompt_bwd_kernel`` per (16 prompt rows, 32 D columns): dp_tilde = dP~ + dq2 W'q + dv2
     W'v + dpre W1[:, :D] / K, the class token's gate gradient dz0, partial dmsg = dp_tilde Wo.
  4. ``_t2p_attn_bwd_kernel`` per (image, head): dV1 = S1 dM, dL1 = S1 (V1 dM^T - rowsum), dQ1 =
     scale dL1 K1 (-> dX), dK1 = scale dL1^T Q1.
  5. ``_grad_z_kernel``    (64 x 32 tiles, 2376 programs, 6 CTAs an SM): dZ = dY + dX [Wq; Wv;
     W'k] (+ dz0), one pipelined loop over dX's 3A columns; 2*MZ*D*3A*3 = 5.6 GFLOP.
  6-7. ``_wgrad_kernel``: dWz = dX^T Z [3A, D], then dW'o = dY^T (alpha o2) [D, A], each over
     row chunks (one program a (tile, chunk)).
  8. ``_reduce_kernel``: both gradients' chunks added in order into the flat dW, one launch.
  9. ``_prompt_wgrad_kernel`` (24 D tiles x 6 jobs = 144 programs): dWo, dW'q, dW'v, dWk, the
     gate's weights (over the MP prompt rows or B images) and dP = dp_tilde + dK1 Wk.
  => 5 Z-sized streams + 16 rows: ~74 MB, 22 us at 3.35 TB/s.
Saved for backward: z, p, the flat weights and one fp32 state buffer (X, o2, K1, msg, p_tilde,
q2/v2, the softmax statistics, the gate's pre-activation and alpha): 7.3 MB a layer at the
model shape. ``spec.pim_achieved_bytes`` is the traffic model; ``benchmarks/kernel_model.py``
counts grids, waves, serial iterations, bytes and FLOPs of every launch.

Precision (the bounded-error rule, ``avpt_kernels.testing.assert_bounded_error``: in fp16 and
bf16 the error against the fp64 truth is at most 2x the torch backend's, which computes in fp32).
X and every intermediate are fp32; the weights are fp32 master weights. A product of an operand
exact in the input dtype (Z, P, dY) with an fp32 one is a two-part split dot; a product of two
fp32 operands a three-part one (``dots._mm_split``: ~fp32 accuracy on 16-bit tensor cores; IEEE
fp32 for fp32 inputs). The softmaxes are computed in fp32 from fp32 logits, so high-norm tokens
and sharp attention cost no more than in the torch backend.

The sizes the Triton path takes (anything else: ``ValueError`` for ``backend="triton"``, the
torch path for ``"auto"``): ``weights``.
"""
from .weights import PIMParams, pack_weights, packed_size, unpack_weights, weight_shapes
from .op import (check_args, pim, pim_backward_op, pim_forward_op, pim_packed,
                 triton_unsupported_reason)
from .configs import aot_configs
from .spec import SPEC, pim_achieved_bytes, pim_min_bytes
from . import reference

__all__ = ["pim", "pim_packed", "PIMParams", "pack_weights", "unpack_weights", "packed_size",
           "weight_shapes", "pim_min_bytes", "pim_achieved_bytes", "check_args",
           "triton_unsupported_reason", "pim_forward_op", "pim_backward_op", "aot_configs", "SPEC",
           "reference"]
