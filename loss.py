"""The next-token loss without the (tokens × vocab) logits: a fused, chunked cross-entropy.

    python -m pytest tests/test_model.py -k loss    # equal to F.cross_entropy, loss and gradients

At 32k tokens and a 128k vocabulary the fp32 logits of one sequence are 16 GiB, and autograd
would keep them (and their softmax) until backward. Here they are formed LOSS_CHUNK rows at a
time and dropped: the logits are never whole.

The math. With logits z = h Wᵀ (one row per token), p = softmax(z) and the target y, the loss
of a row is ℓ = −log p_y, and its gradient with respect to the logits is ∂ℓ/∂z = p − onehot(y).
The mean over the n kept targets then gives, by the chain rule through z = h Wᵀ,

    ∂L/∂h = (p − onehot(y)) W / n        ∂L/∂W = (p − onehot(y))ᵀ h / n

Both need only the chunk's own p, so the forward pass computes them at once, chunk by chunk,
while the logits exist; backward then only multiplies the stored dh and dW by its incoming
scalar. Rows whose target is IGNORE (−100, PoSE's chunk-boundary labels) count in neither the
sum nor n. The cost: dh and dW are computed even if backward is never called, so a caller
under torch.no_grad() says so (grad_enabled) and gets the loss alone.
"""
import torch

IGNORE = -100  # targets the loss skips (PyTorch's ignore_index): PoSE's chunk-boundary labels
LOSS_CHUNK = 256  # rows of (rows, vocab) fp32 logits alive at once: 50 MB for a 49k vocabulary


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits h @ weightᵀ against targets (N,), IGNORE skipped.

    Same numbers as F.cross_entropy(F.linear(h, weight).float(), targets), same dtypes under
    autocast. `grad_enabled`: torch.is_grad_enabled() of the caller (inside forward it is off).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, grad_enabled):
        device = h.device.type  # F.linear's compute dtype: autocast's if on, else the operands' own
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            x, w = h.to(dtype), weight.to(dtype)
            keep = targets != IGNORE
            n = keep.sum().clamp(min=1)  # no targets: a loss of 0 (and no gradient), not 0 / 0
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            want_dh = grad_enabled and ctx.needs_input_grad[0]
            want_dw = grad_enabled and ctx.needs_input_grad[1]
            dh = torch.empty_like(h) if want_dh else None
            dw = torch.zeros_like(weight, dtype=torch.float32) if want_dw else None
            for start in range(0, len(x), LOSS_CHUNK):
                rows = slice(start, start + LOSS_CHUNK)
                y, rows_kept = targets[rows].clamp(min=0), keep[rows]
                log_probs = torch.log_softmax((x[rows] @ w.T).float(), dim=-1)  # (chunk, vocab)
                loss -= (log_probs.gather(1, y[:, None])[:, 0] * rows_kept).sum()
                if dh is None and dw is None:
                    continue
                grad = log_probs.exp_()  # p = softmax(z), in place
                grad[torch.arange(len(y)), y] -= 1  # p − onehot(y)
                grad = grad.mul_((rows_kept / n)[:, None]).to(dtype)  # / n; ignored rows: 0
                if dh is not None:
                    dh[rows] = grad @ w
                if dw is not None and dtype == dw.dtype:  # summed over the chunks in fp32
                    dw.addmm_(grad.T, x[rows])
                elif dw is not None:  # bf16 products, summed in fp32
                    dw += grad.T @ x[rows]
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * grad_loss,
                None if dw is None else (dw * grad_loss).to(ctx.weight_dtype), None, None)


def cross_entropy(h, weight, targets):
    """Mean next-token loss of hidden states h (N, dim) under the output projection `weight`."""
    return ChunkedCrossEntropy.apply(h, weight, targets, torch.is_grad_enabled())
