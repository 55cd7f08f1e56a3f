"""Per-token log-probs through the LM head on CPU: TRL's fused head with one projection instead of folded tiles.

TRL (1.16) scores every SFT, DPO and GRPO batch through `ChunkedLogProbFunction`: the hidden states go through the LM
head in tiles of 32,768 vocabulary columns, and each tile is folded into running log-sum-exp statistics, by a Triton
kernel on a GPU and elsewhere by a dozen torch element-wise passes per tile, forward and backward, with the logits'
gradient multiplied back in float32. That keeps the [tokens, vocabulary] logits out of GPU memory. On a CPU stage of a
small model the labelled positions of a batch are a few hundred and their logits a few tens of MB, and the passes cost
more than the projection: for 350 positions and SmolLM2's 49,152-token vocabulary (bf16 autocast, 2 cores) forward and
backward took 0.69-0.91 s in TRL's function and 0.33-0.41 s here. Nothing in torch or TRL offers this, so it is
written here.

`CpuLogProb` takes TRL's arguments and returns its outputs: one projection in autocast's dtype per chunk of positions,
torch's fused `log_softmax`, the probabilities kept for the backward when they fit in one chunk (else projected
again), and the hidden states' gradient multiplied in that dtype, as an unfused `lm_head` under autocast does. `apply` sends
anything else (CUDA, logit soft-capping) to TRL's function. The stages install it on CPU with `use_on_cpu`.
"""

import contextlib

import torch

OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's, in its order
CHUNK_ELEMENTS = 1 << 25  # logits per chunk of positions: 128 MB in float32, a few such temporaries at once


def chunks(positions: int, vocab: int) -> list[tuple[int, int]]:
    size = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [(start, min(start + size, positions)) for start in range(0, positions, size)] or [(0, 0)]


def project(hidden, weight, bias):
    logits = torch.mm(hidden, weight.t())
    return logits if bias is None else logits.add_(bias)  # rounded as TRL rounds it: the product, then the sum


class CpuLogProb(torch.autograd.Function):
    """TRL's `ChunkedLogProbFunction(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
    logit_scale, outputs)` -> (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each None unless asked
    for; without soft-capping (`apply` routes that to TRL). `chunk_size` (TRL's vocabulary tile) is not used."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        ctx.set_materialize_grads(False)  # entropy is often logged only: no gradient pass for it then
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        scale = logit_scale / temperature
        weight_c, bias_c = weight.to(dtype), None if bias is None else bias.to(dtype)
        spans = chunks(hidden.shape[0], weight.shape[0])
        names = ("log_probs", "log_z", *outputs)
        parts = {name: [] for name in names}
        # one chunk under a graph: its probabilities are kept for the backward, which needs nothing else of the logits
        keep = len(spans) == 1 and any(ctx.needs_input_grad[:3])
        ctx.probs = None
        with torch.autocast("cpu", enabled=False):
            for start, end in spans:
                logits = project(hidden[start:end].to(dtype), weight_c, bias_c)
                z = logits.float() if scale == 1.0 else logits.float() * scale
                del logits
                log_p = torch.log_softmax(z, dim=-1)
                target = targets[start:end, None]
                parts["log_probs"].append(log_p.gather(-1, target).squeeze(-1))
                parts["log_z"].append(z.gather(-1, target).squeeze(-1) - parts["log_probs"][-1])
                if "mean_logits" in outputs:
                    parts["mean_logits"].append(z.mean(-1))
                if "is_top1" in outputs:  # argmax is the first maximum, as in TRL: a tie with an earlier token fails
                    parts["is_top1"].append(log_p.argmax(-1) == targets[start:end])
                if keep or "entropy" in outputs or "log_sum_sq_probs" in outputs:
                    p = torch.exp(log_p, out=z)  # into z's memory: z is not read again
                    if "entropy" in outputs:  # -sum p log p as a batched dot: no [positions, vocab] product
                        parts["entropy"].append(-torch.bmm(p.unsqueeze(1), log_p.unsqueeze(2)).view(-1))
                    if "log_sum_sq_probs" in outputs:
                        parts["log_sum_sq_probs"].append(torch.bmm(p.unsqueeze(1), p.unsqueeze(2)).view(-1).log())
                    if keep:
                        ctx.probs = p  # an attribute, not a saved tensor: the backward overwrites it in place
        out = {name: torch.cat(values) for name, values in parts.items()}
        entropy = out.get("entropy")
        ctx.save_for_backward(hidden, weight, bias, targets, out["log_z"], out["log_z"] if entropy is None else entropy)
        ctx.dtype, ctx.scale, ctx.spans = dtype, scale, spans
        extras = [out.get(name) for name in OPTIONAL_OUTPUTS[1:]]  # after entropy: the outputs without a gradient
        ctx.mark_non_differentiable(*(x for x in extras if x is not None))
        return out["log_probs"], entropy, *extras

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None  # used up here: a second backward through the graph projects again
        with maybe_gather_lm_head_ctx(weight, bias):  # a ZeRO-3 partitioned head, gathered as TRL's backward does
            return gradients(ctx, grad_log_probs, grad_entropy, hidden, weight, bias, targets, log_z, entropy, probs)


def gradients(ctx, grad_log_probs, grad_entropy, hidden, weight, bias, targets, log_z, entropy, probs) -> tuple:
    """`CpuLogProb.backward` once the saved tensors are unpacked (and the head gathered). `probs`: the forward's
    probabilities of its one chunk, or None (several chunks, a second backward), when each chunk is projected again."""
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    weight_c, bias_c = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
    grad_hidden = torch.empty_like(hidden) if needs_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if needs_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32) if needs_bias else None
    with torch.autocast("cpu", enabled=False):
        for start, end in ctx.spans:
            hidden_c = hidden[start:end].to(ctx.dtype)
            # from here on in place, on memory nothing else reads: each fresh [positions, vocabulary] buffer cost
            # more in page faults than the pass that fills it (68 MB: 30 ms against 8 ms for an exp, 2 cores)
            if probs is not None and grad_entropy is None:
                grad = probs  # p, which the log-probs' gradient below turns into its own
            else:
                z = project(hidden_c, weight_c, bias_c).float()
                if ctx.scale != 1.0:
                    z.mul_(ctx.scale)
                log_p = z.sub_(log_z[start:end, None])
                if grad_entropy is None:
                    grad = log_p.exp_()  # p, in the same memory: log p is not needed again
                else:  # d entropy / dz_j = -p_j (log p_j + entropy) needs log p as well as p
                    p = log_p.exp()
                    grad = p.clone()
            if grad_log_probs is None:
                grad.zero_()
            else:  # d log p_target / dz_j = 1[j = target] - p_j
                g = grad_log_probs[start:end, None].float()
                grad.mul_(-g).scatter_add_(-1, targets[start:end, None], g)
            if grad_entropy is not None:
                grad.sub_(grad_entropy[start:end, None].float() * p * (log_p + entropy[start:end, None]))
            if ctx.scale != 1.0:
                grad.mul_(ctx.scale)
            grad_c = grad.to(ctx.dtype)
            if needs_hidden:
                grad_hidden[start:end] = torch.mm(grad_c, weight_c)
            if needs_weight:
                grad_weight += torch.mm(grad_c.t(), hidden_c).float()
            if needs_bias:
                grad_bias += grad.sum(0)
    return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None, None)


def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
          outputs=OPTIONAL_OUTPUTS):
    """TRL's `ChunkedLogProbFunction.apply`, through `CpuLogProb` for CPU tensors without soft-capping."""
    from trl.kernels import ChunkedLogProbFunction

    args = (hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)
    if hidden.device.type != "cpu" or final_logit_softcapping is not None:
        return ChunkedLogProbFunction.apply(*args)
    return CpuLogProb.apply(*args)


@contextlib.contextmanager
def use_on_cpu():
    """TRL's fused LM head (trl 1.16, `add_fused_lm_head`) on CPU, for the duration:

    - it projects only the positions that carry a label, as it already does on CUDA/XPU. TRL compacts to them only
      where its Triton kernels run and otherwise scores every position, so that tile shapes stay fixed for graph
      compilers (Neuron); eager CPU has nothing to recompile, and the unlabelled positions (prompts, system text) are
      most of an SFT, DPO or GRPO batch: a step of the default recipe's SFT took 2.2 s instead of 3.0 s. The
      labelled positions' log-probs are the same either way, the others zero either way;
    - it scores them through `apply` above instead of TRL's tiles.

    TRL has no switch for either, so the two module-level names its fused forward reads are swapped and put back."""
    import trl.trainer.utils as trl_utils

    original_check = getattr(trl_utils, "_use_triton", None)
    original_function = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if original_check is None or original_function is None:  # another TRL layout: keep its behaviour
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original_check(device)
    trl_utils._ChunkedLogProbFunction = CpuHead
    try:
        yield
    finally:
        trl_utils._use_triton = original_check
        trl_utils._ChunkedLogProbFunction = original_function


class CpuHead:
    """What `trl.trainer.utils` calls `_ChunkedLogProbFunction` while `use_on_cpu` is on: it only calls `.apply`."""

    apply = staticmethod(apply)
