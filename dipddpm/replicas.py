"""K independent DIP runs trained in one process, in lockstep.

The K networks share an architecture but nothing else: each keeps its own parameters,
Adam state, BatchNorm statistics, network input, jitter generator and early-stopping
rule, so run k follows the same path as ``fit_dip`` on network k alone, up to
floating-point rounding. One loop, one backward pass, one fused Adam call and one
batched evaluation serve all K runs. Two ways to evaluate the K networks:

- ``vmap``: one batched computation. The K parameter sets are stacked every step and
  ``torch.func.vmap`` runs ``functional_call`` over them; each run sees its own batch
  of one, so training-mode BatchNorm normalises each run with its own statistics and
  updates its own (stacked) running averages. Convolutions become grouped convolutions.
- ``loop``: the K networks are called one after the other inside the same step. A run
  that its rule has stopped is not evaluated at all until the stage ends.

``auto`` picks vmap on CUDA, where one wide computation fills the device, and loop on
the CPU, where grouped convolutions measured slower than K separate ones for the
full-size skip network (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, vmap

from dipddpm.dip import (DipResult, DipSettings, Stage, autocast_context, backward_rows, fit_dip, make_optimizer,
                         run_loop)
from dipddpm.early_stop import NoStop

MODES = ("auto", "vmap", "loop")


def replica_seeds(seed: int, count: int) -> list[int]:
    """The seeds of ``count`` replicas started from ``seed``: seed, seed + 1, ..."""
    return [int(seed) + k for k in range(int(count))]


def average_outputs(outputs: list[torch.Tensor], collapsed: list[bool]) -> tuple[torch.Tensor, list[int]]:
    """The pixel-wise mean of the replicas' returned images (each (1, C, H, W)) and the indices
    averaged: mean_k x_k over the replicas that did not collapse, or over all when every one did
    (a collapsed replica's constant image would only pull the average towards that constant).
    ``collapsed`` comes from :func:`dipddpm.dip.is_collapsed`, which reads each replica's output,
    loss and training target, never the clean image unless that is the target."""
    if len(outputs) != len(collapsed) or not outputs:
        raise ValueError(f"{len(outputs)} outputs but {len(collapsed)} collapse flags")
    kept = [k for k, dead in enumerate(collapsed) if not dead] or list(range(len(outputs)))
    return torch.stack([outputs[k] for k in kept]).mean(dim=0), kept


def resolve_mode(mode: str, device) -> str:
    """auto -> vmap on CUDA, loop elsewhere."""
    if mode not in MODES:
        raise ValueError(f"replica mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "vmap" if torch.device(device).type == "cuda" else "loop"
    return mode


class ReplicaRuns:
    """K networks of one architecture as the trainee of :func:`dipddpm.dip.run_loop`."""

    def __init__(self, nets: list[torch.nn.Module], settings: DipSettings, mode: str = "loop"):
        if settings.channels_last:
            raise ValueError("channels_last is not supported with replicas")
        self.nets, self.settings, self.count = list(nets), settings, len(nets)
        shapes = [[(n, tuple(p.shape)) for n, p in net.named_parameters()] for net in self.nets]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("replica networks must share one architecture")
        self.mode = mode
        self.names = [name for name, _ in shapes[0]]
        self.params = [[dict(net.named_parameters())[name] for name in self.names] for net in self.nets]
        self.optimizer = make_optimizer([p for params in self.params for p in params], settings)
        if mode == "vmap":
            buffer_sets = [dict(net.named_buffers()) for net in self.nets]
            self.buffers = {name: torch.stack([b[name] for b in buffer_sets]) for name in buffer_sets[0]}
            self.template = copy.deepcopy(self.nets[0]).to("meta")
            batched = vmap(self._one, in_dims=(0, 0, 0))
            self.batched = torch.compile(batched) if settings.compile else batched
        else:
            self.calls = [torch.compile(net) if settings.compile else net for net in self.nets]

    def _one(self, params: dict, buffers: dict, net_input: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (net_input,))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """vmap mode: (K, Cin, H, W), row k for network k -> (K, C, H, W) in one batched
        call. Stopped runs are computed too; ``step`` skips them and ``hold`` keeps their
        BatchNorm statistics. (Loop mode calls the networks inside ``train_step``.)"""
        stacked = {name: torch.stack([p[i] for p in self.params]) for i, name in enumerate(self.names)}
        return self.batched(stacked, self.buffers, inputs.unsqueeze(1)).squeeze(1)

    def train_step(self, inputs: torch.Tensor, target: torch.Tensor, active: list[bool]):
        """Forward and backward of the K runs: (outputs, per-run losses), detached.

        In loop mode each network's backward pass follows its own forward pass, so one
        network's activations are alive at a time; a stopped run contributes zeros.
        """
        if self.mode == "vmap":
            with autocast_context(inputs.device, self.settings.autocast):
                output = self.forward(inputs)
            return output.detach(), backward_rows(output, target)
        outputs, losses = [None] * self.count, [None] * self.count
        for k, (call, on) in enumerate(zip(self.calls, active)):
            if on:
                with autocast_context(inputs.device, self.settings.autocast):
                    output = call(inputs[k:k + 1])
                losses[k] = backward_rows(output, target if target.shape[0] == 1 else target[k:k + 1])
                outputs[k] = output.detach()
        reference = next(out for out in outputs if out is not None)
        outputs = [torch.zeros_like(reference) if out is None else out for out in outputs]
        losses = [torch.zeros(1, device=inputs.device) if loss is None else loss for loss in losses]
        return torch.cat(outputs), torch.cat(losses)

    @torch.no_grad()
    def forward_no_grad(self, inputs: torch.Tensor, eval_mode: bool) -> torch.Tensor:
        """Every network's forward pass outside training, (K, Cin, H, W) -> (K, C, H, W), in eval
        mode or not (train mode updates BatchNorm statistics); the networks end in train mode."""
        nets = [self.template] if self.mode == "vmap" else self.nets
        for net in nets:
            net.train(not eval_mode)
        with autocast_context(inputs.device, self.settings.autocast):
            if self.mode == "vmap":
                output = self.forward(inputs)
            else:
                output = torch.cat([call(inputs[k:k + 1]) for k, call in enumerate(self.calls)])
        for net in nets:
            net.train()
        return output.float()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, active: list[bool]) -> None:
        """One Adam step for the active runs (a run without gradients is skipped by Adam)."""
        for params, on in zip(self.params, active):
            if not on:
                for param in params:
                    param.grad = None
        self.optimizer.step()

    def reset_optimizers(self) -> None:
        self.optimizer = make_optimizer([p for params in self.params for p in params], self.settings)

    def hold(self, k: int) -> dict:
        """Network k's BatchNorm statistics where the other runs' steps would change them (vmap)."""
        if self.mode != "vmap":
            return {}
        return {name: buffer[k].clone() for name, buffer in self.buffers.items()}

    @torch.no_grad()
    def release(self, k: int, held: dict) -> None:
        for name, value in held.items():
            self.buffers[name][k].copy_(value)

    @torch.no_grad()
    def weights(self, k: int) -> dict:
        if self.mode != "vmap":
            return copy.deepcopy(self.nets[k].state_dict())
        return {"params": [p.detach().clone() for p in self.params[k]], "buffers": self.hold(k)}

    @torch.no_grad()
    def load_weights(self, k: int, state: dict) -> None:
        if self.mode != "vmap":
            self.nets[k].load_state_dict(state)
            return
        for param, value in zip(self.params[k], state["params"]):
            param.copy_(value)
        self.release(k, state["buffers"])

    @torch.no_grad()
    def finish(self) -> None:
        """Copy the stacked BatchNorm statistics back into the K networks (vmap)."""
        if self.mode != "vmap":
            return
        for k, net in enumerate(self.nets):
            own = dict(net.named_buffers())
            for name, buffer in self.buffers.items():
                own[name].copy_(buffer[k])


def stack_stages(stages_per_run: list[list[Stage]]) -> list[Stage]:
    """Per-run stage lists (same plan) -> one list of stages with batched tensors.

    net_input becomes (K, Cin, H, W); the target stays (1, C, H, W) when every run has
    the same target, else it is stacked too.
    """
    plans = [[(s.index, s.steps) for s in stages] for stages in stages_per_run]
    if any(plan != plans[0] for plan in plans[1:]):
        raise ValueError("replicas must follow the same stage plan")
    batched = []
    for i, first in enumerate(stages_per_run[0]):
        column = [stages[i] for stages in stages_per_run]
        same_target = all(s.target is first.target or torch.equal(s.target, first.target) for s in column)
        batched.append(Stage(
            index=first.index, steps=first.steps,
            net_input=torch.cat([s.net_input for s in column]),
            target=first.target if same_target else torch.cat([s.target for s in column]),
            info=dict(first.info),
        ))
    return batched


def fit_dip_replicas(
    nets: list[torch.nn.Module],
    stages: list[list[Stage]],
    settings: DipSettings,
    early_stops: list | None = None,
    clean: torch.Tensor | None = None,
    generators: list | None = None,
    mode: str = "auto",
) -> list[DipResult]:
    """``fit_dip`` for K networks at once: stages[k], early_stops[k] and generators[k]
    belong to nets[k]; ``mode`` is auto | vmap | loop (see the module docstring).
    Returns K results equal to K separate ``fit_dip`` calls (their ``seconds`` is the
    shared wall time). One network runs through ``fit_dip`` itself.
    """
    count = len(nets)
    if len(stages) != count:
        raise ValueError(f"{count} networks but {len(stages)} stage lists")
    early_stops = list(early_stops) if early_stops is not None else [NoStop() for _ in range(count)]
    generators = list(generators) if generators is not None else [None] * count
    if count == 1:
        return [fit_dip(nets[0], stages[0], settings, early_stops[0], clean=clean, generator=generators[0])]
    if len({id(rule) for rule in early_stops}) != count:
        raise ValueError("each replica needs its own early-stopping rule object")
    if any(rule.uses_clean_image for rule in early_stops) and clean is None:
        raise ValueError("early stopping on PSNR needs the clean image")
    for net in nets:
        net.train()
    batched = stack_stages(stages)
    runs = ReplicaRuns(nets, settings, resolve_mode(mode, batched[0].target.device))
    return run_loop(runs, batched, settings, early_stops,
                    clean=clean, generators=generators)
