"""PIM, the Prompt-token Interaction Module (Eqs. 5-10): the op ``pim`` / ``pim_packed`` here, the
``nn.Module`` ``PromptTokenInteraction`` in ``avpt_kernels.modules`` (one name for one thing:
"PIM" is the abbreviation of the module's name). This docstring is the one account of the
algorithm; the kernels' docstrings give their shapes and refer here.

Files: ``kernels`` (token passes), ``algebra`` (per-image matrices, fused), ``dots`` (exact and
split tile products), ``launch`` (limits, launch choices, traffic model, packed weights,
``_forward`` / ``_backward``), ``op`` (checks, dispatch, custom ops, autograd), ``configs``
(the AOT list).

``pim(z[B,T,D], p[B,K,D], params, num_heads) -> (z_out[B,T,D], p_tilde[B,K,D])``

Triton path (``backend="triton"``). The products are reassociated so that the token tensor Z
(T x D per image) is only ever multiplied by small per-image matrices. Columns ``c = h*K + k``
index (head, prompt) pairs, padded to ``HKP`` (a power of two >= 16; padding is masked):

  logits1[t,c] = Z_t . Mq[:,c] + cq[c]     Mq = scale * Wq_h^T k1[k,h]  [D,HKP],  cq = scale bq_h.k1[k,h]
  S1 = softmax over k inside each head (per token, local to a row block)
  G = S1^T Z [HKP,D], colsum = sum_t S1 [HKP]   ->  msg_h = G_h Wv_h^T + colsum bv_h  (tiny)
  logits2[t,c] = Z_t . Mk[:,c]             Mk = scale * W'k_h^T q2[k,h]  (b'k only shifts a softmax
                                           row over T, so it drops out exactly)
  S2 = softmax over t per column c;  z_out_t = Z_t + alpha * (sum_c S2[c,t] Nv[c] + b'o),
                                           Nv[c] = v2[k,h] W'o_h^T  [HKP,D]

Forward: 5 launches and no torch algebra. The per-image matrices come from two small kernels
(``algebra``: Mq, cq before pass 1; p_tilde, Qexp or Mk, Nv and the gate alpha after it),
all reading the 20 weights from one flat fp32 vector (``pack_weights``; the module keeps its
weights that way). Z is read
twice from DRAM and z_out written once (the DESIGN floor) on the 2-read path, taken when the raw
prompt->token keys K2 = Z W'k^T [T, A] (fp32) are cheap: A padded to KEY_COLS (a power of two
>= 16) with 12 * KEY_COLS <= D * element size (``key_columns`` decides). The A-VPT model's layout
(A = 4 x 16 = 64, K = 6, so HKP = 32, with D = 768) takes the 2-read path in every dtype.
There logits2[t,(h,k)] = K2_t . Qexp[:,(h,k)], Qexp [KEY_COLS,HKP] block-diagonal
(scale * q2[k,h] in rows h*dh .. (h+1)*dh), which needs only q2, i.e. G, after pass 1:
  0. ``_t2p_small_kernel``    (per image) k1 = P W_k^T + b_k, Mq, cq; zeroes G and colsum.
  1. ``_t2p_reduce_kernel``   reads Z once from DRAM: G, colsum, and (2-read path) writes K2
     [B,T,KEY_COLS] in fp32 from the Z tiles already on chip. A program owns a chunk of
     row blocks of one image (``TARGET_PROGRAMS``); it parks the chunk's S1 in an L2-resident
     fp32 scratch, re-reads the chunk's Z tiles (L2 hits) D block by D block and adds its
     [HKP, D] partial of G once with fp32 atomics.
  1b. ``_p2t_small_kernel``  (per image) p_tilde, q2, v2, alpha, Qexp, Mk, Nv from G, colsum.
  2. ``_p2t_stats_kernel``    per-row-block max / sum-exp of logits2 (combined by pass 3), from
     (K2, Qexp) on the 2-read path (reads T x KEY_COLS, not Z), else from (Z, Mk) (reads Z).
  3. ``_p2t_update_kernel``   reads Z once, writes z_out once (and the attention if asked); its
     logits2 come from the same operands as pass 2's, so S2 is normalised exactly.
  => 2-read path: Z read twice, z_out written once, K2 written once and read twice (12 * KEY_COLS
     bytes a token in all, at most one Z read); fallback (larger A, or small D, where K2 would not
     pay): Z read 3 times. K2 is a forward temporary, never saved: the backward kernels rebuild
     logits2 = K2 Qexp from the Z tiles they load anyway (``_key_step``/``_key_logits``, the
     same operations and roundings as the forward), so that they agree with the saved statistics.

Backward: 5 launches and one zero-fill of the fp32 accumulators (pass A's sums, dMq, dcq and
the flat weight gradient), nothing of size T x A or T x K saved:
  A. ``_p2t_grad_reduce_kernel`` (chunked like 1) reads Z, dY once: E = S2^T dY, the
     chunk-centred F1 = (S2*(yn - delta_c))^T Z, F2 = S2^T Z, G1 = sum_chunks delta_c F2_chunk
     ([HKP,D]), sum_t dY and delta = sum_t S2*yn, with yn[t,c] = dY_t . Nv[c]; from them
     dNv = alpha E, dMk = alpha (F1 + G1 - delta F2) (no cancellation of two large sums: see the
     kernel), dalpha in closed form (delta is the softmax-backward row sum: no extra pass).
  B. ``_grad_z_kernel`` reads Z, dY once, writes dZ once (and dl1 [T,HKP] fp32 to scratch).
  C. ``_t2p_grad_reduce_kernel`` (chunked) reads Z once more: dMq = Z^T dl1.
  => Z read 3 times, dY twice, dZ written once (the floor: Z and dY twice each). On the 2-read
  path, A and B also recompute K2 = Z W'k^T (no extra traffic) for logits2 = K2 Qexp.
  Between A and B, ``_p2t_small_grad_kernel`` (per image) turns A's sums into dG, dcolsum,
  dz_0, dp_tilde and the p2t/gate weight gradients; after C, ``_t2p_small_grad_kernel`` gives
  dP and the t2p q/k weight gradients (fp32 atomic adds into one flat vector). Saved for
  backward: z, p, the flat weights and one fp32 state buffer (G, colsum, the softmax stats, the
  per-image matrices and the small kernels' intermediates): O(B*(K+HKP)*D).

Precision (the bounded-error rule, ``avpt_kernels.testing.assert_bounded_error``: in fp16 and
bf16 the error against the fp64 truth is at most 2x the torch backend's, which computes in fp32).
Products of two operands that are exact in the input dtype (Z, dY) are single 16-bit
tensor-core dots with fp32 accumulation: exact products; the weights are fp32 (master weights),
so Z W'k is a two-part split dot. Every product with an fp32
intermediate (softmax probabilities S1, S2, the per-image matrices Mq, Mk, Nv, the gradients
dG, dl1, dl2) is a split dot (``_mm_split``: the fp32 operand as 16-bit hi + lo parts, 2-3 dots,
~fp32 accuracy), because rounding those operands to 16 bits is amplified: a high-norm token
(x100) turns a 2^-9 relative error of Mq or Mk into logit errors of ~0.2 and softmax errors of
20%, and dMk is a difference of sums that cancel to many digits when the attention sits on one
token. K2 . Qexp (both fp32, KEY_COLS deep) is an IEEE fp32 dot. The per-image algebra kernels
use the same split dots (fp32 x fp32: 3 dots), IEEE fp32 for fp32 inputs.

Supported by the Triton path: fp32/fp16/bf16, D a multiple of 16 up to 1024, 1 <= K <= 16, head
width 8..64, A = H * head width <= 64, gate hidden width <= 64, H*K <= 32 head-prompt columns
(e.g. 4 heads x K <= 8, 12 heads x K <= 2; at 64 the per-image backward kernel spills in 16
bits: it holds [HKP, A] fp32 tiles and their split parts). Anything else: ``ValueError`` for
``backend="triton"``, the torch path for ``"auto"``.
"""
from .launch import (key_columns, num_columns, pack_weights, packed_size, pim_achieved_bytes,
                     pim_min_bytes, triton_unsupported_reason, unpack_weights, weight_shapes)
from .op import check_args, pim, pim_backward_op, pim_forward_op, pim_packed
from .configs import aot_configs

__all__ = ["pim", "pim_packed", "pack_weights", "unpack_weights", "packed_size", "weight_shapes",
           "pim_min_bytes", "pim_achieved_bytes", "key_columns", "num_columns", "check_args",
           "triton_unsupported_reason", "pim_forward_op", "pim_backward_op", "aot_configs"]
