"""Train many same-shaped models at once: the pruned copies of one dense model.

The copies that a sweep retrains (methods x levels, or seeds) differ only in weights and masks,
so we stack their parameters (``torch.func.stack_module_state``) and run one vectorised
forward/backward (``vmap`` over ``functional_call``). Adam and SGD act element-wise, so one
optimiser over the stacked tensors is exactly K separate optimisers. Each model draws its own
batches from its own seed; models with the same seed share one batch (no copy). Buffers are
stacked too, so batch norm keeps per-model running statistics (updated in place under vmap)
and they are copied back with the weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from .train import TrainConfig, TrainResult, batch_stream, make_optimizer, set_lr


def batchable(models: Sequence[nn.Module]) -> bool:
    """Whether :func:`train_batched` can train these models together."""
    try:
        _check_models(models)
    except ValueError:
        return False
    return True


def batch_why_not(models: Sequence[nn.Module], x: Tensor, config: TrainConfig) -> str | None:
    """Why :func:`train_batched` cannot train ``models`` together (None: it can)."""
    try:
        _check_models(models)
    except ValueError as error:
        return str(error)
    return None


def _check_models(models: Sequence[nn.Module]) -> None:
    if not models:
        raise ValueError("train_batched needs at least one model")
    names = [[(n, p.shape) for n, p in m.named_parameters()] for m in models]
    masks = [sorted(n for n, _ in m.named_buffers() if n.endswith("weight_mask")) for m in models]
    if any(n != names[0] for n in names) or any(m != masks[0] for m in masks):
        raise ValueError(
            "train_batched needs models of one architecture with the same layers pruned "
            "(the same parameter names and shapes); train the others separately"
        )
    for m in models:
        for name, module in m.named_modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                raise ValueError(
                    f"module '{name}' ({type(module).__name__}) draws randomness that vmap "
                    "does not batch here; use train() per model"
                )


@contextlib.contextmanager
def _fp32_batchnorm(model: nn.Module) -> Iterator[None]:
    """While in effect, ``model``'s batch-norm layers normalise a bf16/fp16 input in float32
    and hand back the input's dtype.

    Under bf16 autocast a conv gives bf16, and batch norm (no autocast policy on CUDA or CPU)
    gets that bf16 input next to float32 running statistics and affine weights. train()'s
    kernels take the mix and compute in float32; under vmap's batching rule for batch norm
    (which applies the affine weights itself, after the kernel) it fails: ``Expected
    running_mean to have type BFloat16 but got Float`` on an H200, ``expected scalar type
    BFloat16 but found Float`` on the CPU (pytorch/pytorch#184890 is the like failure of vmap
    over a backward). Normalising the upcast input is what the mixed kernels do anyway
    (float32 statistics of the same bf16 values); casting the result back keeps what follows
    (residual sums, the next layer) in train()'s dtypes.
    """
    modules = [m for m in model.modules() if isinstance(m, _BatchNorm) and "forward" not in vars(m)]
    for module in modules:
        module.forward = _upcasting(module)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        for module in modules:
            del module.forward  # the class's forward again


def _upcasting(module: _BatchNorm) -> Callable[[Tensor], Tensor]:
    forward = type(module).forward

    def upcast_forward(x: Tensor) -> Tensor:
        if x.dtype not in (torch.bfloat16, torch.float16):
            return forward(module, x)
        return forward(module, x.float()).to(x.dtype)

    return upcast_forward


def train_batched(
    models: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    *,
    seeds: Sequence[int] | None = None,
) -> list[TrainResult]:
    """Train ``models`` in place, each as ``train(model, x, y, config)`` with its own seed would.

    ``seeds`` defaults to ``config.seed`` for every model. Masks stay applied (the masked
    entries of ``weight_orig`` are reset to 0 after each update, as :func:`train` does).
    Results match separate runs up to floating-point summation order. ``precision='bf16'``
    autocasts as :func:`train` does, batch norm normalising in float32 as train()'s kernels do
    (on the CPU autocast misses some of vmap's batched ops, convs and Linears with a bias, which
    then run in float32). ``channels_last`` and ``compile`` do not apply here (the stacked
    weights have an extra model dimension), so this loop always runs eager.
    """
    _check_models(models)
    seeds = list(seeds) if seeds is not None else [config.seed] * len(models)
    if len(seeds) != len(models):
        raise ValueError(f"got {len(seeds)} seeds for {len(models)} models")
    params, buffers = stack_module_state(list(models))
    base = models[0]
    masks = [
        (params[n.removesuffix("_mask") + "_orig"], buffers[n])
        for n in buffers
        if n.endswith("weight_mask") and n.removesuffix("_mask") + "_orig" in params
    ]
    unique = sorted(set(seeds))
    streams = {s: batch_stream(x, y, config, seed=s) for s in unique}
    which = torch.tensor([unique.index(s) for s in seeds], device=x.device)
    shared = len(unique) == 1

    bf16 = config.precision == "bf16"

    def loss_one(p: dict[str, Tensor], b: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        if not bf16:  # as train(): the loss in the model's own dtype (float64 stays float64)
            return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)
        with torch.autocast(xb.device.type, dtype=torch.bfloat16), _fp32_batchnorm(base):
            logits = functional_call(base, (p, b), (xb,))
        return F.cross_entropy(logits.float(), yb)

    batched_loss = vmap(loss_one, in_dims=(0, 0, None if shared else 0, None if shared else 0))
    # unfused on purpose: train.py's fused optimiser over stacked tensors drifted ~5e-3 from
    # separate runs within 25 steps in tests/test_batched.py; the unfused one stays within 1e-4
    optimizer = make_optimizer(list(params.values()), config, fused=False)
    tail: list[Tensor] = []
    tail_start = config.steps - min(100, config.steps)
    modes = [(m, m.training) for model in models for m in model.modules()]
    start = time.perf_counter()
    try:
        for model in models:
            model.train()
        with torch.no_grad():
            for orig, mask in masks:
                orig.mul_(mask)
        for step in range(1, config.steps + 1):
            set_lr(optimizer, config, step)  # the schedule entered at config.schedule_start
            drawn = [next(streams[s]) for s in unique]
            if shared:
                xb, yb = drawn[0]
            else:
                xb = torch.stack([b[0] for b in drawn])[which]
                yb = torch.stack([b[1] for b in drawn])[which]
            losses = batched_loss(params, buffers, xb, yb)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            with torch.no_grad():
                for orig, mask in masks:
                    orig.mul_(mask)
            if step > tail_start:
                tail.append(losses.detach())
    finally:
        for module, flag in modes:
            module.training = flag
    wall = time.perf_counter() - start
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(params[name][i])
            for name, b in model.named_buffers():  # batch-norm statistics (masks: unchanged)
                b.copy_(buffers[name][i])
    final = torch.stack(tail).mean(0).tolist() if tail else [math.nan] * len(models)
    return [TrainResult(config.steps, loss, wall, {}) for loss in final]
